"""The ``bastion`` command: ``serve``, ``call``, ``methods``, ``login``, ``user``, ``token``, ``cert``.

Business logic lives in the package; this layer parses arguments, reads the
configuration at the entry point, and prints results (data to stdout,
messages to stderr, a non-zero exit code on failure).
"""

from __future__ import annotations

__all__ = ["main"]


def main() -> None:
    """Console-script entry point."""
    from bastion.cli.app import main as run

    run()
