"""Running an admitted call: its handler, in a task or inline, under its deadline (``ServerSession``'s).

``CallRunner`` is mixed into ``ServerSession`` (session.py, where the theory
of operation is), which admits each call and sets every attribute stubbed
here. It builds on the idempotency-key path (``IdempotentCalls``, once.py)
and the failed-call answers (``CallFailures``, failures.py): ``_run`` runs a
call in the task the scheduler started for it, ``_run_inline`` a handler that
cannot suspend at once, ``_invoke`` a streaming or synchronous handler;
``_arm_deadline`` and ``_expire`` bound a running call by its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from bastion.exceptions import CallError
from bastion.protocol.frames import ENCODE_ERRORS, encode_error
from bastion.protocol.messages import Call
from bastion.security.principal import Principal
from bastion.server.dispatch import Entry, IdempotencyKeys
from bastion.server.failures import CallFailures
from bastion.server.once import IdempotentCalls
from bastion.server.scheduler import Ticket, TicketState
from bastion.server.streams import CreditGate
from bastion.service import Context, MethodSpec
from bastion.status import Status

__all__ = ["Args", "CallRunner"]

log = logging.getLogger("bastion.server")
_OK = Status.OK
#: The share of ``limits.max_args_memory`` one connection's waiting answers may hold (``_park``): past it
#: they wait in their scheduler slots, so a few connections that stop reading cannot take the memory
#: other callers' arguments are admitted against.
PARKED_SHARE = 16
#: A call's arguments: by name, or by position for a handler that takes them so (``Entry.positional``).
Args = dict[str, Any] | tuple[Any, ...]


class CallRunner(IdempotentCalls, CallFailures):
    """The running of ``ServerSession``'s calls."""

    _gates: dict[int, CreditGate]
    _queue_deadlines: dict[int, int]  # calls queued with a deadline -> its slot in server.deadlines
    _args_cost: dict[int, int]  # calls holding memory counted in server.args_memory -> how much (upkeep.py)
    _parked: dict[int, int]  # calls whose answers wait encoded (_park) -> their bytes, also in _args_cost
    _parked_bytes: int  # their sum

    def _forget(self, call_id: int, status: Status = Status.CANCELLED, *, ran: bool = False) -> None:
        raise NotImplementedError  # the session's: drop a call's state, it ended with ``status``

    def read_for_credit(self) -> None:
        raise NotImplementedError  # the session's (upkeep.py): read on while a stream waits for credit

    def watch_principal(self, callback: Callable[[Principal], None]) -> Callable[[], None]:
        raise NotImplementedError  # the session's (upkeep.py): a Context follows its principal through it

    def end_at_drain(self, call_id: int, ending: Callable[[bool], CallError]) -> Callable[[], None]:
        raise NotImplementedError  # the session's (upkeep.py): a resumable stream's own ending at a drain

    async def _run(self, call: Call, entry: Entry, args: Args, deadline: float | None, ticket: Ticket) -> None:
        """The call, in the task the scheduler started for it; reports its end to the scheduler itself
        (``reports_end``: no coroutine around this one)."""
        ticket.started = True
        call_id = call.id
        spec = entry.spec
        status = _OK  # for the metrics
        ended = True
        try:
            if self.server.check_rate_async is not None:  # a shared (Redis) limiter answers asynchronously
                try:
                    await self.server.check_rate_async(self.principal, self.peer_host, spec.full_name)
                except CallError as exc:  # counted as _on_call counts the in-process limiter's refusals
                    if exc.status is Status.RESOURCE_EXHAUSTED:
                        self.server.counters["rejected_rate_limited"] += 1
                    raise
            if spec.context_param is not None:
                context = self._context(call, spec, deadline)
                if isinstance(args, tuple):
                    args = (context, *args)
                else:
                    args[spec.context_param] = context
            if isinstance(args, dict) and call.metadata and IdempotencyKeys.key_of(call.metadata) is not None:
                await self._run_once(call, entry, args, deadline)
            elif entry.unary_async:  # _invoke's path for it, inline: the usual call, one coroutine fewer
                slot = self._arm_deadline(call_id, deadline) if deadline is not None else None
                try:
                    self._started(call_id)
                    result = await (spec.handler(*args) if isinstance(args, tuple) else spec.handler(**args))
                finally:
                    if slot is not None:
                        self.server.deadlines.disarm(slot, self, call_id)
                if self.link is not None and self.link.writing_paused:
                    result = self._park(call_id, result)  # encoded: the decoded answer is let go
                    await self._writable()
                self.core.send_result(call_id, result)
            elif deadline is None:
                assert isinstance(args, dict)  # tuples are for entry.positional, which are unary_async
                await self._invoke(call_id, entry, args)
            else:
                assert isinstance(args, dict)
                slot = self._arm_deadline(call_id, deadline)
                try:
                    await self._invoke(call_id, entry, args)
                finally:
                    self.server.deadlines.disarm(slot, self, call_id)
        except (Exception, asyncio.CancelledError) as exc:
            status = self._failed(call_id, spec, exc)
        except GeneratorExit:
            if asyncio._get_running_loop() is not self._loop:
                ended = False  # closed unfinished as its loop went away: nothing runs any more
                raise
            status = self._failed(call_id, spec, RuntimeError("the handler raised GeneratorExit"))
        finally:
            try:
                self._forget(call_id, status, ran=True)
            except Exception:
                log.exception("scheduler: a job raised")
            finally:
                if ended:
                    self.server.scheduler.finished(ticket)

    def _run_inline(self, call: Call, entry: Entry, args: Args, deadline: float | None) -> Status:
        """Run a handler that cannot suspend (``Entry.inline``) to its end now, and answer; its status.

        ``_run`` without the task: the handler's coroutine ends in its first step,
        taken here in a copy of the context (as a task would run it). No deadline
        or cancel can reach it: it gives them no await to arrive at.
        """
        call_id = call.id
        spec = entry.spec
        server = self.server
        server.inline_running += 1  # in flight (admin.stats) while it runs
        try:
            if spec.context_param is not None:
                context = self._context(call, spec, deadline)
                if isinstance(args, tuple):
                    args = (context, *args)
                else:
                    args[spec.context_param] = context
            coro = spec.handler(*args) if isinstance(args, tuple) else spec.handler(**args)
            try:
                contextvars.copy_context().run(coro.send, None)
            except StopIteration as stop:
                self.core.send_result(call_id, stop.value)
                return _OK
            coro.close()  # never_suspends said it could not get here
            raise RuntimeError(f"{spec.full_name} suspended although it has no await")
        except (Exception, asyncio.CancelledError) as exc:
            return self._failed(call_id, spec, exc)
        finally:
            server.inline_running -= 1

    def _park(self, call_id: int, result: Any) -> msgspec.Raw:
        """A finished unary call's answer, encoded to wait while its peer is not reading (``_writable``).

        It waits charged to ``limits.max_args_memory``, as arguments are, and without
        the call's scheduler slot: the work is done, and a peer that stopped reading
        must not keep other callers' calls from running until ``write_stall_timeout``
        drops it. One connection's waiting answers hold at most ``max_args_memory //
        PARKED_SHARE``, and all of them at most half of it, so connections that stop
        reading cannot fill the limit and have every other caller's arguments
        refused. An answer the server cannot hold so (past any) waits in its slot,
        as before.
        """
        try:
            encoded = msgspec.msgpack.encode(result)
        except ENCODE_ERRORS as exc:  # as the core's writer reports it
            raise encode_error("Result", exc) from None
        ticket = self.tickets.get(call_id)
        server = self.server
        size = len(encoded)
        limit = server.limits.max_args_memory
        if (
            ticket is not None
            and server.args_memory + size <= limit
            and self._parked_bytes + size <= limit // PARKED_SHARE
            and server.parked_memory + size <= limit // 2  # arguments keep the other half, however many stop
        ):
            server.args_memory += size
            server.parked_memory += size
            self._args_cost[call_id] = self._args_cost.get(call_id, 0) + size  # given back by _forget
            self._parked[call_id] = size
            self._parked_bytes += size
            server.scheduler.detach(ticket)
        return msgspec.Raw(encoded)

    def _context(self, call: Call, spec: MethodSpec, deadline: float | None) -> Context:
        link = self.link
        return Context._make(  # Context(...) with these keywords, made faster
            spec,
            self.principal,
            self.id,  # and call.id: its request id, as _request_id makes it
            call.id,
            link.peer if link is not None else "?",
            deadline,
            call.metadata or {},
            self.server.info,
            self,
        )

    def _arm_deadline(self, call_id: int, deadline: float) -> int:
        """Cancel the running task (this call's) at ``deadline`` (``time.monotonic``), marking the call expired.

        ``asyncio.timeout_at`` without its per-call context manager or timer:
        the server's ``Deadlines`` holds the call in a 10 ms slot (returned,
        for the caller to disarm once the guarded await is over). The
        CancelledError reaches ``_run``, which answers DEADLINE_EXCEEDED.
        """
        return self.server.deadlines.arm(self._loop, deadline, self, call_id)

    def _expire(self, call_id: int) -> None:
        ticket = self.tickets.get(call_id)  # the running call's ticket holds its task
        if ticket is None:
            return
        if ticket.state is TicketState.QUEUED:  # armed at submit (_on_call): refused now, it never runs
            self.server.scheduler.expire(ticket)  # its on_reject (_rejected) answers and forgets it
        elif not ticket.started and ticket.task is not None and not ticket.task.done():
            # Started by the scheduler, its first step not yet taken: its finally will never run.
            self._claimed.pop(call_id, None)
            self.server.scheduler.cancel(ticket)
            self.core.send_error(call_id, Status.DEADLINE_EXCEEDED, "deadline passed before the call started")
            self._forget(call_id, Status.DEADLINE_EXCEEDED)
        elif ticket.task is not None and not ticket.task.done():
            self._claimed.pop(call_id, None)
            self._expired.add(call_id)
            ticket.task.cancel()

    async def _invoke(self, call_id: int, entry: Entry, args: dict[str, Any], *, record: bool = False) -> Any:
        """Run the handler and send its answer; with ``record``, return the encoded result unsent instead."""
        self._started(call_id)
        spec = entry.spec
        if entry.streams_out or entry.input_decoder is not None:
            # A stream may live for hours: it must not hold a scheduler slot.
            ticket = self.tickets.get(call_id)
            if ticket is not None:
                self.server.scheduler.detach(ticket)
        if entry.streams_out:
            gate = self._gates[call_id]
            # aclosing: the generator's finally blocks run now, not at GC time.
            async with contextlib.aclosing(spec.handler(**args)) as items:
                async for item in items:
                    while self.core.send_credit(call_id) <= 0:
                        self.read_for_credit()
                        await gate.wait()
                    if not self.core.send_item(call_id, item):
                        return  # cancelled under us
                    assert self.link is not None
                    if self.link.writing_paused:
                        self.link.flush()
                        await self.link.drain()
                    else:
                        self.link.schedule_flush()
            self.core.send_result(call_id, None)
        elif spec.is_async:
            result = await spec.handler(**args)
            if record:
                return msgspec.msgpack.encode(result)
            if self.link is not None and self.link.writing_paused:
                result = self._park(call_id, result)
                await self._writable()
            self.core.send_result(call_id, result)
        else:
            ctx = contextvars.copy_context()
            func = functools.partial(ctx.run, spec.handler, **args)
            result = await self._loop.run_in_executor(self.server.executor, func)
            if record:
                return msgspec.msgpack.encode(result)
            if self.link is not None and self.link.writing_paused:
                result = self._park(call_id, result)
                await self._writable()
            self.core.send_result(call_id, result)
