"""The gateway's browser-facing surface: what a page on another site, or the console's own HTML, can be made to do.

Real gateway over real TCP (plaintext, Host 127.0.0.1), urllib as the browser.
"""

from __future__ import annotations

import urllib.parse
from html.parser import HTMLParser
from http.client import HTTPConnection

import pytest

from bastion.config import GatewayConfig
from bastion.exceptions import UsageError
from tests.gateway.conftest import PASSWORD, World, http

EVIL = {"Origin": "http://evil.example"}


def _cookie_values(set_cookies: list[str]) -> dict[str, str]:
    return {c.split(";", 1)[0].split("=", 1)[0]: c.split(";", 1)[0].split("=", 1)[1] for c in set_cookies}


def test_logout_from_a_foreign_origin_is_refused(world: World) -> None:
    """A page on another site posting a form to /logout: the browser sends no SameSite=Strict cookie, but the
    answer's Set-Cookie headers would still clear the console's session (logout CSRF). Like every other POST,
    a foreign Origin is refused 403 and nothing is cleared."""
    bare = http(world, "POST", "/logout", headers=EVIL)
    assert bare.status == 403 and bare.json()["error"]["status"] == "PERMISSION_DENIED"
    assert not bare.cookies
    login = http(world, "POST", "/v1/auth/login", {"username": "carol", "password": PASSWORD})
    cookies = _cookie_values(login.cookies)
    jar = {
        "Cookie": "; ".join(f"{name}={value}" for name, value in cookies.items()),
        "X-CSRF-Token": cookies["__Host-bastion_csrf"],
    }
    refused = http(world, "POST", "/logout", headers={**jar, **EVIL})
    assert refused.status == 403 and not refused.cookies
    assert http(world, "POST", "/v1/auth/whoami", {}, headers=jar).json()["name"] == "carol"  # not revoked
    assert http(world, "POST", "/logout", headers=jar).json() == {"logged_out": True}


@pytest.mark.parametrize("media", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_login_takes_only_json(world: World, media: str) -> None:
    """A page on another site can post a form (text/plain can carry a JSON body) to /v1/auth/login without
    any preflight; where the browser sends no Origin (older ones, extensions stripping it) the Origin check
    cannot stop it, and the answer's cookies would log the victim's console into the attacker's account
    (login CSRF). Login takes application/json only, which a form cannot send."""
    # (A text/plain form sends name=value: the attacker's own password holds the "=", the JSON the rest.)
    body = b'{"username": "carol", "password": "' + PASSWORD.encode() + b'"}'
    login = http(world, "POST", "/v1/auth/login", raw=body, headers={"Content-Type": media})
    assert login.status == 400 and login.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert not login.cookies
    json_login = http(
        world, "POST", "/v1/auth/login", raw=body, headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert json_login.status == 200 and json_login.cookies


class _Forms(HTMLParser):
    """Each <form> of a page: its attributes and the names of the fields it would submit."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[dict[str, str | None], list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "form":
            self.forms.append((found, []))
        elif tag in ("input", "select", "textarea") and self.forms and found.get("name"):
            self.forms[-1][1].append(str(found["name"]))


def test_the_console_never_submits_fields_in_a_url(world: World) -> None:
    """A console form whose submit the script has not (yet) taken over -- app.js still loading, or failed --
    is submitted by the browser itself: with no method, as GET to the page's URL, so the login form's
    user name and password would land in the address bar, the history and any proxy's log. Forms with
    named fields post, and the CSP forbids native form submissions altogether (form-action 'none')."""
    page = http(world, "GET", "/")
    assert page.status == 200
    parser = _Forms()
    parser.feed(page.body.decode())
    named = [(attrs, names) for attrs, names in parser.forms if names]
    assert any("password" in names for _, names in named)  # the login form is among them
    for attrs, names in named:
        assert (attrs.get("method") or "get").lower() == "post", (attrs, names)
    policy = [part.strip() for part in page.headers["content-security-policy"].split(";")]
    assert "form-action 'none'" in policy
    assert "base-uri 'none'" in policy


@pytest.mark.parametrize("setting", ["cors_origins", "ws_origins"])
@pytest.mark.parametrize(
    "origin",
    [
        "null",  # what a sandboxed iframe on any site sends: listing it lets every site in
        "*",  # not a wildcard here: CORS would answer any origin's GETs (/metrics) while every POST is refused
        "https://app.example/",  # a browser's Origin has no path: never matches
        "https://App.example",  # nor capitals
        "app.example",
        "ftp://app.example",
        "https://app.example:port",
    ],
)
def test_listed_origins_must_be_ones_a_browser_sends(setting: str, origin: str) -> None:
    with pytest.raises(UsageError, match=rf"gateway\.{setting}"):
        GatewayConfig(**{setting: [origin]})


@pytest.mark.parametrize("origin", ["https://app.example", "http://127.0.0.1:8080", "http://[::1]:3000"])
def test_well_formed_origins_are_accepted(origin: str) -> None:
    assert GatewayConfig(cors_origins=[origin], ws_origins=[origin]).cors_origins == [origin]


@pytest.mark.parametrize(("method", "path"), [("POST", "/rpc/"), ("GET", "/livez/"), ("GET", "/openapi.json/")])
def test_a_trailing_slash_is_not_redirected(world: World, method: str, path: str) -> None:
    """Starlette answered ``/rpc/`` with a redirect built from the Host header, which over TLS is any host the
    request named (plaintext checks it first): no path is redirected at all."""
    parsed = urllib.parse.urlsplit(world.url)
    conn = HTTPConnection(parsed.hostname or "", parsed.port, timeout=10)
    try:
        conn.request(method, path, body=b"{}" if method == "POST" else None, headers={"Host": parsed.netloc})
        answer = conn.getresponse()
        answer.read()
    finally:
        conn.close()
    assert answer.getheader("location") is None
    assert answer.status == 404, answer.status
