"""The console's cookies: ``__Host-`` names whenever they are Secure, so a same-site page cannot plant them.

A sibling subdomain, or a plaintext page of the same host, can set cookies
the gateway receives. With plain names such a page plants its own session and
CSRF pair and the console runs as the attacker; a ``__Host-`` cookie can be
set only by this host name over HTTPS, so the gateway reads only those names when
its cookies are Secure (bastion/gateway/_cookies.py). Over a real gateway:
plaintext with ``cookie_secure`` (the default: behind a TLS proxy), plaintext
without it (local development: plain names), and a real ``bastion serve``
over TLS.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from websockets.sync.client import connect as ws_connect

from bastion.client.sync import SyncClient
from bastion.gateway import GatewayConfig
from tests.gateway.conftest import PASSWORD, World, bearer, http, start_world
from tests.gateway.test_gateway import rpc, ws_url
from tests.support.server import ServerProcess, shared_ca, start_server

SESSION, CSRF = "__Host-bastion_session", "__Host-bastion_csrf"


def _set_cookies(set_cookies: list[str]) -> dict[str, list[str]]:
    """Each Set-Cookie by name: [value, attribute, ...] (attributes lower-cased)."""
    parsed = {}
    for line in set_cookies:
        first, *attributes = (part.strip() for part in line.split(";"))
        name, value = first.split("=", 1)
        parsed[name] = [value, *(a.lower() for a in attributes)]
    return parsed


def _login(world: World, user: str = "carol") -> dict[str, list[str]]:
    reply = http(world, "POST", "/v1/auth/login", {"username": user, "password": PASSWORD})
    assert reply.status == 200, reply
    return _set_cookies(reply.cookies)


def _whoami(world: World, cookie: str, csrf: str) -> Any:
    reply = http(world, "POST", "/v1/auth/whoami", {}, headers={"Cookie": cookie, "X-CSRF-Token": csrf})
    assert reply.status == 200, reply
    return reply.json()


def _ws_whoami(world: World, cookie: str) -> Any:
    with ws_connect(ws_url(world), additional_headers={"Cookie": cookie}) as ws:
        ws.send(msgspec.json.encode(rpc("auth.whoami")).decode())
        return msgspec.json.decode(ws.recv(timeout=10))["result"]


@pytest.fixture(scope="module")
def development(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A plaintext gateway with ``cookie_secure = false``: local development."""
    w = start_world(tmp_path_factory.mktemp("cookies-dev"), GatewayConfig(http_port=0, cookie_secure=False))
    yield w
    w.stop()


def test_secure_cookies_are_named_host_prefixed(world: World) -> None:
    cookies = _login(world)
    assert set(cookies) == {SESSION, CSRF}
    for attributes in cookies.values():
        # What a browser demands of a __Host- cookie: Secure, Path=/, no Domain.
        assert "secure" in attributes and "path=/" in attributes and "samesite=strict" in attributes
        assert not any(a.startswith("domain") for a in attributes)
    assert "httponly" in cookies[SESSION] and "httponly" not in cookies[CSRF]
    session, csrf = cookies[SESSION][0], cookies[CSRF][0]
    jar = f"{SESSION}={session}; {CSRF}={csrf}"
    assert _whoami(world, jar, csrf)["name"] == "carol"
    assert _ws_whoami(world, f"{SESSION}={session}")["name"] == "carol"
    logout = http(world, "POST", "/logout", headers={"Cookie": jar, "X-CSRF-Token": csrf})
    assert logout.json() == {"logged_out": True}
    cleared = _set_cookies(logout.cookies)
    assert set(cleared) == {SESSION, CSRF}
    assert all("max-age=0" in a and "secure" in a and "path=/" in a for a in cleared.values())


def test_a_planted_plain_cookie_pair_is_ignored(world: World) -> None:
    """An attacker on a sibling host plants ``bastion_session`` (its own live token) and ``bastion_csrf``:
    the gateway must not run the victim's console as the attacker."""
    planted = f"bastion_session={world.tokens['ada']}; bastion_csrf=known"
    assert _whoami(world, planted, "known")["authenticated"] is False
    assert _ws_whoami(world, planted)["authenticated"] is False
    # Beside the victim's own __Host- pair, the victim's session is the one used.
    cookies = _login(world)
    own = f"{planted}; {SESSION}={cookies[SESSION][0]}; {CSRF}={cookies[CSRF][0]}"
    assert _whoami(world, own, cookies[CSRF][0])["name"] == "carol"
    assert http(world, "POST", "/v1/auth/whoami", {}, headers={"Cookie": own, "X-CSRF-Token": "known"}).status == 403


