"""A session with no wire: the HTTP gateway's door into the server's own call path.

Theory of operation. The gateway must be a second door into the one server,
not a second rule set (bastion/gateway/bridge.py). A ``DirectSession`` *is*
a ``ServerSession``: the same handshake (the server's authenticator, its
login throttles and per-source limits seeing the HTTP client's address), the
same admission of every call (method table, roles, argument validation from
MessagePack bytes, idempotency keys, rate limits), the same scheduler,
deadlines, metrics, audit log, revalidation of its credential and drain. Only
its two ends are replaced. Its protocol core (``_DirectCore``) hands each
answer to the future its caller awaits instead of framing it, and its link
(``_DirectLink``) has no transport to flush. What that skips is the wire
alone: a client's framing, an in-memory transport and the frame parser on
both sides, which had cost the gateway more than its HTTP layer did.

An answer is exactly what a native client would receive. A result is encoded
to MessagePack -- so one the wire could not carry (unencodable, or larger
than a client's ``max_frame``) fails as it would natively, with the session's
own "result cannot be sent" error -- and decoded again. A call past
``max_inflight`` waits for a free slot, as a native client's would (the
longest waiter first). A credential longer than ``handshake_max_frame`` is
refused, as a native Hello that long would be.

Unary calls only: a stream needs the wire's credit and items, so the bridge
carries streams over an in-memory connection instead.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import TYPE_CHECKING, Any

import msgspec

from bastion._slots import Slots
from bastion.exceptions import (
    CallError,
    FailedPrecondition,
    LocalProtocolError,
    Unavailable,
    error_for_status,
)
from bastion.protocol.connection import ProtocolLimits
from bastion.protocol.messages import PROTOCOL_VERSION, Call, Cancel, GoAway, Hello, Welcome
from bastion.protocol.state import ConnectionState
from bastion.server.session import ServerSession
from bastion.status import Status

if TYPE_CHECKING:
    from bastion.server.server import Server

__all__ = ["DirectSession"]

_OPEN = ConnectionState.OPEN
#: The largest result a direct caller takes: a native client's default ``max_frame``.
MAX_RESULT = ProtocolLimits().max_frame
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


class DirectSession(ServerSession):
    """A ``ServerSession`` answering into futures; ``open``, then ``call``, then ``close``."""

    def __init__(self, server: Server, peer: str, token: str | None) -> None:
        super().__init__(server)
        self.core = _DirectCore()  # type: ignore[assignment]  # the Connection interface the session uses
        self._direct_link = _DirectLink(self, peer)
        self._token = token
        self._ids = itertools.count(1)
        self._slots = Slots(self._loop, self.limits.max_inflight)
        server.counters["connections"] += 1

    @property
    def open(self) -> bool:
        """Past its handshake and neither closed nor draining: it takes calls."""
        return self.core.state is _OPEN and not self._direct_link.closed

    async def start(self) -> None:
        """The handshake: raises the server's own refusal (UNAUTHENTICATED, RESOURCE_EXHAUSTED...)."""
        self.on_connect(self._direct_link)  # type: ignore[arg-type]
        core: _DirectCore = self.core  # type: ignore[assignment]
        token = self._token
        if token is not None and len(token) > self.limits.handshake_max_frame:
            core.reject(Status.UNAUTHENTICATED, "the credential is too long")  # natively: a Hello over the limit
        else:
            try:
                await self._handshake(Hello(version=PROTOCOL_VERSION, client="bastion-gateway", token=token))
            except BaseException:  # cancelled mid-handshake: nothing half-open is left behind
                self.close()
                raise
        if core.refusal is not None:
            self.close()
            raise core.refusal

    async def call(self, method: str, args: bytes, timeout: float | None = None) -> Any:
        """Call ``method`` with MessagePack-encoded named ``args``; its result, or its CallError."""
        core: _DirectCore = self.core  # type: ignore[assignment]
        entry = self.server.table.entries.get(method)
        if entry is not None and (entry.streams_out or entry.input_decoder is not None):
            raise FailedPrecondition(f"{method} is a stream: a direct session carries unary calls only")
        slots = self._slots
        if not slots.try_acquire():
            timeout = await slots.acquire_within(timeout, method)  # as on a client's connection
        call_id = next(self._ids)
        try:
            if not self.open:
                raise core.gone()
            future: asyncio.Future[Any] = self._loop.create_future()
            core.waiting[call_id] = future
            timeout_ms = None if timeout is None else max(0, int(timeout * 1000))
            # ``on_events`` for one Call, without what only a wire needs (read pauses, refused frames).
            self._last_seen = self._last_active = time.monotonic()
            self._read_at = time.perf_counter()
            self._on_call(Call(call_id, method, msgspec.Raw(args), timeout_ms=timeout_ms))
            self._count_answered()
            return await future
        except asyncio.CancelledError:
            if core.waiting.pop(call_id, None) is not None:  # still running: cancel it, as a Cancel frame would
                self.on_events([Cancel(call_id)])
            raise
        finally:
            core.waiting.pop(call_id, None)  # answered, or failed before it was admitted
            slots.release()

    def close(self) -> None:
        self._direct_link.close()

    def _arm_keepalive(self) -> None:
        pass  # no wire to keep alive; idleness is still watched by the idle timer


