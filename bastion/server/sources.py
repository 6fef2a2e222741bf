"""Connections per source address: those open, and those still in their handshake (``Server``'s accept).

Theory of operation. A source is a client's address as the per-source
limits count it (``source_key``: an IPv6 one by its ``/ipv6_prefix``
network). ``SourceCounts`` keeps, per source, the connections open
(``limits.max_connections_per_source``) and, of them, those still in their
handshake -- from accept until the server sends the Welcome, or the
connection closes (``limits.max_handshakes_per_source``). A new connection
from a source at either count is closed at accept, before any TLS work, and
counted: ``rejected_connections`` and ``rejected_connections_per_source`` or
``rejected_handshakes_per_source``. The second bounds how many of the
connections anyone may open without a word (the unreserved ones:
``limits.reserved_connections``) one address can hold for up to
``handshake_timeout`` each, well below its share of open connections.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

from bastion.config import ServerLimits
from bastion.security.throttle import source_key

__all__ = ["SourceCounts"]


class Session(Protocol):
    """What is read of a ``ServerSession`` here."""

    source: str | None  # its peer's address (None: not from a listener, counted in nothing)
    handshaking: bool  # still counted as in its handshake


class SourceCounts:
    def __init__(self, limits: ServerLimits, counters: Counter[str], ipv6_prefix: int) -> None:
        """``counters``: the server's; ``ipv6_prefix``: the network an IPv6 source counts by (its key is
        given to ``refuse`` and ``take``; ``handshake_over`` and ``give_back`` make it from the session)."""
        self._limits = limits
        self._counters = counters
        self._ipv6_prefix = ipv6_prefix
        self._open: dict[str, int] = {}
        self._handshaking: dict[str, int] = {}

    def refuse(self, source: str) -> bool:
        """True, counted, if a new connection from ``source`` is over a per-source limit."""
        if self._open.get(source, 0) >= self._limits.max_connections_per_source:
            self._counters["rejected_connections_per_source"] += 1
        elif self._handshaking.get(source, 0) >= self._limits.max_handshakes_per_source:
            self._counters["rejected_handshakes_per_source"] += 1
        else:
            return False
        self._counters["rejected_connections"] += 1
        return True

    def take(self, source: str) -> None:
        """Count a connection from ``source`` admitted: open, and in its handshake."""
        self._open[source] = self._open.get(source, 0) + 1
        self._handshaking[source] = self._handshaking.get(source, 0) + 1

    def handshake_over(self, session: Session) -> None:
        """``session``'s handshake ended (a Welcome sent, or it closed): once; sessions not from a listener
        (no source) count in none."""
        if session.source is not None and session.handshaking:
            session.handshaking = False
            _decrement(self._handshaking, source_key(session.source, self._ipv6_prefix))

    def give_back(self, session: Session) -> None:
        """``session`` closed (``Server.release``, once): its source's connection, and its handshake if still
        in it."""
        assert session.source is not None
        self.handshake_over(session)
        _decrement(self._open, source_key(session.source, self._ipv6_prefix))


def _decrement(counts: dict[str, int], source: str) -> None:
    left = counts[source] - 1
    if left:
        counts[source] = left
    else:
        del counts[source]
