"""Who may read ``/metrics`` and ``/openapi.json``: the ``[gateway] metrics_*`` settings, on a real ``bastion serve``.

Default: anyone who reaches the port (Prometheus scrapes without credentials
as a rule). ``metrics_token_file``: a bearer token of its own (401 without
it); ``metrics_networks``: only those client addresses (403); ``metrics_enabled
= false``: 404. And whatever the setting, a scrape shows no credential, user
name or client-chosen string.
"""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bastion.config import GatewayConfig
from bastion.exceptions import UsageError
from tests.gateway.test_metrics import _context
from tests.support.server import ServerProcess, start_server

METRICS_TOKEN = secrets.token_urlsafe(24)


def _request(server: ServerProcess, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
    """(status, headers, body) of one request to the gateway; any status comes back."""
    assert server.gateway_url is not None
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.gateway_url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, context=_context(server), timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("metrics-token")
    token_file = workdir / "metrics.token"
    token_file.write_text(METRICS_TOKEN + "\n")
    token_file.chmod(0o600)
    env = {"BASTION_GATEWAY__METRICS_TOKEN_FILE": str(token_file)}
    server = start_server(workdir, env=env, http=True)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.parametrize("path", ["/metrics", "/openapi.json"])
def test_a_metrics_token_is_required_when_configured(guarded: ServerProcess, path: str) -> None:
    for token in (None, "wrong", guarded.token):  # none, a wrong one, a user's (admin's) API token
        status, headers, body = _request(guarded, "GET", path, token=token)
        assert status == 401, (token, status, body)
        assert headers["WWW-Authenticate"].startswith("Bearer")
        error = json.loads(body)["error"]
        assert error["status"] == "UNAUTHENTICATED" and "metrics_token_file" in error["message"]
        assert METRICS_TOKEN not in body.decode()
    status, _, body = _request(guarded, "GET", path, token=METRICS_TOKEN)
    assert status == 200
    assert (b"bastion_calls_total" if path == "/metrics" else b'"openapi"') in body
    assert _request(guarded, "GET", "/livez")[0] == 200  # the rest of the gateway is as before


def test_rpc_discover_needs_a_credential_when_the_description_is_protected(guarded: ServerProcess) -> None:
    call = {"jsonrpc": "2.0", "method": "rpc.discover", "id": 1}
    status, _, body = _request(guarded, "POST", "/rpc", call)
    assert status == 200
    assert json.loads(body)["error"]["data"]["status"] == "UNAUTHENTICATED"
    status, _, body = _request(guarded, "POST", "/rpc", call, token="not-a-token")
    assert json.loads(body)["error"]["data"]["status"] == "UNAUTHENTICATED"
    status, _, body = _request(guarded, "POST", "/rpc", call, token=guarded.token)
    assert status == 200 and json.loads(body)["result"]["openrpc"]


def test_metrics_networks_and_metrics_enabled(tmp_path: Path) -> None:
    outside = start_server(
        tmp_path / "outside", env={"BASTION_GATEWAY__METRICS_NETWORKS": "10.0.0.0/8,fd00::/8"}, http=True
    )
    try:
        for path in ("/metrics", "/openapi.json"):
            status, _, body = _request(outside, "GET", path)
            assert status == 403, body
            assert json.loads(body)["error"]["status"] == "PERMISSION_DENIED"
    finally:
        assert outside.stop() == 0, outside.log()
    inside = start_server(tmp_path / "inside", env={"BASTION_GATEWAY__METRICS_NETWORKS": "127.0.0.0/8"}, http=True)
    try:
        assert _request(inside, "GET", "/metrics")[0] == 200
    finally:
        assert inside.stop() == 0, inside.log()
    off = start_server(tmp_path / "off", env={"BASTION_GATEWAY__METRICS_ENABLED": "false"}, http=True)
    try:
        for path in ("/metrics", "/openapi.json"):
            status, _, body = _request(off, "GET", path)
            assert status == 404 and json.loads(body)["error"]["status"] == "NOT_FOUND"
        assert _request(off, "GET", "/livez")[0] == 200
    finally:
        assert off.stop() == 0, off.log()


def test_bad_metrics_settings_are_refused_up_front(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="metrics_networks"):
        GatewayConfig(metrics_networks=["not-a-network"])
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    missing = tmp_path / "missing.token"
    for path, why in ((empty, "is empty"), (missing, "cannot read")):
        server = tmp_path / f"server-{path.stem}"
        with pytest.raises(Exception, match="metrics_token_file"):
            start_server(server, env={"BASTION_GATEWAY__METRICS_TOKEN_FILE": str(path)}, http=True, timeout=30)
        assert why in (server / "server.log").read_text()


def test_a_scrape_shows_no_credential_user_or_client_chosen_string(guarded: ServerProcess) -> None:
    """What a caller chooses (a user name at login, a method name, a token) never becomes part of /metrics."""
    marker = "zz" + secrets.token_hex(6)
    _request(guarded, "POST", "/v1/auth/login", {"username": f"user-{marker}", "password": f"pw-{marker}"})
    _request(guarded, "POST", "/rpc", {"jsonrpc": "2.0", "method": f"svc{marker}.m{marker}", "id": 1}, guarded.token)
    _request(guarded, "POST", "/rpc", {"jsonrpc": "2.0", "method": "demo.echo", "params": [1], "id": 1}, marker)
    status, _, body = _request(guarded, "GET", "/metrics", token=METRICS_TOKEN)
    assert status == 200
    text = body.decode()
    for secret in (marker, guarded.token, METRICS_TOKEN, "admin"):
        assert secret not in text, secret
