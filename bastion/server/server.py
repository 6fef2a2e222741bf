"""The server: listeners, sessions, statistics and graceful shutdown.

Theory of operation. ``Server`` builds its method table once from the
services it is given, listens on its own sockets (one ``Link`` +
``ServerSession`` per accepted connection) and keeps the set of live
sessions. Shutdown is two-stage: stop accepting and send every session a
GoAway naming the last call it will process; wait up to the grace period for
the calls already accepted to answer; then cancel what is left and close.

Accepting connections (the limits at accept, running out of descriptors, the
PROXY header of a trusted load balancer) is ``Acceptor``'s: accept.py.

TLS. With an ``ssl_context`` connections are TLS. The session is made at accept,
before the TLS handshake, and its handshake deadline starts there, so one deadline
(``limits.handshake_timeout``; a quarter, at least 1 s, for one accepted into
``limits.reserved_connections``) bounds the TLS and bastion handshakes together;
asyncio's TLS handshake timeout is the same. Once TLS is up (``_on_secure``) a
connection that did not negotiate ALPN ``bastion/1`` is closed, the client
certificate's identity is put on the Link (``link.tls_identity``, the subject, and
``link.peer_cert_identity``, subject and serial) for authentication to use, and a
certificate whose serial is in ``revoked_serials`` is refused with UNAUTHENTICATED
(and an open connection whose serial joins it is closed within
``revalidate_interval``: upkeep.py). SIGHUP reloads the certificate, key (and CRL)
from ``cert_files`` into the live context (and those in ``also_reload``, the
gateway's): new connections get the new certificate, established ones keep going.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import resource
import signal
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from bastion._version import __version__
from bastion.config import ServerLimits
from bastion.exceptions import BastionError, UsageError
from bastion.observability.loglimit import LogBudget
from bastion.observability.stats import CallStats
from bastion.protocol.proxy import parse_networks
from bastion.security.audit import AuditLog
from bastion.security.authn import AllowAnonymous, Authenticator
from bastion.security.principal import Principal
from bastion.security.ratelimit import Limiter, RateLimiter
from bastion.security.tls import parse_serial
from bastion.security.tls import reload as reload_certificate
from bastion.server.accept import BACKLOG, Acceptor
from bastion.server.deadlines import Deadlines
from bastion.server.dispatch import IdempotencyKeys, MethodTable
from bastion.server.reserve import DescriptorReserve
from bastion.server.scheduler import Scheduler
from bastion.server.session import ServerSession
from bastion.server.sockets import bind
from bastion.server.sources import SourceCounts
from bastion.server.upkeep import SessionUpkeep
from bastion.server.view import ServerView
from bastion.service import Service
from bastion.transport.aio import Link

__all__ = ["Server"]

log = logging.getLogger("bastion.server")

#: The names of the threads that run synchronous handlers start with this.
HANDLER_THREAD_PREFIX = "bastion-handler"


class Server(Acceptor):
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
        limiter: Limiter | None = None,
        scheduler: Scheduler | None = None,
        trusted_proxies: Iterable[str] = (),
        idempotency: IdempotencyKeys | None = None,
        ipv6_prefix: int = 64,
    ) -> None:
        """TLS: ``cert_files`` are the (certificate, key) paths SIGHUP reloads into
        ``ssl_context``, ``crl_file`` a CRL reloaded with them; ``revoked_serials``
        are client certificate serials to refuse (ints, decimal or 0x-hex strings).
        ``trusted_proxies``: addresses or CIDR networks of load balancers whose
        connections start with a PROXY protocol v2 header (UsageError if one is
        not an address or network). ``idempotency``: where the first results of
        calls carrying an ``idempotency-key`` are kept (shared by replicas through
        the store); without it such calls are refused. ``ipv6_prefix``: the
        network an IPv6 client counts by, for an anonymous caller's scheduler
        queue and for ``max_connections_per_source`` (``rate_limits.ipv6_prefix``,
        as the rate limits group sources; 1..128)."""
        if not 1 <= ipv6_prefix <= 128:
            raise UsageError(f"Server: ipv6_prefix must be 1..128, got {ipv6_prefix!r}")
        #: Anonymous callers' fair queues group IPv6 sources by this network (read once per handshake).
        self.ipv6_prefix = ipv6_prefix
        self.table = MethodTable(services)
        self.limits = limits or ServerLimits()
        self.authenticator: Authenticator = authenticator or AllowAnonymous()
        self.ssl_context = ssl_context
        self.cert_files = cert_files
        #: Other live contexts serving ``cert_files`` (the gateway's): ``reload_tls`` loads the pair into them too.
        self.also_reload: list[ssl.SSLContext] = []
        self.crl_file = crl_file
        self.revoked_serials = frozenset(parse_serial(s) for s in revoked_serials)  # SIGHUP: cli/serve.py
        #: Called on SIGHUP after the TLS reload (``bastion serve`` re-reads ``tls.revoked_serials``).
        self.hangup_hooks: list[Callable[[], None]] = []
        self.drain_hooks: list[Callable[[], None]] = []  #: called once, as a drain begins
        self._hurry_on_repeat = True
        self._hurried = False  # SIGUSR2 came before the drain began (see _hurry): the drain has no grace
        self.trusted_proxies = parse_networks(trusted_proxies)
        self.idempotency = idempotency
        self.audit = audit or AuditLog()
        self.revalidate_interval = revalidate_interval
        # Rate limiting: an in-memory limiter is checked inline before a call is
        # admitted; a shared (Redis) one is awaited in the call's task.
        self.limiter = limiter
        self.scheduler = scheduler or Scheduler()
        self.check_rate: Callable[[Principal, str, str, float | None, float | None], None] | None = None
        #: Drops what a principal object's calls charge, when its session is done with it.
        self.forget_principal: Callable[[Principal], None] = getattr(limiter, "forget", lambda principal: None)
        if isinstance(limiter, RateLimiter):
            if limiter.clock is time.monotonic:  # sessions pass the time.monotonic() of the read as ``now``
                self.check_rate = limiter.check_sync
            else:  # a limiter on a clock of its own reads it
                check = limiter.check_sync
                self.check_rate = lambda principal, source, method, cost, now: check(principal, source, method, cost)
        self.check_rate_async = limiter.check if limiter is not None and self.check_rate is None else None
        self.sessions: set[ServerSession] = set()
        self.counters: collections.Counter[str] = collections.Counter()
        self.log_budget = LogBudget()  # lines peers can cause at will: a few per 10 s (loglimit.py)
        #: Calls by method and status, latencies (bastion/observability: read by /metrics).
        self.metrics = CallStats(self.table.entries)
        self.deadlines = Deadlines()
        for name, entry in self.table.entries.items():
            entry.metric_row = self.metrics.method_index(name)
        self.executor = ThreadPoolExecutor(self.limits.threads, thread_name_prefix=HANDLER_THREAD_PREFIX)
        self.info = ServerView(self)
        self.started_at = time.time()
        self.draining = False
        #: Calls running inline (ServerSession._run_inline) right now: in flight without a ticket.
        self.inline_running = 0
        #: What the arguments of calls in flight may cost decoded, as counted for limits.max_args_memory.
        self.args_memory = 0
        #: Of it, what finished answers waiting for their peers to read hold (calls.py, _park): at most half.
        self.parked_memory = 0
        #: Bytes of client-stream items all sessions hold, for limits.max_stream_buffer_total, and the
        #: sessions not read from until they or the total come back under it (upkeep.py).
        self.stream_bytes = 0
        self.stream_waiting: dict[SessionUpkeep, None] = {}
        self._listeners: list[socket.socket] = []
        self._accept_tasks: list[asyncio.Task[None]] = []
        self._handshakes: set[asyncio.Task[None]] = set()  # connections still in the TLS handshake
        self._open = 0  # accepted connections not yet closed (handshaking ones too)
        self.sources = SourceCounts(self.limits, self.counters, ipv6_prefix)  # per source: open, handshaking
        self._reserve = DescriptorReserve()
        self._stopped = asyncio.Event()
        self.addresses: list[tuple[str, int]] = []

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, sock: socket.socket | None = None) -> None:
        """Listen on ``host:port`` (port 0 picks a free one; see ``addresses``), or on ``sock``."""
        loop = asyncio.get_running_loop()
        listeners = [sock] if sock is not None else await bind(host, port)
        for listener in listeners:
            listener.setblocking(False)
            listener.listen(BACKLOG)
            self._listeners.append(listener)
            addr = listener.getsockname()
            self.addresses.append((addr[0], addr[1]))
            self._accept_tasks.append(loop.create_task(self._accept_loop(listener)))
        self._reserve.hold()
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < self.limits.max_connections + 64:
            log.warning(
                "the file descriptor limit (%d) is below limits.max_connections (%d): "
                "connections past it will be refused",
                soft,
                self.limits.max_connections,
            )
        self.started_at = time.time()

    def connect_memory(self, protocol: asyncio.Protocol, *, peer: str | None = None) -> None:
        """Join a client protocol to a new session in memory, as if it connected from ``peer``
        ("host:port"; None: an unnamed in-memory peer). bastion.testing and the HTTP gateway use
        this: such a session passes authentication, limits and the scheduler like any other."""
        from bastion.transport.memory import connect_pair

        connect_pair(self._new_link(None, peer), protocol)

    def _new_link(self, source: str | None = None, peer: str | None = None) -> Link:
        # Made at accept, before any TLS handshake: the session's handshake
        # deadline counts from now (ServerSession.handshake_deadline). ``peer``: the
        # client's "host:port" from a PROXY header, put on the Link (which
        # set the socket's peer name) before anything reads it.
        self.counters["connections"] += 1
        session = ServerSession(self, source)
        on_secure = self._on_secure if self.ssl_context is not None else None
        if peer is not None:
            on_secure = functools.partial(self._on_proxied, peer, on_secure)
        limits = self.limits
        return Link(
            session.core,
            session,
            write_high_water=limits.write_high_water,
            write_hard_limit=limits.write_hard_limit,
            write_stall_timeout=limits.write_stall_timeout,
            pause_reads_with_writes=True,
            on_secure=on_secure,
            on_writing_paused=self.scheduler.owner_paused,  # its queued calls are held meanwhile
        )

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
            for context in self.also_reload:
                reload_certificate(context, cert, key)
            if self.crl_file is not None:
                self.ssl_context.load_verify_locations(cafile=self.crl_file)
        except (BastionError, OSError) as exc:
            log.error("TLS reload failed, keeping the current certificate: %s", exc)
            return False
        log.info("reloaded TLS certificate %s (serial 0x%x)", cert, serial)
        return True

    @property
    def connections_open(self) -> int:
        """Accepted connections not yet closed, handshaking ones too (``limits.reserved_connections``)."""
        return self._open

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    def install_signal_handlers(self, *, supervised: bool = False) -> None:
        """Make SIGTERM/SIGINT start a graceful shutdown and SIGHUP reload TLS (call from the running loop).

        A second SIGTERM/SIGINT during the drain cancels the calls still
        running instead of waiting out the grace period. ``supervised`` (a
        worker of ``--workers``): SIGINT and a repeated SIGTERM are ignored
        -- a terminal's Ctrl-C, a group-wide SIGTERM (systemd's default
        ``KillMode``) or the parent-death signal reach a worker beside the
        supervisor's SIGTERM, and none means "hurry" -- and SIGUSR2, only
        sent by the supervisor on a second signal, cancels what still runs.
        Call it before announcing readiness: a signal arriving before the
        handlers exist would kill the process instead of draining it.
        """
        loop = asyncio.get_running_loop()
        self._hurry_on_repeat = not supervised
        loop.add_signal_handler(signal.SIGTERM, self._on_signal, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, _ignore if supervised else self._on_signal, signal.SIGINT)
        if supervised:
            loop.add_signal_handler(signal.SIGUSR2, self._hurry, signal.SIGUSR2)
        # SIGHUP is handled even with nothing to reload: its default action would end the
        # process at once, undrained (a reload sent to a plaintext server killed it).
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)

    def _on_hangup(self) -> None:
        if self.ssl_context is not None and self.cert_files is not None:
            self.reload_tls()
        else:
            log.info("received SIGHUP: no TLS certificate to reload; still serving")
        for hook in self.hangup_hooks:
            try:
                hook()
            except Exception:  # one hook's failure neither stops the others nor the server
                log.exception("a SIGHUP hook failed")

    async def serve_forever(self, *, handle_signals: bool = True) -> None:
        """Run until ``shutdown`` (or SIGTERM/SIGINT when ``handle_signals``)."""
        if handle_signals:
            self.install_signal_handlers()
        await self._stopped.wait()

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self.draining:  # a second one: no more grace (what a second Ctrl-C means), unless supervised
            if self._hurry_on_repeat:
                self._hurry(sig)
            return
        log.info("received %s: draining (grace period %.0fs)", name, self.limits.grace_period)
        asyncio.get_running_loop().create_task(self.shutdown())

    def _hurry(self, sig: int) -> None:
        if not self.draining:  # the supervisor's SIGTERM is not handled yet (a lower signal number is delivered
            self._hurried = True  # first; the drain starts a loop turn later): drain with no grace when it does
            asyncio.get_running_loop().create_task(self.shutdown())
        else:
            log.warning("received %s again: cancelling the calls still running", signal.Signals(sig).name)
            for session in list(self.sessions):
                session.abort()

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, drain sessions for ``grace`` seconds, then cancel the rest."""
        if self.draining:
            await self._stopped.wait()
            return
        self.draining = True
        for hook in self.drain_hooks:
            hook()
        grace = 0.0 if self._hurried else self.limits.grace_period if grace is None else grace
        for task in self._accept_tasks:
            task.cancel()
        await asyncio.gather(*self._accept_tasks, return_exceptions=True)
        for listener in self._listeners:
            listener.close()
        for task in list(self._handshakes):  # not sessions yet: nothing to drain
            task.cancel()
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
        self._reserve.release()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()

    # -- observability ----------------------------------------------------------

    def stats(self) -> dict[str, int | float]:
        """Gauges and counters (``admin.stats``).

        connections: open sessions past the TLS handshake; connections_open: every
        accepted connection not yet closed, handshaking ones included.
        rejected_connections_total: closed at accept, over a connection limit
        or for want of file descriptors, and anonymous handshakes refused for
        reserved_connections; rejected_connections_per_source,
        rejected_handshakes_per_source, rejected_connections_reserved: those kinds. closed_idle, closed_abuse,
        closed_slow_reader, closed_slow_sender: connections closed for
        idle_timeout, an abuse cap (max_*_per_10s), not reading their answers
        (write_stall_timeout or the hard cap), or sending a frame too slowly
        (frame_timeout, frame_min_rate); closed_abuse counts those over
        limits.max_stream_buffer too. stream_buffer_bytes: bytes of
        client-stream items received and not yet taken by their handlers, all
        connections together; stream_buffer_paused: times a connection was
        not read from for limits.max_stream_buffer_total. accept_errors_total: accept() failures (EMFILE...).
        proxied_connections_total: connections from a trusted proxy whose
        PROXY header named a client (not LOCAL ones, such as health checks);
        rejected_proxy_header_total: connections from a trusted proxy closed
        for a missing, malformed or late header.
        """
        counters = self.counters
        return {
            "connections": sum(not s.lost for s in self.sessions),
            "connections_open": self._open,
            "connections_total": counters["connections"],
            "calls_total": counters["calls"],
            "calls_in_flight": sum(len(s.tickets) for s in self.sessions) + self.inline_running,
            "internal_errors_total": counters["internal_errors"],
            "rejected_connections_total": counters["rejected_connections"],
            "rejected_connections_per_source": counters["rejected_connections_per_source"],
            "rejected_handshakes_per_source": counters["rejected_handshakes_per_source"],
            "rejected_connections_reserved": counters["rejected_connections_reserved"],
            "closed_idle": counters["closed_idle"],
            "closed_abuse": counters["closed_abuse"],
            "closed_slow_reader": counters["closed_slow_reader"],
            "closed_slow_sender": counters["closed_slow_sender"],
            "accept_errors_total": counters["accept_errors"],
            "rejected_rate_limited": counters["rejected_rate_limited"],
            "rejected_args_memory": counters["rejected_args_memory"],
            "stream_buffer_bytes": self.stream_bytes,
            "stream_buffer_paused": counters["stream_buffer_paused"],
            "proxied_connections_total": counters["proxied_connections"],
            "rejected_proxy_header_total": counters["rejected_proxy_header"],
            **{f"scheduler_{key}": value for key, value in self.scheduler.stats().items()},
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "pid": os.getpid(),  # which worker answered, under ``bastion serve --workers``
        }


def _ignore(sig: int) -> None:
    log.debug("ignored %s: the supervisor passes it on", signal.Signals(sig).name)
