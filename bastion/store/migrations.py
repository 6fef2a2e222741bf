"""Versioned schema migrations, applied when a store opens.

``MIGRATIONS`` is ordered by version, starting at 1, with no gaps. Each one
is a few statements run in the same transaction as the ``schema_version`` row
that records it, so a crash leaves the database at one version or the next,
never in between. Reopening applies nothing twice.

Rolling upgrades
----------------

During an upgrade, replicas of bastion N and N+1 share one database: the
first N+1 replica migrates it, and N replicas keep running -- and must be
able to restart -- on the newer schema. So each migration declares whether
it is ``compatible``: code of the previous version still works on the
migrated schema (additive changes -- new tables, new nullable columns or
columns with defaults, new indexes -- whose data old code may ignore), or
not (renames, drops, new constraints old code would break, changed
meanings). From the list, ``compatible_from(migrations, v)`` is the lowest
schema version whose code may use a database at version ``v``: the version
of the last incompatible migration up to ``v`` (the first migration counts
as one).

The database records that number in the one-row ``schema_compat`` table
(created by migration 6; every later migration run updates it in the same
transaction). Opening a database at a version newer than the code's latest
is then allowed when the recorded number is at most the code's latest --
with a warning naming both versions, and without touching the schema --
and refused otherwise, as it is when nothing is recorded (a database
migrated by a bastion that did not record compatibility).

Rules for adding one: append, never edit or renumber a released migration;
prefer compatible migrations, and split a breaking change over two releases
(docs/operations.md, "Rolling upgrades"). The statements here are SQLite's;
the PostgreSQL backend carries its own list (bastion/store/postgres_migrations.py) with
the same versions, descriptions and compatibility, so both report the same
``schema_version``.
"""

from __future__ import annotations

import logging
import sqlite3
import time

from bastion.exceptions import UsageError
from bastion.store import files_schema, idempotency, jobs, jobs_owners, kv, mail, topics

__all__ = [
    "CODE_POINT_ORDER",
    "JOB_OWNERS",
    "LATEST",
    "MAIL_SENDER_INDEX",
    "MIGRATIONS",
    "SQLITE_COMPAT_SCHEMA",
    "SQLITE_USER_ROLES_SCHEMA",
    "USER_ROLES",
    "Migration",
    "apply_migrations",
    "check_newer_schema",
    "compatible_from",
    "current_version",
    "recorded_compatible_from",
]

log = logging.getLogger("bastion.store")


class Migration:
    """Schema version ``version``: what it is for, its statements, and whether
    code of version ``version - 1`` still works once it is applied."""

    __slots__ = ("compatible", "description", "statements", "version")

    def __init__(
        self, version: int, description: str, statements: tuple[str, ...], *, compatible: bool = False
    ) -> None:
        self.version = version
        self.description = description
        self.statements = statements
        self.compatible = compatible

    def __repr__(self) -> str:
        flag = ", compatible=True" if self.compatible else ""
        return f"Migration({self.version}, {self.description!r}{flag})"


#: The one-row table recording the lowest schema version whose code may use the database.
SQLITE_COMPAT_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE schema_compat (
        id           INTEGER PRIMARY KEY CHECK (id = 1),
        min_version  INTEGER NOT NULL,   -- code knowing at least this schema version may use the database
        updated_at   REAL NOT NULL
    )""",
)

#: Migration 13 (both backends): expired lockouts are purged in batches by this index (throttle.py).
LOCKOUTS_EXPIRY = "lockouts: an index on their expiry, to purge expired ones"
LOCKOUTS_EXPIRY_INDEX = "CREATE INDEX lockouts_expiry ON lockouts (until)"
#: Migration 15's description (both backends).
MAIL_SENDER_INDEX = "messages: an index counting each sender's messages in a mailbox, for the sender share"

#: Migration 16's description (both backends): mail to role:NAME finds the role's holders by index.
USER_ROLES = "users: each role's holders, found by index, for mail to role:NAME"
#: Migration 16 on SQLite: the roles column is a JSON array, which no index can serve, so a table of
#: (role, user) pairs kept by triggers on users (whoever writes, older code included), filled from the users
#: already stored. A row's roles are deleted through the primary key, by the roles it held.
SQLITE_USER_ROLES_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE user_roles (
        role TEXT NOT NULL,
        name TEXT NOT NULL,
        PRIMARY KEY (role, name)
    ) WITHOUT ROWID""",
    "INSERT OR IGNORE INTO user_roles (role, name) SELECT r.value, u.name FROM users AS u, json_each(u.roles) AS r",
    """CREATE TRIGGER user_roles_insert AFTER INSERT ON users BEGIN
        INSERT OR IGNORE INTO user_roles (role, name) SELECT value, NEW.name FROM json_each(NEW.roles);
    END""",
    """CREATE TRIGGER user_roles_update AFTER UPDATE OF name, roles ON users BEGIN
        DELETE FROM user_roles WHERE name = OLD.name AND role IN (SELECT value FROM json_each(OLD.roles));
        INSERT OR IGNORE INTO user_roles (role, name) SELECT value, NEW.name FROM json_each(NEW.roles);
    END""",
    """CREATE TRIGGER user_roles_delete AFTER DELETE ON users BEGIN
        DELETE FROM user_roles WHERE name = OLD.name AND role IN (SELECT value FROM json_each(OLD.roles));
    END""",
)

