"""The console's session and CSRF cookies: their names, setting and clearing them, the CSRF check.

Theory of operation. A browser lets any host of the same *site* -- a sibling
subdomain, the same host on another port, a plaintext page of the same name
-- set a cookie that the gateway then receives: cookies are scoped by name,
domain and path, not by origin, and a request carries no word of who set
them. With plain names, such a page could plant its own
``bastion_session``/``bastion_csrf`` pair (a session the attacker logged in,
and a CSRF value it knows) and the console would then run as the attacker:
what the victim types -- a mail, a file -- lands in the attacker's account.

The ``__Host-`` name prefix closes most of that: a browser stores a cookie
whose name starts with ``__Host-`` only if it was set by a secure origin
with ``Secure``, ``Path=/`` and no ``Domain`` -- so by this very host name,
over HTTPS -- and a sibling subdomain or a plaintext page cannot plant one
(RFC 6265bis, "Cookie Name Prefixes"). So whenever the cookies are
``Secure`` the gateway names them ``__Host-bastion_session`` and
``__Host-bastion_csrf``, and it reads only those names: a plain
``bastion_session`` is then ignored, whoever set it. What the prefix cannot
stop: cookies do not separate ports, so another HTTPS service on the same
host name (another port) can still set ``__Host-`` cookies the gateway
receives -- and browsers that treat ``http://localhost`` and
``http://127.0.0.1`` as secure (Chromium) let any local port do so. Do not
serve the console under a host name shared with services you do not trust.

The cookies are ``Secure`` when the request came over TLS (the gateway's own
HTTPS port) or ``gateway.cookie_secure`` is set (the default: a plaintext
gateway behind a TLS-terminating proxy, whose pages the browser sees over
HTTPS). Only with ``cookie_secure = false`` over plaintext -- local
development at, say, ``http://devbox:7401``, where a browser refuses
``Secure`` cookies, ``__Host-`` ones with them -- are they plain
``bastion_session`` and ``bastion_csrf``, without ``Secure``: there nothing
protects them from a planted pair, which is one more reason that setting is
for development only.
"""

from __future__ import annotations

import hmac
from typing import NamedTuple

from starlette.requests import HTTPConnection
from starlette.responses import Response

from bastion.exceptions import PermissionDenied

__all__ = [
    "CSRF_COOKIE",
    "CSRF_HEADER",
    "HOST_PREFIX",
    "SESSION_COOKIE",
    "CookieNames",
    "check_csrf",
    "clear_session_cookies",
    "cookie_names",
    "secure_cookies",
    "session_token",
    "set_session_cookies",
]

#: The cookies' base names; over a secure connection they carry the ``HOST_PREFIX``.
SESSION_COOKIE = "bastion_session"
CSRF_COOKIE = "bastion_csrf"
CSRF_HEADER = "x-csrf-token"
HOST_PREFIX = "__Host-"
_TLS_SCHEMES = frozenset({"https", "wss"})


class CookieNames(NamedTuple):
    session: str
    csrf: str
    secure: bool


_SECURE = CookieNames(HOST_PREFIX + SESSION_COOKIE, HOST_PREFIX + CSRF_COOKIE, True)
_PLAIN = CookieNames(SESSION_COOKIE, CSRF_COOKIE, False)


def cookie_names(secure: bool) -> CookieNames:
    """The cookies' names when they are (or are not) ``Secure``."""
    return _SECURE if secure else _PLAIN


def secure_cookies(conn: HTTPConnection, cookie_secure: bool) -> CookieNames:
    """The names (and ``Secure``) of the cookies for this request: ``__Host-`` ones over TLS or with
    ``cookie_secure``; plain ones only over plaintext with ``cookie_secure = false``."""
    return cookie_names(cookie_secure or conn.scope.get("scheme", "http") in _TLS_SCHEMES)


def session_token(conn: HTTPConnection, names: CookieNames) -> str | None:
    """The session cookie's token, None without one (a cookie of the other name is not looked at)."""
    return conn.cookies.get(names.session) or None


def check_csrf(conn: HTTPConnection, names: CookieNames) -> None:
    """PermissionDenied unless the CSRF cookie is present and echoed in the ``X-CSRF-Token`` header."""
    cookie = conn.cookies.get(names.csrf, "")
    header = conn.headers.get(CSRF_HEADER, "")
    if not cookie or not header or not hmac.compare_digest(cookie.encode(), header.encode()):
        raise PermissionDenied(f"cookie-authenticated requests need the {names.csrf} cookie echoed in {CSRF_HEADER}")


def set_session_cookies(response: Response, names: CookieNames, token: str, csrf: str, max_age: int) -> None:
    """Set the session (HttpOnly) and CSRF (readable) cookies: SameSite=Strict, Path=/, no Domain."""
    secure = names.secure
    response.set_cookie(
        names.session, token, max_age=max_age, path="/", secure=secure, httponly=True, samesite="strict"
    )
    response.set_cookie(names.csrf, csrf, max_age=max_age, path="/", secure=secure, httponly=False, samesite="strict")


def clear_session_cookies(response: Response, names: CookieNames) -> None:
    """Expire both cookies (with the attributes they were set with, as a ``__Host-`` cookie requires)."""
    secure = names.secure
    response.delete_cookie(names.session, path="/", secure=secure, httponly=True, samesite="strict")
    response.delete_cookie(names.csrf, path="/", secure=secure, httponly=False, samesite="strict")
