"""What the gateway's two HTTP doors share: status codes, error bodies, headers, credentials.

The Starlette routes (app.py) and the plain-ASGI front for the hot routes
(front.py) answer the same way from these, so a request gets the same answer
whichever door took it.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Collection
from typing import Any

from starlette.requests import HTTPConnection, Request

from bastion.exceptions import CallError, InvalidArgument, Unauthenticated
from bastion.gateway.jsonrpc import json_writable
from bastion.status import Status

__all__ = [
    "INTERNAL_ERROR_BODY",
    "NO_STORE",
    "SECURITY_HEADERS",
    "TooLarge",
    "error_body",
    "error_headers",
    "host_allowed",
    "http_status",
    "length_refusal",
    "media_type",
    "origin_allowed",
    "origin_host",
    "parse_bearer",
    "read_body",
    "retry_after",
    "target_refusal",
    "too_large_body",
]

#: On every response.
SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", b"default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
#: On every API response (everything but the console's static files).
NO_STORE = (b"cache-control", b"no-store")
#: The body of the 500 answered for a bug (an exception escaping the gateway): nothing about the bug itself.
INTERNAL_ERROR_BODY = b'{"error":{"status":"INTERNAL","code":13,"message":"internal error"}}'

_HTTP_STATUS = {
    Status.OK: 200,
    Status.CANCELLED: 499,
    Status.UNKNOWN: 500,
    Status.INVALID_ARGUMENT: 400,
    Status.DEADLINE_EXCEEDED: 504,
    Status.NOT_FOUND: 404,
    Status.ALREADY_EXISTS: 409,
    Status.PERMISSION_DENIED: 403,
    Status.RESOURCE_EXHAUSTED: 429,
    Status.FAILED_PRECONDITION: 400,
    Status.ABORTED: 409,
    Status.OUT_OF_RANGE: 400,
    Status.UNIMPLEMENTED: 404,
    Status.INTERNAL: 500,
    Status.UNAVAILABLE: 503,
    Status.DATA_LOSS: 500,
    Status.UNAUTHENTICATED: 401,
}


class TooLarge(Exception):
    """A body went past the gateway's ``max_body``: answered 413."""


def http_status(status: Status) -> int:
    """The HTTP status a /v1 route answers for a bastion status."""
    return _HTTP_STATUS.get(status, 500)


def error_body(exc: CallError) -> dict[str, Any]:
    """A /v1 error answer: ``{"error": {status, code, message[, details][, retry_after]}}``."""
    error: dict[str, Any] = {"status": exc.status.name, "code": int(exc.status), "message": exc.message}
    if exc.details and json_writable(exc.details):  # else without them, as jsonrpc.error_object sends it
        error["details"] = exc.details
    if exc.retry_after is not None:
        error["retry_after"] = exc.retry_after
    return {"error": error}


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (``TooLarge``) at the first byte past ``limit``, however it is framed."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def too_large_body(limit: int) -> dict[str, Any]:
    return {"error": {"status": "RESOURCE_EXHAUSTED", "code": 8, "message": f"request body over {limit} bytes"}}


def parse_bearer(header: str | None) -> str | None:
    """The token of an Authorization header (None without one); Unauthenticated if it is not Bearer."""
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
    return token


#: What a 401 says of how to authenticate (RFC 9110 15.5.2: a 401 MUST carry a WWW-Authenticate challenge).
BEARER_CHALLENGE = 'Bearer realm="bastion"'


def error_headers(exc: CallError) -> dict[str, str]:
    """The headers of an error answer: ``Retry-After`` when it carries a retry-after; on a 401 the challenge."""
    headers = {}
    if (retry := retry_after(exc)) is not None:
        headers["retry-after"] = retry
    if exc.status is Status.UNAUTHENTICATED:
        headers["www-authenticate"] = BEARER_CHALLENGE
    return headers


