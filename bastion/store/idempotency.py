"""Idempotency keys: the first result of a call, remembered per (principal, key).

Theory of operation. A client that may send a call twice -- it lost the
connection and cannot tell whether the call ran -- gives the call an
idempotency key (call metadata ``idempotency-key``). The server claims the
key before running the call (``idempotency_begin``): the claim is a row in
state ``running`` that names its ``owner`` (a random id of that one
execution) and holds a ``lease_until``; when the call finishes the owner
records its answer (``idempotency_finish``: status, message and the encoded
value) and the row turns ``done``; a call that failed retryably gives the
claim back (``idempotency_release``) so a retry may run it. A second
``idempotency_begin`` for the same key finds the row and gets it back
instead of a claim: the caller replays a ``done`` answer, waits for a
``running`` one, and compares ``method`` and ``digest`` (a hash of the
method and its encoded arguments) to refuse a key reused for another call.

Rows live in the store, so every replica sharing the database sees them. A
row expires at ``expires_at`` (the server's window, 24 hours by default);
an expired row counts as absent -- ``idempotency_begin`` replaces it -- and
``idempotency_expire`` deletes expired rows in batches.

Records are caches of answers, not user data: ``idempotency_reassign_owner``
deletes the old user's rows whatever ``new`` is (a key is private to the
principal that used it).
"""

from __future__ import annotations

import sqlite3
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import msgspec

from bastion.store._access import PostgresAccess, SQLiteAccess

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "POSTGRES_SCHEMA",
    "SQLITE_SCHEMA",
    "IdempotencyRecord",
    "IdempotencyStore",
    "PostgresIdempotency",
    "SQLiteIdempotency",
]

SQLITE_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE idempotency_keys (
        principal   TEXT NOT NULL,
        key         TEXT NOT NULL,
        method      TEXT NOT NULL,
        digest      BLOB NOT NULL,                 -- SHA-256 of the method and its encoded arguments
        state       TEXT NOT NULL CHECK (state IN ('running', 'done')),
        owner       TEXT NOT NULL,                 -- the execution holding (or that held) the claim
        status      INTEGER,                       -- done: the answer's status code (0: OK)
        message     TEXT,                          -- done with an error: its message
        value       BLOB,                          -- done with OK: the encoded result
        created_at  REAL NOT NULL,
        expires_at  REAL NOT NULL,
        lease_until REAL NOT NULL,                 -- running: when the claim counts as abandoned
        PRIMARY KEY (principal, key)
    ) WITHOUT ROWID""",
    "CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at)",
)

POSTGRES_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE idempotency_keys (
        principal   TEXT COLLATE "C" NOT NULL,
        key         TEXT COLLATE "C" NOT NULL,
        method      TEXT NOT NULL,
        digest      BYTEA NOT NULL,
        state       TEXT NOT NULL CHECK (state IN ('running', 'done')),
        owner       TEXT NOT NULL,
        status      INTEGER,
        message     TEXT,
        value       BYTEA,
        created_at  DOUBLE PRECISION NOT NULL,
        expires_at  DOUBLE PRECISION NOT NULL,
        lease_until DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (principal, key)
    )""",
    "CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at)",
)

_COLUMNS = "principal, key, method, digest, state, owner, status, message, value, created_at, expires_at, lease_until"


class IdempotencyRecord(msgspec.Struct, frozen=True):
    """One remembered key: who claimed it for which call, and (once ``done``) the answer."""

    principal: str
    key: str
    method: str
    digest: bytes
    state: str  # "running" or "done"
    owner: str
    status: int | None
    message: str | None
    value: bytes | None
    created_at: float
    expires_at: float
    lease_until: float


def _record(row: Any) -> IdempotencyRecord:
    return IdempotencyRecord(
        principal=row[0],
        key=row[1],
        method=row[2],
        digest=bytes(row[3]),
        state=row[4],
        owner=row[5],
        status=row[6],
        message=row[7],
        value=bytes(row[8]) if row[8] is not None else None,
        created_at=float(row[9]),
        expires_at=float(row[10]),
        lease_until=float(row[11]),
    )


