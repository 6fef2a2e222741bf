"""The built-in services, written with the public service API only.

``admin`` and ``auth`` are plain services. ``kv``, ``files``, ``jobs`` and
the backups behind ``admin.backup`` are *components*: a service plus the
background work it needs (expiry sweeps, job runners, scheduled backups),
started after the store opens and closed before it closes.
"""

from __future__ import annotations

from typing import Protocol

from bastion.service import Service

__all__ = ["Component", "HostedComponent"]


class Component(Protocol):
    """Background work with a lifecycle; ``bastion serve`` drives it."""

    async def start(self) -> None:
        """Start background work; called once the store is open."""

    async def aclose(self) -> None:
        """Stop background work; idempotent; called before the store closes."""


class HostedComponent(Component, Protocol):
    """A component that is also a service."""

    @property
    def service(self) -> Service: ...
