"""The credential store on PostgreSQL (``PostgresCredentials``): users, tokens and lockouts.

The part of ``PostgresStore`` that security's ``CredentialStore`` asks for
(bastion/store/base.py gives the contract), reaching the database through
``PostgresAccess``; the tables are migration 1 of ``POSTGRES_MIGRATIONS``
(bastion/store/postgres.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from bastion.exceptions import AlreadyExists, NotFound
from bastion.security.credentials import Token, User, lockout_key_range, throttle_key_ranges
from bastion.store._access import USER_LOCK, PostgresAccess

__all__ = ["PostgresCredentials"]

T = TypeVar("T")
Connection = Any  # asyncpg.Connection (asyncpg ships no type information)


class PostgresCredentials(PostgresAccess):
    """Users, tokens and lockouts on PostgreSQL: the ``CredentialStore`` part of ``PostgresStore``."""

    if TYPE_CHECKING:  # PostgresStore._call, typed as it is there: the result is fn's

        async def _call(self, fn: Callable[[Connection], Awaitable[T]]) -> T: ...

    # -- users ----------------------------------------------------------------------------

    async def create_user(self, user: User) -> bool:
        return await self._call(_changes(_INSERT_USER, *_user_row(user))) == 1

    async def get_user(self, name: str) -> User | None:
        row = await self._call(_one(f"SELECT {_USER_COLUMNS} FROM users WHERE name = $1", name))
        return None if row is None else _user(row)

    async def update_user(self, user: User) -> bool:
        return await self._call(_changes(_UPDATE_USER, *_user_row(user))) == 1

    async def set_password_hash(self, name: str, password_hash: str | None, *, replacing: str | None = None) -> bool:
        if replacing is None:
            return await self._call(_changes(_SET_PASSWORD, name, password_hash)) == 1
        return (
            await self._call(_changes(_SET_PASSWORD + " AND password_hash = $3", name, password_hash, replacing)) == 1
        )

    async def set_access(self, name: str, roles: frozenset[str], disabled: bool) -> bool:
        sql = "UPDATE users SET roles = $2, disabled = $3 WHERE name = $1"
        return await self._call(_changes(sql, name, sorted(roles), disabled)) == 1

    async def delete_user(self, name: str) -> bool:
        # Their tokens go too (ON DELETE CASCADE), and the login throttle's rows for them in the same
        # transaction (known sources, lockouts): a name reused later starts clean.
        async def delete(conn: Connection) -> int:
            async with conn.transaction():
                # Exclusive: waits for writes that checked the row under the shared lock (kv to ~NAME, an
                # upload) to commit, and makes later ones wait for this, then see the row gone (_access.py).
                await conn.execute(USER_LOCK, name)
                status: str = await conn.execute("DELETE FROM users WHERE name = $1", name)
                for low, high in throttle_key_ranges(name):
                    await conn.execute(_DELETE_LOCKOUT_RANGE, low, high)
            return int(status.rsplit(" ", 1)[-1])

        return await self._call(delete) == 1

    async def list_users(self) -> list[User]:
        rows = await self._call(_all(f"SELECT {_USER_COLUMNS} FROM users ORDER BY name"))
        return [_user(row) for row in rows]

    async def users_with_role(self, role: str, limit: int) -> list[str]:
        return [row[0] for row in await self._call(_all(_USERS_WITH_ROLE, role, limit))]

    # -- tokens ---------------------------------------------------------------------------

    async def add_token(self, token: Token) -> None:
        row = (
            token.id, token.digest, token.user, token.kind, token.label,
            token.created_at, token.expires_at, token.revoked_at,
        )  # fmt: skip

        async def insert(conn: Connection) -> None:
            try:
                await conn.execute(
                    f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)", *row
                )
            except asyncpg.ForeignKeyViolationError:
                raise NotFound(f"no user {token.user!r}") from None
            except asyncpg.UniqueViolationError:
                raise AlreadyExists(f"token {token.id!r} or its digest is already stored") from None

        await self._call(insert)

    async def token_by_digest(self, digest: str) -> Token | None:
        row = await self._call(_one(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE digest = $1", digest))
        return None if row is None else Token(*row)

    async def token_by_id(self, token_id: str) -> Token | None:
        row = await self._call(_one(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE id = $1", token_id))
        return None if row is None else Token(*row)

    async def list_tokens(self, user: str | None = None) -> list[Token]:
        if user is None:
            query = _all(f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY created_at, id")
        else:
            query = _all(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE username = $1 ORDER BY created_at, id", user)
        return [Token(*row) for row in await self._call(query)]

    async def revoke_token(self, token_id: str, at: float) -> bool:
        sql = "UPDATE tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL"
        return await self._call(_changes(sql, at, token_id)) == 1

    async def revoke_user_tokens(self, user: str, at: float) -> int:
        return await self._call(_changes(_REVOKE_USER_TOKENS, at, user))

    async def purge_sessions(self, user: str, now: float, limit: int) -> int:
        return await self._call(_changes(_PURGE_SESSIONS, user, now, limit))

    # -- lockouts -------------------------------------------------------------------------

    async def get_lockout(self, key: str) -> float | None:
        row = await self._call(_one("SELECT until FROM lockouts WHERE key = $1", key))
        return None if row is None else float(row[0])

    async def set_lockout(self, key: str, until: float) -> None:
        await self._call(_changes(_SET_LOCKOUT, key, until))

    async def expire_lockouts(self, now: float, limit: int) -> int:
        return await self._call(_changes(_EXPIRE_LOCKOUTS, now, limit))

    async def delete_lockouts(self, user: str) -> dict[str, float]:
        low, high = lockout_key_range(user)
        rows = await self._call(_all(_DELETE_LOCKOUT_RANGE + " RETURNING key, until", low, high))
        return {str(row[0])[len(low) :]: float(row[1]) for row in rows}


# -- SQL and row mapping -------------------------------------------------------------------

_USER_COLUMNS = "name, roles, password_hash, created_at, disabled"
# In Token's field order, so a row unpacks straight into Token(*row).
_TOKEN_COLUMNS = "id, digest, username, kind, label, created_at, expires_at, revoked_at"

# Through the GIN index users_by_role (migration 16): every holder of the role is found (a bitmap scan), then
# sorted and cut; not every user, though.
_USERS_WITH_ROLE = "SELECT name FROM users WHERE roles @> ARRAY[$1::text] ORDER BY name LIMIT $2"
_INSERT_USER = f"INSERT INTO users ({_USER_COLUMNS}) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING"
_SET_PASSWORD = "UPDATE users SET password_hash = $2 WHERE name = $1"
_UPDATE_USER = "UPDATE users SET roles = $2, password_hash = $3, created_at = $4, disabled = $5 WHERE name = $1"
# Live: neither revoked nor expired at ``at`` (Token.valid_at).
_REVOKE_USER_TOKENS = (
    "UPDATE tokens SET revoked_at = $1 WHERE username = $2 AND revoked_at IS NULL"
    " AND (expires_at IS NULL OR expires_at > $1)"
)
# Ended sessions of one user, a bounded batch, through tokens_by_user.
_PURGE_SESSIONS = (
    "DELETE FROM tokens WHERE id IN (SELECT id FROM tokens WHERE username = $1 AND kind = 'session'"
    " AND (revoked_at IS NOT NULL OR expires_at <= $2) LIMIT $3)"
)
_SET_LOCKOUT = (
    "INSERT INTO lockouts (key, until) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET until = excluded.until"
)
# A bounded batch, found through the lockouts_expiry index (migration 11).
_EXPIRE_LOCKOUTS = "DELETE FROM lockouts WHERE key IN (SELECT key FROM lockouts WHERE until <= $1 LIMIT $2)"
# One user's throttle rows: a key range (the key is COLLATE "C"), through the primary key.
_DELETE_LOCKOUT_RANGE = "DELETE FROM lockouts WHERE key >= $1 AND key < $2"


def _changes(sql: str, *args: Any) -> Callable[[Connection], Awaitable[int]]:
    """A write: run ``sql``, the number of rows it changed."""

    async def run(conn: Connection) -> int:
        status: str = await conn.execute(sql, *args)  # e.g. "INSERT 0 1", "UPDATE 3"
        return int(status.rsplit(" ", 1)[-1])

    return run


def _one(sql: str, *args: Any) -> Callable[[Connection], Awaitable[Any]]:
    async def run(conn: Connection) -> Any:
        return await conn.fetchrow(sql, *args)

    return run


def _all(sql: str, *args: Any) -> Callable[[Connection], Awaitable[list[Any]]]:
    async def run(conn: Connection) -> list[Any]:
        return list(await conn.fetch(sql, *args))

    return run


def _user_row(user: User) -> tuple[Any, ...]:
    return (user.name, sorted(user.roles), user.password_hash, user.created_at, user.disabled)


def _user(row: Any) -> User:
    name, roles, password_hash, created_at, disabled = row
    return User(name, frozenset(roles), password_hash, float(created_at), bool(disabled))