class IdempotencyStore(ABC):
    """What the server's idempotency-key path needs of storage."""

    @abstractmethod
    async def idempotency_begin(self, claim: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """Claim ``claim``'s (principal, key), state ``running``: None when claimed, else the live row.

        A row whose ``expires_at`` is at or before ``now`` counts as absent
        and is replaced.
        """

    @abstractmethod
    async def idempotency_finish(
        self, principal: str, key: str, owner: str, status: int, message: str | None, value: bytes | None
    ) -> bool:
        """Record the answer of ``owner``'s execution; False if ``owner`` no longer holds the key."""

    @abstractmethod
    async def idempotency_release(self, principal: str, key: str, owner: str) -> bool:
        """Give back ``owner``'s claim (the call may run again); False if it did not hold it."""

    @abstractmethod
    async def idempotency_get(self, principal: str, key: str) -> IdempotencyRecord | None:
        """The row for (principal, key), expired or not."""

    @abstractmethod
    async def idempotency_expire(self, now: float, limit: int) -> int:
        """Delete up to ``limit`` rows expired at ``now``; how many were deleted."""

    @abstractmethod
    async def idempotency_reassign_owner(self, old: str, new: str | None) -> int:
        """Delete every row of principal ``old`` (keys are never handed over); how many."""


# -- SQLite -----------------------------------------------------------------------------


class SQLiteIdempotency(SQLiteAccess, IdempotencyStore):
    """``IdempotencyStore`` on SQLite."""

    async def idempotency_begin(self, claim: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        def begin(conn: sqlite3.Connection) -> IdempotencyRecord | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM idempotency_keys WHERE principal = ? AND key = ?",
                (claim.principal, claim.key),
            ).fetchone()
            if row is not None and row[10] > now:
                return _record(row)
            conn.execute(
                f"INSERT OR REPLACE INTO idempotency_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _values(claim),
            )
            return None

        return await self._write(begin)

    async def idempotency_finish(
        self, principal: str, key: str, owner: str, status: int, message: str | None, value: bytes | None
    ) -> bool:
        def finish(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE idempotency_keys SET state = 'done', status = ?, message = ?, value = ? "
                "WHERE principal = ? AND key = ? AND owner = ? AND state = 'running'",
                (status, message, value, principal, key, owner),
            )
            return cursor.rowcount == 1

        return await self._write(finish)

    async def idempotency_release(self, principal: str, key: str, owner: str) -> bool:
        def release(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "DELETE FROM idempotency_keys WHERE principal = ? AND key = ? AND owner = ? AND state = 'running'",
                (principal, key, owner),
            )
            return cursor.rowcount == 1

        return await self._write(release)

    async def idempotency_get(self, principal: str, key: str) -> IdempotencyRecord | None:
        def get(conn: sqlite3.Connection) -> IdempotencyRecord | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM idempotency_keys WHERE principal = ? AND key = ?", (principal, key)
            ).fetchone()
            return _record(row) if row is not None else None

        return await self._read(get)

    async def idempotency_expire(self, now: float, limit: int) -> int:
        def expire(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "DELETE FROM idempotency_keys WHERE (principal, key) IN ("
                "SELECT principal, key FROM idempotency_keys WHERE expires_at <= ? LIMIT ?)",
                (now, limit),
            )
            return cursor.rowcount

        return await self._write(expire)

    async def idempotency_reassign_owner(self, old: str, new: str | None) -> int:
        def reassign(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM idempotency_keys WHERE principal = ?", (old,)).rowcount

        return await self._write(reassign)


def _values(claim: IdempotencyRecord) -> tuple[Any, ...]:
    return (
        claim.principal,
        claim.key,
        claim.method,
        claim.digest,
        claim.state,
        claim.owner,
        claim.status,
        claim.message,
        claim.value,
        claim.created_at,
        claim.expires_at,
        claim.lease_until,
    )


# -- PostgreSQL ---------------------------------------------------------------------------

_PG_BEGIN = f"""INSERT INTO idempotency_keys ({_COLUMNS})
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
    ON CONFLICT (principal, key) DO UPDATE SET
        method = EXCLUDED.method, digest = EXCLUDED.digest, state = EXCLUDED.state, owner = EXCLUDED.owner,
        status = EXCLUDED.status, message = EXCLUDED.message, value = EXCLUDED.value,
        created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at, lease_until = EXCLUDED.lease_until
    WHERE idempotency_keys.expires_at <= $13
    RETURNING owner"""


class PostgresIdempotency(PostgresAccess, IdempotencyStore):
    """``IdempotencyStore`` on PostgreSQL: one upsert claims a key atomically across replicas."""

    async def idempotency_begin(self, claim: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        async def begin(conn: asyncpg.Connection[Any]) -> IdempotencyRecord | None:
            for _ in range(3):  # the live row may expire and be swept between the two statements
                claimed = await conn.fetchrow(_PG_BEGIN, *_values(claim), now)
                if claimed is not None:
                    return None
                row = await conn.fetchrow(
                    f"SELECT {_COLUMNS} FROM idempotency_keys WHERE principal = $1 AND key = $2",
                    claim.principal,
                    claim.key,
                )
                if row is not None:
                    return _record(row)
            raise RuntimeError("idempotency key claim did not settle")  # pragma: no cover

        result: IdempotencyRecord | None = await self._call(begin)
        return result

    async def idempotency_finish(
        self, principal: str, key: str, owner: str, status: int, message: str | None, value: bytes | None
    ) -> bool:
        async def finish(conn: asyncpg.Connection[Any]) -> bool:
            done = await conn.execute(
                "UPDATE idempotency_keys SET state = 'done', status = $1, message = $2, value = $3 "
                "WHERE principal = $4 AND key = $5 AND owner = $6 AND state = 'running'",
                status,
                message,
                value,
                principal,
                key,
                owner,
            )
            return bool(done == "UPDATE 1")

        return bool(await self._call(finish))

    async def idempotency_release(self, principal: str, key: str, owner: str) -> bool:
        async def release(conn: asyncpg.Connection[Any]) -> bool:
            done = await conn.execute(
                "DELETE FROM idempotency_keys WHERE principal = $1 AND key = $2 AND owner = $3 AND state = 'running'",
                principal,
                key,
                owner,
            )
            return bool(done == "DELETE 1")

        return bool(await self._call(release))

    async def idempotency_get(self, principal: str, key: str) -> IdempotencyRecord | None:
        async def get(conn: asyncpg.Connection[Any]) -> IdempotencyRecord | None:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM idempotency_keys WHERE principal = $1 AND key = $2", principal, key
            )
            return _record(row) if row is not None else None

        result: IdempotencyRecord | None = await self._call(get)
        return result

    async def idempotency_expire(self, now: float, limit: int) -> int:
        async def expire(conn: asyncpg.Connection[Any]) -> int:
            done = await conn.execute(
                "DELETE FROM idempotency_keys WHERE (principal, key) IN ("
                "SELECT principal, key FROM idempotency_keys WHERE expires_at <= $1 LIMIT $2)",
                now,
                limit,
            )
            return int(str(done).rsplit(" ", 1)[-1])

        return int(await self._call(expire))

    async def idempotency_reassign_owner(self, old: str, new: str | None) -> int:
        async def reassign(conn: asyncpg.Connection[Any]) -> int:
            done = await conn.execute("DELETE FROM idempotency_keys WHERE principal = $1", old)
            return int(str(done).rsplit(" ", 1)[-1])

        return int(await self._call(reassign))
