"""The ``bastion`` command (filled in by the CLI module)."""

from __future__ import annotations


def main() -> None:
    raise SystemExit("bastion CLI: not built yet")