class _DirectCore:
    """What ``ServerSession`` asks of its protocol core, with futures in place of frames."""

    def __init__(self) -> None:
        self.state = ConnectionState.HANDSHAKE
        self.refused_calls = 0  # calls over max_inflight wait for a slot instead
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.refusal: CallError | None = None
        self.goaway: GoAway | None = None

    def gone(self) -> CallError:
        """The error for a call this session will not start."""
        if self.refusal is not None:
            return self.refusal
        goaway = self.goaway
        if goaway is not None and goaway.code not in (Status.OK, Status.UNAVAILABLE):
            return error_for_status(goaway.code, goaway.message)
        return Unavailable(goaway.message if goaway is not None and goaway.message else "the server is going away")

    # -- the handshake ------------------------------------------------------------------

    def send_welcome(self, welcome: Welcome) -> None:
        self.state = ConnectionState.OPEN

    def reject(self, status: Status, message: str) -> None:
        self.state = ConnectionState.CLOSED
        self.refusal = error_for_status(int(status), message)

    def is_open(self, call_id: int) -> bool:
        return call_id in self.waiting

    # -- answers ----------------------------------------------------------------------------

    def send_result(self, call_id: int, value: Any) -> bool:
        future = self.waiting.get(call_id)
        if future is None:
            return False  # cancelled meanwhile
        try:
            encoded = _encode(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise LocalProtocolError(f"cannot encode Result: {exc}") from None  # still open: answered with an Error
        if len(encoded) > MAX_RESULT:
            raise LocalProtocolError(
                f"a result of {len(encoded)} bytes exceeds the peer's limit of {MAX_RESULT}", Status.RESOURCE_EXHAUSTED
            )
        del self.waiting[call_id]
        if not future.done():
            future.set_result(_decode(encoded))
        return True

    def send_error(
        self,
        call_id: int,
        status: Status,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        retry_after_ms: int | None = None,
    ) -> bool:
        future = self.waiting.pop(call_id, None)
        if future is None:
            return False
        retry = retry_after_ms / 1000 if retry_after_ms is not None else None
        if not future.done():
            future.set_exception(error_for_status(int(status), message, details=details, retry_after=retry))
        return True

    def send_goaway(self, status: Status = Status.OK, message: str = "") -> int:
        if self.state is ConnectionState.OPEN:
            self.state = ConnectionState.DRAINING
        self.goaway = GoAway(0, int(status), message)
        return 0

    def send_ping(self, payload: int) -> None:
        pass

    def fail_all(self) -> None:
        """The session closed: every call still waiting gets the reason."""
        waiting, self.waiting = self.waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(self.gone())
        self.state = ConnectionState.CLOSED


class _DirectLink:
    """What ``ServerSession`` asks of its link: a peer name and a close, nothing to write."""

    dropped = None
    writing_paused = False
    reading_paused = False
    flush_scheduled = False
    tls_identity = None

    def __init__(self, session: DirectSession, peer: str) -> None:
        self.session = session
        self.peer = peer
        self.closed = False
        self.transport = self  # ``transport.is_closing()`` is asked before closing for abuse

    def is_closing(self) -> bool:
        return self.closed

    def flush(self) -> None:
        pass

    def schedule_flush(self) -> None:
        pass

    def flush_if_full(self) -> None:
        pass

    def pause_reading(self, reason: str) -> None:
        pass

    def resume_reading(self, reason: str) -> None:
        pass

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        core: _DirectCore = self.session.core  # type: ignore[assignment]
        core.fail_all()
        self.session.on_close(None)
