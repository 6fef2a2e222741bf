"""Who may read the gateway's operator endpoints, ``/metrics`` and ``/openapi.json`` (and ``rpc.discover``).

``/openapi.json`` and ``rpc.discover`` describe what the caller may call, as
``admin.methods`` does (openapi.py): the caller is the request's bearer
token, or its session cookie (a GET reads, so no CSRF proof is asked), or
anonymous, who sees the public methods only. A bad credential is 401.

``/metrics`` shows every method called (admin-only ones too) with per-status
counts, latencies, login failures, rejections, backups and the exact
versions: by default only a caller holding the ``metrics`` role may read it
(``METRICS_ROLE``; admins hold every role), by bearer token (Prometheus:
``authorization: {credentials_file: ...}``) or session cookie (the web
console's latency chart). An anonymous request is answered 401 naming the
settings before anything is opened or rendered, so a flood of them costs a
header lookup each; a token is checked by the server's own handshake
through the bridge (login throttle and all), its session pooled, so a
scraper's every scrape after the first costs no handshake. A caller without
the role gets 403. Settings, in ``[gateway]``:

- ``public_metrics = true``: anyone who reaches the port may read
  ``/metrics`` (as before this default: for a Prometheus that cannot send
  a credential). Not inferred from a loopback listener: a reverse proxy on
  the same host makes every remote client a loopback one;
- ``metrics_token_file = "/etc/bastion/metrics.token"``: ``Authorization:
  Bearer <the file's token>`` reads ``/metrics`` too (a secret of its own,
  no user's: compared in constant time, never logged);
- ``metrics_enabled = false``: both endpoints answer 404 (NOT_FOUND);
- ``metrics_networks = ["10.0.0.0/8", ...]``: only clients whose address is
  in one of them (the TCP peer: the gateway never reads X-Forwarded-For)
  may read either; others get 403 (PERMISSION_DENIED).

Under the last two ``rpc.discover`` answers only callers with a valid
credential. The checks run in the order: enabled, networks, credential.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from pathlib import Path
from typing import Final

from starlette.requests import Request
from starlette.responses import Response

from bastion.config import GatewayConfig
from bastion.exceptions import CallError, NotFound, PermissionDenied, Unauthenticated, UsageError
from bastion.gateway._cookies import secure_cookies, session_token
from bastion.gateway._http import error_body, http_status, parse_bearer, retry_after
from bastion.gateway._shared import _encoder
from bastion.gateway.bridge import Bridge, Caller
from bastion.protocol.proxy import parse_networks
from bastion.security.principal import ANONYMOUS, Principal

__all__ = ["METRICS_ROLE", "OpsAccess", "read_token_file"]

log = logging.getLogger("bastion.gateway")

#: The role whose holders may read /metrics (admins hold every role).
METRICS_ROLE: Final = "metrics"
_NEEDED = frozenset({METRICS_ROLE})


def read_token_file(path: str) -> bytes:
    """The token in ``path`` (stripped), as bytes; UsageError if it cannot be read or is empty."""
    file = Path(path)
    try:
        if file.stat().st_mode & 0o077:
            log.warning("gateway.metrics_token_file %s is readable by others; chmod 600 it", file)
        token = file.read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read gateway.metrics_token_file {file}: {exc.strerror}") from None
    except UnicodeDecodeError:  # said without the bytes: they are a secret
        raise UsageError(f"gateway.metrics_token_file {file} is not UTF-8 text") from None
    if not token:
        raise UsageError(f"gateway.metrics_token_file {file} is empty")
    return token.encode()


def refusal_response(refusal: CallError) -> Response:
    """The JSON error answer for ``refusal`` (401s with ``WWW-Authenticate: Bearer``)."""
    headers = {"www-authenticate": 'Bearer realm="bastion-metrics"'} if isinstance(refusal, Unauthenticated) else {}
    if (retry := retry_after(refusal)) is not None:
        headers["retry-after"] = retry
    body = _encoder.encode(error_body(refusal))
    return Response(body, http_status(refusal.status), headers=headers, media_type="application/json")


class OpsAccess:
    """The ``metrics_*`` settings, ready to check a request against (see the module docstring)."""

    def __init__(self, config: GatewayConfig, bridge: Bridge) -> None:
        self.config = config
        self.bridge = bridge
        self.enabled = config.metrics_enabled
        self.networks = parse_networks(config.metrics_networks)
        self.token = read_token_file(config.metrics_token_file) if config.metrics_token_file else None
        self.public = config.public_metrics
        #: Whether ``rpc.discover`` needs a valid credential (the description is off, or for some networks only).
        self.protected = not self.enabled or bool(self.networks)
        how = "a bearer token or session of a user with the 'metrics' (or 'admin') role"
        if self.token is not None:
            how += ", or Authorization: Bearer <the token in gateway.metrics_token_file>"
        self._anonymous = Unauthenticated(
            f"GET /metrics needs {how}; set gateway.public_metrics = true to serve it to anyone"
        )

    def place_refusal(self, client_host: str | None) -> CallError | None:
        """Why a request from ``client_host`` may read neither endpoint (off, or not one of the networks)."""
        if not self.enabled:
            return NotFound("not served here (gateway.metrics_enabled = false)")
        if self.networks and not self._trusted(client_host):
            return PermissionDenied("served only to the networks in gateway.metrics_networks")
        return None

    async def principal(self, request: Request) -> Principal:
        """Who the request is: its bearer token's or session cookie's principal, or anonymous (without either).
        Raises the handshake's refusal for a bad credential (UNAUTHENTICATED...)."""
        token = parse_bearer(request.headers.get("authorization"))
        if token is None:
            token = session_token(request, secure_cookies(request, self.config.cookie_secure))
        if token is None:
            return ANONYMOUS
        client = request.client
        address = f"{client.host}:{client.port}" if client is not None else "unknown:0"
        return await self.bridge.check(Caller(token, address))

    async def openapi_refusal(self, request: Request) -> tuple[Response | None, Principal]:
        """(the answer refusing /openapi.json to this request or None, the principal whose view it gets)."""
        client = request.client
        if (refusal := self.place_refusal(client.host if client else None)) is not None:
            return refusal_response(refusal), ANONYMOUS
        try:
            return None, await self.principal(request)
        except CallError as exc:
            return refusal_response(exc), ANONYMOUS

    async def metrics_refusal(self, request: Request) -> Response | None:
        """The answer refusing /metrics to this request, None if it may read it."""
        client = request.client
        if (refusal := self.place_refusal(client.host if client else None)) is not None:
            return refusal_response(refusal)
        if self.public:
            return None
        authorization = request.headers.get("authorization")
        if self.token is not None and authorization is not None:
            scheme, _, given = authorization.partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token):
                return None
        if authorization is None and not request.cookies:  # refused before anything is opened or rendered
            return refusal_response(self._anonymous)
        try:
            principal = await self.principal(request)
        except CallError as exc:
            return refusal_response(exc)
        if not principal.authenticated:  # cookies, but not the session one
            return refusal_response(self._anonymous)
        if not principal.has_roles(_NEEDED):
            return refusal_response(PermissionDenied("GET /metrics needs the 'metrics' role (or 'admin')"))
        return None

    def _trusted(self, host: str | None) -> bool:
        try:
            address = ipaddress.ip_address(host or "")
        except ValueError:  # no address (a Unix socket): not in any network
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)
