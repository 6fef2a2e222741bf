"""Credential records and the small store interface security needs.

Security defines what it must persist -- users, tokens, lockouts -- and
``bastion.store`` implements it (SQLite embedded, PostgreSQL shared). Only
digests of tokens and argon2id hashes of passwords are ever stored.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

__all__ = ["THROTTLE_KEY_PREFIXES", "CredentialStore", "Token", "User", "lockout_key_range", "throttle_key_ranges"]

#: The login throttle's lockouts-table keys for a user are ``PREFIX + user + "|" + source`` (throttle.py).
THROTTLE_KEY_PREFIXES = ("known:", "login:")


class User(msgspec.Struct, frozen=True):
    name: str
    roles: frozenset[str] = frozenset()
    password_hash: str | None = None  # argon2id, or None: token-only user
    created_at: float = 0.0
    disabled: bool = False


class Token(msgspec.Struct, frozen=True):
    """An API or session token, known only by its SHA-256 digest."""

    id: str  # public handle for listing and revoking, not a secret
    digest: str
    user: str
    kind: str = "api"  # "api" or "session"
    label: str = ""
    created_at: float = 0.0
    expires_at: float | None = None
    revoked_at: float | None = None

    def valid_at(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


def throttle_key_ranges(user: str) -> list[tuple[str, str]]:
    """The key ranges [low, high) of ``user``'s rows in the lockouts table, in code-point order: every key
    starting ``known:USER|`` or ``login:USER|`` ("}" follows "|"), which a store deletes with the user."""
    return [(f"{prefix}{user}|", f"{prefix}{user}}}") for prefix in THROTTLE_KEY_PREFIXES]


def lockout_key_range(user: str) -> tuple[str, str]:
    """The key range [low, high) of ``user``'s lockouts (``login:USER|SOURCE``) alone, as above."""
    return f"login:{user}|", f"login:{user}}}"


class CredentialStore(Protocol):
    """What authentication needs from storage. All methods are async and durable:
    a call that returned has been committed."""

    async def create_user(self, user: User) -> bool:
        """Insert; False if the name is taken."""
        ...

    async def get_user(self, name: str) -> User | None: ...

    async def update_user(self, user: User) -> bool:
        """Replace the record of ``user.name``; False if there is none."""
        ...

    async def set_password_hash(self, name: str, password_hash: str | None, *, replacing: str | None = None) -> bool:
        """Replace ``name``'s password hash alone (roles and the disabled flag as they stand); False if no user
        or, given ``replacing``, if the stored hash is no longer that one."""
        ...

    async def set_access(self, name: str, roles: frozenset[str], disabled: bool) -> bool:
        """Replace ``name``'s roles and disabled flag alone (the password hash as it stands); False if no user."""
        ...

    async def delete_user(self, name: str) -> bool:
        """Delete the user, their tokens and the login throttle's rows for them (``throttle_key_ranges``),
        so a name reused later starts clean; False if there was no such user."""
        ...

    async def list_users(self) -> list[User]: ...

    async def add_token(self, token: Token) -> None: ...

    async def token_by_digest(self, digest: str) -> Token | None: ...

    async def token_by_id(self, token_id: str) -> Token | None: ...

    async def list_tokens(self, user: str | None = None) -> list[Token]: ...

    async def revoke_token(self, token_id: str, at: float) -> bool:
        """Mark revoked; False if unknown or already revoked."""
        ...

    async def revoke_user_tokens(self, user: str, at: float) -> int:
        """Revoke every live token of ``user``; the number revoked."""
        ...

    async def purge_sessions(self, user: str, now: float, limit: int) -> int:
        """Delete up to ``limit`` of ``user``'s session tokens that were revoked or expired by ``now``."""
        ...

    async def get_lockout(self, key: str) -> float | None:
        """The time until which ``key`` is locked out, if any."""
        ...

    async def set_lockout(self, key: str, until: float) -> None: ...

    async def expire_lockouts(self, now: float, limit: int) -> int:
        """Delete up to ``limit`` lockouts that ended at or before ``now``; the number deleted."""
        ...

    async def delete_lockouts(self, user: str) -> dict[str, float]:
        """Delete ``user``'s lockouts (keys ``login:USER|SOURCE``; not the known sources); the key of each
        deleted, without the ``login:USER|``, and when it ended or ends."""
        ...
