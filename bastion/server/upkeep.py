"""A server session's upkeep of its connection: handshake, revalidation, keepalive, idleness, abuse caps, drain.

Theory of operation. ``SessionUpkeep`` is the half of ``ServerSession``
(session.py) that looks after the connection rather than its calls. The
handshake runs under one deadline from accept: a connection that has not
completed it in ``handshake_timeout`` seconds (a quarter, at least 1 s, if it
was accepted into the reserved connections: ``ServerLimits.handshake_timeout_at``)
is closed whatever it trickles in; then the server's authenticator decides (an anonymous principal is
refused while the server holds more than ``limits.anonymous_connections``: the
rest are reserved for authenticated ones), and a credential that can expire
or be revoked is revalidated every ``revalidate_interval`` seconds, the
connection closed (its calls answered UNAUTHENTICATED) once it is no longer
good; at the same pace a connection with a client certificate is checked
against the server's ``revoked_serials`` (re-read on SIGHUP). Keepalive: a
timer pings a silent connection and closes it if the Pong does not come. An
idle timer closes a connection with no call open and no traffic but pings for
``idle_timeout``. Frame pace: a frame begun must arrive whole within
``frame_timeout`` seconds plus one second for each ``frame_min_rate`` bytes of
it received, or the connection is closed, so a peer trickling a frame it never
finishes cannot hold its connection (and the bytes buffered) past idle and
keepalive limits; the clock restarts while the server itself is not reading.
Argument memory: a call whose arguments are ``ARGS_COUNTED`` bytes or more
counts its bytes times their growth (``Entry.growth``, dispatch.py: 2 for
flat ones, text or bytes, up to 80 for nested containers), server-wide, from
its arrival until it ends -- an inline call of flat arguments (a handler with
no await, run at once, which lets go of them as it ends) only if it has to
wait for a slot instead (and is refused, if so, as it would start to wait:
decoded by then, and counted by the rate limits); any other that would take
the total past ``limits.max_args_memory`` is refused
RESOURCE_EXHAUSTED before it is decoded (a 1 MiB frame of empty maps decodes to about 73 MB, and calls wait in queues
decoded: the queues bound them in count, this in bytes). Stream buffer: the bytes of the client-stream
items a connection's calls hold, received but not yet taken by their handlers
(``stream_bytes``; streams.py), past ``limits.max_stream_buffer`` close the
connection with GoAway(RESOURCE_EXHAUSTED): the window bounds items per call,
not bytes, and calls queued for a slot or whose handlers do not read yet each
accept theirs (pausing reads instead would leave Cancels unread). Past
``limits.max_stream_buffer_total`` bytes on all connections together
(``Server.stream_bytes``) a connection that holds more than its share
(``ServerLimits.stream_share``) when an item arrives is no longer read from
(``Server.stream_waiting``) until its own handlers take it back to its share
or the total falls to the limit: flow control rather than a close, since each
of them is within its own limit; a connection within its share is always read,
so one whose handlers take their items goes on while others' items sit
unread. A paused connection's close goes unread too: keepalive still writes
it a Ping every ``ping_interval``, which fails once the peer is gone. Cancels, Pings and Calls the core refused over
``max_inflight`` are counted in fixed 10-second windows; past a cap the
session sends GoAway(RESOURCE_EXHAUSTED) and closes. Denied calls are written
to the audit log, at most ``DENIALS_AUDITED`` per connection and
``DENIALS_AUDITED_SERVER_WIDE`` on the whole server per 10 s (the rest
counted), so a denial flood cannot flood the log, even over new connections.
A record's ``suppressed_before`` counts both: its connection's denials past
the per-connection cap and, from the budget, the server's past the server-wide one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from bastion.exceptions import CallError, ResourceExhausted, Unauthenticated
from bastion.observability.loglimit import suppressed_note
from bastion.protocol.connection import Connection
from bastion.protocol.frames import FrameReader
from bastion.protocol.messages import PROTOCOL_VERSION, Call, Hello, Item, Message, Welcome
from bastion.protocol.state import ConnectionState
from bastion.security.authn import PeerInfo
from bastion.security.principal import Principal
from bastion.security.throttle import source_key
from bastion.server.tickets import Ticket
from bastion.status import Status
from bastion.transport.aio import Link

if TYPE_CHECKING:
    from bastion.config import ServerLimits
    from bastion.server.dispatch import Entry
    from bastion.server.server import Server
    from bastion.server.streams import CreditGate, InputStream

__all__ = ["ABUSE_WINDOW", "ARGS_COUNTED", "AUDITED_METHOD_CHARS", "DENIALS_AUDITED", "ArgsMemoryFull", "SessionUpkeep"]

log = logging.getLogger("bastion.server")
DENIALS_AUDITED = 20  # denied calls written to the audit log per connection per 10 s
#: ... and on the whole server: connections (from ever new addresses) are no bound.
DENIALS_AUDITED_SERVER_WIDE = 100
#: The most characters of a denied call's method name the audit record keeps: the name is the
#: peer's, as long as its frame allows (a real one is a few dozen characters).
AUDITED_METHOD_CHARS = 200
#: Argument bytes from which a call's decoded size counts toward ``limits.max_args_memory``: below
#: it, the queue limits bound what calls hold (3,300 calls waiting or running x 80 KiB at worst).
#: Calls of flat arguments count too (growth 2: the frame and the decoded copy), so that 3,300
#: queued calls of 1 MiB of text cannot hold 6.6 GB.
ARGS_COUNTED = 1024
#: How a drain ends a resumable stream that has no ending of its own (``Context.end_at_drain``).
_DRAINING_ENDED = "server is draining: resume this stream on another server"
#: Seconds in each window the abuse caps (``max_*_per_10s``) count in.
ABUSE_WINDOW = 10.0
#: What is counted -> (the ServerLimits field capping it per window, the GoAway reason).
_ABUSE_CAPS = {
    "cancels": ("max_cancels_per_10s", "too many cancellations"),
    "pings": ("max_pings_per_10s", "ping flood"),
    "refused": ("max_refused_per_10s", "too many calls over max_inflight"),
}


class ArgsMemoryFull(ResourceExhausted):
    """Refused for ``limits.max_args_memory``: the server holds as many decoded arguments as it may."""


class SessionUpkeep:
    """The connection-keeping half of ``ServerSession``, which sets every attribute below."""

    server: Server
    limits: ServerLimits
    core: Connection
    link: Link | None
    principal: Principal
    source: str | None
    handshaking: bool
    peer_host: str
    anonymous_key: str
    tickets: dict[int, Ticket]
    _inputs: dict[int, InputStream]
    stream_bytes: int
    _loop: asyncio.AbstractEventLoop
    _timer: asyncio.TimerHandle | None
    _idle_timer: asyncio.TimerHandle | None
    _frames: FrameReader[Message]
    _frame_begun: int
    _frame_since: float
    _frame_timer: asyncio.TimerHandle | None
    _revalidation: asyncio.Task[None] | None
    #: Callbacks of running calls to tell when revalidation changes the principal (None until one asks).
    _principal_watchers: set[Callable[[Principal], None]] | None = None
    #: Closed for abuse: none of its calls runs on once the connection is gone (once.py), not even one
    #: whose task the scheduler starts while the close waits for the GoAway to be written.
    cut_off: bool = False
    _last_seen: float
    _last_active: float
    _ping_outstanding: bool
    _window_start: float
    _resumable: set[int]
    _gates: dict[int, CreditGate]
    #: Resumable streams that end themselves at a drain (``Context.end_at_drain``): call id -> their ending.
    _drain_endings: dict[int, Callable[[bool], CallError]] | None = None
    _abuse: collections.Counter[str]
    _denial_window: float
    _denials_logged: int
    _denials_suppressed: int
    _claimed: dict[int, float | None]  # keyed calls that would run on if the connection were lost (once.py)
    _recording: set[int]  # keyed calls whose handler ended, recording their answer (once.py)
    _detached: dict[int, tuple[str, asyncio.TimerHandle | None]]  # keyed calls running on after it was (once.py)

    def _cancel(self, call_id: int, ticket: Ticket) -> None:
        raise NotImplementedError  # the session's: cancel a call's job

    # -- drain -------------------------------------------------------------------------

    def drain(self) -> None:
        """Send GoAway: finish the calls already accepted, start no more."""
        if self.link is None or self.link.closed:
            return
        if self.core.state in (ConnectionState.OPEN, ConnectionState.DRAINING):
            self.core.send_goaway(Status.OK, "server is draining")
            self._end_resumable()
            self.link.flush()
            self._maybe_finish_drain()
        elif self.core.state is not ConnectionState.CLOSED and self.core.state is not ConnectionState.HANDSHAKE:
            self.link.close()

    def _end_resumable(self) -> None:
        """End the resumable streams (watches, subscriptions) with UNAVAILABLE: they never finish by
        themselves, and waiting out the grace period for them only delays the clients' resuming. One
        that registered its own ending (``Context.end_at_drain``) is ended with it (where to resume,
        what it dropped), at once all the same and with the same retry-after."""
        endings = self._drain_endings or {}
        for call_id in list(self._resumable):
            ticket = self.tickets.get(call_id)
            if ticket is not None:
                status, message, details = Status.UNAVAILABLE, _DRAINING_ENDED, None
                ending = endings.pop(call_id, None)
                if ending is not None:
                    gate = self._gates.get(call_id)
                    try:
                        error = ending(gate is not None and gate.waiting)
                        status, message, details = error.status, error.message, error.details
                    except Exception:
                        log.exception("a stream's ending at the drain failed; ended it UNAVAILABLE")
                self.core.send_error(call_id, status, message, details=details, retry_after_ms=1000)
                self._cancel(call_id, ticket)

    def _maybe_finish_drain(self) -> None:
        if not self.tickets and self.link is not None and self.core.state is ConnectionState.DRAINING:
            self.link.close()

    def abort(self) -> None:
        """Grace period over: answer every call still running UNAVAILABLE, then close.

        The answers are queued here, not left to the cancelled tasks: the link
        closes before those tasks next run, so what they send would be lost.
        """
        for call_id, ticket in list(self.tickets.items()):
            self.core.send_error(call_id, Status.UNAVAILABLE, "server shutting down", retry_after_ms=1000)
            self._cancel(call_id, ticket)
        if self.link is not None:
            self.link.close()

    # -- handshake ------------------------------------------------------------------

    async def _handshake(self, hello: Hello) -> None:
        link = self.link
        assert link is not None
        host = self.peer_host = link.peer.rsplit(":", 1)[0].strip("[]")
        # One fair queue per source as the rate limits count it (an IPv6 one: its /rate_limits.ipv6_prefix).
        self.anonymous_key = f"anonymous@{source_key(host, self.server.ipv6_prefix)}"
        certificate = getattr(link, "peer_cert_identity", None)
        peer = PeerInfo(
            link.peer,
            host,
            getattr(link, "tls_identity", None),
            getattr(link, "peer_cert_expires", None),
            None if certificate is None else certificate[1],
            getattr(link, "peer_cert_issued", None),
        )
        try:
            principal = await self.server.authenticator.authenticate(hello.token, peer)
        except (Unauthenticated, ResourceExhausted) as exc:
            throttled = exc.status is Status.RESOURCE_EXHAUSTED
            self.server.counters["auth_failures_throttled" if throttled else "auth_failures_credentials"] += 1
            retry = f" (retry after {exc.retry_after:.1f}s)" if exc.retry_after else ""
            self._refuse(exc.status, exc.message + retry)
            return
        except Exception:  # its store down: every handshake meets it, so a few per 10 s are logged
            if (left_out := self.server.log_budget.take("authenticator_failed")) is not None:
                log.exception("authenticator failed%s", suppressed_note(left_out))
            self._refuse(Status.INTERNAL, "authentication is unavailable")
            return
        if link.closed or self.core.state is not ConnectionState.HANDSHAKE:
            return
        if not principal.authenticated and self._in_reserve():
            return
        self.principal = principal
        self.core.send_welcome(
            Welcome(
                version=min(hello.version, PROTOCOL_VERSION),  # the highest both speak (docs/protocol.md 4.2)
                server=f"bastion/{self.server.version}",
                principal=principal.name,
                max_frame=self.limits.max_frame,
                max_inflight=self.limits.max_inflight,
                window=self.limits.window,
                ping_interval_ms=int(self.limits.ping_interval * 1000),
            )
        )
        link.flush()
        self.server.sources.handshake_over(self)
        if self.server.draining:
            self.drain()
        if self._timer is not None:  # the handshake deadline's: the keepalive timer takes its place
            self._timer.cancel()
        self._arm_keepalive()
        self._idle_timer = self._loop.call_later(self.limits.idle_timeout, self._check_idle)
        revocable = principal.token_id is not None or principal.expires_at is not None or principal.mechanism == "mtls"
        # A client certificate can be revoked too (tls.revoked_serials, re-read on SIGHUP).
        if revocable or getattr(link, "peer_cert_identity", None) is not None:
            self._revalidation = self._loop.create_task(self._revalidate_loop())  # on_close cancels it

    def _in_reserve(self) -> bool:
        """Refuse an anonymous handshake ending while the server holds more than
        ``limits.anonymous_connections`` (the rest are reserved); True if refused.
        The gateway's sessions (in memory, no source) hold no slot and are never refused."""
        server = self.server
        if self.source is None or server.connections_open <= self.limits.anonymous_connections:
            return False
        server.counters["rejected_connections"] += 1
        server.counters["rejected_connections_reserved"] += 1
        self._refuse(
            Status.RESOURCE_EXHAUSTED,
            f"the server is near limits.max_connections ({self.limits.max_connections}): its last "
            "limits.reserved_connections are kept for authenticated clients; retry later, or present a "
            "token or a client certificate",
        )
        return True

    def _refuse(self, status: Status, message: str) -> None:
        """Refuse the Hello and close, unless the connection is gone already (the peer hung up, or
        the handshake deadline closed it while the authenticator was deciding): nothing to tell."""
        link = self.link
        if link is None or link.closed or self.core.state is not ConnectionState.HANDSHAKE:
            return
        self.core.reject(status, message)
        link.close()

    def watch_principal(self, callback: Callable[[Principal], None]) -> Callable[[], None]:
        """``Context.watch_principal``: ``callback(principal)`` whenever revalidation replaces it."""
        if self._principal_watchers is None:
            self._principal_watchers = set()
        watchers = self._principal_watchers
        watchers.add(callback)
        return lambda: watchers.discard(callback)

    def end_at_drain(self, call_id: int, ending: Callable[[bool], CallError]) -> Callable[[], None]:
        """``Context.end_at_drain``: a drain ends resumable stream ``call_id`` with ``ending(unsent)``."""
        if self._drain_endings is None:
            self._drain_endings = {}
        endings = self._drain_endings
        endings[call_id] = ending

        def forget() -> None:
            endings.pop(call_id, None)

        return forget

    async def _revalidate_loop(self) -> None:
        """Close the connection once its credential expires or is revoked."""
        interval = self.server.revalidate_interval
        # After the connection is lost, on while detached keyed calls run (once.py): revocation cancels them too.
        while self.link is not None and (not self.link.closed or self._detached):
            await asyncio.sleep(interval)
            certificate = getattr(self.link, "peer_cert_identity", None)  # none on the gateway's direct links
            # The server's list of revoked serials is re-read on SIGHUP: it reaches open connections here.
            revoked = certificate is not None and certificate[1] in self.server.revoked_serials
            current: Principal | None = None
            if not revoked:
                try:
                    current = await self.server.authenticator.revalidate(self.principal)
                except Exception:  # every connection every interval meets it: a few per 10 s are logged
                    if (left_out := self.server.log_budget.take("revalidation_failed")) is not None:
                        log.exception(
                            "revalidation failed; keeping the connection for now%s", suppressed_note(left_out)
                        )
                    continue
            if current is not None:
                if current is not self.principal:  # roles changed: running calls that asked re-check access
                    self.server.forget_principal(self.principal)
                    self.principal = current
                    for callback in list(self._principal_watchers or ()):
                        try:
                            callback(current)
                        except Exception:
                            log.exception("a principal watcher failed")
            elif self.link is not None and not self.link.closed:
                self.server.audit(
                    "auth.revoked_connection",
                    peer=self.link.peer,
                    principal=self.principal.name,
                    token_id=self.principal.token_id,
                    reason="client certificate revoked" if revoked else None,
                    serial=f"0x{certificate[1]:x}" if revoked and certificate is not None else None,
                )
                message = "client certificate is revoked" if revoked else "credentials expired or revoked"
                for call_id, ticket in list(self.tickets.items()):
                    if call_id in self._recording:  # its handler has ended: its answer, being recorded, is a
                        continue  # retry's (the connection closes; the keyed retry gets it), not cancelled
                    self.core.send_error(call_id, Status.UNAUTHENTICATED, message)
                    self._cancel(call_id, ticket)
                self.core.send_goaway(Status.UNAUTHENTICATED, message)
                self.link.close()
                return
            else:  # the connection is gone, its detached calls run on: they must not act for a revoked principal
                self.server.audit(
                    "auth.revoked_connection",
                    peer=self.link.peer if self.link is not None else "?",
                    principal=self.principal.name,
                    token_id=self.principal.token_id,
                    reason="client certificate revoked" if revoked else "detached calls cancelled",
                    serial=f"0x{certificate[1]:x}" if revoked and certificate is not None else None,
                )
                for call_id in list(self._detached):  # not those only recording an answer: a retry gets it
                    if call_id not in self._recording and (held := self.tickets.get(call_id)) is not None:
                        self._cancel(call_id, held)
                return

    def _handshake_expired(self) -> None:
        if self.core.state in (ConnectionState.IDLE, ConnectionState.HANDSHAKE) and self.link is not None:
            self.server.counters["closed_handshake_timeout"] += 1
            self.core.send_goaway(Status.DEADLINE_EXCEEDED, "handshake timed out")
            self.link.close()

    # -- keepalive ------------------------------------------------------------------

    def _arm_keepalive(self) -> None:
        self._timer = self._loop.call_later(self.limits.ping_interval, self._keepalive)

    def _keepalive(self) -> None:
        link = self.link
        if link is None or link.closed:
            return
        if link.reading_paused:  # our doing, not the peer's silence
            self._last_seen = time.monotonic()
            if self in self.server.stream_waiting:
                # Paused until others' handlers read, maybe long: its close is not read meanwhile.
                # A Ping written (its Pong is not awaited) fails once the peer is gone.
                self.core.send_ping(int(time.monotonic() * 1000) & 0x7FFFFFFF)
                link.flush()
        idle = time.monotonic() - self._last_seen
        if self._ping_outstanding and idle >= self.limits.ping_timeout:
            self.core.send_goaway(Status.UNAVAILABLE, "keepalive timed out")
            link.close()
            return
        if idle >= self.limits.ping_interval and not self._ping_outstanding:
            self._ping_outstanding = True
            self.core.send_ping(int(time.monotonic() * 1000) & 0x7FFFFFFF)
            link.flush()
        delay = self.limits.ping_timeout if self._ping_outstanding else self.limits.ping_interval
        self._timer = self._loop.call_later(delay, self._keepalive)

    # -- connection limits ---------------------------------------------------------------

    def _check_idle(self) -> None:
        link = self.link
        if link is None or link.closed or self.core.state is not ConnectionState.OPEN:
            return
        idle = time.monotonic() - self._last_active
        if not self.tickets and idle >= self.limits.idle_timeout:
            self.server.counters["closed_idle"] += 1
            self.core.send_goaway(Status.OK, "idle timeout")
            link.close()
            return
        delay = self.limits.idle_timeout - idle if not self.tickets else self.limits.idle_timeout
        self._idle_timer = self._loop.call_later(max(delay, 0.001), self._check_idle)

    def _frame_begun_at(self, now: float) -> None:
        """A read ended inside a new frame: start its clock, and the watch if none is on."""
        self._frame_begun, self._frame_since = self._frames.begun, now
        if self._frame_timer is None:
            self._frame_timer = self._loop.call_later(self.limits.frame_timeout, self._check_frame)

    def _check_frame(self) -> None:
        self._frame_timer = None
        link, frames = self.link, self._frames
        if link is None or link.closed or not frames.buffered:
            return  # the frame arrived whole (the next one that stops partway starts the watch again)
        now = time.monotonic()
        if link.reading_paused:  # our doing, not the peer's: its clock starts again
            self._frame_since = now
        limits = self.limits
        due = self._frame_since + limits.frame_timeout + frames.buffered / limits.frame_min_rate
        if now < due:
            self._frame_timer = self._loop.call_later(due - now, self._check_frame)
            return
        self.server.counters["closed_slow_sender"] += 1
        if (left_out := self.server.log_budget.take("slow_sender")) is not None:
            log.warning(
                "closing connection %s: a frame arrived too slowly (%d bytes)%s",
                link.peer,
                frames.buffered,
                suppressed_note(left_out),
            )
        self.core.send_goaway(Status.DEADLINE_EXCEEDED, "frame too slow")
        link.close()

    def _args_cost_of(self, call: Call, entry: Entry) -> int:
        """What ``call``'s arguments may cost decoded; refused if the server cannot hold that now."""
        cost = len(call.args) * entry.growth
        server = self.server
        if server.args_memory + cost > self.limits.max_args_memory:
            server.counters["rejected_args_memory"] += 1
            raise ArgsMemoryFull(
                f"the server holds its limit of call arguments in memory (limits.max_args_memory); "
                f"this call's {len(call.args)} bytes of arguments may decode to {cost} bytes: retry shortly, "
                "or send smaller values",
                retry_after=1.0,
            )
        return cost

    # -- client-stream input ---------------------------------------------------------------

    def _on_item(self, item: Item) -> bool:
        """Queue an Item for its call's handler; True if its bytes took the connection past
        ``limits.max_stream_buffer`` and it was closed. Past ``limits.max_stream_buffer_total``
        on the whole server, a connection holding more than its share is no longer read from."""
        stream = self._inputs.get(item.id)
        if stream is None:  # its call ended or was refused: nothing will take it
            return False
        size = len(item.value)
        stream.feed(item.value, size)
        self.stream_bytes += size
        server = self.server
        server.stream_bytes += size
        limits = self.limits
        if self.stream_bytes <= limits.stream_share:
            return False
        if self.stream_bytes > limits.max_stream_buffer:
            self._close_for_abuse(
                f"stream items buffered past limits.max_stream_buffer ({limits.max_stream_buffer} bytes) "
                "by calls whose handlers have not taken them"
            )
            return True
        if server.stream_bytes > limits.max_stream_buffer_total and self not in server.stream_waiting:
            # Flow control: the rest of this read is queued (it was sent within credit), then
            # nothing more until this connection's handlers or the server's total make room.
            server.stream_waiting[self] = None
            server.counters["stream_buffer_paused"] += 1
            if self.link is not None:
                self.link.pause_reading("stream buffer")
        return False

    def stream_taken(self, size: int) -> None:
        """``size`` bytes of this connection's stream items were taken by a handler, or dropped
        with their call: uncount them, and read again from connections waiting for the room."""
        self.stream_bytes -= size
        server = self.server
        server.stream_bytes -= size
        waiting = server.stream_waiting
        if not waiting:
            return
        if server.stream_bytes <= self.limits.max_stream_buffer_total:  # every waiting connection reads again
            resumed = list(waiting)
            waiting.clear()
        elif self in waiting and self.stream_bytes <= self.limits.stream_share:  # this one alone
            del waiting[self]
            resumed = [self]
        else:
            return
        for session in resumed:
            if session.link is not None:
                session.link.resume_reading("stream buffer")

    def read_for_credit(self) -> None:
        """A handler waits for the peer's Credit: read again if paused for the stream buffer total.

        Left unread, that Credit would keep the handler from taking its next
        item, so the connection's items and the server's total would never
        fall: a two-way stream past the total stalled for good. Reading costs
        at most one read: an item past the total pauses the connection again.
        """
        waiting = self.server.stream_waiting
        if self in waiting:
            del waiting[self]
            if self.link is not None:
                self.link.resume_reading("stream buffer")

    def _grant(self, call_id: int, n: int) -> None:
        """A handler took ``n`` items of ``call_id``'s stream: let the peer send as many more."""
        if self.core.grant(call_id, n) and self.link is not None:
            self.link.schedule_flush()

    def _abused(self, kind: str, now: float, n: int = 1) -> bool:
        """Count ``n`` of ``kind`` in this window; past its cap, close the connection and say so."""
        if now - self._window_start >= ABUSE_WINDOW:
            self._window_start = now
            self._abuse.clear()
        self._abuse[kind] += n
        limit, reason = _ABUSE_CAPS[kind]
        if self._abuse[kind] <= getattr(self.limits, limit):
            return False
        self._close_for_abuse(reason)
        return True

    def _close_for_abuse(self, reason: str) -> None:
        link = self.link
        if link is None or link.closed or link.transport is None or link.transport.is_closing():
            return
        self.server.counters["closed_abuse"] += 1
        if (left_out := self.server.log_budget.take("abuse")) is not None:  # a flood of them logs a few
            self.server.audit(
                "connection.abuse",
                peer=link.peer,
                principal=self.principal.name,
                reason=reason,
                suppressed_before=left_out or None,
            )
            log.warning("closing connection %s: %s%s", link.peer, reason, suppressed_note(left_out))
        self.cut_off = True  # a peer cut off for abuse leaves no call running on (once.py)
        self._claimed.clear()
        self.core.send_goaway(Status.RESOURCE_EXHAUSTED, reason)
        link.close()

    def _audit_denial(self, method: str, status: Status) -> None:
        """Audit a denied call; past DENIALS_AUDITED per connection per 10 s, count
        instead of writing, so a denial flood cannot flood the audit log."""
        if self.link is None:
            return
        now = time.monotonic()
        if now - self._denial_window >= 10.0:
            self._denial_window, self._denials_logged = now, 0
        if self._denials_logged >= DENIALS_AUDITED:
            self._denials_suppressed += 1  # this connection's count: its next record reports it
            return
        # Past the server-wide budget the budget counts it: the next record on any connection reports it.
        if (server_wide := self.server.log_budget.take("denied", DENIALS_AUDITED_SERVER_WIDE)) is None:
            return
        self._denials_logged += 1
        suppressed, self._denials_suppressed = self._denials_suppressed + server_wide, 0
        if len(method) > AUDITED_METHOD_CHARS:
            method = f"{method[:AUDITED_METHOD_CHARS]}... ({len(method)} characters)"
        self.server.audit(
            "call.denied",
            peer=self.link.peer,
            principal=self.principal.name,
            method=method,
            status=status.name,
            suppressed_before=suppressed or None,
        )