def retry_after(exc: CallError) -> str | None:
    """The ``Retry-After`` header's value for an error that carries a retry-after (whole seconds, at least 1)."""
    return None if exc.retry_after is None else str(max(1, math.ceil(exc.retry_after)))


def length_refusal(value: bytes, limit: int) -> tuple[int, dict[str, Any]] | None:
    """The answer (status, body) to a Content-Length that is not a number (400) or is over ``limit``
    (413, sent before a byte of the body is read); None when the body may be read."""
    try:
        length = int(value)
    except ValueError:
        length = -1
    if length > limit:
        return 413, too_large_body(limit)
    if length < 0:
        return 400, error_body(InvalidArgument("bad Content-Length"))
    return None


def media_type(conn: HTTPConnection) -> str:
    """The request's media type (Content-Type without parameters), lower case; "" without one."""
    return conn.headers.get("content-type", "").split(";")[0].strip().lower()


def origin_allowed(
    origin: str | None, scheme: str, host: str | None, allowed: Collection[str], names: Collection[str]
) -> bool:
    """Whether a request with this ``Origin`` header may go on: none (not a browser's cross-origin
    request), one of ``allowed`` (``cors_origins`` or ``ws_origins``), or the gateway's own origin.

    The own origin is ``scheme://<Host header>``, but the Host header is the browser's own word for
    the name it connected to, so a DNS-rebinding page (``http://evil.example:7401``, its name
    re-pointed at the gateway's address) would match it. So the Host counts only where rebinding
    cannot reach: over TLS (the browser checked the gateway's certificate for that name), or a host
    that is an IP address, ``localhost``, or one of ``names`` (the host the gateway is configured
    to listen on). A plaintext gateway served under another name lists its origin in the settings.
    """
    if origin is None or origin in allowed:
        return True
    if host is None:
        return False
    scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    if origin != f"{scheme}://{host}":
        return False
    return scheme == "https" or host_allowed(host, names)


def origin_host(origin: str) -> str:
    """The host name of an origin as the settings hold it (``https://name:port`` -> ``name``, IPv6 unbracketed)."""
    rest = origin.split("://", 1)[1]
    if rest.startswith("["):
        return rest[1 : rest.index("]")]
    return rest.rsplit(":", 1)[0] if ":" in rest else rest


def host_allowed(host: str, names: Collection[str]) -> bool:
    """Whether a Host header's name is an IP address, ``localhost`` or one of ``names`` (any port):
    a name DNS rebinding cannot put there (the front answers any other 400 over plaintext)."""
    if host.startswith("["):
        name = host[1 : host.find("]")]
    else:
        before, colon, port = host.rpartition(":")
        name = before if colon and port.isdigit() else host
    name = name.lower()
    if name == "localhost" or name in names:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


_AUTHORITY_END = re.compile(rb"[/?#]")


def target_refusal(target: bytes, host: bytes | None) -> str | None:
    """Why a request whose target is absolute-form (``http://name:port/path``) is answered 400, None if it is not.

    RFC 9112 3.2.2: such a request is for the target's authority, its Host ignored; and 3.2: a client sends a Host
    identical to that authority. The gateway routes by the path and checks the Host (DNS rebinding, ``front.py``),
    so a target naming another authority than the Host (or with userinfo, RFC 9110 4.2.4; or with no Host at all)
    is refused rather than served under a name nothing checked. Origin-form (``/path``), ``*`` and authority-form
    (CONNECT's, answered by the routes) are not judged here.
    """
    if target[:1] == b"/" or target == b"*":
        return None
    _, sep, rest = target.partition(b"://")
    if not sep:
        return None
    authority = _AUTHORITY_END.split(rest, maxsplit=1)[0]
    if b"@" in authority:
        return "a request target with userinfo is not served"
    if host is None or authority.lower() != host.lower():
        shown = authority.decode("latin-1")[:100]
        return f"the request target's authority {shown!r} is not the Host header's (RFC 9112 3.2.2)"
    return None
