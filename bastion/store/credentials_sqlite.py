"""The credential store on SQLite (``SQLiteCredentials``): users, tokens and lockouts.

The part of ``SQLiteStore`` that security's ``CredentialStore`` asks for
(bastion/store/base.py gives the contract), reaching the database through
``SQLiteAccess``; the tables are migration 1 (bastion/store/migrations.py),
and each role's holders, for ``users_with_role``, migration 16.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

from bastion.exceptions import AlreadyExists, NotFound
from bastion.security.credentials import Token, User, lockout_key_range, throttle_key_ranges
from bastion.store._access import SQLiteAccess

__all__ = ["SQLiteCredentials"]


class SQLiteCredentials(SQLiteAccess):
    """Users, tokens and lockouts on SQLite: the ``CredentialStore`` part of ``SQLiteStore``."""

    # -- users ----------------------------------------------------------------------------

    async def create_user(self, user: User) -> bool:
        return await self._write(_changes(_INSERT_USER, _user_row(user))) == 1

    async def get_user(self, name: str) -> User | None:
        row = await self._read(_one(f"SELECT {_USER_COLUMNS} FROM users WHERE name = ?", (name,)))
        return None if row is None else _user(row)

    async def update_user(self, user: User) -> bool:
        name, *rest = _user_row(user)
        return await self._write(_changes(_UPDATE_USER, (*rest, name))) == 1

    async def set_password_hash(self, name: str, password_hash: str | None, *, replacing: str | None = None) -> bool:
        if replacing is None:
            return await self._write(_changes(_SET_PASSWORD, (password_hash, name))) == 1
        return (
            await self._write(_changes(_SET_PASSWORD + " AND password_hash = ?", (password_hash, name, replacing))) == 1
        )

    async def set_access(self, name: str, roles: frozenset[str], disabled: bool) -> bool:
        args = (json.dumps(sorted(roles)), int(disabled), name)
        return await self._write(_changes("UPDATE users SET roles = ?, disabled = ? WHERE name = ?", args)) == 1

    async def delete_user(self, name: str) -> bool:
        # Their tokens go too (ON DELETE CASCADE), and the login throttle's rows for them in the same
        # transaction (known sources, lockouts): a name reused later starts clean.
        def delete(c: sqlite3.Connection) -> int:
            deleted: int = c.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount
            for low, high in throttle_key_ranges(name):
                c.execute(_DELETE_LOCKOUT_RANGE, (low, high))
            return deleted

        return await self._write(delete) == 1

    async def list_users(self) -> list[User]:
        rows = await self._read(_all(f"SELECT {_USER_COLUMNS} FROM users ORDER BY name", ()))
        return [_user(row) for row in rows]

    async def users_with_role(self, role: str, limit: int) -> list[str]:
        return [row[0] for row in await self._read(_all(_USERS_WITH_ROLE, (role, limit)))]

    # -- tokens ---------------------------------------------------------------------------

    async def add_token(self, token: Token) -> None:
        row = (
            token.id, token.digest, token.user, token.kind, token.label,
            token.created_at, token.expires_at, token.revoked_at,
        )  # fmt: skip

        def insert(c: sqlite3.Connection) -> None:
            try:
                c.execute(f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
            except sqlite3.IntegrityError as exc:
                if exc.sqlite_errorname == "SQLITE_CONSTRAINT_FOREIGNKEY":
                    raise NotFound(f"no user {token.user!r}") from exc
                raise AlreadyExists(f"token {token.id!r} or its digest is already stored") from exc

        await self._write(insert)

    async def token_by_digest(self, digest: str) -> Token | None:
        row = await self._read(_one(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE digest = ?", (digest,)))
        return None if row is None else Token(*row)

    async def token_by_id(self, token_id: str) -> Token | None:
        row = await self._read(_one(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE id = ?", (token_id,)))
        return None if row is None else Token(*row)

    async def list_tokens(self, user: str | None = None) -> list[Token]:
        if user is None:
            query = _all(f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY created_at, id", ())
        else:
            query = _all(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE username = ? ORDER BY created_at, id", (user,))
        return [Token(*row) for row in await self._read(query)]

    async def revoke_token(self, token_id: str, at: float) -> bool:
        sql = "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL"
        return await self._write(_changes(sql, (at, token_id))) == 1

    async def revoke_user_tokens(self, user: str, at: float) -> int:
        return await self._write(_changes(_REVOKE_USER_TOKENS, (at, user, at)))

    async def purge_sessions(self, user: str, now: float, limit: int) -> int:
        return await self._write(_changes(_PURGE_SESSIONS, (user, now, limit)))

    # -- lockouts -------------------------------------------------------------------------

    async def get_lockout(self, key: str) -> float | None:
        row = await self._read(_one("SELECT until FROM lockouts WHERE key = ?", (key,)))
        return None if row is None else float(row[0])

    async def set_lockout(self, key: str, until: float) -> None:
        await self._write(_changes(_SET_LOCKOUT, (key, until)))

    async def expire_lockouts(self, now: float, limit: int) -> int:
        return await self._write(_changes(_EXPIRE_LOCKOUTS, (now, limit)))

    async def delete_lockouts(self, user: str) -> dict[str, float]:
        low, high = lockout_key_range(user)
        rows = await self._write(_all(_DELETE_LOCKOUT_RANGE + " RETURNING key, until", (low, high)))
        return {str(key)[len(low) :]: float(until) for key, until in rows}


# -- SQL and row mapping -------------------------------------------------------------------

_USER_COLUMNS = "name, roles, password_hash, created_at, disabled"
# In Token's field order, so a row unpacks straight into Token(*row).
_TOKEN_COLUMNS = "id, digest, username, kind, label, created_at, expires_at, revoked_at"

# Through user_roles (migration 16), which triggers on users keep: the roles column is JSON text.
_USERS_WITH_ROLE = "SELECT name FROM user_roles WHERE role = ? ORDER BY name LIMIT ?"
_INSERT_USER = f"INSERT INTO users ({_USER_COLUMNS}) VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING"
_SET_PASSWORD = "UPDATE users SET password_hash = ? WHERE name = ?"
_UPDATE_USER = "UPDATE users SET roles = ?, password_hash = ?, created_at = ?, disabled = ? WHERE name = ?"
# Live: neither revoked nor expired at ``at`` (Token.valid_at).
_REVOKE_USER_TOKENS = (
    "UPDATE tokens SET revoked_at = ? WHERE username = ? AND revoked_at IS NULL"
    " AND (expires_at IS NULL OR expires_at > ?)"
)
# Ended sessions of one user, a bounded batch, through tokens_by_user.
_PURGE_SESSIONS = (
    "DELETE FROM tokens WHERE id IN (SELECT id FROM tokens WHERE username = ? AND kind = 'session'"
    " AND (revoked_at IS NOT NULL OR expires_at <= ?) LIMIT ?)"
)
_SET_LOCKOUT = "INSERT INTO lockouts (key, until) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET until = excluded.until"
# A bounded batch, found through the lockouts_expiry index (migration 11).
_EXPIRE_LOCKOUTS = "DELETE FROM lockouts WHERE key IN (SELECT key FROM lockouts WHERE until <= ? LIMIT ?)"
# One user's throttle rows: a key range (binary collation), through the primary key.
_DELETE_LOCKOUT_RANGE = "DELETE FROM lockouts WHERE key >= ? AND key < ?"

Row = tuple[Any, ...]


def _changes(sql: str, args: Row) -> Callable[[sqlite3.Connection], int]:
    """A write: run ``sql``, the number of rows it changed."""
    return lambda conn: conn.execute(sql, args).rowcount


def _one(sql: str, args: Row) -> Callable[[sqlite3.Connection], Row | None]:
    return lambda conn: conn.execute(sql, args).fetchone()


def _all(sql: str, args: Row) -> Callable[[sqlite3.Connection], list[Row]]:
    return lambda conn: conn.execute(sql, args).fetchall()


def _user_row(user: User) -> Row:
    return (user.name, json.dumps(sorted(user.roles)), user.password_hash, user.created_at, int(user.disabled))


def _user(row: Row) -> User:
    name, roles, password_hash, created_at, disabled = row
    return User(name, frozenset(json.loads(roles)), password_hash, float(created_at), bool(disabled))
