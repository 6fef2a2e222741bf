"""JSON-RPC 2.0 framing: parse requests, build responses, map bastion statuses to error codes.

Theory of operation. This module is sans-IO: it turns a request body into
``Request`` objects (or the error answers the spec demands) and calls'
outcomes into response objects; it never calls a method. ``parse`` checks
the body's size-independent limits (nesting depth, batch size), decodes it,
and validates every element against the spec (section 4): ``jsonrpc`` is
exactly ``"2.0"``, ``method`` a string, ``params`` an object or array if
present, ``id`` a string, number or null if present (absent: a
notification, which gets no response). An element that is not a valid
request gets a -32600 answer (with its id when that id is itself valid,
else null); a body that is not JSON gets one -32700 answer; an empty batch
one -32600.

Error codes. The spec's own codes: -32700 parse error, -32600 invalid
request, -32601 method not found, -32602 invalid params, -32603 internal
error. A bastion status maps onto them where the meaning is the same
(UNIMPLEMENTED -> -32601, INVALID_ARGUMENT -> -32602, INTERNAL -> -32603);
every other status S gets ``-32000 - S`` (in the spec's range for
implementation-defined server errors: CANCELLED -32001 ... UNAUTHENTICATED
-32016). ``error.data`` always carries ``{"status": name, "code": S}``,
plus ``details`` and ``retry_after`` (seconds) when the call had them.

Values. JSON has no bytes: bytes travel as base64 strings (msgspec's
convention both ways: results are encoded so, and a ``bytes`` parameter
accepts base64; see bridge.py).
"""

from __future__ import annotations

import re
from typing import Any, Final, Literal

import msgspec

from bastion.exceptions import CallError
from bastion.status import Status

__all__ = [
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "BodyError",
    "Request",
    "discover_once",
    "error_code",
    "error_object",
    "error_response",
    "failure",
    "json_depth",
    "parse",
    "parse_any",
    "result_response",
    "single_call",
]

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
#: A bastion status S without a spec code of its own answers ``STATUS_BASE - S``.
STATUS_BASE: Final = -32000

_SPEC_CODES: Final = {
    Status.UNIMPLEMENTED: METHOD_NOT_FOUND,
    Status.INVALID_ARGUMENT: INVALID_PARAMS,
    Status.INTERNAL: INTERNAL_ERROR,
}
_MISSING: Final = object()
_MEMBERS: Final = frozenset({"jsonrpc", "method", "params", "id"})
_ID_TYPES: Final = (str, int, float)
_PARAMS_TYPES: Final = (dict, list)
_decoder: Final = msgspec.json.Decoder()
# A JSON string, escapes included; what is left once strings are cut out has only structural brackets.
_STRING: Final = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET: Final = re.compile(rb"[\[\]{}]")


class BodyError(Exception):
    """The body as a whole is refused: ``response`` is the one answer to send."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.response = error_response(None, code, message)


class _OneCall(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A valid call, as ``validate`` would accept it (a body it refuses fails to decode as one)."""

    jsonrpc: Literal["2.0"]
    method: str
    params: dict[str, Any] | list[Any] | msgspec.UnsetType = msgspec.UNSET
    id: str | int | float | msgspec.UnsetType | None = msgspec.UNSET


_one_call: Final = msgspec.json.Decoder(_OneCall)


class Request(msgspec.Struct, frozen=True):
    """One valid call: ``id`` is None for a notification (``is_notification``)."""

    method: str
    params: dict[str, Any] | list[Any] | None
    id: Any = None
    is_notification: bool = False


