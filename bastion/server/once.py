"""Calls under an idempotency key: the session's half of ``IdempotencyKeys`` (dispatch.py).

A unary call whose metadata carries ``idempotency-key`` claims the key in
the store before its handler runs; a claim already answered is replayed
instead of running the handler, and the answer is recorded before it is
sent, so a client that lost the connection and retries elsewhere gets it.
Streams refuse a key (INVALID_ARGUMENT), and so does a server without
``server.idempotency`` (FAILED_PRECONDITION). ``IdempotentCalls`` is mixed
into ``ServerSession``, which sets every attribute and method stubbed here.

Lost connections. A call holding its claim (``_claimed``: from the claim's
write until its answer is recorded or the claim given back) whose connection is
lost is not cancelled with the others: ``_detach_claimed`` lets it run to
its end -- still bounded by its deadline, or by its claim's lease without
one, and still holding its scheduler slot and argument memory -- so its
answer is recorded and the client's retry gets it, not "outcome unknown".
Nothing is sent. A Cancel, the call's deadline, a shutdown's abort and a
connection closed for abuse take the call out of ``_claimed`` first (an
abuse close also sets ``cut_off``: a call that claims its key while the close
waits on its last write is not detached either), so they still cancel it;
so does revalidation (upkeep.py), which goes on while
detached calls run and cancels them once the credential is revoked or
expired. At most ``limits.max_detached_calls`` such calls run in the server
(``limits.max_detached_calls_per_principal`` for one
principal; ``IdempotencyKeys.detach``); past that the call is cancelled as
before. The session stays in ``server.sessions`` (not counted as a
connection) until its last detached call ends, so a drain waits for them
within its grace period and then cancels them with the rest.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import TYPE_CHECKING, Any

import msgspec

from bastion.exceptions import CallError, FailedPrecondition, InvalidArgument
from bastion.protocol.connection import Connection
from bastion.protocol.messages import Call
from bastion.security.principal import Principal
from bastion.server.dispatch import RELEASED_ON, UNKNOWN_ON, Entry, IdempotencyKeys
from bastion.server.scheduler import Ticket
from bastion.status import Status
from bastion.transport.aio import Link

if TYPE_CHECKING:
    from bastion.server.server import Server

__all__ = ["IdempotentCalls"]


class IdempotentCalls:
    """The idempotency-key half of ``ServerSession``."""

    server: Server
    core: Connection
    link: Link | None
    principal: Principal
    peer_host: str
    tickets: dict[int, Ticket]
    #: Calls holding their claim -> when their claim's lease runs out (time.monotonic; None: their deadline is sooner).
    _claimed: dict[int, float | None]
    #: Keyed calls whose handler has ended, their answer being recorded: nothing cancels them (``_lease_moot``).
    _recording: set[int]
    #: Calls running on after the connection was lost -> (their key's owner, the timer of their lease or None).
    _detached: dict[int, tuple[str, asyncio.TimerHandle | None]]
    _loop: asyncio.AbstractEventLoop
    _closed: asyncio.Event
    _revalidation: asyncio.Task[None] | None
    cut_off: bool  # closed for abuse (upkeep.py)

    def _started(self, call_id: int) -> None:
        raise NotImplementedError  # the session's: the call's handler starts

    def _arm_deadline(self, call_id: int, deadline: float) -> int:
        raise NotImplementedError  # the session's: cancel the call's task at its deadline

    def _park(self, call_id: int, result: Any) -> msgspec.Raw:
        raise NotImplementedError  # CallRunner's: an answer encoded to wait for the peer, its slot given back

    async def _invoke(self, call_id: int, entry: Entry, args: dict[str, Any], *, record: bool = False) -> Any:
        raise NotImplementedError  # the session's: run the handler

    async def _writable(self) -> None:
        raise NotImplementedError  # the session's: wait while the peer is not reading

    def _expire(self, call_id: int) -> None:
        raise NotImplementedError  # the session's: its deadline cancels the call

    def _idempotency_key(self, call: Call, entry: Entry) -> str | None:
        """The call's idempotency key, if it carries one it may use; else raise."""
        key = IdempotencyKeys.key_of(call.metadata)
        if key is None:
            return None
        if entry.streams_out or entry.input_decoder is not None:
            raise InvalidArgument(f"{call.method}: idempotency keys apply to unary calls only, not streams")
        if entry.spec.public:
            # Public methods need no key (login, whoami...), and their answers (session tokens) must
            # not be kept in the store; anonymous callers must not create durable records either.
            raise InvalidArgument(f"{call.method}: idempotency keys are not accepted on public methods")
        if self.server.idempotency is None:
            raise FailedPrecondition("this server does not keep idempotency keys (it has no shared store)")
        return key

    def _key_owner(self) -> str:
        return self.principal.name if self.principal.authenticated else f"anonymous@{self.peer_host}"

    async def _run_once(
        self,
        call: Call,
        entry: Entry,
        args: dict[str, Any],
        deadline: float | None,
    ) -> None:
        """Run a call under its idempotency key: replay the first answer, or run it and record its answer."""
        keys = self.server.idempotency
        assert keys is not None
        key = self._idempotency_key(call, entry)
        assert key is not None
        principal = self._key_owner()
        now = time.monotonic()
        left = None if deadline is None else max(0.0, deadline - now)
        lease_end = now + keys.lease  # no later than the claim's, which begin reckons from its own start
        # From before the claim is written: a connection lost while it is being written leaves no claim
        # without a call behind it (the write goes on without its waiter), but a call run to its end.
        self._claimed[call.id] = lease_end if deadline is None else None
        try:
            claimed = await keys.begin(principal, key, call.method, bytes(call.args), left)
            if not isinstance(claimed, str):
                self._started(call.id)
                status, message, value = keys.replay(claimed)
                if status is Status.OK:
                    self.core.send_result(call.id, value)
                else:
                    self.core.send_error(call.id, status, message or status.name)
                return
            owner = claimed
            slot = self._arm_deadline(call.id, deadline) if deadline is not None else None
            try:
                try:
                    encoded = await self._invoke(call.id, entry, args, record=True)
                finally:
                    if slot is not None:  # the deadline bounds the handler, not the bookkeeping below
                        self.server.deadlines.disarm(slot, self, call.id)
                    self._lease_moot(call.id)  # and so does the lease of a detached call
            except CallError as exc:
                if exc.status in RELEASED_ON:
                    await keys.release(principal, key, owner)
                elif exc.status in UNKNOWN_ON:
                    pass  # it may have taken effect: keep the claim (see bastion/server/dispatch.py)
                else:
                    await keys.finish(principal, key, owner, exc.status, exc.message, None)
                raise
            except (TimeoutError, asyncio.CancelledError):  # deadline, client cancel, shutdown, or a lost
                raise  # connection past the detach caps: its writes may have committed: keep the claim
            except Exception:
                failed = "internal error (the first attempt failed)"
                await keys.finish(principal, key, owner, Status.INTERNAL, failed, None)
                raise
            await keys.finish(principal, key, owner, Status.OK, None, encoded)
        finally:
            self._claimed.pop(call.id, None)
            self._recording.discard(call.id)
        if call.id in self._detached:
            return  # its connection is gone: the answer waits in the store for the retry
        answer = msgspec.Raw(encoded) if encoded is not None else None
        if self.link is not None and self.link.writing_paused:
            answer = self._park(call.id, answer)  # waits without its scheduler slot (calls.py)
            await self._writable()
        self.core.send_result(call.id, answer)

    def _detach_claimed(self) -> None:
        """The connection is lost: let the calls holding their claim run on, within the caps (see above)."""
        keys = self.server.idempotency
        if not self._claimed or keys is None or self.cut_off:  # closed for abuse: its calls are cancelled
            return
        limits = self.server.limits
        principal = self._key_owner()
        for call_id, lease_end in list(self._claimed.items()):
            ticket = self.tickets.get(call_id)
            task = ticket.task if ticket is not None else None
            if task is None or task.done() or task.cancelling():
                continue
            if not keys.detach(principal, limits.max_detached_calls, limits.max_detached_calls_per_principal):
                continue
            timer = None
            if lease_end is not None:  # no deadline: its claim's lease bounds it
                timer = self._loop.call_later(max(0.0, lease_end - time.monotonic()), self._expire, call_id)
            self._detached[call_id] = (principal, timer)
            task.add_done_callback(functools.partial(self._detached_ended, call_id, keys))
        if self._detached:  # the session lives on for them, without the connection's buffers (up to max_frame)
            self.core.reader.discard()  # a partial frame, cut off with the connection
            self.core.output.take()  # what was never sent

    def _lease_moot(self, call_id: int) -> None:
        """The handler has ended: the claim's lease no longer bounds the call, so recording its answer
        (``keys.finish``) is not cancelled half-way, leaving a claim "running" for a call that ended; nor
        by a revalidation finding the principal revoked (upkeep.py): it acts for nobody any more."""
        self._recording.add(call_id)
        if self._claimed.get(call_id) is not None:
            self._claimed[call_id] = None  # detached later: no lease timer
        held = self._detached.get(call_id)
        if held is not None and held[1] is not None:
            held[1].cancel()
            self._detached[call_id] = (held[0], None)

    def _detached_ended(self, call_id: int, keys: IdempotencyKeys, task: object) -> None:
        """A detached call's task is done (its ``finally`` has run): count it out; the last one closes the session."""
        principal, timer = self._detached.pop(call_id)
        if timer is not None:
            timer.cancel()
        keys.detached(principal)
        if not self._detached:
            if self._revalidation is not None:  # it went on only for the detached calls (upkeep.py)
                self._revalidation.cancel()
            self.server.sessions.discard(self)  # the session lived on for its detached calls
            self._closed.set()
