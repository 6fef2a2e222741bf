"""Authentication in the handshake: a Hello's credentials -> a Principal.

The server asks its ``Authenticator`` once per connection, before any call
is dispatched, and then every few seconds asks it to ``revalidate`` the
principal so that expiry and revocation reach long-lived connections. A
connection without credentials is ``ANONYMOUS`` and may call only public
methods; bad credentials refuse the handshake with UNAUTHENTICATED. Over
mutual TLS the verified certificate's subject is the principal: with the
store authenticator it must name a user (``tls.client_subjects = "users"``,
the default), else the handshake is refused and audited (``auth.failure``,
mechanism ``mtls``, with subject and serial); ``"any"`` admits subjects no
user has (services), with no roles; a certificate admitted is audited
(``auth.success``, mechanism ``mtls``, subject and serial) as a token is,
once per handshake. Either way the subject must be a
possible user name (``USER_NAME``: no empty CN, no certificate without one,
whose identity is then the whole subject, no control characters, at most 64
characters), else it is refused and audited as well. A certificate issued (notBefore) before
its user was created is refused, whatever ``client_subjects`` says: it was
issued to an earlier holder of the name, or before the admin made the user.
A user disabled, or deleted and created again, meanwhile ends the connection
at revalidation, and so does one deleted under ``"users"`` (under ``"any"``
the connection goes on with no roles). Tokens are looked up by their
SHA-256 digest; the token itself is never stored or logged. A failed token is
audited (``auth.failure``) at most ``AUTH_FAILURES_AUDITED`` times per 10 s
on the server: the login throttle bounds each source, not sources without
number, and the rest are counted (``bastion_auth_failures_total``); the next
record says how many it left out (``suppressed_before``).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import msgspec

from bastion.exceptions import Unauthenticated, UsageError
from bastion.observability.loglimit import LogBudget
from bastion.security.audit import AuditLog
from bastion.security.credentials import CredentialStore, User
from bastion.security.principal import ANONYMOUS, USER_NAME, Principal
from bastion.security.throttle import LoginThrottle

__all__ = [
    "AUTH_FAILURES_AUDITED",
    "AllowAnonymous",
    "Authenticator",
    "PeerInfo",
    "SessionEnder",
    "StaticTokens",
    "StoreAuthenticator",
    "hash_token",
    "new_token",
    "new_token_id",
]

TOKEN_PREFIX = "bst_"
#: Token failures written to the audit log per 10 s, server-wide (the rest counted).
AUTH_FAILURES_AUDITED = 100
_TOKEN_SHAPE = re.compile(r"^bst_[A-Za-z0-9_-]{43}\Z")
#: What a refused client certificate's holder is told, by the reason audited.
_CERTIFICATE_REFUSALS = {
    "subject is not a user name": (
        "client certificate subject {subject!r} is not a user name (its CN must be 1-64 ASCII letters, digits "
        "and . _ @ -, starting with a letter or digit)"
    ),
    "no such user": (
        "client certificate subject {subject!r} names no user: an admin must create the user "
        '(or set tls.client_subjects = "any" for certificates of services)'
    ),
    "user disabled": "certificate's user is disabled",
    "certificate predates the user": (
        "client certificate was issued before user {subject!r} was created (a name given again?): "
        "issue the user a new certificate"
    ),
}


def new_token() -> str:
    """A fresh token: 256 random bits, URL-safe, with a recognisable prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_token_id() -> str:
    """A public handle for a token (for listing and revoking); not a secret."""
    return "tok_" + secrets.token_hex(8)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class PeerInfo(msgspec.Struct, frozen=True):
    """Where a connection comes from."""

    address: str  # "host:port"
    host: str  # the source address alone, the key for per-source limits
    tls_identity: str | None = None  # a verified client certificate's subject
    tls_expires_at: float | None = None  # and its expiry (Unix time): the connection's end
    tls_serial: int | None = None  # and its serial (for the audit log)
    tls_issued_at: float | None = None  # and its notBefore (Unix time): its user must be no newer


