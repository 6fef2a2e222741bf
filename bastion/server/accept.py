"""How the server takes connections: limits at accept, the PROXY header, TLS checks (``Server``'s).

``Acceptor`` is mixed into ``Server`` (server.py, where the lifecycle and the
TLS setup are), which sets every attribute stubbed here.

Accepting. Each listening socket has an accept loop of ours (``_accept_loop``)
rather than the event loop's, so the connection limits are checked on the bare
socket, before any TLS work: over ``max_connections`` in total, or
``max_connections_per_source`` from one address (an IPv6 one: its ``/ipv6_prefix``
network), or ``max_handshakes_per_source`` of them still in their handshake
(sources.py), a connection is closed at once
and counted; past ``max_connections`` less ``reserved_connections`` a connection
is still accepted, but a handshake that ends anonymous is refused (upkeep.py,
``_in_reserve``). An accepted socket is handed to ``loop.connect_accepted_socket``;
its slot is released when the session closes, or when the TLS handshake fails
and no session ever starts. Out of file descriptors (EMFILE/ENFILE), the loop
gives up a reserved descriptor to accept and close what is waiting (so those
clients learn at once instead of hanging), takes it back, backs off briefly and
carries on; it never dies.

Behind a load balancer. A connection from an address in ``trusted_proxies``
(IPs or CIDR networks) must start with a PROXY protocol v2 header
(bastion/protocol/proxy.py), read from the bare socket before any TLS, byte for
byte so nothing of the TLS handshake is consumed, under the same handshake
deadline. The client address it carries then stands for the peer everywhere:
the per-source connection limit (the balancer's own address is counted only
against ``max_connections``), rate limits, login throttles, ``Context.peer``
and the audit log. A LOCAL header (the balancer's own connection, e.g. a health
check) keeps the real endpoints. A trusted connection without a valid header is
closed and counted (``rejected_proxy_header_total``). From any other address no
header is ever looked for: one sent anyway is just bytes that break the
protocol. A trusted connection that starts like a client's own TLS or bastion
handshake (a client that skipped the balancer) is first told why, once, with
a fixed answer (``direct_client_answer`` in proxy.py). The warning for a
refused header is one of the lines a peer can cause at will: within
``log_budget`` (kind ``proxy_header``), the counter counts them all.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from bastion.config import ServerLimits
from bastion.observability.loglimit import LogBudget, suppressed_note
from bastion.protocol.proxy import Command, ProxyHeader, ProxyHeaderError
from bastion.security.audit import AuditLog
from bastion.security.throttle import source_key
from bastion.security.tls import ALPN_PROTOCOL, client_certificate
from bastion.server.reserve import DescriptorReserve
from bastion.server.session import ServerSession
from bastion.server.sockets import read_proxy_header
from bastion.server.sources import SourceCounts
from bastion.status import Status
from bastion.transport.aio import Link

__all__ = ["BACKLOG", "Acceptor"]

log = logging.getLogger("bastion.server")

BACKLOG = 1024
#: accept() errors that mean "out of descriptors or memory, for now".
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Acceptor:
    """The connection intake of ``Server``: accept, check the limits, set each connection up."""

    limits: ServerLimits
    counters: collections.Counter[str]
    ipv6_prefix: int
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    sources: SourceCounts
    ssl_context: ssl.SSLContext | None
    revoked_serials: frozenset[int]
    audit: AuditLog
    log_budget: LogBudget
    _open: int
    _handshakes: set[asyncio.Task[None]]
    _reserve: DescriptorReserve

    def _new_link(self, source: str | None = None, peer: str | None = None) -> Link:
        raise NotImplementedError  # the server's: a new session and its Link

    async def _accept_loop(self, listener: socket.socket) -> None:
        """Accept until cancelled, whatever accept() says."""
        loop = asyncio.get_running_loop()
        backoff = 0.0
        while True:
            try:
                conn, addr = await loop.sock_accept(listener)
                self._admit(conn, addr)
                for _ in range(BACKLOG):  # whatever else is waiting, without a trip through the loop
                    conn, addr = listener.accept()
                    conn.setblocking(False)
                    self._admit(conn, addr)
                backoff = 0.0
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                backoff = 0.0
            except OSError as exc:
                self.counters["accept_errors"] += 1
                if exc.errno in _RESOURCE_ERRNOS:
                    if not backoff:
                        log.warning("cannot accept connections: %s; refusing new ones until some close", exc)
                    self.counters["rejected_connections"] += self._reserve.shed(listener, BACKLOG)
                else:
                    log.error("accept failed: %s", exc)
                backoff = min(max(backoff * 2, 0.01), 0.5)
                await asyncio.sleep(backoff)
            except Exception:  # never let the accept loop die
                log.exception("accept loop error")
                await asyncio.sleep(0.1)

    def _admit(self, conn: socket.socket, addr: Any) -> None:
        """Check the connection limits on a just-accepted socket; start it or close it."""
        source = addr[0] if isinstance(addr, tuple) else str(addr)
        key = source_key(source, self.ipv6_prefix)  # what the per-source limit counts (IPv6: its /ipv6_prefix)
        limits = self.limits
        proxied = bool(self.trusted_proxies) and self._is_trusted_proxy(source)
        if self._open >= limits.max_connections:
            self.counters["rejected_connections"] += 1
            conn.close()
            return
        if not proxied and self.sources.refuse(key):  # (counted there)
            conn.close()
            return
        self._open += 1
        deadline = asyncio.get_running_loop().time() + limits.handshake_timeout_at(self._open)  # reserve: sooner
        if proxied:  # the per-source limit applies to the client the header names
            coro = self._connect_proxied(conn, source, deadline)
        else:
            self.sources.take(key)
            coro = self._connect(conn, source, None, deadline)
        task = asyncio.get_running_loop().create_task(coro)
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def _is_trusted_proxy(self, source: str) -> bool:
        try:
            address = ipaddress.ip_address(source)
        except ValueError:  # not an IP (a Unix socket)
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted_proxies)

    async def _connect_proxied(self, conn: socket.socket, proxy: str, deadline: float) -> None:
        """Read the PROXY header of a connection from a trusted balancer, then set it up as the client's.

        Holds one slot of ``max_connections`` (taken in ``_admit``); the
        per-source slot is taken here, for the client the header names.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                header = await read_proxy_header(loop, conn)
        except (ProxyHeaderError, TimeoutError, OSError) as exc:
            reason = "no PROXY header within the handshake timeout" if isinstance(exc, TimeoutError) else str(exc)
            self.counters["rejected_proxy_header"] += 1
            if (left_out := self.log_budget.take("proxy_header")) is not None:
                log.warning("closing connection from trusted proxy %s: %s%s", proxy, reason, suppressed_note(left_out))
            self._open -= 1
            conn.close()
            return
        except BaseException:
            self._open -= 1
            conn.close()
            raise
        source = header.source[0] if header.command is Command.PROXY and header.source is not None else proxy
        key = source_key(source, self.ipv6_prefix)
        if self.sources.refuse(key):
            self._open -= 1
            conn.close()
            return
        self.sources.take(key)
        if header.command is Command.PROXY:
            self.counters["proxied_connections"] += 1
        await self._connect(conn, source, header, deadline)

    async def _connect(
        self, conn: socket.socket, source: str, proxy: ProxyHeader | None = None, deadline: float | None = None
    ) -> None:
        """Run the (TLS and) transport setup of one accepted socket.

        ``proxy``: its PROXY header (its client address becomes the peer);
        ``deadline``: the loop time its handshakes must end by, counted from
        accept (``ServerLimits.handshake_timeout_at``).
        """
        link = self._new_link(source, proxy.peer if proxy is not None else None)
        session = link.session
        assert isinstance(session, ServerSession)
        timeout = self.limits.handshake_timeout
        if deadline is not None:
            session.handshake_deadline = deadline
            timeout = max(deadline - asyncio.get_running_loop().time(), 0.001)
        kwargs: dict[str, Any] = {}
        if self.ssl_context is not None:
            kwargs = {"ssl": self.ssl_context, "ssl_handshake_timeout": timeout}
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: link, conn, **kwargs)
        except Exception as exc:  # the TLS handshake failed or timed out; the loop closed the socket
            log.debug("connection from %s failed before it started: %r", source, exc)
            if self.ssl_context is not None:
                self.counters["tls_refused"] += 1
            self.release(session)
        except BaseException:
            self.release(session)
            raise

    def release(self, session: ServerSession) -> None:
        """Give back the connection slot ``session`` held (once; sessions not from a listener hold none)."""
        if session.source is None or session.slot_released:
            return
        session.slot_released = True
        self._open -= 1
        self.sources.give_back(session)

    @staticmethod
    def _on_proxied(peer: str, on_secure: Callable[[Link], None] | None, link: Link) -> None:
        link.peer = peer
        if on_secure is not None:
            on_secure(link)

    def _on_secure(self, link: Link) -> None:
        """TLS is up on ``link``: check ALPN, record the client certificate, refuse revoked ones."""
        if link.ssl_object is None:
            return
        if link.alpn != ALPN_PROTOCOL:
            self.counters["tls_refused"] += 1
            self.audit("tls.refused", peer=link.peer, reason=f"ALPN {link.alpn!r} is not {ALPN_PROTOCOL}")
            link.refuse(Status.FAILED_PRECONDITION, f"TLS ALPN must negotiate {ALPN_PROTOCOL}")
            link.close()
            return
        found = client_certificate(link.ssl_object)
        identity = None if found is None else found[0]
        link.peer_cert_identity = identity
        link.peer_cert_expires = None if found is None else found.expires_at
        link.peer_cert_issued = None if found is None else found.issued_at
        if identity is not None and identity.serial in self.revoked_serials:
            self.counters["tls_refused"] += 1
            self.audit(
                "tls.refused",
                peer=link.peer,
                reason="client certificate revoked",
                subject=identity.subject[:256],  # a CN is any length a CA signed
                serial=f"0x{identity.serial:x}",
            )
            link.refuse(Status.UNAUTHENTICATED, "client certificate is revoked")
