"""Small helpers that both the HTTP routes (app.py) and the WebSocket session (ws.py) use."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from starlette.requests import ClientDisconnect

from bastion.exceptions import CallError, Cancelled, ConnectError, ConnectionClosed, InternalError, Unavailable
from bastion.service import MethodKind

log = logging.getLogger("bastion.gateway")

_STREAMS = (MethodKind.SERVER_STREAM, MethodKind.BIDI_STREAM)
_encoder = msgspec.json.Encoder()


def _as_call_error(exc: Exception) -> CallError:
    """Anything a bridged call raised, as the CallError to answer with."""
    if isinstance(exc, CallError):
        return exc
    if isinstance(exc, ConnectError | ConnectionClosed):
        return Unavailable(f"the server is unavailable: {exc}")
    if isinstance(exc, ClientDisconnect):  # went away before its body was read: nobody to answer, nothing wrong here
        return Cancelled("the client disconnected")
    log.error("gateway call failed", exc_info=exc)
    return InternalError("internal error")


async def _ready(value: dict[str, Any]) -> dict[str, Any]:
    return value
