"""``bastion backup`` and ``bastion restore`` (being written: issue 5)."""

from __future__ import annotations

__all__ = ["backup", "restore"]


def backup() -> None:
    """Take a verified backup archive of a data directory and its store."""


def restore() -> None:
    """Verify a backup archive, then restore it into a data directory."""