def test_openapi_names_the_cookie_the_gateway_reads(world: World, development: World) -> None:
    for w, name in ((world, SESSION), (development, "bastion_session")):
        doc = http(w, "GET", "/openapi.json").json()
        assert doc["components"]["securitySchemes"]["cookie"]["name"] == name


def test_plaintext_development_keeps_plain_names(development: World) -> None:
    """``cookie_secure = false`` over plaintext: a browser would refuse a __Host- cookie there, so plain
    names without Secure (and nothing protects them from a planted pair: development only)."""
    cookies = _login(development)
    assert set(cookies) == {"bastion_session", "bastion_csrf"}
    assert all("secure" not in a for a in cookies.values())
    session, csrf = cookies["bastion_session"][0], cookies["bastion_csrf"][0]
    assert _whoami(development, f"bastion_session={session}; bastion_csrf={csrf}", csrf)["name"] == "carol"
    # A __Host- name is not read here: one name per gateway, never either.
    prefixed = f"{SESSION}={session}; {CSRF}={csrf}"
    assert _whoami(development, prefixed, csrf)["authenticated"] is False
    assert _ws_whoami(development, f"bastion_session={session}")["name"] == "carol"


# -- over TLS -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real ``bastion serve`` whose gateway speaks TLS, with ``cookie_secure = false``: TLS alone makes the
    cookies Secure (and so ``__Host-``)."""
    server = start_server(
        tmp_path_factory.mktemp("cookies-tls"), env={"BASTION_GATEWAY__COOKIE_SECURE": "false"}, http=True
    )
    try:
        with SyncClient(server.address, token=server.token, timeout=30) as admin:
            admin.call("auth.set_password", name="admin", password=PASSWORD)
        yield server
    finally:
        assert server.stop() == 0, server.log()


def _https(server: ServerProcess, path: str, body: Any, headers: dict[str, str]) -> tuple[int, list[str], Any]:
    assert server.gateway_url is not None and server.gateway_url.startswith("https://")
    data = json.dumps(body).encode()
    request = urllib.request.Request(server.gateway_url + path, data=data, method="POST", headers=headers)
    request.add_header("Content-Type", "application/json")
    context = ssl.create_default_context(cafile=str(shared_ca()))
    try:
        with urllib.request.urlopen(request, timeout=20, context=context) as response:
            return response.status, response.headers.get_all("set-cookie") or [], json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get_all("set-cookie") or [], json.loads(exc.read())


def test_over_tls_the_cookies_are_host_prefixed_whatever_cookie_secure_says(tls_server: ServerProcess) -> None:
    status, set_cookies, _ = _https(tls_server, "/v1/auth/login", {"username": "admin", "password": PASSWORD}, {})
    assert status == 200
    cookies = _set_cookies(set_cookies)
    assert set(cookies) == {SESSION, CSRF}
    assert all("secure" in a and "path=/" in a for a in cookies.values())
    csrf = cookies[CSRF][0]
    jar = {"Cookie": f"{SESSION}={cookies[SESSION][0]}; {CSRF}={csrf}", "X-CSRF-Token": csrf}
    status, _, me = _https(tls_server, "/v1/auth/whoami", {}, jar)
    assert (status, me["name"]) == (200, "admin")
    plain = {"Cookie": f"bastion_session={tls_server.token}; bastion_csrf=x", "X-CSRF-Token": "x"}
    status, _, me = _https(tls_server, "/v1/auth/whoami", {}, plain)
    assert (status, me["authenticated"]) == (200, False)


def test_a_bearer_header_still_wins(world: World) -> None:
    cookies = _login(world)
    headers = {**bearer(world, "ada"), "Cookie": f"{SESSION}={cookies[SESSION][0]}"}
    assert http(world, "POST", "/v1/auth/whoami", {}, headers=headers).json()["name"] == "ada"


# -- a login replaces the session it finds ------------------------------------------------------------------


def test_a_login_revokes_the_session_cookie_it_replaces(world: World) -> None:
    """Logging in (as anyone) while the browser holds a session cookie revokes that session's token: the first
    session does not stay live behind the browser's back (the new cookie only hides it from this browser)."""
    first = _login(world)
    old, old_csrf = first[SESSION][0], first[CSRF][0]
    old_jar = {"Cookie": f"{SESSION}={old}; {CSRF}={old_csrf}", "X-CSRF-Token": old_csrf}
    assert http(world, "POST", "/v1/auth/whoami", {}, headers=old_jar).json()["name"] == "carol"
    # A failed login changes nothing.
    wrong = http(world, "POST", "/v1/auth/login", {"username": "carol", "password": "nope"}, headers=old_jar)
    assert wrong.status == 401
    assert http(world, "POST", "/v1/auth/whoami", {}, headers=old_jar).json()["name"] == "carol"
    again = http(world, "POST", "/v1/auth/login", {"username": "carol", "password": PASSWORD}, headers=old_jar)
    assert again.status == 200
    new = _set_cookies(again.cookies)
    assert new[SESSION][0] != old
    assert http(world, "POST", "/v1/auth/whoami", {}, headers=old_jar).status == 401  # revoked at the server
    new_jar = {"Cookie": f"{SESSION}={new[SESSION][0]}; {CSRF}={new[CSRF][0]}", "X-CSRF-Token": new[CSRF][0]}
    assert http(world, "POST", "/v1/auth/whoami", {}, headers=new_jar).json()["name"] == "carol"