class Authenticator(Protocol):
    async def authenticate(self, token: str | None, peer: PeerInfo) -> Principal:
        """The principal for these credentials; raise Unauthenticated to refuse."""
        ...

    async def revalidate(self, principal: Principal) -> Principal | None:
        """The principal as it stands now (roles may have changed), or None once
        its credential has expired or been revoked."""
        ...


@runtime_checkable
class SessionEnder(Protocol):
    """An authenticator that can end a session given its token without a handshake (the gateway's login
    revoking the session cookie it replaces): a stale or bogus token is no failed credential."""

    async def end_session(self, token: str, peer: PeerInfo) -> bool:
        """Revoke ``token`` if it is a live session token; True if it was revoked now."""
        ...


class AllowAnonymous:
    """Everyone is anonymous; presenting a token is an error (none exist)."""

    async def authenticate(self, token: str | None, peer: PeerInfo) -> Principal:
        if token is not None:
            raise Unauthenticated("invalid token")
        return ANONYMOUS

    async def revalidate(self, principal: Principal) -> Principal | None:
        return principal


class StaticTokens:
    """A fixed set of tokens, held only as digests (for tests and embedding)."""

    def __init__(self, tokens: Mapping[str, Principal]) -> None:
        self._by_digest = {hash_token(token): principal for token, principal in tokens.items()}

    async def authenticate(self, token: str | None, peer: PeerInfo) -> Principal:
        if token is None:
            return ANONYMOUS
        digest = hash_token(token)
        found: Principal | None = None
        # Compare against every digest so timing does not depend on a match.
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                found = principal
        if found is None:
            raise Unauthenticated("invalid token")
        return found

    async def revalidate(self, principal: Principal) -> Principal | None:
        return principal