#: Migration 14's description (both backends).
JOB_OWNERS = "jobs: each owner's queued and running jobs and bytes, for fair claims and the bytes bound"

#: Migration 9's description (both backends).
CODE_POINT_ORDER = "text keys of files, shares, uploads and jobs sort by code point on every backend"

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
    # New tables only, so each is compatible with the code before it.
    Migration(2, "kv: namespaces, keys and the change log", kv.SQLITE_SCHEMA, compatible=True),
    Migration(3, "files: metadata, uploads and shares", files_schema.SQLITE_SCHEMA, compatible=True),
    Migration(4, "jobs: the queue, leases and results", jobs.SQLITE_SCHEMA, compatible=True),
    Migration(5, "idempotency keys: first results of retried calls", idempotency.SQLITE_SCHEMA, compatible=True),
    Migration(
        6, "schema compatibility: the oldest code that may use the database", SQLITE_COMPAT_SCHEMA, compatible=True
    ),
    Migration(7, "messages: mailboxes, sends and sender rate buckets", mail.SQLITE_SCHEMA, compatible=True),
    Migration(
        8, "messages: the topic log (durable topics and relayed live messages)", topics.SQLITE_SCHEMA, compatible=True
    ),
    # PostgreSQL's version 9 gives the text columns listings order by COLLATE "C"; SQLite
    # compares them bytewise already (BINARY), so here it only keeps the versions in step.
    Migration(9, CODE_POINT_ORDER, (), compatible=True),
    # Triggers keep the usage whoever writes, old code included: compatible.
    Migration(10, "kv: each namespace's keys and bytes, for quotas", kv.SQLITE_USAGE_SCHEMA, compatible=True),
    # A column with a default, which old code ignores: compatible.
    Migration(
        11, "messages: the highest seq trimmed from each durable topic", topics.SQLITE_TRIMMED_SCHEMA, compatible=True
    ),
    # A nullable column, an index and a table, which old code ignores: compatible (but version-11 code creating a
    # forgotten topic again starts it at offset 1: docs/operations.md).
    Migration(
        12,
        "messages: durable topics' creators, and forgotten topics' last offsets",
        topics.SQLITE_FORGET_SCHEMA,
        compatible=True,
    ),
    # An index, which old code ignores: compatible.
    Migration(13, LOCKOUTS_EXPIRY, (LOCKOUTS_EXPIRY_INDEX,), compatible=True),
    # A table triggers keep whoever writes, and indexes, which old code ignores: compatible (its claims stay FIFO).
    Migration(14, JOB_OWNERS, jobs_owners.SQLITE_OWNERS_SCHEMA, compatible=True),
    # An index, which old code ignores: compatible.
    Migration(15, MAIL_SENDER_INDEX, mail.SENDER_INDEX_SCHEMA, compatible=True),
    # A table triggers keep whoever writes, which old code ignores: compatible.
    Migration(16, USER_ROLES, SQLITE_USER_ROLES_SCHEMA, compatible=True),
    # Triggers replaced, keeping the same counts whoever writes: compatible.
    Migration(17, jobs_owners.OWNERS_V17, jobs_owners.SQLITE_OWNERS_V17, compatible=True),
    # Rows deleted, no schema change; old code would only accept such shares again: compatible.
    Migration(18, files_schema.UNKNOWN_GRANTEES, files_schema.UNKNOWN_GRANTEES_SCHEMA, compatible=True),
    # A nullable column, which old code ignores (it would commit such an upload without the check): compatible.
    Migration(19, files_schema.EXPECTED_CONTENTS, files_schema.EXPECTED_CONTENTS_SCHEMA, compatible=True),
    # A trigger old code does not notice (its shares to users go with the user too) and rows deleted: compatible.
    Migration(20, files_schema.USER_SHARES_GO, files_schema.USER_SHARES_GO_SQLITE, compatible=True),
    # A table triggers keep whoever writes, which old code ignores: compatible.
    Migration(21, files_schema.FILE_COUNTS, files_schema.FILE_COUNTS_SQLITE, compatible=True),
)

