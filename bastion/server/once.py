"""Calls under an idempotency key: the session's half of ``IdempotencyKeys`` (dispatch.py).

A unary call whose metadata carries ``idempotency-key`` claims the key in
the store before its handler runs; a claim already answered is replayed
instead of running the handler, and the answer is recorded before it is
sent, so a client that lost the connection and retries elsewhere gets it.
Streams refuse a key (INVALID_ARGUMENT), and so does a server without
``server.idempotency`` (FAILED_PRECONDITION). ``IdempotentCalls`` is mixed
into ``ServerSession``, which sets every attribute and method stubbed here.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import msgspec

from bastion.exceptions import CallError, FailedPrecondition, InvalidArgument
from bastion.protocol.connection import Connection
from bastion.protocol.messages import Call
from bastion.security.principal import Principal
from bastion.server.dispatch import RELEASED_ON, UNKNOWN_ON, Entry, IdempotencyKeys
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

    def _started(self, call_id: int) -> None:
        raise NotImplementedError  # the session's: the call's handler starts

    def _arm_deadline(self, call_id: int, deadline: float) -> int:
        raise NotImplementedError  # the session's: cancel the call's task at its deadline

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
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
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
        except CallError as exc:
            if exc.status in RELEASED_ON:
                await keys.release(principal, key, owner)
            elif exc.status in UNKNOWN_ON:
                pass  # it may have taken effect: keep the claim (see bastion/server/dispatch.py)
            else:
                await keys.finish(principal, key, owner, exc.status, exc.message, None)
            raise
        except (TimeoutError, asyncio.CancelledError):  # deadline, client cancel, lost connection or shutdown
            raise  # its writes may have committed: keep the claim, so a retry never runs it twice
        except Exception:
            await keys.finish(principal, key, owner, Status.INTERNAL, "internal error (the first attempt failed)", None)
            raise
        await keys.finish(principal, key, owner, Status.OK, None, encoded)
        if self.link is not None and self.link.writing_paused:
            await self._writable()
        self.core.send_result(call.id, msgspec.Raw(encoded) if encoded is not None else None)
