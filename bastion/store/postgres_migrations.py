"""PostgreSQL's schema migrations: the same versions and descriptions as SQLite's (``bastion.store.migrations``).

Each is one transaction; ``compatible`` says whether a server one version
older may keep running against the new schema (docs/operations.md, "Rolling
upgrades").
"""

from __future__ import annotations

from bastion.store import files_schema, idempotency, jobs, jobs_owners, kv, mail, topics
from bastion.store.migrations import (
    CODE_POINT_ORDER,
    JOB_OWNERS,
    LOCKOUTS_EXPIRY,
    LOCKOUTS_EXPIRY_INDEX,
    MAIL_SENDER_INDEX,
    USER_ROLES,
    Migration,
)

__all__ = ["LATEST", "POSTGRES_MIGRATIONS"]

POSTGRES_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "users, tokens and lockouts",
        (
            # COLLATE "C": names sort by code point, exactly as in SQLite, whatever the
            # database's locale. Domain tables referencing users (name) use it too.
            """CREATE TABLE users (
                name          TEXT COLLATE "C" PRIMARY KEY,
                roles         TEXT[] NOT NULL DEFAULT '{}',  -- role names, sorted
                password_hash TEXT,                          -- argon2id, or NULL: token-only user
                created_at    DOUBLE PRECISION NOT NULL DEFAULT 0,
                disabled      BOOLEAN NOT NULL DEFAULT FALSE
            )""",
            """CREATE TABLE tokens (
                id         TEXT COLLATE "C" PRIMARY KEY,
                digest     TEXT COLLATE "C" NOT NULL UNIQUE,  -- SHA-256 of the token; never the token
                username   TEXT COLLATE "C" NOT NULL REFERENCES users (name) ON DELETE CASCADE,
                kind       TEXT NOT NULL DEFAULT 'api',
                label      TEXT NOT NULL DEFAULT '',
                created_at DOUBLE PRECISION NOT NULL DEFAULT 0,
                expires_at DOUBLE PRECISION,
                revoked_at DOUBLE PRECISION
            )""",
            "CREATE INDEX tokens_by_user ON tokens (username, created_at, id)",
            "CREATE INDEX tokens_by_time ON tokens (created_at, id)",
            """CREATE TABLE lockouts (
                key   TEXT COLLATE "C" PRIMARY KEY,
                until DOUBLE PRECISION NOT NULL
            )""",
        ),
    ),
    # Same versions, descriptions and compatibility as bastion/store/migrations.py.
    Migration(2, "kv: namespaces, keys and the change log", kv.POSTGRES_SCHEMA, compatible=True),
    Migration(3, "files: metadata, uploads and shares", files_schema.POSTGRES_SCHEMA, compatible=True),
    Migration(4, "jobs: the queue, leases and results", jobs.POSTGRES_SCHEMA, compatible=True),
    Migration(5, "idempotency keys: first results of retried calls", idempotency.POSTGRES_SCHEMA, compatible=True),
    Migration(
        6,
        "schema compatibility: the oldest code that may use the database",
        (
            """CREATE TABLE schema_compat (
                id           INTEGER PRIMARY KEY CHECK (id = 1),
                min_version  INTEGER NOT NULL,   -- code knowing at least this schema version may use the database
                updated_at   DOUBLE PRECISION NOT NULL
            )""",
        ),
        compatible=True,
    ),
    Migration(7, "messages: mailboxes, sends and sender rate buckets", mail.POSTGRES_SCHEMA, compatible=True),
    Migration(
        8, "messages: the topic log (durable topics and relayed live messages)", topics.POSTGRES_SCHEMA, compatible=True
    ),
    # Migrations 3 and 4 left these columns, which listings order and page by, in the
    # database's collation: in an en_US one files.list sorted "a" < "B" < "_x" unlike
    # SQLite, and a page cursor from one backend's order skipped rows on the other.
    # Same type, new collation: no table rewrite; the indexes on them are rebuilt.
    Migration(
        9,
        CODE_POINT_ORDER,
        (
            'ALTER TABLE files ALTER COLUMN owner TYPE TEXT COLLATE "C", ALTER COLUMN name TYPE TEXT COLLATE "C"',
            'ALTER TABLE file_shares ALTER COLUMN grantee TYPE TEXT COLLATE "C"',
            'ALTER TABLE file_uploads ALTER COLUMN id TYPE TEXT COLLATE "C"',
            'ALTER TABLE jobs ALTER COLUMN id TYPE TEXT COLLATE "C"',
        ),
        compatible=True,
    ),
    Migration(10, "kv: each namespace's keys and bytes, for quotas", kv.POSTGRES_USAGE_SCHEMA, compatible=True),
    # A column with a default, which old code ignores: compatible.
    Migration(
        11, "messages: the highest seq trimmed from each durable topic", topics.POSTGRES_TRIMMED_SCHEMA, compatible=True
    ),
    # A nullable column, an index and a table, which old code ignores: compatible (but version-11 code creating a
    # forgotten topic again starts it at offset 1: docs/operations.md).
    Migration(
        12,
        "messages: durable topics' creators, and forgotten topics' last offsets",
        topics.POSTGRES_FORGET_SCHEMA,
        compatible=True,
    ),
    # An index, which old code ignores: compatible.
    Migration(13, LOCKOUTS_EXPIRY, (LOCKOUTS_EXPIRY_INDEX,), compatible=True),
    # A table triggers keep whoever writes, and indexes, which old code ignores: compatible (its claims stay FIFO).
    Migration(14, JOB_OWNERS, jobs_owners.POSTGRES_OWNERS_SCHEMA, compatible=True),
    # An index, which old code ignores: compatible.
    Migration(15, MAIL_SENDER_INDEX, mail.SENDER_INDEX_SCHEMA, compatible=True),
    # An index, which old code ignores: compatible. roles is a text[]: GIN serves "roles @> ARRAY[role]".
    Migration(16, USER_ROLES, ("CREATE INDEX users_by_role ON users USING GIN (roles)",), compatible=True),
    # Triggers replaced, keeping the same counts whoever writes: compatible.
    Migration(17, jobs_owners.OWNERS_V17, jobs_owners.POSTGRES_OWNERS_V17, compatible=True),
    # Rows deleted, no schema change; old code would only accept such shares again: compatible.
    Migration(18, files_schema.UNKNOWN_GRANTEES, files_schema.UNKNOWN_GRANTEES_SCHEMA, compatible=True),
    # A nullable column, which old code ignores (it would commit such an upload without the check): compatible.
    Migration(19, files_schema.EXPECTED_CONTENTS, files_schema.EXPECTED_CONTENTS_SCHEMA, compatible=True),
    # A trigger old code does not notice (its shares to users go with the user too) and rows deleted: compatible.
    Migration(20, files_schema.USER_SHARES_GO, files_schema.USER_SHARES_GO_POSTGRES, compatible=True),
    # A table triggers keep whoever writes, which old code ignores: compatible.
    Migration(21, files_schema.FILE_COUNTS, files_schema.FILE_COUNTS_POSTGRES, compatible=True),
)

LATEST = POSTGRES_MIGRATIONS[-1].version
