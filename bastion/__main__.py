"""``python -m bastion``: the same as the ``bastion`` command."""

from bastion.cli import main

if __name__ == "__main__":
    main()
