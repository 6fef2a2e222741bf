"""The gateway's browser-facing surface: what a page on another site, or the console's own HTML, can be made to do.

Real gateway over real TCP (plaintext, Host 127.0.0.1), urllib as the browser.
"""

from __future__ import annotations

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
        "Cookie": f"bastion_session={cookies['bastion_session']}; bastion_csrf={cookies['bastion_csrf']}",
        "X-CSRF-Token": cookies["bastion_csrf"],
    }
    refused = http(world, "POST", "/logout", headers={**jar, **EVIL})
    assert refused.status == 403 and not refused.cookies
    assert http(world, "POST", "/v1/auth/whoami", {}, headers=jar).json()["name"] == "carol"  # not revoked
    assert http(world, "POST", "/logout", headers=jar).json() == {"logged_out": True}