def test_a_login_with_a_dead_or_bogus_session_cookie_still_succeeds(world: World) -> None:
    for cookie in (f"{SESSION}=bst_not-a-token", f"{SESSION}=whatever; {CSRF}=x", f"{SESSION}={'x' * 4000}"):
        reply = http(
            world, "POST", "/v1/auth/login", {"username": "carol", "password": PASSWORD}, headers={"Cookie": cookie}
        )
        assert reply.status == 200, (cookie[:40], reply)
        assert set(_set_cookies(reply.cookies)) == {SESSION, CSRF}


def test_a_login_revokes_only_the_cookie_of_the_name_in_use(development: World) -> None:
    """Over plaintext development the plain-named cookie is the session: it is the one revoked."""
    first = _login(development)
    old, old_csrf = first["bastion_session"][0], first["bastion_csrf"][0]
    jar = {"Cookie": f"bastion_session={old}; bastion_csrf={old_csrf}", "X-CSRF-Token": old_csrf}
    assert (
        http(development, "POST", "/v1/auth/login", {"username": "carol", "password": PASSWORD}, headers=jar).status
        == 200
    )
    assert http(development, "POST", "/v1/auth/whoami", {}, headers=jar).status == 401


def test_a_stale_session_cookie_replaced_by_a_login_costs_nothing_and_logs_no_failure(world: World) -> None:
    """The login revoked the cookie's token through a bridged ``auth.logout`` with it: a stale cookie (the
    normal case: sessions end by password changes, purges, expiry) failed that token handshake, which charged
    the login throttle's bucket of failures for the client's address and wrote an ``auth.failure`` record,
    every time a browser with an old cookie logged in."""
    assert world.server is not None
    first = _login(world)
    stale, stale_csrf = first[SESSION][0], first[CSRF][0]
    jar = {"Cookie": f"{SESSION}={stale}; {CSRF}={stale_csrf}", "X-CSRF-Token": stale_csrf}
    assert http(world, "POST", "/v1/auth/logout", {}, headers=jar).status == 200  # the session ends
    audit_path = world.tmp / "audit.log"
    failures_before = audit_path.read_text().count('"auth.failure"')
    counted_before = world.server.counters["auth_failures_credentials"]
    for _ in range(3):
        reply = http(world, "POST", "/v1/auth/login", {"username": "carol", "password": PASSWORD}, headers=jar)
        assert reply.status == 200, reply
    assert audit_path.read_text().count('"auth.failure"') == failures_before
    assert world.server.counters["auth_failures_credentials"] == counted_before
    # A live cookie is still revoked, and that is audited as the session's end.
    live = _login(world)
    live_jar = {"Cookie": f"{SESSION}={live[SESSION][0]}; {CSRF}={live[CSRF][0]}", "X-CSRF-Token": live[CSRF][0]}
    assert (
        http(world, "POST", "/v1/auth/login", {"username": "carol", "password": PASSWORD}, headers=live_jar).status
        == 200
    )
    assert http(world, "POST", "/v1/auth/whoami", {}, headers=live_jar).status == 401
    assert audit_path.read_text().count('"auth.failure"') == failures_before + 1  # that whoami, not the login
