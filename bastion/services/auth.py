"""The built-in ``auth`` service: login, identity, users, roles and tokens.

Written with the public service API; it reaches storage only through the
``CredentialStore`` interface. ``auth.login`` and ``auth.whoami`` are public;
changing one's own password needs any authenticated identity; managing
users, roles and tokens needs the ``admin`` role, which is checked before a
handler runs, so a denial never reveals whether the target exists.

Secrets: passwords arrive only as call arguments and are hashed with
argon2id (typed ``OpaqueText``: any character, NUL too, as only the hash is
stored; every other text argument holding NUL is refused by the dispatcher,
``refuse_nul``); tokens are returned once, at creation, and stored as digests.
Neither ever reaches the audit log, nor does a failed login's username that
names no user (it may be a password typed into the wrong field): that is
logged as a short keyed hash, ``<unknown 0123456789abcdef>``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec

from bastion.config import AuthConfig
from bastion.exceptions import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from bastion.security.audit import AuditLog
from bastion.security.authn import hash_token, new_token, new_token_id
from bastion.security.credentials import CredentialStore, Token, User
from bastion.security.passwords import PasswordHasher
from bastion.security.principal import ADMIN_ROLE, USER_NAME
from bastion.security.throttle import LoginThrottle
from bastion.service import Context, OpaqueText, Service

__all__ = ["DeletedUser", "LoginResult", "Reassign", "TokenInfo", "Unlocked", "UserInfo", "create_service"]

# Hands every item user ``old`` owns in one storage domain to user ``new`` (None: deletes them);
# returns how many items changed. bastion serve passes the store's kv/files/jobs ones.
Reassign = Callable[[str, str | None], Awaitable[int]]

_ROLE = re.compile(r"^[a-z][a-z0-9_-]{0,31}\Z")
_ADMIN = [ADMIN_ROLE]
log = logging.getLogger("bastion.auth")
#: Ended (revoked or expired) session tokens of a user deleted at each of their logins.
SESSION_PURGE_BATCH = 100


class LoginResult(msgspec.Struct, frozen=True):
    token: str
    user: str
    expires_at: float


class NewToken(msgspec.Struct, frozen=True):
    token: str
    id: str
    user: str
    expires_at: float | None


class UserInfo(msgspec.Struct, frozen=True):
    name: str
    roles: list[str]
    created_at: float
    disabled: bool
    has_password: bool


class TokenInfo(msgspec.Struct, frozen=True):
    id: str
    user: str
    kind: str
    label: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None


class DeletedUser(msgspec.Struct, frozen=True):
    name: str
    tokens_revoked: int
    transferred_to: str | None  # None: their data was deleted
    items: dict[str, int]  # per domain (kv, files, jobs): items handed over or deleted


class Unlocked(msgspec.Struct, frozen=True):
    name: str
    lifted: int  # (username, source) pairs that were locked


class Identity(msgspec.Struct, frozen=True):
    name: str
    roles: list[str]
    authenticated: bool
    mechanism: str
    token_id: str | None
    expires_at: float | None
    limits: dict[str, float]
    rate_limits: dict[str, Any]


def _source(ctx: Context) -> str:
    return ctx.peer.rsplit(":", 1)[0].strip("[]")


def _unknown_name(key: bytes, username: str) -> str:
    """How a failed login's username that names no user is logged: it may be a password typed into the
    username field, so a short HMAC of it under a key that lives in this process alone, marked unknown --
    the same name gives the same mark (a spray or a repeated slip shows) and nothing leads back to it."""
    digest = hmac.new(key, username.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
    return f"<unknown {digest[:16]}>"


def _check_username(name: str) -> None:
    if not USER_NAME.fullmatch(name):
        raise InvalidArgument("a username is 1-64 letters, digits or . _ @ - and starts with a letter or digit")


def _check_roles(roles: list[str]) -> frozenset[str]:
    for role in roles:
        if not _ROLE.match(role):
            raise InvalidArgument(f"role {role!r}: roles are lowercase letters, digits, _ or -, at most 32")
    return frozenset(roles)


def _last_admin(name: str) -> str:
    return f"{name!r} is the last enabled admin: give another user the {ADMIN_ROLE!r} role first"


def _user_info(user: User) -> UserInfo:
    return UserInfo(user.name, sorted(user.roles), user.created_at, user.disabled, user.password_hash is not None)


def _token_info(token: Token) -> TokenInfo:
    return TokenInfo(
        token.id, token.user, token.kind, token.label, token.created_at, token.expires_at, token.revoked_at
    )


def create_service(
    store: CredentialStore,
    *,
    hasher: PasswordHasher,
    throttle: LoginThrottle,
    audit: AuditLog,
    config: AuthConfig | None = None,
    owned_data: Mapping[str, Reassign] | None = None,
) -> Service:
    """Build the ``auth`` service over ``store``.

    ``owned_data`` names, per storage domain, how to hand a deleted user's
    data over or delete it (``auth.delete_user``).
    """
    domains = dict(owned_data or {})
    cfg = config or AuthConfig()
    name_key = secrets.token_bytes(32)  # keys the hashes unknown usernames are logged as (this process only)
    service = Service("auth", doc="Login, identity, users, roles and tokens.", refuse_nul=True)

    async def _issue(user: str, kind: str, label: str, ttl: float | None) -> NewToken:
        token = new_token()
        now = time.time()
        expires = now + ttl if ttl else None
        record = Token(new_token_id(), hash_token(token), user, kind, label, now, expires)
        await store.add_token(record)
        return NewToken(token, record.id, user, expires)

    async def _end_sessions(user: str, keep: str | None) -> int:
        """Revoke ``user``'s live session tokens (logins with the old password) but ``keep``; how many."""
        now = time.time()
        ended = 0
        for token in await store.list_tokens(user):
            if token.kind == "session" and token.id != keep and token.valid_at(now):
                ended += await store.revoke_token(token.id, now)
        return ended

    @service.method(public=True, priority=5)
    async def login(ctx: Context, username: str, password: OpaqueText) -> LoginResult:
        """Exchange a username and password for a session token."""
        source = _source(ctx)
        # A name no user can have is an unknown user, throttled per source only: it keys no
        # lockout, so anonymous guesses cannot grow the store; logged as any unknown name is.
        name: str | None = username if USER_NAME.fullmatch(username) else None
        async with throttle.attempt(name, source):  # pending, so guesses sent at once count against the limits
            user = await store.get_user(username) if name is not None else None
            stored = user.password_hash if user is not None and not user.disabled else None
            verified, outdated = await hasher.verify_login(stored, password)
            if not verified:
                locked = await throttle.failed(name, source)
                # An unknown name may be a password typed into the wrong field: never logged as typed.
                shown = username if user is not None else _unknown_name(name_key, username)
                audit("auth.login_failure", username=shown, peer=ctx.peer, request_id=ctx.request_id)
                if locked:
                    audit("auth.lockout", username=shown, peer=ctx.peer, seconds=throttle.lockout)
                raise Unauthenticated("invalid username or password")
            await throttle.succeeded(username, source)
        if outdated and stored is not None:  # older parameters, or no normalisation: bring it up to date
            await store.set_password_hash(username, await hasher.hash(password), replacing=stored)
        issued = await _issue(username, "session", "login", cfg.session_ttl)
        # Each login stores a token: its ended ones go, a bounded batch each time, so they cannot pile up.
        await store.purge_sessions(username, time.time(), SESSION_PURGE_BATCH)
        audit("auth.login", principal=username, peer=ctx.peer, token_id=issued.id, request_id=ctx.request_id)
        assert issued.expires_at is not None
        return LoginResult(issued.token, username, issued.expires_at)

    @service.method
    async def logout(ctx: Context) -> bool:
        """Revoke the token this connection authenticated with."""
        token_id = ctx.principal.token_id
        if token_id is None:
            return False
        done = await store.revoke_token(token_id, time.time())
        audit("auth.logout", principal=ctx.principal.name, peer=ctx.peer, token_id=token_id)
        return done

    @service.method(public=True, idempotent=True)
    async def whoami(ctx: Context) -> Identity:
        """The caller's identity, roles, credential and the limits its connection runs under."""
        p = ctx.principal
        limits = dict(ctx.server.limits())
        usage = dict(await ctx.server.rate_usage(p, ctx.peer))
        return Identity(p.name, sorted(p.roles), p.authenticated, p.mechanism, p.token_id, p.expires_at, limits, usage)

    @service.method
    async def change_password(ctx: Context, old_password: OpaqueText, new_password: OpaqueText) -> bool:
        """Change the caller's own password (the old one is required)."""
        source = _source(ctx)
        name = ctx.principal.name
        async with throttle.attempt(name, source):
            user = await store.get_user(name)
            if user is None or not await hasher.verify(user.password_hash, old_password):
                await throttle.failed(name, source)
                audit("auth.password_change_failure", principal=name, peer=ctx.peer)
                raise Unauthenticated("the old password is wrong")
        problem = PasswordHasher.check_policy(new_password)
        if problem:
            raise InvalidArgument(problem)
        # The hash alone: the record read before hashing may be stale by now (a disable, a demotion).
        await store.set_password_hash(name, await hasher.hash(new_password))
        ended = await _end_sessions(name, keep=ctx.principal.token_id)
        audit("auth.password_changed", principal=name, peer=ctx.peer, revoked_sessions=ended)
        return True

    @service.method(roles=_ADMIN)
    async def create_user(
        ctx: Context, name: str, password: OpaqueText | None = None, roles: list[str] | None = None
    ) -> UserInfo:
        """Create a user (admin)."""
        _check_username(name)
        role_set = _check_roles(roles or [])
        if password is not None and (problem := PasswordHasher.check_policy(password)):
            raise InvalidArgument(problem)
        folded = name.casefold()  # names are ASCII (USER_NAME): case is the only look-alike left
        if twin := next((u.name for u in await store.list_users() if u.name.casefold() == folded), None):
            raise AlreadyExists(
                f"user {twin!r} exists" + ("" if twin == name else ": names differing only in case are one")
            )
        digest = await hasher.hash(password) if password is not None else None
        user = User(name, role_set, digest, time.time())
        if not await store.create_user(user):
            raise AlreadyExists(f"user {name!r} exists")
        audit("admin.create_user", principal=ctx.principal.name, peer=ctx.peer, target=name, roles=sorted(role_set))
        return _user_info(user)

    def _enabled_admin(user: User | None) -> bool:
        return user is not None and ADMIN_ROLE in user.roles and not user.disabled

    async def _keep_an_admin(before: User, after: User | None) -> None:
        """Refuse a change after which no enabled user would hold the admin role (a locked-out server)."""
        if not _enabled_admin(before) or _enabled_admin(after):
            return
        name = before.name
        others = [u for u in await store.list_users() if u.name != name and _enabled_admin(u)]
        if not others:
            raise FailedPrecondition(_last_admin(name))

    async def _update_keeping_an_admin(before: User, after: User) -> None:
        """Write ``after`` unless no enabled admin would be left: checked before the write and again after
        it, since two admins removed at once (two calls, workers or replicas) each see the other still
        there beforehand. Whoever finds none left afterwards puts the roles and flag back and is refused
        (both may be: neither removal then happens)."""
        await _keep_an_admin(before, after)
        # Roles and flag alone: the password hash read with ``before`` may have been reset meanwhile.
        if not await store.set_access(after.name, after.roles, after.disabled):
            raise NotFound(f"no user {after.name!r}")
        if not _enabled_admin(before) or _enabled_admin(after):
            return
        if any(_enabled_admin(u) for u in await store.list_users()):
            return
        await store.set_access(before.name, before.roles, before.disabled)
        raise FailedPrecondition(_last_admin(before.name))

    async def _get(name: str) -> User:
        user = await store.get_user(name)
        if user is None:
            raise NotFound(f"no user {name!r}")
        return user

    @service.method(roles=_ADMIN)
    async def delete_user(ctx: Context, name: str, transfer_to: str | None = None) -> DeletedUser:
        """Delete a user (admin): revoke their tokens, then hand their data (keys,
        files, jobs) to ``transfer_to``, or delete it when none is given.

        The tokens go first, so the user can no longer act while their data
        moves. Safe to repeat if interrupted: it picks up where it stopped.
        """
        target = await _get(name)
        await _keep_an_admin(target, None)
        if transfer_to is not None:
            if transfer_to == name:
                raise InvalidArgument("transfer_to must be another user")
            heir = await store.get_user(transfer_to)
            if heir is None:
                raise NotFound(f"no user {transfer_to!r} to transfer the data to")
        if _enabled_admin(target):  # disabled first, under the guard, so no concurrent removal leaves no admin
            await _update_keeping_an_admin(target, msgspec.structs.replace(target, disabled=True))
        revoked = await store.revoke_user_tokens(name, time.time())
        items = {domain: await reassign(name, transfer_to) for domain, reassign in domains.items()}
        await store.delete_user(name)  # (its lockout and known-source rows with it)
        # Once more, now the row is gone: a write that passed its check of the user just before (an admin's
        # put to ~name, the user's own before revalidation cut them off) may have landed after the first pass.
        for domain, reassign in domains.items():
            items[domain] += await reassign(name, transfer_to)
        # A new user given the name inherits no lockout or failure count: those in Redis and in memory go too.
        # Should that fail (or the call be cancelled), its keys stay until they end (auth.lockout): the user
        # is deleted and audited all the same.
        lifted: int | None = None
        try:
            lifted = await _lift(name)
        finally:
            audit(
                "admin.delete_user", principal=ctx.principal.name, peer=ctx.peer, target=name, revoked=revoked,
                transferred_to=transfer_to, items=items, unlocked=lifted,
            )  # fmt: skip
        return DeletedUser(name, revoked, transfer_to, items)

    async def _lift(name: str) -> int | None:
        """``throttle.unlock`` after a change already made (a user deleted, a password set): the pairs that
        were locked, or None if it failed (Redis, or the store: logged), which must not undo the change."""
        try:
            return await throttle.unlock(name)
        except Unavailable:
            return None
        except Exception:
            log.exception("auth: lifting the login lockouts of %r failed", name)
            return None

    @service.method(roles=_ADMIN, idempotent=True)
    async def list_users(ctx: Context) -> list[UserInfo]:
        """Every user (admin)."""
        return [_user_info(u) for u in await store.list_users()]

    @service.method(roles=_ADMIN, idempotent=True)
    async def set_roles(ctx: Context, name: str, roles: list[str]) -> UserInfo:
        """Replace a user's roles (admin); takes effect on their connections within seconds."""
        before = await _get(name)
        user = msgspec.structs.replace(before, roles=_check_roles(roles))
        await _update_keeping_an_admin(before, user)
        audit("admin.set_roles", principal=ctx.principal.name, peer=ctx.peer, target=name, roles=sorted(roles))
        return _user_info(user)

    @service.method(roles=_ADMIN)
    async def set_password(ctx: Context, name: str, password: OpaqueText) -> bool:
        """Set a user's password (admin)."""
        if problem := PasswordHasher.check_policy(password):
            raise InvalidArgument(problem)
        await _get(name)
        if not await store.set_password_hash(name, await hasher.hash(password)):  # the hash alone, as above
            raise NotFound(f"no user {name!r}")
        ended = await _end_sessions(name, keep=None)
        # The guesses that locked the user out were against the old password: their lockouts go too. Should
        # that fail (Redis, the store, a cancel), those left stay (they end as ever; auth.unlock_user lifts
        # them): the password is set and audited.
        lifted: int | None = None
        try:
            lifted = await _lift(name)
        finally:
            audit(
                "admin.set_password", principal=ctx.principal.name, peer=ctx.peer, target=name,
                revoked_sessions=ended, unlocked=lifted,
            )  # fmt: skip
        return True

    @service.method(roles=_ADMIN, idempotent=True)
    async def unlock_user(ctx: Context, name: str) -> Unlocked:
        """Lift a user's login lockouts from every source and forget their failed attempts (admin)."""
        await _get(name)
        try:
            lifted = await throttle.unlock(name, refill=False)  # (the same password: the allowance stays spent)
        except Unavailable:  # (Redis failed: the store's lockouts are lifted, Redis's are not)
            audit("admin.unlock_user", principal=ctx.principal.name, peer=ctx.peer, target=name, incomplete=True)
            raise
        audit("admin.unlock_user", principal=ctx.principal.name, peer=ctx.peer, target=name, lifted=lifted)
        return Unlocked(name, lifted)

    @service.method(roles=_ADMIN, idempotent=True)
    async def disable_user(ctx: Context, name: str, disabled: bool = True) -> UserInfo:
        """Disable (or re-enable) a user (admin); their connections close within seconds."""
        before = await _get(name)
        user = msgspec.structs.replace(before, disabled=disabled)
        await _update_keeping_an_admin(before, user)
        audit("admin.disable_user", principal=ctx.principal.name, peer=ctx.peer, target=name, disabled=disabled)
        return _user_info(user)

    @service.method(roles=_ADMIN)
    async def create_token(
        ctx: Context, user: str | None = None, label: str = "", ttl: float | None = None
    ) -> NewToken:
        """Create an API token for a user (admin; default: yourself). Shown once."""
        name = user or ctx.principal.name
        await _get(name)
        if ttl is not None and not (math.isfinite(ttl) and ttl > 0):  # NaN and inf would store no expiry at all
            raise InvalidArgument("ttl must be a positive, finite number of seconds")
        issued = await _issue(name, "api", label[:200], ttl if ttl is not None else (cfg.token_ttl or None))
        audit("admin.create_token", principal=ctx.principal.name, peer=ctx.peer, target=name, token_id=issued.id)
        return issued

    @service.method(roles=_ADMIN, idempotent=True)
    async def list_tokens(ctx: Context, user: str | None = None) -> list[TokenInfo]:
        """Tokens (admin), optionally one user's; never the tokens themselves."""
        return [_token_info(t) for t in await store.list_tokens(user)]

    @service.method(roles=_ADMIN, idempotent=True)
    async def revoke_token(ctx: Context, id: str) -> bool:
        """Revoke a token by id (admin); connections using it close within seconds."""
        done = await store.revoke_token(id, time.time())
        if not done and await store.token_by_id(id) is None:
            raise NotFound(f"no token {id!r}")
        audit("admin.revoke_token", principal=ctx.principal.name, peer=ctx.peer, token_id=id)
        return done

    return service
