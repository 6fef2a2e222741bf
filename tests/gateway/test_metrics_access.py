"""Who may read ``/metrics``, and what ``/openapi.json`` and ``rpc.discover`` show, on a real ``bastion serve``.

``/openapi.json`` and ``rpc.discover`` describe what the caller may call, as
``admin.methods`` does: anonymous callers see the public methods only.
``/metrics`` needs a credential by default: a token (or session cookie) of
a user with the ``metrics`` role (admins hold every role), or the token in
``metrics_token_file``; an anonymous scrape gets 401 naming
``gateway.public_metrics``, which serves it to anyone again. Besides:
``metrics_networks`` (only those client addresses: 403), ``metrics_enabled
= false`` (404). And whatever the setting, a scrape shows no credential, user
name or client-chosen string.
"""

from __future__ import annotations

import json
import re
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis

from bastion.config import GatewayConfig
from bastion.exceptions import UsageError
from tests.gateway.test_metrics import _context
from tests.support.server import ServerProcess, start_server

METRICS_TOKEN = secrets.token_urlsafe(24)
PASSWORD = "correct horse battery staple 7"


def _request(
    server: ServerProcess, method: str, path: str, body: Any = None, token: str | None = None, cookie: str = ""
) -> Any:
    """(status, headers, body) of one request to the gateway; any status comes back."""
    assert server.gateway_url is not None
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if cookie:
        headers["Cookie"] = cookie
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.gateway_url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, context=_context(server), timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def _call(server: ServerProcess, method: str, token: str | None, **args: Any) -> Any:
    status, _, body = _request(server, "POST", "/v1/" + method.replace(".", "/"), args, token=token)
    assert status == 200, (method, status, body)
    return json.loads(body)


def _user(server: ServerProcess, name: str, roles: list[str]) -> str:
    """A new user with ``roles`` (password ``PASSWORD``); an API token of theirs."""
    _call(server, "auth.create_user", server.token, name=name, password=PASSWORD, roles=roles)
    token: str = _call(server, "auth.create_token", server.token, user=name)["token"]
    return token


def _counter(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match is not None, name
    return float(match.group(1))


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("metrics-default"), http=True)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()


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


# -- /openapi.json and rpc.discover ---------------------------------------------------------------


def test_openapi_and_rpc_discover_show_each_caller_what_admin_methods_shows(default: ServerProcess) -> None:
    plain = _user(default, "pat", [])
    ops = _user(default, "olga", ["ops"])
    seen: dict[str | None, set[str]] = {}
    for token in (None, plain, ops, default.token):
        listed = _call(default, "admin.methods", token)
        allowed = {m["name"] for svc in listed for m in svc["methods"]}
        unary = {m["name"] for svc in listed for m in svc["methods"] if m["kind"] == "unary"}
        status, _, body = _request(default, "GET", "/openapi.json", token=token)
        assert status == 200, body
        doc = json.loads(body)
        assert doc["openapi"].startswith("3.1")
        paths = {path.removeprefix("/v1/").replace("/", ".") for path in doc["paths"]}
        assert paths == unary, token
        assert {tag["name"] for tag in doc["tags"]} == {name.split(".")[0] for name in paths}
        # Still a document an OpenAPI tool reads whole (schemathesis: every operation resolves).
        operations = [result.ok() for result in schemathesis.openapi.from_dict(doc).get_all_operations()]
        assert len(operations) == len(paths)
        call = {"jsonrpc": "2.0", "method": "rpc.discover", "id": 1}
        status, _, body = _request(default, "POST", "/rpc", call, token=token)
        assert {m["name"] for m in json.loads(body)["result"]["methods"]} == allowed, token
        seen[token] = paths
    anonymous = seen[None]
    assert "auth.login" in anonymous and "admin.health" in anonymous
    assert not anonymous & {"admin.stats", "auth.create_user", "kv.put", "demo.ops_only", "demo.echo"}
    assert "kv.put" in seen[plain] and not seen[plain] & {"admin.stats", "demo.ops_only"}
    assert "demo.ops_only" in seen[ops] and "admin.stats" not in seen[ops]
    assert {"admin.stats", "auth.create_user", "demo.ops_only"} <= seen[default.token]


def test_openapi_with_a_session_cookie_and_with_a_bad_credential(default: ServerProcess) -> None:
    _user(default, "carla", [])
    status, headers, _ = _request(default, "POST", "/v1/auth/login", {"username": "carla", "password": PASSWORD})
    assert status == 200
    cookie = "; ".join(c.split(";", 1)[0] for c in headers.get_all("Set-Cookie"))
    status, _, body = _request(default, "GET", "/openapi.json", cookie=cookie)
    assert status == 200 and "/v1/kv/put" in json.loads(body)["paths"]
    status, headers, body = _request(default, "GET", "/openapi.json", token="bst_not-a-token")
    assert status == 401 and json.loads(body)["error"]["status"] == "UNAUTHENTICATED"


# -- /metrics -----------------------------------------------------------------------------------------


