"""One client connection on the server: handshake, calls, streams, drain.

Theory of operation. A ``ServerSession`` sits on a ``Link`` (the asyncio
edge) and reacts to the messages the sans-IO core decodes. Its upkeep of the
connection -- the handshake under one deadline from accept, revalidation of
the credential, keepalive, the idle timer and the abuse caps -- is
``SessionUpkeep`` (upkeep.py); running a call, in a task or inline and under
its deadline, is ``CallRunner``'s (calls.py). After the Welcome, each Call is admitted by
the method table (exists, allowed, valid arguments) and, if admitted, runs as
its own task; its answer goes back through the core and is flushed at the
end of the loop turn together with any other answers ready by then. A
handler that cannot suspend (``Entry.inline``: no await in its body) runs
at once instead, without a task, when the scheduler has a slot free and
nothing queued (``_run_inline``); its answer leaves with the read's others. A Cancel
cancels the task; the deadline a call carries bounds its handler: the
server's deadline slots cancel the task if it is still running then
(``_arm_deadline``; bastion/server/deadlines.py). Draining: after GoAway, the
session closes once its last call has answered.

Limits on the calls (docs/security.md, section 7). Calls accepted but not
yet started (``_queued``) past ``read_high_water`` pause reading until they
start. A finished unary handler whose peer is not reading sends its answer
once the peer reads (the Link stops reading meanwhile): the answer waits
encoded, counted in ``limits.max_args_memory`` (one connection's, up to a
sixteenth of it), and gives its scheduler slot back (``_park``), so a peer
that stops reading cannot hold the slots other callers' calls need; a peer
that never reads is dropped by the Link. A task
cancelled before it ever ran (a Call and its Cancel in one read) never runs
its ``finally``, so the Cancel cleans up after it.

Idempotency keys: a unary call whose metadata carries ``idempotency-key``
runs under it (once.py, ``IdempotentCalls``; the store's half is
``IdempotencyKeys`` in dispatch.py). Holding its claim, such a call is not
cancelled when the connection is lost but runs to its end (``on_close``;
once.py says how far), and the session stays in ``server.sessions`` until it has.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import math
import time
from typing import TYPE_CHECKING

from bastion.exceptions import (
    CallError,
    InvalidArgument,
)
from bastion.observability.loglimit import suppressed_note
from bastion.protocol.connection import Connection, ProtocolLimits
from bastion.protocol.messages import (
    Call,
    Cancel,
    Credit,
    End,
    GoAway,
    Hello,
    Item,
    Message,
    Ping,
    Pong,
)
from bastion.protocol.state import ConnectionState, Role
from bastion.security.principal import ANONYMOUS, Principal
from bastion.server.calls import CallRunner
from bastion.server.dispatch import GROWTH, Entry, IdempotencyKeys
from bastion.server.scheduler import Ticket, TicketState, effective_priority
from bastion.server.streams import CreditGate, InputStream
from bastion.server.upkeep import ABUSE_WINDOW as ABUSE_WINDOW  # re-exported: importable from here as before
from bastion.server.upkeep import ARGS_COUNTED, ArgsMemoryFull, SessionUpkeep
from bastion.server.upkeep import DENIALS_AUDITED as DENIALS_AUDITED
from bastion.status import Status
from bastion.transport.aio import Link

if TYPE_CHECKING:
    from bastion.server.server import Server

__all__ = ["ServerSession"]

log = logging.getLogger("bastion.server")
_REJECTED_KEY = {status: f"rejected_{status.name.lower()}" for status in Status}
_OK = Status.OK
_REJECTED = TicketState.REJECTED
_QUEUED = TicketState.QUEUED
_DRAINING = ConnectionState.DRAINING
#: What a refused call to a method the server lacks is charged as: a peer's names must not fill the limiter's caches.
REFUSED_METHOD = "<refused>"
_session_ids = itertools.count(1)
#: The metadata of a call that carries none: one read-only mapping for all (handlers must not change it).


class ServerSession(SessionUpkeep, CallRunner):
    """The server's side of one connection (its upkeep of the connection: upkeep.py)."""

    def __init__(self, server: Server, source: str | None = None) -> None:
        self.server = server
        #: The peer's IP address, counted against max_connections_per_source (None: not from a listener).
        self.source = source
        self.slot_released = False
        #: Counted against max_handshakes_per_source until its Welcome (or close): sources.py.
        self.handshaking = source is not None
        self.limits = server.limits
        self.id = next(_session_ids)
        self.core = Connection(
            Role.SERVER,
            ProtocolLimits(
                max_frame=self.limits.max_frame,
                handshake_max_frame=self.limits.handshake_max_frame,
                max_inflight=self.limits.max_inflight,
                window=self.limits.window,
            ),
        )
        self.link: Link | None = None
        self.principal: Principal = ANONYMOUS
        self.peer_host = "?"  # the source address alone, the key for per-source limits
        self.anonymous_key = "anonymous@?"  # an anonymous caller's scheduler queue: its source (handshake)
        self._denial_window = 0.0  # start of the current 10 s audit window for denials
        self._denials_logged = 0
        self._denials_suppressed = 0
        self.tickets: dict[int, Ticket] = {}  # calls admitted: queued in the scheduler or running
        self._inputs: dict[int, InputStream] = {}
        self.stream_bytes = 0  # of the items _inputs hold: limits.max_stream_buffer (upkeep.py)
        self._gates: dict[int, CreditGate] = {}
        self._resumable: set[int] = set()  # running calls of resumable streams (Service.method)
        self._loop = asyncio.get_running_loop()
        # Made by the server's protocol factory at accept, before any TLS handshake: one deadline covers the
        # TLS and the bastion handshakes (sooner for a connection into the reserved ones: Server._admit).
        self.handshake_deadline = self._loop.time() + self.limits.handshake_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._last_seen = time.monotonic()
        self._read_at = time.perf_counter()  # the latest read's arrival, for its calls' latency
        #: Calls of the current read answered inline, (metrics row, status): counted at its end.
        self._answered: list[tuple[int, int]] = []
        self._ping_outstanding = False
        self._closed = asyncio.Event()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._revalidation: asyncio.Task[None] | None = None  # re-checks a revocable credential
        self._last_active = self._last_seen  # last traffic other than Ping/Pong, or a call's end
        self._queued: set[int] = set()  # calls accepted whose handler has not started
        self._queue_full = False  # reading paused for _queued
        self._window_start = self._last_seen
        self._abuse: collections.Counter[str] = collections.Counter()
        self._refused_seen = 0
        self._args_cost: dict[int, int] = {}  # calls holding large arguments -> their cost (upkeep.py)
        self._parked: dict[int, int] = {}  # calls whose answers wait encoded -> their bytes (calls.py, _park)
        self._parked_bytes = 0
        self._timing: dict[int, tuple[int, float]] = {}  # admitted call -> (metrics method row, perf_counter at start)
        self._expired: set[int] = set()  # running calls whose deadline timer has cancelled them
        self._queue_deadlines: dict[int, int] = {}  # calls queued with a deadline -> its slot (server.deadlines)
        self._claimed: dict[int, float | None] = {}  # keyed calls holding their claim (once.py)
        self._recording: set[int] = set()  # keyed calls whose handler ended, their answer being recorded (once.py)
        self._detached: dict[int, tuple[str, asyncio.TimerHandle | None]] = {}  # run on, the connection lost
        self.lost = False  # the connection is closed (the session may live on for detached calls: once.py)
        #: Methods this connection's principal was admitted to, with that principal (the table's
        #: checks depend on nothing else; a revalidated principal is a new object and checks again).
        self._admitted: dict[str, tuple[Principal, Entry]] = {}
        self._frames = self.core.reader  # its partial frame's pace is watched (upkeep.py)
        self._frame_begun = 0  # the partial frame being watched, by the reader's count of them
        self._frame_since = 0.0
        self._frame_timer: asyncio.TimerHandle | None = None

    # -- Session protocol ---------------------------------------------------------

    def on_connect(self, link: Link) -> None:
        self.link = link
        self.server.sessions.add(self)
        self._timer = self._loop.call_at(self.handshake_deadline, self._handshake_expired)

    def on_close(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._frame_timer is not None:
            self._frame_timer.cancel()
        if self.link is not None and self.link.dropped is not None:
            self.server.counters["closed_slow_reader"] += 1
            if (left_out := self.server.log_budget.take("slow_reader")) is not None:
                log.warning("dropped connection %s: %s%s", self.link.peer, self.link.dropped, suppressed_note(left_out))
        self.lost = True
        self.server.release(self)
        self._detach_claimed()  # keyed calls holding their claim run on (once.py); the session lives until they end
        if self._revalidation is not None and not self._detached:  # else it goes on for them (_detached_ended ends it)
            self._revalidation.cancel()
        if not self._detached:
            self.server.sessions.discard(self)
        self.server.forget_principal(self.principal)
        self.server.stream_waiting.pop(self, None)  # its items are uncounted as its calls end
        for call_id, ticket in list(self.tickets.items()):
            if call_id not in self._detached:
                self._cancel(call_id, ticket)
        for stream in self._inputs.values():
            stream.fail(asyncio.CancelledError())
        for gate in self._gates.values():
            gate.close()
        if not self._detached:
            self._closed.set()

    def on_events(self, events: list[Message]) -> None:
        now = self._last_seen = time.monotonic()
        self._read_at = time.perf_counter()  # when this read's calls arrived (their latency counts from it)
        if self._frames.buffered and self._frames.begun != self._frame_begun:
            self._frame_begun_at(now)  # a read ended inside a new frame
        try:
            pings = pongs = 0
            for event in events:
                cls = type(event)
                if cls is Call:
                    self._on_call(event)  # type: ignore[arg-type]
                elif cls is Item:
                    if self._on_item(event):  # type: ignore[arg-type]
                        return
                elif cls is End:
                    stream = self._inputs.get(event.id)  # type: ignore[union-attr]
                    if stream is not None:
                        stream.end()
                elif cls is Credit:
                    gate = self._gates.get(event.id)  # type: ignore[union-attr]
                    if gate is not None:
                        gate.open()
                elif cls is Cancel:
                    ticket = self.tickets.get(event.id)  # type: ignore[union-attr]
                    if ticket is not None:
                        self._cancel(event.id, ticket)  # type: ignore[union-attr]
                    if self._abused("cancels", now):
                        return
                elif cls is Pong:
                    self._ping_outstanding = False
                    pongs += 1
                elif cls is Ping:  # the core has queued the Pong
                    pings += 1
                    if self._abused("pings", now):
                        return
                elif cls is Hello:
                    self._loop.create_task(self._handshake(event))  # type: ignore[arg-type]
                elif cls is GoAway:
                    self._maybe_finish_drain()
            if pings + pongs < len(events) or not events:
                self._last_active = now
            refused = self.core.refused_calls - self._refused_seen
            if refused:
                self._refused_seen += refused
                self.server.counters["rejected_inflight"] += refused
                if self._abused("refused", now, refused):
                    return
            if len(self._queued) >= self.limits.read_high_water and self.link is not None:
                self._queue_full = True
                self.link.pause_reading("queued calls")
        finally:
            if self._answered:  # _count_answered's check, without the call for a read that answered none
                self._count_answered()

    def _count_answered(self) -> None:
        """Count the calls answered inline since the last time in the server's metrics, as one
        batch: their answers leave together, at the end of the read that brought them."""
        if self._answered:
            self.server.metrics.record_together(self._answered, self._read_at)
            self._answered = []

    def _started(self, call_id: int) -> None:
        queued = self._queued
        queued.discard(call_id)
        if self._queue_full and len(queued) <= self.limits.read_high_water // 2 and self.link is not None:
            self._queue_full = False
            self.link.resume_reading("queued calls")

    def _forget(self, call_id: int, status: Status = Status.CANCELLED, *, ran: bool = False) -> None:
        """Drop a call's state: it ended with ``status``, or it never ran (cancelled or refused while
        queued, or cancelled before its task's first step, so no ``finally`` runs).

        ``ran``: its task ends here, its answer (if any) queued. With no other call of the connection
        running, no other answer can join it in this loop turn: it is written now, without a flush
        scheduled for the end of the turn (a loop callback less per call)."""
        timing = self._timing.pop(call_id, None)  # _record, inline: count it unless counted already
        if timing is not None:
            self.server.metrics.record_since(timing[0], status, timing[1])
        self._last_active = time.monotonic()  # idleness counts from the end of the last call
        if call_id in self._queued:  # it failed before its handler started
            self._started(call_id)
        if self._expired:
            self._expired.discard(call_id)
        if self._queue_deadlines and (slot := self._queue_deadlines.pop(call_id, None)) is not None:
            self.server.deadlines.disarm(slot, self, call_id)
        self.tickets.pop(call_id, None)
        if self._args_cost:
            self.server.args_memory -= self._args_cost.pop(call_id, 0)
            if self._parked:  # parked calls are in _args_cost too: nothing more per call when peers read
                parked = self._parked.pop(call_id, 0)
                self._parked_bytes -= parked
                self.server.parked_memory -= parked
        if self._inputs and (stream := self._inputs.pop(call_id, None)) is not None:
            self.stream_taken(stream.discard())
        if self._gates:
            gate = self._gates.pop(call_id, None)
            if gate is not None:
                gate.close()
                self._resumable.discard(call_id)
        link = self.link
        if link is not None:
            if ran and not self.tickets and not link.flush_scheduled:
                link.flush()
            else:
                link.schedule_flush()
        if self.core.state is _DRAINING:  # a GoAway went one way or the other: close after the last call
            self._maybe_finish_drain()

    def _cancel(self, call_id: int, ticket: Ticket) -> None:
        """Cancel a call's job. One that will never run -- still queued, or its task not yet
        begun (a Call and its Cancel in one read) -- is forgotten now: no ``finally`` of its will."""
        if self._claimed:
            self._claimed.pop(call_id, None)  # cancelled: it does not run on if the connection is lost
        self.server.scheduler.cancel(ticket)
        if ticket.state is TicketState.CANCELLED or not ticket.started:
            self._forget(call_id)

    def _rejected(self, call_id: int, status: Status, message: str, retry_after: float | None) -> None:
        """The scheduler refused a call (queue full, shed, deadline passed while queued)."""
        self.server.counters[_REJECTED_KEY[status]] += 1
        retry = math.ceil(retry_after * 1000) if retry_after is not None else None
        self.core.send_error(call_id, status, message, retry_after_ms=retry)
        self._forget(call_id, status)

    async def _writable(self) -> None:
        """Wait while the peer is not taking what was already sent."""
        while self.link is not None and self.link.writing_paused:
            await self.link.drain()

    # -- calls ------------------------------------------------------------------------

    def _on_call(self, call: Call) -> None:
        server = self.server
        server.counters["calls"] += 1
        started = self._read_at
        metrics = server.metrics
        call_id = call.id
        cost = 0
        deferred = False  # an inline call of flat arguments: counted only if it waits (see below)
        try:
            admitted = self._admitted.get(call.method)
            if admitted is not None and admitted[0] is self.principal:
                entry = admitted[1]
            else:  # first call to the method, or the principal changed (revalidated: a new object)
                entry = server.table.admit(call.method, self.principal)
                self._admitted[call.method] = (self.principal, entry)
            if call.stream is not entry.streams_in:  # bools: msgspec decodes the singletons
                raise InvalidArgument(entry.stream_mismatch)
            if len(call.args) >= ARGS_COUNTED:  # before decoding: it is the cost (flat ones too: they queue)
                if entry.inline and entry.growth == GROWTH[0]:  # decoded flat: twice its bytes, for one step
                    deferred = True
                else:
                    cost = self._args_cost_of(call, entry)
            # By position where the handler takes them so, unless metadata may ask for the idempotent path.
            raw = call.args
            args = entry.decode_values(raw) if entry.positional and not call.metadata else entry.decode_args(raw)
            if call.metadata:
                self._idempotency_key(call, entry)  # refuse a bad or unusable key now; claimed when the call runs
            if server.check_rate is not None:
                server.check_rate(self.principal, self.peer_host, call.method, None, self._last_seen)
        except CallError as exc:
            if server.check_rate is not None and exc.status is not Status.RESOURCE_EXHAUSTED:
                method = call.method if call.method in server.table.entries else REFUSED_METHOD
                try:  # refused before the limiter was asked: such calls cost the server too
                    server.check_rate(self.principal, self.peer_host, method, None, self._last_seen)
                except CallError as limited:
                    exc = limited
            if exc.status is Status.RESOURCE_EXHAUSTED and not isinstance(exc, ArgsMemoryFull):
                self.server.counters["rejected_rate_limited"] += 1
            if exc.status in (Status.UNAUTHENTICATED, Status.PERMISSION_DENIED):
                self.server.counters["auth_failures_denied"] += 1
                self._audit_denial(call.method, exc.status)
            self._answer_error(call.id, exc)
            metrics.record_since(metrics.method_index(call.method), exc.status, started)
            return
        deadline = None
        if call.timeout_ms is not None:
            if call.timeout_ms <= 0:
                self.core.send_error(call.id, Status.DEADLINE_EXCEEDED, "deadline passed before the call started")
                metrics.record_since(metrics.method_index(call.method), Status.DEADLINE_EXCEEDED, started)
                return
            deadline = self._last_seen + call.timeout_ms / 1000  # on_events read the clock just now
        priority = entry.spec.priority
        if call.priority is not None:
            priority = effective_priority(priority, call.priority)
        if entry.inline:  # unary, so no streams to set up
            link = self.link
            if not self.core.is_open(call_id) or (link is not None and link.dropped is not None):
                # Its Cancel came later in this very read (the core has closed it), or the
                # connection was dropped: a task would be cancelled before its first step.
                self._answered.append((entry.metric_row, Status.CANCELLED))
                return
            if (
                server.check_rate_async is None
                and (not call.metadata or IdempotencyKeys.key_of(call.metadata) is None)
                and not (link is not None and link.writing_paused)  # else its answer must wait
                and server.scheduler.run_inline(priority)
            ):
                self._answered.append((entry.metric_row, self._run_inline(call, entry, args, deadline)))
                if link is not None:  # written at the end of the read, or now if that is a lot:
                    link.flush_if_full()  # then writing may pause, and the next answer waits
                return
        else:  # streams exist before the task runs: items may be in this very read
            if entry.input_decoder is not None:
                grant = functools.partial(self._grant, call_id)
                stream = InputStream(entry.input_decoder, self.limits.window, grant, self)
                self._inputs[call_id] = args[entry.spec.input_param] = stream  # type: ignore[index]
            if entry.streams_out:
                self._gates[call_id] = CreditGate()
                if entry.spec.resumable:  # drain() ends it at once
                    self._resumable.add(call_id)
        if deferred:  # it could not run at once: it waits, holding its arguments, so it counts
            try:
                cost = self._args_cost_of(call, entry)
            except ArgsMemoryFull as exc:
                self._answer_error(call_id, exc)
                metrics.record_since(metrics.method_index(call.method), exc.status, started)
                return
        principal = self.principal
        self._timing[call_id] = (entry.metric_row, started)  # before submit: it may reject
        if cost:  # held until the call ends (_forget)
            server.args_memory += cost
            self._args_cost[call_id] = cost
        ticket = server.scheduler.submit(
            functools.partial(self._run, call, entry, args, deadline),
            priority=priority,
            principal=principal.name if principal.authenticated else self.anonymous_key,
            deadline=deadline,
            on_reject=functools.partial(self._rejected, call_id),
            reports_end=True,
            owner=self.link,  # held queued while its peer does not read (scheduler.py, "Held jobs")
        )
        if ticket.state is not _REJECTED:
            self.tickets[call_id] = ticket
            self._queued.add(call_id)
            if deadline is not None and ticket.state is _QUEUED:  # answered at its deadline if still waiting
                self._queue_deadlines[call_id] = server.deadlines.arm(self._loop, deadline, self, call_id)

    async def wait_closed(self) -> None:
        await self._closed.wait()
