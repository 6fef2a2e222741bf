"""The HTTP gateway: JSON-RPC 2.0 over POST /rpc and WebSocket /ws, plain POST /v1 routes.

Theory of operation. ``create_app`` builds a Starlette application around a
``Bridge`` (bridge.py), which sends every call over an in-memory bastion
connection into the same ``Server`` -- so authentication, authorization,
rate limits, the scheduler and argument validation are the server's own,
call by call. This module only translates: HTTP and JSON-RPC in, the bridge's
results and ``CallError``s out.

Surface::

    POST /rpc                    JSON-RPC 2.0: one call or a batch (jsonrpc.py)
    GET  /ws                     JSON-RPC over WebSocket, plus server streams
    POST /v1/{service}/{method}  body: the arguments as a JSON object; answer: the result
    POST /v1/auth/login          body {username, password}: sets the session cookie (revokes one it replaces)
    POST /logout                 revokes the session cookie's token, clears the cookies
    GET  /openapi.json           OpenAPI 3.1 of what the caller may call (openapi.py); ``rpc.discover``: OpenRPC
    GET  /livez /readyz /healthz liveness; readiness (503 while starting or draining)
    GET  /metrics                Prometheus text format (bastion/observability/metrics.py)

/metrics needs a credential with the ``metrics`` role unless
``public_metrics``; /openapi.json shows a caller what it may call (anonymous:
the public methods); the ``metrics_*`` settings turn both off or limit them
to trusted networks (_ops.py).
    GET  / and /static/...       the web console (static files in bastion/gateway/static/)

Credentials. ``Authorization: Bearer <token>`` or, for browsers, the
session cookie that ``POST /v1/auth/login`` sets (HttpOnly, SameSite=Strict,
Path=/; the token never appears in a response body). A bearer header wins
over the cookie. Cookie-authenticated requests need CSRF proof, double-submit
style: login also sets a readable CSRF cookie, and every cookie-authenticated
POST must echo it in an ``X-CSRF-Token`` header (a page on another site can
neither read the cookie nor set the header). The cookies are
``__Host-bastion_session`` and ``__Host-bastion_csrf`` (Secure), so no
same-site page can plant them, unless ``cookie_secure = false`` over
plaintext: then ``bastion_session`` and ``bastion_csrf`` (_cookies.py).
Independently, any POST carrying an ``Origin`` header that is neither the
gateway's own origin nor in ``cors_origins`` is refused with 403. The own
origin is ``scheme://<Host>`` only where DNS rebinding cannot forge it: over
TLS, or when the Host is an IP address, ``localhost`` or the host the gateway
listens on (``origin_allowed`` in _http.py), or it is one of ``public_origins``
(served through a TLS-terminating proxy; X-Forwarded-* is never trusted).

Hosts. Over plaintext, a request (or WebSocket upgrade) whose Host header is
not an IP address, ``localhost``, the configured host, one of
``allowed_hosts`` or a ``public_origins`` host is answered 400 before anything else (front.py): a
DNS-rebinding page's GETs carry no Origin, so without this it could read
/metrics, /openapi.json and the console. Over TLS the browser has checked the
certificate for the name, so the Host is not checked (as Django's
ALLOWED_HOSTS, ``["*"]`` turns the check off).

Limits. A body whose Content-Length exceeds ``max_body`` is answered 413
before a byte of it is read; a chunked body is counted as it arrives and
refused at the first byte past the limit. JSON nested deeper than
``max_json_depth`` is refused (-32600 / 400) before it is decoded; a batch of
more than ``max_batch`` calls is refused whole (-32600). An answer holds at most ``max_answer_bytes`` of results,
all answers in progress ``max_answer_memory``: results past them are RESOURCE_EXHAUSTED (_answers.py).

Uploads. A client-stream method whose items are ``bytes`` (``files.upload``)
is carried by ``POST /v1/{service}/{method}`` with ``Content-Type:
application/octet-stream``: the arguments are the query string, the body is
the stream, passed on as it arrives. One request carries at most
``max_body`` bytes, so a large file is sent as several requests at
increasing offsets (``files.upload`` is resumable). Same credentials and
CSRF rule as any POST.

WebSocket. Origin check, credentials, messages and server streams on /ws: see ws.py.

Headers. Every response carries Content-Security-Policy ``default-src
'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'``, X-Content-Type-Options nosniff,
X-Frame-Options DENY and Referrer-Policy no-referrer; API responses also
Cache-Control no-store. So does the 500 for an exception escaping a route
(``_internal_error``) or the front (_protocol.py), which tells nothing of it.
CORS is off unless ``cors_origins`` lists origins (then exactly those, for
GET/POST with the Authorization, Content-Type and X-CSRF-Token headers,
without credentials; errors included; _guard.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from bastion.exceptions import (
    CallError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unimplemented,
)
from bastion.gateway import jsonrpc
from bastion.gateway._answers import Answer, AnswerMemory, HeldResponse
from bastion.gateway._cookies import (
    CSRF_COOKIE,
    CSRF_HEADER,
    SESSION_COOKIE,
    check_csrf,
    clear_session_cookies,
    secure_cookies,
    session_token,
    set_session_cookies,
)
from bastion.gateway._guard import BodyLimit, Cors, Guard
from bastion.gateway._http import (
    INTERNAL_ERROR_BODY,
    error_headers,
    http_status,
    media_type,
    origin_allowed,
    origin_host,
    parse_bearer,
    read_body,
    retry_after,
    too_large_body,
)
from bastion.gateway._http import NO_STORE as _NO_STORE
from bastion.gateway._http import SECURITY_HEADERS as _SECURITY_HEADERS
from bastion.gateway._http import TooLarge as _TooLarge
from bastion.gateway._http import error_body as _error_body
from bastion.gateway._ops import OpsAccess
from bastion.gateway._shared import _STREAMS, REFUSALS_LOGGED, _as_call_error, _encoder, _ready, holding_body, shown
from bastion.gateway.bridge import Bridge, Caller
from bastion.gateway.config import GatewayConfig
from bastion.gateway.front import Front
from bastion.gateway.openapi import openapi_document, openrpc_document, visible_methods
from bastion.gateway.ws import WS_MAX_PENDING as WS_MAX_PENDING  # re-exported: importable from here as before
from bastion.gateway.ws import WS_MAX_STREAMS as WS_MAX_STREAMS
from bastion.gateway.ws import _WebSocketSession
from bastion.observability.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from bastion.observability.metrics import render, server_snapshot
from bastion.security.authn import PeerInfo, SessionEnder
from bastion.security.principal import ANONYMOUS, Principal
from bastion.server.server import Server
from bastion.service import MethodKind, brief_error

__all__ = ["CSRF_COOKIE", "CSRF_HEADER", "SESSION_COOKIE", "Gateway", "create_app", "http_status"]

log = logging.getLogger("bastion.gateway")

#: The web console's files (index.html, app.js, app.css), shipped in the package.
STATIC_DIR = Path(__file__).with_name("static")
#: API descriptions cached per kind (one per set of methods shown) before the cache starts over.
_DOCUMENTS_KEPT = 64

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Gateway:
    """What the routes share: the server, its bridge, the settings and the readiness flag."""

    def __init__(self, server: Server, config: GatewayConfig, bridge: Bridge, host: str | None = None) -> None:
        self.server = server
        self.config = config
        self.bridge = bridge
        #: Host names the gateway is configured to serve (``host`` and ``allowed_hosts``): over plaintext a
        #: request must name one of them (or an IP address, or localhost), and its own origin counts under them.
        #: The origins the gateway is served under through a TLS-terminating proxy (``public_origins``): its
        #: own, though no request's scheme and Host say so; their names are served (a proxy may keep the Host).
        public = frozenset(config.public_origins)
        self.names: frozenset[str] = (
            frozenset({host.strip("[]").lower()} if host else ())
            | frozenset(name.lower() for name in config.allowed_hosts)
            | frozenset(origin_host(origin) for origin in public)
        )
        #: Origins whose POSTs (``cors_origins``) and WebSocket upgrades (``ws_origins``) may go on, besides
        #: the own origin that ``origin_allowed`` (_http.py) works out from the request.
        self.post_origins = frozenset(config.cors_origins) | public
        self.ws_origins = frozenset(config.ws_origins) | public
        #: Who may read /metrics, /openapi.json and rpc.discover (_ops.py).
        self.ops = OpsAccess(config, bridge)
        self.answers = AnswerMemory(config.max_answer_bytes, config.max_answer_memory)  # held by answers (_answers.py)
        #: False until the runner has the listener up; /readyz answers 503 meanwhile.
        self.started = True
        #: What /metrics shows: this server's numbers (``bastion serve --workers`` adds the other workers').
        self.metrics_snapshot: Callable[[], Mapping[str, Any]] = lambda: server_snapshot(server)
        self._openapi: dict[tuple[str, frozenset[str]], bytes] = {}  # by cookie name and the methods shown
        self._openrpc: dict[frozenset[str], dict[str, Any]] = {}  # by the methods shown

    @property
    def ready(self) -> bool:
        return self.started and not self.server.draining

    def openapi(self, session_cookie: str, principal: Principal) -> bytes:
        """The OpenAPI document of what ``principal`` may call, its cookie scheme naming ``session_cookie``.
        Cached by the set of methods shown: as many as there are distinct role sets among the callers."""
        key = (session_cookie, visible_methods(self.server.table, principal))
        if (document := self._openapi.get(key)) is None:
            if len(self._openapi) >= _DOCUMENTS_KEPT:
                self._openapi.clear()
            table = self.server.table
            document = self._openapi[key] = _encoder.encode(openapi_document(table, key[1], session_cookie=key[0]))
        return document

    def openrpc(self, principal: Principal) -> dict[str, Any]:
        """The OpenRPC document of what ``principal`` may call (cached as ``openapi``)."""
        shown = visible_methods(self.server.table, principal)
        if (document := self._openrpc.get(shown)) is None:
            if len(self._openrpc) >= _DOCUMENTS_KEPT:
                self._openrpc.clear()
            document = self._openrpc[shown] = openrpc_document(self.server.table, shown)
        return document


# -- responses and request helpers ------------------------------------------------------


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(body), status, headers=headers, media_type="application/json")


def _error(exc: CallError) -> Response:
    return _json(_error_body(exc), http_status(exc.status), error_headers(exc))


def _caller_address(conn: HTTPConnection) -> str:
    client = conn.client
    return f"{client.host}:{client.port}" if client is not None else "unknown:0"


def _bearer(conn: HTTPConnection) -> str | None:
    """The bearer token, None without an Authorization header; Unauthenticated if it is not Bearer."""
    return parse_bearer(conn.headers.get("authorization"))


def _too_large(limit: int) -> Response:
    return _json(too_large_body(limit), 413, {"connection": "close"})


# -- the application -------------------------------------------------------------------------


def create_app(
    server: Server, config: GatewayConfig | None = None, *, bridge: Bridge | None = None, host: str | None = None
) -> Front:
    """The gateway's ASGI application for ``server`` (see the module docstring).

    ``host`` is the name or address the gateway is configured to listen on
    (``bastion serve --host``): a page served under that name is on the
    gateway's own origin even over plaintext (``origin_allowed`` in _http.py).
    Credentials are checked by ``server.authenticator`` in the bridged
    sessions' handshakes (bridge.py): no second authenticator. The
    ``Gateway`` state is ``app.state.gateway``. The hot routes are answered
    by ``Front`` (front.py), the rest by the Starlette application it wraps.
    """
    config = config or GatewayConfig()
    bridge = bridge or Bridge(server, idle=config.idle_seconds, max_calls=config.max_calls_in_flight)
    gateway = Gateway(server, config, bridge, host)
    routes = _Routes(gateway)
    middleware = [Middleware(Guard)]
    if config.cors_origins:
        middleware.append(Middleware(Cors, origins=config.cors_origins))
    middleware.append(Middleware(BodyLimit, max_body=config.max_body))
    app = Starlette(
        routes=[
            Route("/rpc", routes.rpc, methods=["POST"]),
            WebSocketRoute("/ws", routes.websocket),
            Route("/v1/auth/login", routes.login, methods=["POST"]),
            Route("/logout", routes.logout, methods=["POST"]),
            Route("/v1/{service}/{method}", routes.v1, methods=["POST"]),
            Route("/openapi.json", routes.openapi, methods=["GET"]),
            Route("/livez", routes.livez, methods=["GET"]),
            Route("/readyz", routes.readyz, methods=["GET"]),
            Route("/healthz", routes.readyz, methods=["GET"]),
            Route("/metrics", routes.metrics, methods=["GET"]),
            Route("/", routes.console, methods=["GET"]),
            Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        middleware=middleware,
        lifespan=_lifespan,
        exception_handlers={Exception: _internal_error},
    )
    app.router.redirect_slashes = False  # a redirect would be built from the Host header: /rpc/ is a 404
    app.state.gateway = gateway
    return Front(app, routes)


class _Routes:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self.bridge = gateway.bridge

    # -- credentials -----------------------------------------------------------------

    def _origin_allowed(self, conn: HTTPConnection, allowed: frozenset[str]) -> bool:
        headers = conn.headers
        scheme = conn.scope.get("scheme", "http")
        return origin_allowed(headers.get("origin"), scheme, headers.get("host"), allowed, self.gateway.names)

    def _check_origin(self, request: Request) -> None:
        """PermissionDenied for a POST whose Origin is neither the gateway's own nor in ``cors_origins``."""
        if not self._origin_allowed(request, self.gateway.post_origins):
            raise PermissionDenied(f"requests from origin {request.headers.get('origin')!r} are not allowed")

    def _caller(self, request: Request) -> Caller:
        """The request's caller; raises PermissionDenied (origin, CSRF) or Unauthenticated."""
        self._check_origin(request)
        token = _bearer(request)
        if token is None:
            names = secure_cookies(request, self.config.cookie_secure)
            token = session_token(request, names)
            if token is not None:
                check_csrf(request, names)
        return Caller(token, _caller_address(request))

    # -- JSON-RPC ----------------------------------------------------------------------

    async def _run(self, caller: Caller, call: jsonrpc.Request, answer: Answer) -> dict[str, Any] | None:
        """One JSON-RPC call through the bridge: its response (counted in ``answer``), None for a notification."""
        method = call.method
        try:
            if method == "rpc.discover":  # what the caller may call; off or some networks only: callers (_ops.py)
                if caller.token is None and self.gateway.ops.protected:
                    raise Unauthenticated("rpc.discover needs a credential on this gateway")
                principal = ANONYMOUS if caller.token is None else await self.bridge.check(caller)
                result: Any = self.gateway.openrpc(principal)
            elif method.startswith("rpc."):
                raise Unimplemented(f"unknown method {method!r}")
            else:
                kind = self.bridge.kind(method)
                if kind in _STREAMS:
                    raise FailedPrecondition(f"{method} is a server stream: call it over the WebSocket at /ws")
                if kind is MethodKind.CLIENT_STREAM:
                    raise Unimplemented(f"{method} takes an input stream, which the gateway does not carry")
                result = await self.bridge.call(caller, method, call.params)
        except Exception as exc:  # every failure becomes an error object
            if call.is_notification:
                return None
            return jsonrpc.failure(call.id, _as_call_error(exc))
        return None if call.is_notification else answer.response(call.id, result)

    async def answer(self, caller: Caller, body: bytes, answer: Answer) -> Any:
        """The JSON-RPC answer to ``body`` (None: nothing to send), its results counted in ``answer`` until it
        is closed (_answers.py); raises ``ArgsMemoryFull`` (_shared.py)."""
        with holding_body(self.gateway.server, len(body)):
            return await self._answer(caller, body, answer)

    async def _answer(self, caller: Caller, body: bytes, answer: Answer) -> Any:
        try:
            batch, entries = jsonrpc.parse(body, max_depth=self.config.max_json_depth, max_batch=self.config.max_batch)
        except jsonrpc.BodyError as exc:
            return exc.response
        if not batch:  # one call: no tasks to run it beside others
            (entry,) = entries
            return await self._run(caller, entry, answer) if isinstance(entry, jsonrpc.Request) else entry
        entries = jsonrpc.discover_once(entries)
        results = await asyncio.gather(
            *(self._run(caller, e, answer) if isinstance(e, jsonrpc.Request) else _ready(e) for e in entries)
        )
        answers = [r for r in results if r is not None]
        return answers or None

    async def rpc(self, request: Request) -> Response:
        try:
            caller = self._caller(request)
            body = await read_body(request, self.config.max_body)
        except _TooLarge:
            return _too_large(self.config.max_body)
        except (CallError, ClientDisconnect) as exc:
            error = _as_call_error(exc)
            return _json(jsonrpc.failure(None, error), http_status(error.status), error_headers(error))
        budget = self.gateway.answers.open()  # closed once the answer is sent (HeldResponse), or here
        try:
            answer = await self.answer(caller, body, budget)
            if answer is None:
                budget.close()
                return Response(status_code=204)
            return HeldResponse(_encoder.encode(answer), budget)
        except CallError as exc:  # the body is more than the server may hold decoded now
            budget.close()
            return _json(jsonrpc.failure(None, exc), http_status(exc.status), {"retry-after": retry_after(exc) or "1"})
        except BaseException:
            budget.close()
            raise

    # -- plain routes ---------------------------------------------------------------------

    def _object_args(self, body: bytes) -> dict[str, Any]:
        """A /v1 body's arguments: a JSON object (an empty body: none)."""
        if not body.strip():
            return {}
        if jsonrpc.json_depth(body, self.config.max_json_depth) > self.config.max_json_depth:
            raise InvalidArgument(f"JSON nested deeper than {self.config.max_json_depth} levels")
        try:
            args = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise InvalidArgument(f"the body is not JSON: {exc}") from None
        if not isinstance(args, dict):
            raise InvalidArgument("the body must be a JSON object of named arguments")
        return args

    async def v1(self, request: Request) -> Response:
        method = f"{request.path_params['service']}.{request.path_params['method']}"
        try:
            caller = self._caller(request)
            kind = self.bridge.kind(method)
            if kind is MethodKind.CLIENT_STREAM and media_type(request) == "application/octet-stream":
                return _json(await self._upload(request, caller, method))
            result = await self.call_v1(caller, method, await read_body(request, self.config.max_body))
        except _TooLarge:
            return _too_large(self.config.max_body)
        except Exception as exc:
            return _error(_as_call_error(exc))
        return _json(result)

    async def call_v1(self, caller: Caller, method: str, body: bytes) -> Any:
        """A /v1 call once its body is read (the front takes this way too): its result, or raises."""
        kind = self.bridge.kind(method)
        if kind in _STREAMS:
            raise FailedPrecondition(f"{method} is a server stream: call it over the WebSocket at /ws")
        if kind is MethodKind.CLIENT_STREAM:
            raise Unimplemented(f"{method} takes an input stream, which the gateway does not carry")
        with holding_body(self.gateway.server, len(body)):
            return await self.bridge.call(caller, method, self._object_args(body))

    async def _upload(self, request: Request, caller: Caller, method: str) -> Any:
        """A bytes client stream: arguments from the query string, the body passed on as it arrives."""
        entry = self.gateway.server.table.entries[method]
        if entry.spec.input_type is not bytes:
            raise Unimplemented(f"{method} takes an input stream of items other than bytes: not carried over HTTP")
        try:
            converted = msgspec.convert(dict(request.query_params), entry.spec.args_type, strict=False)
        except (msgspec.ValidationError, TypeError) as exc:
            raise InvalidArgument(f"{method}: bad query arguments: {brief_error(str(exc))}") from None
        args = {name: getattr(converted, name) for name in entry.fields}
        limit = self.config.max_body
        over = False

        async def body() -> AsyncIterator[bytes]:
            # A chunked body past the limit ends the stream there (what came before was passed on, as a
            # dropped connection would leave it) and the request is answered 413.
            nonlocal over
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    over = True
                    return
                if chunk:
                    yield chunk

        result = await self.bridge.upload(caller, method, args, body())
        if over:
            raise _TooLarge
        return result

    async def login(self, request: Request) -> Response:
        try:
            self._check_origin(request)
            if media_type(request) != "application/json":  # a cross-site form can send no such body: login CSRF
                raise InvalidArgument("POST /v1/auth/login takes a JSON body (Content-Type: application/json)")
            args = self._object_args(await read_body(request, self.config.max_body))
            result = await self.bridge.call(Caller(None, _caller_address(request)), "auth.login", args)
        except _TooLarge:
            return _too_large(self.config.max_body)
        except Exception as exc:
            return _error(_as_call_error(exc))
        names = secure_cookies(request, self.config.cookie_secure)
        if (old := session_token(request, names)) is not None and old != result["token"]:
            await self._revoke_replaced(Caller(old, _caller_address(request)))
        csrf = secrets.token_urlsafe(32)
        expires_at = float(result["expires_at"])
        response = _json({"user": result["user"], "expires_at": expires_at, "csrf_token": csrf})
        max_age = max(0, int(expires_at - time.time()))
        set_session_cookies(response, names, result["token"], csrf, max_age)
        return response

    async def _revoke_replaced(self, caller: Caller) -> None:
        """Revoke the token of the session cookie a successful login replaces (logging in as someone else
        must not leave the first session live): best effort, a login never fails for it. With the store's
        authenticator, by the token's digest (``end_session``): a stale cookie -- the usual case, sessions
        end by password changes, purges and expiry -- fails no handshake, so it charges the client's address
        nothing at the login throttle and writes no ``auth.failure``. Another authenticator's: a bridged
        ``auth.logout`` with it, as before."""
        authenticator = self.gateway.server.authenticator
        assert caller.token is not None
        try:
            if isinstance(authenticator, SessionEnder):
                await authenticator.end_session(caller.token, PeerInfo(caller.address, caller.host))
            else:
                await self.bridge.call(caller, "auth.logout", {})
        except Exception as exc:  # expired, revoked, not a token, the server busy: the new session stands
            log.debug("login: the replaced session was not revoked (%s)", type(exc).__name__)
        with contextlib.suppress(Exception):
            await self.bridge.forget(caller)

    async def logout(self, request: Request) -> Response:
        names = secure_cookies(request, self.config.cookie_secure)
        token = session_token(request, names)
        done = False
        try:
            self._check_origin(request)  # a foreign form post: its answer's Set-Cookie would clear the console's
            if token is not None:
                check_csrf(request, names)
                caller = Caller(token, _caller_address(request))
                try:
                    done = bool(await self.bridge.call(caller, "auth.logout", {}))
                except Unauthenticated:
                    done = False  # already expired or revoked: clearing the cookie is all there is to do
                await self.bridge.forget(caller)
        except Exception as exc:
            return _error(_as_call_error(exc))
        response = _json({"logged_out": done})
        clear_session_cookies(response, names)
        return response

    async def openapi(self, request: Request) -> Response:
        refused, principal = await self.gateway.ops.openapi_refusal(request)  # (_ops.py)
        if refused is not None:
            return refused
        cookie = secure_cookies(request, self.config.cookie_secure).session
        return Response(self.gateway.openapi(cookie, principal), media_type="application/json")

    async def livez(self, request: Request) -> Response:
        return _json({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        if self.gateway.server.draining:
            return _json({"status": "draining"}, 503)
        if not self.gateway.started:
            return _json({"status": "starting"}, 503)
        return _json({"status": "ready"})

    async def console(self, request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    async def metrics(self, request: Request) -> Response:
        if (refused := await self.gateway.ops.metrics_refusal(request)) is not None:  # before rendering (_ops.py)
            return refused
        body = render(self.gateway.metrics_snapshot())
        return Response(body, media_type=METRICS_CONTENT_TYPE, headers={"Cache-Control": "no-store"})

    # -- WebSocket ---------------------------------------------------------------------------

    async def websocket(self, ws: WebSocket) -> None:
        if not self._origin_allowed(ws, self.gateway.ws_origins):
            origin = shown(ws.headers.get("origin"))  # (a client's: bounded in the log and the answer)
            if (skipped := REFUSALS_LOGGED.take("ws_origin")) is not None:
                log.info("refused WebSocket from origin %s (%d more refusals not logged)", origin, skipped)
            await _refuse_upgrade(ws, PermissionDenied(f"WebSockets from origin {origin} are not allowed"))
            return
        try:
            token = _bearer(ws)
        except Unauthenticated as exc:
            await _refuse_upgrade(ws, exc)
            return
        if token is None:
            token = session_token(ws, secure_cookies(ws, self.config.cookie_secure))
        await ws.accept()
        await _WebSocketSession(self, ws, Caller(token, _caller_address(ws))).run()


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
    await app.state.gateway.bridge.aclose()


async def _internal_error(request: Request, exc: Exception) -> Response:
    """The 500 Starlette's ServerErrorMiddleware sends for an exception escaping a route (outside the
    ``Guard`` middleware (_guard.py); it re-raises the exception, which uvicorn logs): the usual headers, no detail."""
    response = Response(INTERNAL_ERROR_BODY, 500, headers={"connection": "close"}, media_type="application/json")
    response.raw_headers += [*_SECURITY_HEADERS, _NO_STORE]
    return response


async def _refuse_upgrade(ws: WebSocket, exc: CallError) -> None:
    """Answer a WebSocket upgrade (before accept) with the error, its status (403 PERMISSION_DENIED, 401
    UNAUTHENTICATED with its challenge) and the headers every answer carries (``Guard``, _guard.py, sees only HTTP)."""
    response = _json(_error_body(exc), http_status(exc.status), error_headers(exc))
    response.raw_headers += [*_SECURITY_HEADERS, _NO_STORE]
    await ws.send_denial_response(response)
