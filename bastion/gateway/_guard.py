"""The gateway's outermost HTTP middleware: security headers on every answer, an oversized body refused unread."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.responses import Response

from bastion.gateway._http import NO_STORE, SECURITY_HEADERS, length_refusal
from bastion.gateway._shared import _encoder

__all__ = ["Guard"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Guard:
    """Security headers on every response; Content-Length over ``max_body`` -> 413 before reading."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

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

        for name, value in scope["headers"]:
            if name == b"content-length" and (refusal := length_refusal(value, self.max_body)) is not None:
                status, body = refusal
                headers = {"connection": "close"} if status == 413 else None
                response = Response(_encoder.encode(body), status, headers=headers, media_type="application/json")
                await response(scope, receive, send_with_headers)
                return
        await self.app(scope, receive, send_with_headers)
