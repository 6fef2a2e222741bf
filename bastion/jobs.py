"""Registering job functions for the ``jobs`` service (being written: issue 5)."""

from __future__ import annotations

__all__ = ["JobRegistry"]


class JobRegistry:
    """The job functions a server may run, by name."""
