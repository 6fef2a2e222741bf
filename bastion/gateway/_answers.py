"""The memory JSON-RPC answers hold: a budget for each answer and one for all the answers in progress.

Theory of operation. A JSON-RPC answer (one call or a batch, over /rpc or a
/ws message) is sent whole, so it was built whole: a batch of 100
``kv.get`` calls on 512 KiB values held their 50 MB of decoded values,
then 70 MB of JSON, then the same again in the transport's buffer until the
client read it -- and a WebSocket handles 64 messages at once, and a caller
may open many. So here each call's result is encoded as soon as it comes
(its decoded values let go at once) and kept as ``msgspec.Raw``, which the
answer's encoding copies as it is; and it is counted:

- against its answer's budget, ``gateway.max_answer_bytes``: a result that
  would take the answer past it is answered RESOURCE_EXHAUSTED (-32008)
  instead -- in a batch, that item alone: the rest are answered as usual
  (which items is a matter of which results come first);
- against the gateway's, ``gateway.max_answer_memory``, shared by every
  answer in progress, whoever it is for: past it a result is answered
  RESOURCE_EXHAUSTED with ``retry_after`` 1 s.

An answer gives its bytes back once it is sent or has failed. Sent (over
/rpc or /ws) means the connection's buffer has drained below its low-water mark
(the client has read all but its last few KiB), or ``gateway.send_timeout``
passed without it draining and the connection was aborted, the buffer
dropped (_send.py): so a client that does not read keeps its answer
counted for that long, at most. While an answer is put together its parts and the
whole are both held, briefly: about twice its count, at most.

/v1 answers carry one result each, which the server's frame limit bounds,
and are not counted here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from bastion.exceptions import InternalError, ResourceExhausted
from bastion.gateway import jsonrpc
from bastion.gateway._shared import _encoder

__all__ = ["Answer", "AnswerMemory", "HeldResponse"]


class AnswerMemory:
    """The bytes of results that the answers in progress hold, all together (``max_answer_memory``), and the
    budget of each (``max_answer_bytes``)."""

    def __init__(self, per_answer: int, total: int) -> None:
        self.per_answer = per_answer
        self.total = total
        self.held = 0  # by every answer in progress

    def open(self) -> Answer:
        """A new answer's budget: ``close`` it once the answer is sent or given up."""
        return Answer(self)

    @contextlib.contextmanager
    def answer(self) -> Iterator[Answer]:
        """A new answer's budget, closed when the block ends."""
        answer = Answer(self)
        try:
            yield answer
        finally:
            answer.close()


class Answer:
    """One answer's results as they come, encoded at once, within its budget and the gateway's."""

    __slots__ = ("closed", "held", "memory")

    def __init__(self, memory: AnswerMemory) -> None:
        self.memory = memory
        self.held = 0
        self.closed = False

    def response(self, ident: Any, result: Any) -> dict[str, Any]:
        """The response carrying ``result`` (encoded now), or RESOURCE_EXHAUSTED if it would pass a budget;
        INTERNAL for a result JSON cannot carry (MessagePack can: a map keyed by arrays, an extension)."""
        if self.closed:  # given up (a sibling failed, the client left): counted no more, never sent
            return jsonrpc.failure(ident, InternalError("the answer was given up"))
        try:
            raw = _encoder.encode(result)
        except (TypeError, ValueError, OverflowError) as exc:
            return jsonrpc.failure(ident, InternalError(f"the result cannot be written as JSON: {exc}"))
        size = len(raw)
        memory = self.memory
        if self.held + size > memory.per_answer:
            error = ResourceExhausted(
                f"this answer would hold more than gateway.max_answer_bytes ({memory.per_answer} bytes) of "
                f"results ({size} more): ask for fewer or smaller results at once"
            )
        elif memory.held + size > memory.total:
            error = ResourceExhausted(
                f"the gateway holds its limit of answers in progress (gateway.max_answer_memory, {memory.total} "
                "bytes): retry shortly",
                retry_after=1.0,
            )
        else:
            self.held += size
            memory.held += size
            return jsonrpc.result_response(ident, msgspec.Raw(raw))
        return jsonrpc.failure(ident, error)

    def close(self) -> None:
        """Give the answer's bytes back (it is sent, or will not be): for good, as results still to come for
        it (a batch's other calls) are counted no more."""
        self.memory.held -= self.held
        self.held = 0
        self.closed = True


class HeldResponse(Response):
    """A JSON answer whose budget is closed once it is sent (or sending it failed)."""

    def __init__(self, body: bytes, answer: Answer) -> None:
        super().__init__(body, media_type="application/json")
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.answer.close()
