"""The gateway's WebSocket session: JSON-RPC 2.0 over /ws, plus server streams.

``_Routes.websocket`` (app.py) checks the upgrade and the credentials, then
hands the accepted socket to a ``_WebSocketSession``.

WebSocket. The upgrade is refused (403) when its ``Origin`` is not the
gateway's own (``origin_allowed`` in _http.py: DNS rebinding cannot pass for
it) and not in ``ws_origins`` (cross-site WebSocket hijacking); a
client without an Origin (not a browser) is let through. Credentials: a
bearer header, the session cookie, or a first message
``{"jsonrpc":"2.0","method":"auth","params":{"token":"..."},"id":1}``
(the messages after it run once it is answered, as whom it authenticated).
Each text message is a JSON-RPC request or batch, answered as over /rpc, and
calls run concurrently. A call to a server-stream method (``kv.watch``,
``jobs.watch``) sends each item as a notification
``{"jsonrpc":"2.0","method":"stream.item","params":{"id":<call id>,"item":...}}``
and then its response (result ``{"items": n}``, or the error that ended it);
``stream.cancel`` with ``{"id": <call id>}`` stops one (it then ends with
CANCELLED). A stream call needs an id (string or number) not already in use
by a stream on the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from bastion.exceptions import Cancelled
from bastion.gateway import jsonrpc
from bastion.gateway._answers import Answer
from bastion.gateway._shared import _STREAMS, _as_call_error, _encoder, _ready, holding_body
from bastion.gateway.bridge import Caller
from bastion.server.upkeep import ArgsMemoryFull

if TYPE_CHECKING:
    from bastion.gateway.app import _Routes

WS_MAX_PENDING = 64  # messages of one WebSocket handled at once
WS_MAX_STREAMS = 64  # server streams open on one WebSocket


class _WebSocketSession:
    """One /ws connection: JSON-RPC messages in, responses and stream items out."""

    def __init__(self, routes: _Routes, ws: WebSocket, caller: Caller) -> None:
        self.routes = routes
        self.ws = ws
        self.caller = caller
        self.first = True
        # Set once the first message is known not to be an "auth", or once that "auth" is answered: the
        # messages after it wait, so that a client need not wait for the answer to call as whom it names.
        self.settled = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.streams: dict[Any, asyncio.Task[None]] = {}
        self.cancelled: set[Any] = set()  # stream ids a client's stream.cancel stopped
        self.send_lock = asyncio.Lock()
        # Messages being handled at once: past this the socket is not read (TCP pushes back on the client).
        self.pending = asyncio.Semaphore(WS_MAX_PENDING)

    async def send(self, message: Any) -> None:
        await self._send_text(_encoder.encode(message).decode())

    async def _send_text(self, text: str) -> None:
        async with self.send_lock:
            await self.ws.send_text(text)

    async def run(self) -> None:
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes") or (message.get("text") or "").encode()
                await self.pending.acquire()
                self._spawn(self._handle_then_release(data))
        except WebSocketDisconnect:
            return
        finally:
            for task in list(self.tasks):
                task.cancel()

    async def _handle_then_release(self, data: bytes) -> None:
        try:
            with self.routes.gateway.answers.answer() as budget:  # its results counted until sent (_answers.py)
                answer = await self.handle(data, budget)
                # A client that does not read holds its answers (WS_MAX_PENDING of them, within the gateway's
                # max_answer_memory) while they wait to be sent, encoded, not its messages too (up to max_body
                # each) nor the answers' decoded values.
                text = None if answer is None else _encoder.encode(answer).decode()
                del data, answer
                if text is not None:
                    await self._send_text(text)
        finally:
            self.pending.release()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def handle(self, data: bytes, budget: Answer) -> Any:
        """The message's answer (None: it has none), its calls run, their results counted in ``budget``."""
        first, self.first = self.first, False
        if not first:
            await self.settled.wait()
        # The message's decoded values are counted while its calls run, not while its answer is sent: a client
        # that stops reading must not hold the server's argument memory (the native port's too) meanwhile.
        try:
            with holding_body(self.routes.gateway.server, len(data)):
                answer = await self._handle(data, first, budget)
        except ArgsMemoryFull as exc:  # more than the server may hold decoded now: this message is refused
            self.settled.set()
            answer = jsonrpc.failure(None, exc)
        return answer

    async def _handle(self, data: bytes, first: bool, budget: Answer) -> Any:
        """The message's calls run (streams started); its answer, None if it has none."""
        config = self.routes.config
        try:
            batch, entries = jsonrpc.parse(data, max_depth=config.max_json_depth, max_batch=config.max_batch)
        except jsonrpc.BodyError as exc:
            self.settled.set()
            return exc.response
        if first and not batch and isinstance(entries[0], jsonrpc.Request) and entries[0].method == "auth":
            try:
                return await self._auth(entries[0])
            finally:
                self.settled.set()
        self.settled.set()
        plain: list[Any] = []
        for entry in jsonrpc.discover_once(entries) if batch else entries:
            if isinstance(entry, jsonrpc.Request):
                if entry.method == "stream.cancel":
                    plain.append(self._cancel(entry))
                    continue
                if self.routes.bridge.kind(entry.method) in _STREAMS:
                    if (refusal := self._start_stream(entry)) is not None:
                        plain.append(_ready(refusal))
                    continue
                plain.append(self.routes._run(self.caller, entry, budget))
            else:
                plain.append(_ready(entry))
        results = [r for r in await asyncio.gather(*plain) if r is not None]
        if not results:
            return None
        return results if batch else results[0]

    async def _auth(self, call: jsonrpc.Request) -> Any:
        """Authenticate the connection as ``call`` asks; its answer (None for a notification)."""
        params = call.params if isinstance(call.params, dict) else {}
        token = params.get("token")
        if not isinstance(token, str) or not token:
            return jsonrpc.error_response(call.id, jsonrpc.INVALID_PARAMS, 'auth: "token" must be a string')
        caller = Caller(token, self.caller.address)
        try:
            await self.routes.bridge.check(caller)
        except Exception as exc:
            return None if call.is_notification else jsonrpc.failure(call.id, _as_call_error(exc))
        self.caller = caller
        return None if call.is_notification else jsonrpc.result_response(call.id, {"authenticated": True})

    async def _cancel(self, call: jsonrpc.Request) -> dict[str, Any] | None:
        params = call.params
        target = params.get("id") if isinstance(params, dict) else (params[0] if params else None)
        # Stream ids are strings or numbers; anything else (a list, say) names no stream.
        task = self.streams.get(target) if isinstance(target, str | int | float) else None
        if task is not None:
            self.cancelled.add(target)
            task.cancel()
        return None if call.is_notification else jsonrpc.result_response(call.id, task is not None)

    def _start_stream(self, call: jsonrpc.Request) -> dict[str, Any] | None:
        """Start the stream ``call`` asks for; None, or the error answering a call that cannot start one (part
        of its message's answer: sent under the bound on messages handled at once, as every answer is)."""
        if call.is_notification or call.id is None or call.id in self.streams or len(self.streams) >= WS_MAX_STREAMS:
            if call.is_notification or call.id is None:
                reason = "needs an id"
            elif call.id in self.streams:
                reason = "id is already in use"
            else:
                reason = f"would pass {WS_MAX_STREAMS} streams open on this socket; cancel one first"
            return jsonrpc.error_response(
                None if call.is_notification else call.id, jsonrpc.INVALID_REQUEST, f"a stream call {reason}"
            )
        task = asyncio.ensure_future(self._stream(call))
        self.streams[call.id] = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return None

    async def _stream(self, call: jsonrpc.Request) -> None:
        count = 0
        try:
            try:
                async for item in self.routes.bridge.stream(self.caller, call.method, call.params):
                    count += 1
                    await self.send(
                        {"jsonrpc": "2.0", "method": "stream.item", "params": {"id": call.id, "item": item}}
                    )
            except asyncio.CancelledError:
                self.streams.pop(call.id, None)
                if call.id not in self.cancelled:
                    raise  # the connection is closing
                self.cancelled.discard(call.id)
                error = jsonrpc.error_object(Cancelled("stream cancelled by the client"))
                await self.send({"jsonrpc": "2.0", "error": error, "id": call.id})
                return
            except Exception as exc:
                self.streams.pop(call.id, None)
                await self.send(jsonrpc.failure(call.id, _as_call_error(exc)))
                return
            self.streams.pop(call.id, None)
            await self.send(jsonrpc.result_response(call.id, {"items": count}))
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the socket is gone: nobody to tell
