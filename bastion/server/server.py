"""The server: listeners, sessions, statistics and graceful shutdown.

Theory of operation. ``Server`` builds its method table once from the
services it is given, listens with ``loop.create_server`` (one ``Link`` +
``ServerSession`` per accepted connection) and keeps the set of live
sessions. Shutdown is two-stage: stop accepting and send every session a
GoAway naming the last call it will process; wait up to the grace period for
the calls already accepted to answer; then cancel what is left and close.

TLS. With an ``ssl_context`` the listener is TLS. The protocol factory runs
at accept, before the TLS handshake, and the session's handshake deadline
starts there, so one deadline (``limits.handshake_timeout``) bounds the TLS
handshake and the bastion handshake together; asyncio's own TLS handshake
timeout is set to the same value. Once TLS is up (``_on_secure``) a
connection that did not negotiate ALPN ``bastion/1`` is closed, the client
certificate's identity is put on the Link (``link.tls_identity``, the
subject, and ``link.peer_cert_identity``, subject and serial) for
authentication to use, and a certificate whose serial is in
``revoked_serials`` is refused with UNAUTHENTICATED. SIGHUP reloads the
certificate, key (and CRL) from ``cert_files`` into the live context: new
connections get the new certificate, established ones keep going.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
import socket
import ssl
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from bastion._version import __version__
from bastion.config import ServerLimits
from bastion.exceptions import BastionError
from bastion.security.audit import AuditLog
from bastion.security.authn import AllowAnonymous, Authenticator
from bastion.security.tls import ALPN_PROTOCOL, client_identity, parse_serial
from bastion.security.tls import reload as reload_certificate
from bastion.server.dispatch import MethodTable
from bastion.server.session import ServerSession
from bastion.service import Service
from bastion.status import Status
from bastion.transport.aio import Link

__all__ = ["Server"]

log = logging.getLogger("bastion.server")


class _Info:
    """The narrow view of the server that services get (``ServerInfo``)."""

    def __init__(self, server: Server) -> None:
        self._server = server

    @property
    def version(self) -> str:
        return __version__

    @property
    def started_at(self) -> float:
        return self._server.started_at

    def stats(self) -> Mapping[str, int | float]:
        return self._server.stats()

    def limits(self) -> Mapping[str, int | float]:
        return msgspec.structs.asdict(self._server.limits)

    def describe(self) -> list[dict[str, Any]]:
        return self._server.table.describe()


class Server:
    """A bastion server hosting ``services``."""

    version = __version__

    def __init__(
        self,
        services: Iterable[Service],
        *,
        limits: ServerLimits | None = None,
        authenticator: Authenticator | None = None,
        ssl_context: ssl.SSLContext | None = None,
        audit: AuditLog | None = None,
        revalidate_interval: float = 2.0,
        cert_files: tuple[str, str] | None = None,
        crl_file: str | None = None,
        revoked_serials: Iterable[int | str] = (),
    ) -> None:
        """TLS: ``cert_files`` are the (certificate, key) paths SIGHUP reloads into
        ``ssl_context``, ``crl_file`` a CRL reloaded with them; ``revoked_serials``
        are client certificate serials to refuse (ints, decimal or 0x-hex strings)."""
        self.table = MethodTable(services)
        self.limits = limits or ServerLimits()
        self.authenticator: Authenticator = authenticator or AllowAnonymous()
        self.ssl_context = ssl_context
        self.cert_files = cert_files
        self.crl_file = crl_file
        self.revoked_serials = frozenset(parse_serial(s) for s in revoked_serials)
        self.audit = audit or AuditLog()
        self.revalidate_interval = revalidate_interval
        self.sessions: set[ServerSession] = set()
        self.counters: collections.Counter[str] = collections.Counter()
        self.executor = ThreadPoolExecutor(self.limits.threads, thread_name_prefix="bastion-handler")
        self.info = _Info(self)
        self.started_at = time.time()
        self.draining = False
        self._servers: list[asyncio.Server] = []
        self._stopped = asyncio.Event()
        self.addresses: list[tuple[str, int]] = []

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, sock: socket.socket | None = None) -> None:
        """Listen on ``host:port`` (port 0 picks a free one; see ``addresses``)."""
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {"ssl": self.ssl_context, "backlog": 1024}
        if self.ssl_context is not None:
            kwargs["ssl_handshake_timeout"] = self.limits.handshake_timeout
        if sock is not None:
            srv = await loop.create_server(self._new_link, sock=sock, **kwargs)
        else:
            srv = await loop.create_server(self._new_link, host, port, reuse_address=True, **kwargs)
        self._servers.append(srv)
        for s in srv.sockets:
            addr = s.getsockname()
            self.addresses.append((addr[0], addr[1]))
        self.started_at = time.time()

    def _new_link(self) -> Link:
        # Called at accept, before any TLS handshake: the session's handshake
        # deadline starts now (see ServerSession.accepted_at).
        self.counters["connections"] += 1
        session = ServerSession(self)
        on_secure = self._on_secure if self.ssl_context is not None else None
        return Link(session.core, session, write_high_water=self.limits.write_high_water, on_secure=on_secure)

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
        identity = client_identity(link.ssl_object)
        link.peer_cert_identity = identity
        if identity is not None and identity.serial in self.revoked_serials:
            self.counters["tls_refused"] += 1
            self.audit("tls.refused", peer=link.peer, reason="client certificate revoked",
                       subject=identity.subject, serial=f"0x{identity.serial:x}")
            link.refuse(Status.UNAUTHENTICATED, "client certificate is revoked")

    def reload_tls(self) -> bool:
        """Load ``cert_files`` (and ``crl_file``) again into the live context; False if that failed.

        A failed reload (a missing file, a key that does not match) keeps
        the certificate already loaded. CRLs add up: a newer CRL from the
        same CA (later lastUpdate) takes precedence over the one loaded
        before; nothing already loaded can be unloaded short of a restart.
        """
        if self.ssl_context is None or self.cert_files is None:
            return False
        cert, key = self.cert_files
        try:
            serial = reload_certificate(self.ssl_context, cert, key)
            if self.crl_file is not None:
                self.ssl_context.load_verify_locations(cafile=self.crl_file)
        except (BastionError, OSError) as exc:
            log.error("TLS reload failed, keeping the current certificate: %s", exc)
            return False
        log.info("reloaded TLS certificate %s (serial 0x%x)", cert, serial)
        return True

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    def install_signal_handlers(self) -> None:
        """Make SIGTERM/SIGINT start a graceful shutdown (call from the running loop).

        Call it before announcing readiness: a signal that arrives after the
        announcement but before the handlers exist would kill the process
        outright instead of draining it.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if self.ssl_context is not None and self.cert_files is not None:
            loop.add_signal_handler(signal.SIGHUP, self.reload_tls)

    async def serve_forever(self, *, handle_signals: bool = True) -> None:
        """Run until ``shutdown`` (or SIGTERM/SIGINT when ``handle_signals``)."""
        if handle_signals:
            self.install_signal_handlers()
        await self._stopped.wait()

    def _on_signal(self, sig: int) -> None:
        log.info("received %s: draining (grace period %.0fs)", signal.Signals(sig).name, self.limits.grace_period)
        asyncio.get_running_loop().create_task(self.shutdown())

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, drain sessions for ``grace`` seconds, then cancel the rest."""
        if self.draining:
            await self._stopped.wait()
            return
        self.draining = True
        grace = self.limits.grace_period if grace is None else grace
        for srv in self._servers:
            srv.close()
        for session in list(self.sessions):
            session.drain()
        waits = [asyncio.ensure_future(s.wait_closed()) for s in list(self.sessions)]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=grace)
            if pending:
                log.warning("grace period over: cancelling %d connections' calls", len(pending))
                for session in list(self.sessions):
                    session.abort()
                await asyncio.wait(pending, timeout=2)
        for srv in self._servers:
            await srv.wait_closed()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()

    # -- observability ----------------------------------------------------------

    def stats(self) -> dict[str, int | float]:
        return {
            "connections": len(self.sessions),
            "connections_total": self.counters["connections"],
            "calls_total": self.counters["calls"],
            "calls_in_flight": sum(len(s.tasks) for s in self.sessions),
            "internal_errors_total": self.counters["internal_errors"],
            "uptime_seconds": round(time.time() - self.started_at, 3),
        }