def json_depth(body: bytes, limit: int) -> int:
    """The nesting depth of the JSON in ``body``, counted up to ``limit + 1`` (then it stops looking).

    Brackets inside strings do not count. Cheap for the usual small body:
    with no more brackets than ``limit`` in all, there is nothing to scan.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return 0
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub(b"", body)):
        if match.group() in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def parse(body: bytes, *, max_depth: int, max_batch: int) -> tuple[bool, list[Request | dict[str, Any]]]:
    """Decode a JSON-RPC body: (is_batch, one entry per element).

    Each entry is a ``Request`` to run, or an error response (a dict) to send
    as it is. Raises ``BodyError`` when the body as a whole is refused.
    """
    if json_depth(body, max_depth) > max_depth:
        raise BodyError(INVALID_REQUEST, f"JSON nested deeper than {max_depth} levels")
    one = single_call(body)
    if one is not None:
        return False, [one]
    return parse_any(body, max_batch=max_batch)


def single_call(body: bytes) -> Request | None:
    """The usual body -- one valid call -- checked in one pass in C; None for anything else.

    Whatever it accepts, ``parse_any`` accepts as the same ``Request``.
    """
    try:
        one = _one_call.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    params = None if one.params is msgspec.UNSET else one.params
    if one.id is msgspec.UNSET:
        return Request(one.method, params, None, True)
    return Request(one.method, params, one.id)


def parse_any(body: bytes, *, max_batch: int) -> tuple[bool, list[Request | dict[str, Any]]]:
    """``parse`` for any body (its nesting checked already), element by element."""
    try:
        decoded = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise BodyError(PARSE_ERROR, f"Parse error: {exc}") from None
    if isinstance(decoded, list):
        if not decoded:
            raise BodyError(INVALID_REQUEST, "Invalid Request: empty batch")
        if len(decoded) > max_batch:
            raise BodyError(
                INVALID_REQUEST, f"Invalid Request: batch of {len(decoded)} calls, the limit is {max_batch}"
            )
        return True, [validate(element) for element in decoded]
    return False, [validate(decoded)]


def discover_once(entries: list[Request | dict[str, Any]]) -> list[Request | dict[str, Any]]:
    """A batch's entries with every ``rpc.discover`` call after the first refused (-32600).

    The document is public and tens of KB: a batch of them from anyone would
    answer a few KB with megabytes. One per batch is all a client needs.
    """
    seen = False
    kept: list[Request | dict[str, Any]] = []
    for entry in entries:
        if isinstance(entry, Request) and entry.method == "rpc.discover" and not entry.is_notification:
            if seen:
                entry = error_response(entry.id, INVALID_REQUEST, "Invalid Request: rpc.discover once per batch")
            seen = True
        kept.append(entry)
    return kept


def validate(obj: Any) -> Request | dict[str, Any]:
    """One decoded element as a ``Request``, or the -32600 response it earns."""
    if not isinstance(obj, dict):
        return error_response(None, INVALID_REQUEST, "Invalid Request: not an object")
    ident = obj.get("id", _MISSING)
    valid_id = (
        ident is _MISSING
        or ident is None
        or (isinstance(ident, _ID_TYPES) and ident is not True and ident is not False)
    )
    answer_id = ident if valid_id and ident is not _MISSING else None
    if obj.get("jsonrpc") != "2.0":
        return error_response(answer_id, INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be exactly "2.0"')
    if not valid_id:
        return error_response(None, INVALID_REQUEST, 'Invalid Request: "id" must be a string, a number or null')
    method = obj.get("method")
    if not isinstance(method, str):
        return error_response(answer_id, INVALID_REQUEST, 'Invalid Request: "method" must be a string')
    params = obj.get("params")
    if "params" in obj and not isinstance(params, _PARAMS_TYPES):
        return error_response(answer_id, INVALID_REQUEST, 'Invalid Request: "params" must be an object or an array')
    if not _MEMBERS.issuperset(obj):
        extra = sorted(set(obj) - _MEMBERS)[0]
        return error_response(answer_id, INVALID_REQUEST, f"Invalid Request: unexpected member {extra!r}")
    return Request(method, params, answer_id, ident is _MISSING)


def error_code(status: Status) -> int:
    """The JSON-RPC error code for a bastion status (see the module docstring)."""
    return _SPEC_CODES.get(status, STATUS_BASE - int(status))


def error_object(exc: CallError) -> dict[str, Any]:
    """The JSON-RPC error object for a failed call."""
    data: dict[str, Any] = {"status": exc.status.name, "code": int(exc.status)}
    if exc.details and json_writable(exc.details):  # else sent without them, as the native protocol does
        data["details"] = exc.details
    if exc.retry_after is not None:
        data["retry_after"] = exc.retry_after
    return {"code": error_code(exc.status), "message": exc.message, "data": data}


def json_writable(details: Any) -> bool:
    """Whether JSON can carry an error's ``details`` (a handler's own: MessagePack carries maps keyed by
    arrays, which JSON does not)."""
    try:
        msgspec.json.encode(details)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def failure(ident: Any, exc: CallError) -> dict[str, Any]:
    """The response to call ``ident`` that failed with ``exc``."""
    return {"jsonrpc": "2.0", "error": error_object(exc), "id": ident}


def error_response(ident: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "error": error, "id": ident}


def result_response(ident: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "result": result, "id": ident}
