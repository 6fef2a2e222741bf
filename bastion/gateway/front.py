"""The gateway's front: its two hot routes answered in plain ASGI, everything else by Starlette.

Theory of operation. Every API call a program makes through the gateway is a
``POST /rpc`` or ``POST /v1/{service}/{method}`` with a bearer token. For
those, Starlette's middleware stack, router, request and response objects
cost about as much per call as the call itself does inside the server, so
``Front`` answers them here, in plain ASGI, and hands every other request --
and every one it does not fully understand -- to the Starlette application
unchanged (app.py). It answers with the same code the Starlette routes run
(``_Routes.answer`` for JSON-RPC, ``_Routes.call_v1`` for /v1) and the same
checks, in the same order:

0. over plaintext, every request (any path, WebSockets too) whose Host is
   not an IP address, ``localhost``, the configured host or one of
   ``allowed_hosts`` is answered 400 here (DNS rebinding; app.py "Hosts"), and
   so is any request with more than one Host header (RFC 9112 3.2), TLS or not;
1. a Content-Length that is not a number is answered 400, one over
   ``max_body`` 413, before a byte of the body is read;
2. an ``Origin`` that is neither the gateway's own (``origin_allowed``, or
   one of ``public_origins``) nor in ``cors_origins`` is refused (403), and an Authorization header that is not ``Bearer
   <token>`` is answered 401;
3. the body is read up to ``max_body`` however it is framed (413 past it);
4. the call goes through the bridge, so the server authenticates,
   authorizes, rate-limits, validates and schedules it;
5. every answer carries the security headers and ``Cache-Control:
   no-store``, as the Starlette routes' do.

What goes to Starlette instead: any other path or method, anything under a
``root_path`` (Starlette strips it before routing), a request with two
Content-Length headers, a request without
an Authorization header (the session cookie and its CSRF check are
Starlette's), a request with an ``Origin`` header when CORS is on (the CORS
middleware answers those), an octet-stream upload to /v1, ``/v1/auth/login``,
WebSockets and the lifespan.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette

from bastion.exceptions import CallError, InvalidArgument, PermissionDenied
from bastion.gateway import jsonrpc
from bastion.gateway._http import (
    NO_STORE,
    SECURITY_HEADERS,
    TooLarge,
    error_body,
    error_headers,
    host_allowed,
    http_status,
    length_refusal,
    origin_allowed,
    parse_bearer,
    too_large_body,
)
from bastion.gateway._shared import _as_call_error, _encoder
from bastion.gateway.bridge import Caller

if TYPE_CHECKING:
    from bastion.gateway.app import _Routes

__all__ = ["Front"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The request headers the front reads (ASGI gives names in lower case).
_WANTED = frozenset({b"authorization", b"origin", b"content-length", b"content-type", b"host"})
_OCTETS = "application/octet-stream"
_CLOSE = [(b"connection", b"close")]
_JSON_HEADERS = [(b"content-type", b"application/json"), *SECURITY_HEADERS, NO_STORE]
_PLAINTEXT = frozenset({"http", "ws"})
#: Distinct Host headers whose verdict is remembered (past that, each is judged afresh).
_HOSTS_REMEMBERED = 1024


class Front:
    """The ASGI application ``create_app`` returns: the hot routes here, the rest to ``app``."""

    def __init__(self, app: Starlette, routes: _Routes) -> None:
        self.app: ASGIApp = app
        self.routes = routes
        self.config = routes.config
        self.names = routes.gateway.names
        self.post_origins = routes.gateway.post_origins
        self.answers = routes.gateway.answers
        self.state = app.state  # ``state.gateway``
        self._any_host = "*" in self.config.allowed_hosts
        self._hosts: dict[bytes, bool] = {}  # Host header -> allowed, for the plaintext check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan" and (refusal := self._host_refusal(scope)) is not None:
            await self._refuse_host(scope, receive, send, refusal)
            return
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            path: str = scope["path"]
            if path == "/rpc":
                method = None
            elif path.startswith("/v1/") and path != "/v1/auth/login":
                service, _, name = path[4:].partition("/")
                if not service or not name or "/" in name:
                    await self.app(scope, receive, send)  # not a route: Starlette's 404
                    return
                method = f"{service}.{name}"
            else:
                await self.app(scope, receive, send)
                return
            headers = _headers(scope)
            if (
                headers is None
                or b"authorization" not in headers
                or (b"origin" in headers and self.config.cors_origins)
            ):
                await self.app(scope, receive, send)
                return
            media = headers.get(b"content-type")
            if method is not None and media not in (None, b"application/json") and _media_type(media) == _OCTETS:
                await self.app(scope, receive, send)  # an upload: streamed by the Starlette route
                return
            await self._serve(scope, receive, send, headers, method)
            return
        await self.app(scope, receive, send)

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes], method: str | None
    ) -> None:
        """One hot request: ``method`` is the /v1 method's full name, None for /rpc."""
        limit = self.config.max_body
        length = headers.get(b"content-length")
        if length is not None and (refusal := length_refusal(length, limit)) is not None:
            status, refused = refusal
            await _respond(send, status, _encoder.encode(refused), _CLOSE if status == 413 else None)
            return
        try:
            caller = self._caller(scope, headers)
            first = await receive()
            if first["type"] == "http.request" and not first.get("more_body", False):
                body = first.get("body", b"")  # the usual small body: one message
                if len(body) > limit:
                    raise TooLarge
            else:
                body = await _read_body(receive, limit, first)
            if body is None:
                return  # the client went away: nobody to answer
            if method is None:
                with self.answers.answer() as budget:  # its results counted until it is sent (_answers.py)
                    answer = await self.routes.answer(caller, body, budget)
                    if answer is None:
                        empty = [*SECURITY_HEADERS, NO_STORE]
                        await send({"type": "http.response.start", "status": 204, "headers": empty})
                        await send({"type": "http.response.body", "body": b""})
                        return
                    encoded, answer = _encoder.encode(answer), None  # (the parts let go before it is sent)
                    await _respond(send, 200, encoded)
                return
            result = await self.routes.call_v1(caller, method, body)
        except TooLarge:
            await _respond(send, 413, _encoder.encode(too_large_body(limit)), _CLOSE)
            return
        except Exception as exc:
            error = _as_call_error(exc)
            if method is None:  # before the body was parsed: one error object
                body = _encoder.encode(jsonrpc.failure(None, error))
                await _respond(send, http_status(error.status), body, _error_headers(error))
            else:
                await _respond(
                    send, http_status(error.status), _encoder.encode(error_body(error)), _error_headers(error)
                )
            return
        await _respond(send, 200, _encoder.encode(result))

    def _host_refusal(self, scope: Scope) -> str | None:
        """Why the request is answered 400 for its Host, None if it is not: more than one Host field (RFC 9112
        3.2: the check, and a proxy in front, could each read another), or over plaintext a Host that DNS
        rebinding could forge (none at all is let through: not a browser)."""
        host: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"host":
                if host is not None:
                    return "a request has one Host header, not several"
                host = value
        if host is None or scope.get("scheme") not in _PLAINTEXT or self._any_host:
            return None
        allowed = self._hosts.get(host)
        if allowed is None:
            allowed = host_allowed(host.decode("latin-1"), self.names)
            if len(self._hosts) < _HOSTS_REMEMBERED:
                self._hosts[host] = allowed
        if allowed:
            return None
        shown = host.decode("latin-1")[:100]
        return f"Host {shown!r} is not served here: a plaintext gateway answers its own names only (allowed_hosts)"

    async def _refuse_host(self, scope: Scope, receive: Receive, send: Send, message: str) -> None:
        """400 for the request's Host (``message`` says why), with the headers every answer carries (a WebSocket
        upgrade too)."""
        body = _encoder.encode(error_body(InvalidArgument(message)))
        if scope["type"] == "http":
            await _respond(send, 400, body, _CLOSE)
        elif scope["type"] == "websocket":
            await receive()  # websocket.connect
            if "websocket.http.response" in scope.get("extensions", {}):
                headers = [(b"content-length", str(len(body)).encode()), *_JSON_HEADERS]
                await send({"type": "websocket.http.response.start", "status": 400, "headers": headers})
                await send({"type": "websocket.http.response.body", "body": body})
            else:
                await send({"type": "websocket.close", "code": 1008})

    def _caller(self, scope: Scope, headers: dict[bytes, bytes]) -> Caller:
        """As ``_Routes._caller`` for a bearer request: the origin check, then the token."""
        origin = headers.get(b"origin")
        if origin is not None:
            text = origin.decode("latin-1")
            host = headers.get(b"host")
            scheme = scope.get("scheme", "http")
            if not origin_allowed(
                text, scheme, None if host is None else host.decode("latin-1"), self.post_origins, self.names
            ):
                raise PermissionDenied(f"requests from origin {text!r} are not allowed")
        token = parse_bearer(headers[b"authorization"].decode("latin-1"))
        client = scope.get("client")
        return Caller(token, f"{client[0]}:{client[1]}" if client else "unknown:0")


def _headers(scope: Scope) -> dict[bytes, bytes] | None:
    """The headers the front reads, the first of each name (as Starlette's ``headers.get``).

    None for a request with two Content-Lengths: Starlette's guard, which checks each, answers it.
    """
    found: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name in _WANTED:
            if name not in found:
                found[name] = value
            elif name == b"content-length":
                return None
    return found


def _media_type(value: bytes) -> str:
    return value.decode("latin-1").split(";")[0].strip().lower()


async def _read_body(receive: Receive, limit: int, first: Message) -> bytes | None:
    """The body whose first message is ``first``, refused (``TooLarge``) at the first byte past ``limit``;
    None if the client disconnected."""
    chunks: list[bytes] = []
    size = 0
    message = first
    while True:
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
        message = await receive()


def _error_headers(error: CallError) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in error_headers(error).items()]


async def _respond(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-length", str(len(body)).encode()), *_JSON_HEADERS]
    if extra:
        headers += extra
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