class StoreAuthenticator:
    """Tokens and users from the credential store, failures throttled and audited.

    ``client_subjects`` (``tls.client_subjects``): "users" -- a client certificate must name a user in the
    store -- or "any": a subject no user has speaks too, with no roles (certificates of services).
    """

    def __init__(
        self,
        store: CredentialStore,
        throttle: LoginThrottle,
        audit: AuditLog,
        *,
        cache_seconds: float = 1.0,
        clock: Callable[[], float] = time.time,
        client_subjects: str = "users",
    ) -> None:
        if client_subjects not in ("users", "any"):
            raise UsageError(f'client_subjects must be "users" or "any", got {client_subjects!r}')
        self._any_subject = client_subjects == "any"
        self._store = store
        self._throttle = throttle
        self._audit = audit
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._checked: dict[str, tuple[float, Principal | None]] = {}  # token id -> (when, result)
        self._failures_audited = LogBudget()

    async def authenticate(self, token: str | None, peer: PeerInfo) -> Principal:
        if token is None:
            if peer.tls_identity is not None:
                return await self._from_certificate(peer)
            return ANONYMOUS
        await self._throttle.check(None, peer.host)
        reason, principal = await self._from_token(token)
        if principal is None:
            await self._throttle.failed(None, peer.host)
            if (left_out := self._failures_audited.take("auth.failure", AUTH_FAILURES_AUDITED)) is not None:
                self._audit(
                    "auth.failure",
                    peer=peer.address,
                    mechanism="token",
                    reason=reason,
                    suppressed_before=left_out or None,
                )
            raise Unauthenticated("invalid, expired or revoked token")
        self._audit(
            "auth.success",
            peer=peer.address,
            principal=principal.name,
            mechanism=principal.mechanism,
            token_id=principal.token_id,
        )
        return principal

    async def end_session(self, token: str, peer: PeerInfo) -> bool:
        """Revoke ``token`` if it is a live session token, looked up by its digest: no handshake, so a stale,
        revoked or bogus one (the usual cookie a login replaces) charges no throttle and writes no
        ``auth.failure``; one revoked now is audited as ``auth.logout``. API tokens are left alone."""
        if not _TOKEN_SHAPE.match(token):
            return False
        record = await self._store.token_by_digest(hash_token(token))
        now = self._clock()
        if record is None or record.kind != "session" or not record.valid_at(now):
            return False
        if not await self._store.revoke_token(record.id, now):
            return False  # revoked meanwhile
        self._checked.pop(record.id, None)  # revalidation sees it at once
        self._audit(
            "auth.logout", principal=record.user, peer=peer.address, token_id=record.id, reason="replaced by a login"
        )
        return True

    async def _from_token(self, token: str) -> tuple[str, Principal | None]:
        if not _TOKEN_SHAPE.match(token):
            return "malformed token", None
        record = await self._store.token_by_digest(hash_token(token))
        now = self._clock()
        if record is None:
            return "unknown token", None
        if record.revoked_at is not None:
            return "revoked token", None
        if record.expires_at is not None and now >= record.expires_at:
            return "expired token", None
        user = await self._store.get_user(record.user)
        if user is None or user.disabled:
            return "user disabled or deleted", None
        principal = Principal(
            user.name, user.roles, mechanism=record.kind, token_id=record.id, expires_at=record.expires_at
        )
        return "", principal

    async def _from_certificate(self, peer: PeerInfo) -> Principal:
        subject = peer.tls_identity
        assert subject is not None
        user: User | None = None
        reason: str | None = "subject is not a user name"  # an empty CN, none (the whole subject), "\n"...
        if USER_NAME.fullmatch(subject) is not None:
            user = await self._store.get_user(subject)
            reason = self._certificate_refused(user, peer.tls_issued_at)
        serial = None if peer.tls_serial is None else f"0x{peer.tls_serial:x}"
        if reason is not None:
            # No throttle: a CA vouched for the certificate, there is nothing to guess; the audit is budgeted.
            if (left_out := self._failures_audited.take("auth.failure", AUTH_FAILURES_AUDITED)) is not None:
                self._audit(
                    "auth.failure",
                    peer=peer.address,
                    mechanism="mtls",
                    reason=reason,
                    subject=subject[:256],
                    serial=serial,
                    suppressed_before=left_out or None,
                )
            raise Unauthenticated(_CERTIFICATE_REFUSALS[reason].format(subject=subject[:64]))
        # One record per handshake, as for a token (the subject is a user name now: short, plain).
        self._audit(
            "auth.success", peer=peer.address, principal=subject, mechanism="mtls", subject=subject, serial=serial
        )
        roles = user.roles if user is not None else frozenset()
        return Principal(subject, roles, mechanism="mtls", expires_at=peer.tls_expires_at, issued_at=peer.tls_issued_at)

    def _certificate_refused(self, user: User | None, issued_at: float | None) -> str | None:
        """Why a certificate issued at ``issued_at`` (notBefore) whose subject's user record is ``user``
        may not speak (a key of ``_CERTIFICATE_REFUSALS``), or None if it may.

        X.509 times are whole seconds: a certificate issued in the second its user was created passes. A
        user created with no time recorded (``created_at`` 0: written straight to the store) accepts any.
        """
        if user is None:
            return None if self._any_subject else "no such user"
        if user.disabled:
            return "user disabled"
        if issued_at is not None and issued_at < math.floor(user.created_at):
            return "certificate predates the user"
        return None

    async def revalidate(self, principal: Principal) -> Principal | None:
        token_id = principal.token_id
        now = self._clock()
        if principal.expires_at is not None and now >= principal.expires_at:
            return None
        if token_id is None:
            if principal.mechanism != "mtls":
                return principal
            # A certificate's user: disabled, deleted (and created again) or roles changed since.
            key = f"mtls:{principal.issued_at}:{principal.name}"
        else:
            key = token_id
        cached = self._checked.get(key)
        if cached is not None and now - cached[0] < self._cache_seconds:
            return cached[1]
        current: Principal | None = None
        if token_id is None:
            user = await self._store.get_user(principal.name)
            if self._certificate_refused(user, principal.issued_at) is None:
                current = _with_roles(principal, user.roles if user is not None else frozenset())
        else:
            record = await self._store.token_by_id(token_id)
            if record is not None and record.valid_at(now):
                user = await self._store.get_user(principal.name)
                if user is not None and not user.disabled:
                    current = _with_roles(principal, user.roles)
        if len(self._checked) > 10_000:
            self._checked.clear()
        self._checked[key] = (now, current)
        return current


def _with_roles(principal: Principal, roles: frozenset[str]) -> Principal:
    return principal if roles == principal.roles else msgspec.structs.replace(principal, roles=roles)
