"""Versioned schema migrations, applied when a store opens.

``MIGRATIONS`` is ordered by version, starting at 1, with no gaps. Each one
is a few statements run in the same transaction as the ``schema_version`` row
that records it, so a crash leaves the database at one version or the next,
never in between. Reopening applies nothing twice; a database recorded at a
version newer than ``LATEST`` was written by a newer bastion and is refused
rather than misread.

Rules for adding one: append, never edit or renumber a released migration;
keep each backward-compatible for at least one release when possible. The
statements here are SQLite's; the PostgreSQL backend will carry its own list
with the same version numbers, so both report the same ``schema_version``.
"""

from __future__ import annotations

import sqlite3
import time

from bastion.exceptions import UsageError
from bastion.store import files, idempotency, jobs, kv

__all__ = ["LATEST", "MIGRATIONS", "Migration", "apply_migrations", "current_version"]


class Migration:
    __slots__ = ("description", "statements", "version")

    def __init__(self, version: int, description: str, statements: tuple[str, ...]) -> None:
        self.version = version
        self.description = description
        self.statements = statements

    def __repr__(self) -> str:
        return f"Migration({self.version}, {self.description!r})"


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "users, tokens and lockouts",
        (
            """CREATE TABLE users (
                name          TEXT PRIMARY KEY,
                roles         TEXT NOT NULL DEFAULT '[]',   -- JSON array of role names, sorted
                password_hash TEXT,                          -- argon2id, or NULL: token-only user
                created_at    REAL NOT NULL DEFAULT 0,
                disabled      INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1))
            ) WITHOUT ROWID""",
            """CREATE TABLE tokens (
                id         TEXT PRIMARY KEY,
                digest     TEXT NOT NULL UNIQUE,            -- SHA-256 of the token; never the token
                username   TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
                kind       TEXT NOT NULL DEFAULT 'api',
                label      TEXT NOT NULL DEFAULT '',
                created_at REAL NOT NULL DEFAULT 0,
                expires_at REAL,
                revoked_at REAL
            )""",
            "CREATE INDEX tokens_by_user ON tokens (username, created_at, id)",
            """CREATE TABLE lockouts (
                key   TEXT PRIMARY KEY,
                until REAL NOT NULL
            ) WITHOUT ROWID""",
        ),
    ),
    # Each domain keeps its schema beside its SQL (bastion/store/<domain>.py); the
    # version numbers are fixed here, and the PostgreSQL list uses the same ones.
    Migration(2, "kv: namespaces, keys and the change log", kv.SQLITE_SCHEMA),
    Migration(3, "files: metadata, uploads and shares", files.SQLITE_SCHEMA),
    Migration(4, "jobs: the queue, leases and results", jobs.SQLITE_SCHEMA),
    Migration(5, "idempotency keys: first results of retried calls", idempotency.SQLITE_SCHEMA),
)

LATEST = MIGRATIONS[-1].version

_CREATE_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at  REAL NOT NULL
)"""


def current_version(conn: sqlite3.Connection) -> int:
    """The highest version recorded in ``conn``'s database (0: none)."""
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
    if exists is None:
        return 0
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def apply_migrations(
    conn: sqlite3.Connection, migrations: tuple[Migration, ...] = MIGRATIONS, *, label: str = "database"
) -> int:
    """Bring ``conn``'s database up to the last of ``migrations``; the version it is at.

    ``conn`` must be in autocommit mode (``isolation_level=None``). Everything
    happens in one ``BEGIN IMMEDIATE`` transaction, so two processes opening
    the same new file do not both migrate it.
    """
    _check_order(migrations)
    latest = migrations[-1].version if migrations else 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_CREATE_VERSION_TABLE)
        version = current_version(conn)
        if version > latest:
            raise UsageError(
                f"{label} has schema version {version}, newer than this bastion knows ({latest}); "
                "upgrade bastion, or restore a backup made by this version"
            )
        for migration in migrations:
            if migration.version <= version:
                continue
            for statement in migration.statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.description, time.time()),
            )
            version = migration.version
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # some errors end the transaction themselves
            conn.execute("ROLLBACK")
        raise
    return version


def _check_order(migrations: tuple[Migration, ...]) -> None:
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise UsageError(f"migrations must be numbered 1, 2, 3 … in order, got {versions}")
