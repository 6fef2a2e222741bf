"""The gateway's HTTP middleware, outermost first: security headers on every answer (``Guard``), CORS for
``cors_origins`` (``Cors``, only when it lists any), an oversized body refused unread (``BodyLimit``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from bastion.exceptions import PermissionDenied
from bastion.gateway._http import NO_STORE, SECURITY_HEADERS, error_body, http_status, length_refusal
from bastion.gateway._shared import _encoder, shown

__all__ = ["CORS_HEADERS", "CORS_METHODS", "BodyLimit", "Cors", "Guard"]

#: What a page on one of ``cors_origins`` may send (besides the CORS-safelisted headers).
CORS_METHODS = ("GET", "POST")
CORS_HEADERS = ("Authorization", "Content-Type", "X-CSRF-Token")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Guard:
    """Security headers on every response (API answers: ``Cache-Control: no-store`` too): the outermost
    middleware, so CORS preflights and refusals carry them as well."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api = not scope["path"].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += SECURITY_HEADERS
                if api:
                    headers.append(NO_STORE)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimit:
    """A Content-Length over ``max_body`` -> 413 (not a number: 400) before a byte is read. Inside the CORS
    middleware, so a page on a listed origin can read the refusal."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"content-length" and (refusal := length_refusal(value, self.max_body)) is not None:
                    status, body = refusal
                    headers = {"connection": "close"} if status == 413 else None
                    response = Response(_encoder.encode(body), status, headers=headers, media_type="application/json")
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


#: What a refused preflight's answer leaves out of the headers Starlette put on it.
_NOT_ON_REFUSALS = frozenset({"access-control-allow-origin", "access-control-expose-headers"})


class Cors(CORSMiddleware):
    """Starlette's CORS middleware for ``cors_origins``: exactly those origins, GET and POST, the
    Authorization, Content-Type and X-CSRF-Token headers, no credentials, ``Retry-After`` readable; a
    refused preflight is answered 403 PERMISSION_DENIED saying what was refused (not a bare text 400), and
    without ``Access-Control-Allow-Origin``, even for a listed origin asking for another method or header."""

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        super().__init__(
            app,
            allow_origins=list(origins),
            allow_methods=list(CORS_METHODS),
            allow_headers=list(CORS_HEADERS),
            allow_credentials=False,
            max_age=600,
        )

    def allow_explicit_origin(self, headers: MutableHeaders, origin: str) -> None:  # type: ignore[override]
        """An answer to a listed origin: that origin, and its Retry-After readable (not CORS-safelisted).
        (Starlette's ``expose_headers`` would put the latter on answers to any origin.)"""
        CORSMiddleware.allow_explicit_origin(headers, origin)
        headers["Access-Control-Expose-Headers"] = "Retry-After"

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        refused = []
        origin = request_headers["origin"]
        if not self.is_allowed_origin(origin):
            refused.append(f"origin {shown(origin)} (not in gateway.cors_origins)")
        method = request_headers["access-control-request-method"]
        if method not in self.allow_methods:
            refused.append(f"method {shown(method)} (only {', '.join(CORS_METHODS)})")
        asked = request_headers.get("access-control-request-headers") or ""
        others = [h.strip() for h in asked.lower().split(",") if h.strip() and h.strip() not in self.allow_headers]
        if others:
            refused.append(f"headers {shown(', '.join(others))} (only {', '.join(CORS_HEADERS)})")
        if request_headers.get("access-control-request-private-network") is not None:
            refused.append("private network access")
        error = PermissionDenied("CORS preflight refused: " + "; ".join(refused or ["not allowed"]))
        # Starlette names a listed origin even when it refuses its preflight (for PUT, a Cookie header):
        # a refusal must not, nor expose headers to it.
        headers = {
            k: v
            for k, v in response.headers.items()
            if k.lower().startswith(("access-control-", "vary")) and k.lower() not in _NOT_ON_REFUSALS
        }
        return Response(
            _encoder.encode(error_body(error)), http_status(error.status), headers, media_type="application/json"
        )
