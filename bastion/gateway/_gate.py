"""The gateway's connection caps: in total (``max_connections``) and per address (``max_connections_per_source``).

Theory of operation. Without them, one client on any network that reaches
the port could open WebSockets (which answer the gateway's pings and so
stay open for ever), keep-alive connections or connections mid-handshake
by the thousand, until the process ran out of file descriptors -- and the
native port, in the same process, with it. So every connection the
gateway's listener accepts is admitted here first, by the outermost
protocol (the TLS layer over HTTPS, _tls.py; the HTTP protocol over
plaintext, _protocol.py), and let go when it closes -- as a WebSocket too,
after the HTTP protocol handed the connection over.

A connection past a cap is refused: over plaintext with an answer (429
RESOURCE_EXHAUSTED past the per-address cap, 503 UNAVAILABLE past the
total, ``Retry-After: 1``, the usual headers) written at once, then closed
as its request arrives or a second later (never held for ``header_timeout``:
past the caps is where an attacker's connections are); over TLS, where nothing can be said before a handshake, it is
closed at once. Each refusal is counted (``bastion_rejections_total``,
reasons ``gateway_connection_limit`` and ``gateway_source_connection_limit``).
An IPv6 address counts by its ``rate_limits.ipv6_prefix`` network (the
server's ``ipv6_prefix``), as the rate limits and the native port's cap
count it. The address is the TCP peer's: behind a reverse proxy every client shares
the proxy's, so there ``max_connections_per_source = 0`` turns the
per-address cap off.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from bastion.exceptions import CallError, ResourceExhausted, Unavailable, UsageError
from bastion.gateway._http import NO_STORE, SECURITY_HEADERS, error_body, http_status
from bastion.gateway._shared import _encoder
from bastion.security.throttle import source_key

__all__ = ["ConnectionGate", "peer_host", "refusal_answer"]


def peer_host(transport: asyncio.BaseTransport) -> str:
    """The client's address (no port) of a connection; "" if it has none (a Unix socket)."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, list | tuple) and peer:
        return str(peer[0])
    return ""


def source_of(host: str, ipv6_prefix: int = 64) -> str:
    """What the per-address cap counts ``host`` as: an IPv4 address (IPv4-mapped IPv6 too) as is, an IPv6
    one by its ``/ipv6_prefix`` network (``rate_limits.ipv6_prefix``, as the native port's cap and the rate
    limits count it; /64 by default, which one host usually owns whole)."""
    return source_key(host, ipv6_prefix) if host else host


class ConnectionGate:
    """Open connections in total and per client address, against the caps (0: no per-address cap)."""

    def __init__(self, total: int, per_source: int, counters: Counter[str], *, ipv6_prefix: int = 64) -> None:
        if not 1 <= ipv6_prefix <= 128:
            raise UsageError(f"ConnectionGate: ipv6_prefix must be 1..128, got {ipv6_prefix!r}")
        self.total = total
        self.ipv6_prefix = ipv6_prefix
        self.per_source = per_source
        self.counters = counters
        self.open = 0
        self.by_source: dict[str, int] = {}
        self.lingering = 0  # refused plaintext connections held open a moment for their answer (_protocol.py)
        self.closing = False  # the gateway is stopping: connections still arriving are dropped at once

    def admit(self, host: str) -> CallError | None:
        """Take a slot for a connection from ``host``; the error to refuse it with if it is past a cap."""
        if self.open >= self.total:
            self.counters["gateway_rejected_connections"] += 1
            return Unavailable(
                f"the gateway has {self.total} connections open (gateway.max_connections)", retry_after=1.0
            )
        host = source_of(host, self.ipv6_prefix)
        held = self.by_source.get(host, 0)
        if self.per_source and held >= self.per_source:
            self.counters["gateway_rejected_connections_per_source"] += 1
            message = f"{self.per_source} connections open from this address (gateway.max_connections_per_source)"
            return ResourceExhausted(message, retry_after=1.0)
        self.open += 1
        self.by_source[host] = held + 1
        return None

    def release(self, host: str) -> None:
        host = source_of(host, self.ipv6_prefix)
        self.open -= 1
        held = self.by_source.get(host, 0) - 1
        if held > 0:
            self.by_source[host] = held
        else:
            self.by_source.pop(host, None)


def refusal_answer(error: CallError) -> bytes:
    """The whole HTTP answer refusing a connection past a cap (it then closes)."""
    body = _encoder.encode(error_body(error))
    status = http_status(error.status)
    reason = b"Too Many Requests" if status == 429 else b"Service Unavailable"
    head = [b"HTTP/1.1 %d " % status, reason, b"\r\ncontent-type: application/json\r\n"]
    head.append(b"content-length: %d\r\nconnection: close\r\nretry-after: 1\r\n" % len(body))
    head += [name + b": " + value + b"\r\n" for name, value in [*SECURITY_HEADERS, NO_STORE]]
    return b"".join([*head, b"\r\n", body])