LATEST = MIGRATIONS[-1].version

_CREATE_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at  REAL NOT NULL
)"""

#: Records ``compatible_from`` (parameters: min_version, updated_at).
_RECORD_COMPAT = (
    "INSERT INTO schema_compat (id, min_version, updated_at) VALUES (1, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET min_version = excluded.min_version, updated_at = excluded.updated_at"
)


def compatible_from(migrations: tuple[Migration, ...], version: int) -> int:
    """The lowest schema version whose code may use a database at ``version`` (``migrations`` up to it)."""
    floor = 0
    for migration in migrations:
        if migration.version > version:
            break
        if not migration.compatible or floor == 0:
            floor = migration.version
    return floor


def check_newer_schema(version: int, recorded_from: int | None, latest: int, *, label: str) -> None:
    """Decide about a database at ``version`` > ``latest``, the newest version this code knows.

    ``recorded_from`` is the database's ``schema_compat.min_version`` (None: not
    recorded). Raises ``UsageError`` unless the newer schema declared code of
    ``latest`` compatible; logs a warning when it did.
    """
    if recorded_from is not None and recorded_from <= latest:
        log.warning(
            "%s has schema version %d, newer than this bastion knows (%d); using it, because it declares code "
            "of schema version %d and later compatible (a rolling upgrade is under way: upgrade this replica)",
            label, version, latest, recorded_from,
        )  # fmt: skip
        return
    needs = "" if recorded_from is None else f" and needs code of schema version {recorded_from} or later"
    raise UsageError(
        f"{label} has schema version {version}, newer than this bastion knows ({latest}){needs}; "
        "upgrade bastion, or restore a backup made by this version"
    )


def current_version(conn: sqlite3.Connection) -> int:
    """The highest version recorded in ``conn``'s database (0: none)."""
    if not _has_table(conn, "schema_version"):
        return 0
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def recorded_compatible_from(conn: sqlite3.Connection) -> int | None:
    """The database's ``schema_compat.min_version`` (None: not recorded)."""
    if not _has_table(conn, "schema_compat"):
        return None
    row = conn.execute("SELECT min_version FROM schema_compat WHERE id = 1").fetchone()
    return int(row[0]) if row is not None else None


def apply_migrations(
    conn: sqlite3.Connection, migrations: tuple[Migration, ...] = MIGRATIONS, *, label: str = "database"
) -> int:
    """Bring ``conn``'s database up to the last of ``migrations``; the version it is at.

    ``conn`` must be in autocommit mode (``isolation_level=None``). Everything
    happens in one ``BEGIN IMMEDIATE`` transaction, so two processes opening
    the same new file do not both migrate it. A database at a newer version
    is left alone: opened if it declares this code compatible
    (``check_newer_schema``), refused with ``UsageError`` otherwise.
    """
    _check_order(migrations)
    latest = migrations[-1].version if migrations else 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_CREATE_VERSION_TABLE)
        version = current_version(conn)
        if version > latest:
            check_newer_schema(version, recorded_compatible_from(conn), latest, label=label)
        applied = False
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
            applied = True
        if applied and _has_table(conn, "schema_compat"):
            conn.execute(_RECORD_COMPAT, (compatible_from(migrations, version), time.time()))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # some errors end the transaction themselves
            conn.execute("ROLLBACK")
        raise
    return version


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone()
    return row is not None


def _check_order(migrations: tuple[Migration, ...]) -> None:
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise UsageError(f"migrations must be numbered 1, 2, 3 … in order, got {versions}")