def test_metrics_needs_a_credential_with_the_metrics_role_by_default(default: ServerProcess) -> None:
    """Behaviour change: an anonymous scrape is refused 401, naming the setting that serves it to anyone."""
    status, headers, body = _request(default, "GET", "/metrics")
    assert status == 401, body
    assert headers["WWW-Authenticate"].startswith("Bearer")
    error = json.loads(body)["error"]
    assert error["status"] == "UNAUTHENTICATED"
    assert "gateway.public_metrics" in error["message"] and "metrics" in error["message"]
    status, _, body = _request(default, "GET", "/metrics", token="bst_not-a-token")
    assert status == 401 and json.loads(body)["error"]["status"] == "UNAUTHENTICATED"
    plain = _user(default, "percy", ["user"])
    status, _, body = _request(default, "GET", "/metrics", token=plain)
    assert status == 403, body
    error = json.loads(body)["error"]
    assert error["status"] == "PERMISSION_DENIED" and "metrics" in error["message"]
    scraper = _user(default, "prometheus", ["metrics"])
    for token in (scraper, default.token):  # the metrics role, or admin (which holds every role)
        status, headers, body = _request(default, "GET", "/metrics", token=token)
        assert status == 200 and b"bastion_calls_total" in body
        assert headers["Content-Type"].startswith("text/plain")
    # The web console reads it with the session cookie of a user holding the role.
    _user(default, "watcher", ["metrics"])
    status, headers, _ = _request(default, "POST", "/v1/auth/login", {"username": "watcher", "password": PASSWORD})
    cookie = "; ".join(c.split(";", 1)[0] for c in headers.get_all("Set-Cookie"))
    assert _request(default, "GET", "/metrics", cookie=cookie)[0] == 200
    for path in ("/livez", "/readyz", "/healthz"):  # status only: still anyone's
        assert _request(default, "GET", path)[0] == 200


def test_an_anonymous_scrape_flood_is_refused_before_anything_is_opened(default: ServerProcess) -> None:
    """Refused before a session is opened or a snapshot rendered: no connection, no auth failure counted."""
    before = default.scrape()
    for _ in range(200):
        assert _request(default, "GET", "/metrics")[0] == 401
    after = default.scrape()
    # The admin's two scrapes share one pooled session: the 200 refusals opened none.
    assert _counter(after, "bastion_connections_total") == _counter(before, "bastion_connections_total")
    failures = [line for line in before.splitlines() if line.startswith("bastion_auth_failures_total{")]
    assert failures == [line for line in after.splitlines() if line.startswith("bastion_auth_failures_total{")]


def test_public_metrics_serves_it_to_anyone(tmp_path: Path) -> None:
    server = start_server(tmp_path / "public", env={"BASTION_GATEWAY__PUBLIC_METRICS": "true"}, http=True)
    try:
        status, _, body = _request(server, "GET", "/metrics")
        assert status == 200 and b"bastion_calls_total" in body
        status, _, body = _request(server, "GET", "/openapi.json")  # still the anonymous caller's view
        assert status == 200 and "/v1/admin/stats" not in json.loads(body)["paths"]
    finally:
        assert server.stop() == 0, server.log()


def test_the_metrics_token_or_the_metrics_role(guarded: ServerProcess) -> None:
    for token in (None, "wrong"):
        status, headers, body = _request(guarded, "GET", "/metrics", token=token)
        assert status == 401, (token, status, body)
        assert headers["WWW-Authenticate"].startswith("Bearer")
        error = json.loads(body)["error"]
        assert error["status"] == "UNAUTHENTICATED"
        assert METRICS_TOKEN not in body.decode()
    status, _, body = _request(guarded, "GET", "/metrics")
    assert "metrics_token_file" in json.loads(body)["error"]["message"]
    for token in (METRICS_TOKEN, guarded.token):
        status, _, body = _request(guarded, "GET", "/metrics", token=token)
        assert status == 200 and b"bastion_calls_total" in body
    # /openapi.json is the caller's own view: the metrics token is no user's credential.
    status, _, body = _request(guarded, "GET", "/openapi.json")
    assert status == 200 and "/v1/admin/stats" not in json.loads(body)["paths"]
    assert _request(guarded, "GET", "/livez")[0] == 200  # the rest of the gateway is as before


def test_metrics_networks_and_metrics_enabled(tmp_path: Path) -> None:
    outside = start_server(
        tmp_path / "outside", env={"BASTION_GATEWAY__METRICS_NETWORKS": "10.0.0.0/8,fd00::/8"}, http=True
    )
    try:
        for path in ("/metrics", "/openapi.json"):
            status, _, body = _request(outside, "GET", path, token=outside.token)
            assert status == 403, body
            assert json.loads(body)["error"]["status"] == "PERMISSION_DENIED"
        call = {"jsonrpc": "2.0", "method": "rpc.discover", "id": 1}
        status, _, body = _request(outside, "POST", "/rpc", call)
        assert json.loads(body)["error"]["data"]["status"] == "UNAUTHENTICATED"
        status, _, body = _request(outside, "POST", "/rpc", call, token=outside.token)
        assert json.loads(body)["result"]["openrpc"]
    finally:
        assert outside.stop() == 0, outside.log()
    env = {"BASTION_GATEWAY__METRICS_NETWORKS": "127.0.0.0/8", "BASTION_GATEWAY__PUBLIC_METRICS": "true"}
    inside = start_server(tmp_path / "inside", env=env, http=True)
    try:
        assert _request(inside, "GET", "/metrics")[0] == 200
    finally:
        assert inside.stop() == 0, inside.log()
    off = start_server(tmp_path / "off", env={"BASTION_GATEWAY__METRICS_ENABLED": "false"}, http=True)
    try:
        for path in ("/metrics", "/openapi.json"):
            status, _, body = _request(off, "GET", path, token=off.token)
            assert status == 404 and json.loads(body)["error"]["status"] == "NOT_FOUND"
        assert _request(off, "GET", "/livez")[0] == 200
    finally:
        assert off.stop() == 0, off.log()


def test_bad_metrics_settings_are_refused_up_front(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="metrics_networks"):
        GatewayConfig(metrics_networks=["not-a-network"])
    with pytest.raises(UsageError, match="public_metrics"):
        GatewayConfig(public_metrics=True, metrics_token_file="/etc/bastion/metrics.token")
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
