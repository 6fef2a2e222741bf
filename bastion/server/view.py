"""What handlers may see of the server: its ``ServerInfo`` (``Context.server``), read-only.

``ServerView`` answers version, start time, draining, statistics, limits,
the caller's rate-limit usage and the method table's description, and
nothing that could change the server.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from bastion._version import __version__
from bastion.security.principal import Principal
from bastion.server.memtrim import memory_stats

if TYPE_CHECKING:
    from bastion.server.server import Server

__all__ = ["ServerView"]


class ServerView:
    """The narrow view of the server that services get (``ServerInfo``)."""

    def __init__(self, server: Server) -> None:
        self._server = server

    @property
    def version(self) -> str:
        return __version__

    @property
    def started_at(self) -> float:
        return self._server.started_at

    @property
    def draining(self) -> bool:
        return self._server.draining

    def stats(self) -> Mapping[str, int | float]:
        """``Server.stats()``, the heap trims after connection storms (memtrim.py) and the keyed calls
        run on after their connection was lost (``IdempotencyKeys.stats``)."""
        keys = self._server.idempotency
        return {**self._server.stats(), **memory_stats(self._server), **(keys.stats() if keys is not None else {})}

    def limits(self) -> Mapping[str, int | float]:
        """The server's limits, each as the number it runs with (a default worked out from others included)."""
        limits = self._server.limits
        out: dict[str, int | float] = msgspec.structs.asdict(limits)
        out["reserved_connections"] = limits.max_connections - limits.anonymous_connections
        return out

    async def rate_usage(self, principal: Principal, peer: str) -> Mapping[str, Any]:
        limiter = self._server.limiter
        if limiter is None:
            return {"enabled": False}
        return await limiter.usage(principal, peer.rsplit(":", 1)[0].strip("[]"))

    def describe(self) -> list[dict[str, Any]]:
        return self._server.table.describe()
