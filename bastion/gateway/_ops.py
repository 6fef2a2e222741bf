"""Who may read the gateway's operator endpoints: ``/metrics``, ``/openapi.json`` (and ``rpc.discover``).

By default anyone who reaches the gateway's port may (Prometheus scrapes
without credentials as a rule, and the API description is no secret). An
operator who wants them protected sets, in ``[gateway]``:

- ``metrics_enabled = false``: both answer 404 (NOT_FOUND);
- ``metrics_networks = ["10.0.0.0/8", ...]``: only clients whose address is
  in one of them (the TCP peer: the gateway never reads X-Forwarded-For);
  others get 403 (PERMISSION_DENIED);
- ``metrics_token_file = "/etc/bastion/metrics.token"``: a request must
  carry ``Authorization: Bearer <the file's token>`` (Prometheus:
  ``authorization: {credentials_file: ...}``); others get 401
  (UNAUTHENTICATED) with ``WWW-Authenticate: Bearer``. The token is a
  secret of its own, not a user's: compared in constant time, never logged.

Under any of them ``rpc.discover`` (the OpenRPC twin of /openapi.json)
answers only callers with a valid credential. The checks run in that
order, so a refusal says the first reason that applies.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

from bastion.config import GatewayConfig
from bastion.exceptions import CallError, NotFound, PermissionDenied, Unauthenticated, UsageError
from bastion.gateway._http import error_body, http_status
from bastion.gateway._shared import _encoder
from bastion.protocol.proxy import parse_networks

__all__ = ["OpsAccess", "read_token_file"]

log = logging.getLogger("bastion.gateway")


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


class OpsAccess:
    """The ``metrics_*`` settings, ready to check a request against (see the module docstring)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.enabled = config.metrics_enabled
        self.networks = parse_networks(config.metrics_networks)
        self.token = read_token_file(config.metrics_token_file) if config.metrics_token_file else None
        #: Whether anything is restricted (then ``rpc.discover`` needs a valid credential too).
        self.protected = not self.enabled or bool(self.networks) or self.token is not None

    def refusal(self, client_host: str | None, authorization: str | None) -> CallError | None:
        """Why a request from ``client_host`` with this Authorization header may not read them; None: it may."""
        if not self.enabled:
            return NotFound("not served here (gateway.metrics_enabled = false)")
        if self.networks and not self._trusted(client_host):
            return PermissionDenied("served only to the networks in gateway.metrics_networks")
        if self.token is not None:
            scheme, _, given = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
                return Unauthenticated("needs Authorization: Bearer <the token in gateway.metrics_token_file>")
        return None

    def refusal_response(self, request: Request) -> Response | None:
        """The answer refusing this request, None if it may read them."""
        client = request.client
        refusal = self.refusal(client.host if client else None, request.headers.get("authorization"))
        if refusal is None:
            return None
        headers = {"www-authenticate": 'Bearer realm="bastion-metrics"'} if isinstance(refusal, Unauthenticated) else {}
        body = _encoder.encode(error_body(refusal))
        return Response(body, http_status(refusal.status), headers=headers, media_type="application/json")

    def _trusted(self, host: str | None) -> bool:
        try:
            address = ipaddress.ip_address(host or "")
        except ValueError:  # no address (a Unix socket): not in any network
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)
