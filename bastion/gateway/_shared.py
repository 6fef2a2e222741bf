"""Small helpers that both the HTTP routes (app.py) and the WebSocket session (ws.py) use."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import ClientDisconnect

from bastion.exceptions import CallError, Cancelled, ConnectError, ConnectionClosed, InternalError, Unavailable
from bastion.observability.loglimit import LogBudget
from bastion.server.upkeep import ArgsMemoryFull
from bastion.service import MethodKind

if TYPE_CHECKING:
    from bastion.server.server import Server

log = logging.getLogger("bastion.gateway")

#: The gateway's lines a peer can cause at will (refused cross-origin upgrades, refused or malformed HTTP
#: requests): a few of each kind per 10 s, the rest counted (loglimit.py).
REFUSALS_LOGGED = LogBudget()

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


#: What a byte of a JSON body may cost decoded, at worst: ``[],`` (3 bytes) becomes a 56-byte list and the
#: 8-byte pointer to it; ``{},`` a 64-byte dict and its pointer (small numbers and strings cost less).
JSON_GROWTH = 24
#: Bodies from this size on are counted (as the server counts arguments from ARGS_COUNTED, upkeep.py).
BODY_COUNTED = 1024


@contextlib.contextmanager
def holding_body(server: Server, size: int) -> Iterator[None]:
    """Count a JSON body of ``size`` bytes, decoded, against the server's ``limits.max_args_memory`` while it
    is handled (the server's own accounting, upkeep.py, begins only once a call reaches it, in msgpack, and a
    body's decoded values -- a batch's, those held while a slow call of the same batch runs -- are the
    gateway's); refused with ``ArgsMemoryFull`` (RESOURCE_EXHAUSTED) if the server holds its limit already."""
    cost = size * JSON_GROWTH if size >= BODY_COUNTED else 0
    if cost and server.args_memory + cost > server.limits.max_args_memory:
        server.counters["rejected_args_memory"] += 1
        raise ArgsMemoryFull(
            f"the server holds its limit of call arguments in memory (limits.max_args_memory); this request's "
            f"{size} bytes of JSON may decode to {cost} bytes: retry shortly, or send smaller values",
            retry_after=1.0,
        )
    server.args_memory += cost
    try:
        yield
    finally:
        server.args_memory -= cost


def shown(value: str | None, limit: int = 100) -> str:
    """A client's header value as a message may quote it: at most ``limit`` characters, repr-escaped."""
    if value is None:
        return "None"
    return repr(value[:limit]) + ("..." if len(value) > limit else "")
