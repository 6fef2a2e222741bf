"""The ``files`` storage domain's schema: its tables (migration 3) and later migrations' statements.

The migration lists (bastion/store/migrations.py, bastion/store/postgres_migrations.py) take them from
here; bastion/store/files.py explains the tables.
"""

from __future__ import annotations

__all__ = [
    "EXPECTED_CONTENTS",
    "EXPECTED_CONTENTS_SCHEMA",
    "FILE_COUNTS",
    "FILE_COUNTS_POSTGRES",
    "FILE_COUNTS_SQLITE",
    "POSTGRES_SCHEMA",
    "SQLITE_SCHEMA",
    "UNKNOWN_GRANTEES",
    "UNKNOWN_GRANTEES_SCHEMA",
    "USER_SHARES_GO",
    "USER_SHARES_GO_POSTGRES",
    "USER_SHARES_GO_SQLITE",
]

SQLITE_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE files (
        id         TEXT PRIMARY KEY,
        owner      TEXT NOT NULL,
        name       TEXT NOT NULL,
        size       INTEGER NOT NULL,
        sha256     TEXT NOT NULL,           -- names the blob <files dir>/blobs/<sha256[:2]>/<sha256>
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        UNIQUE (owner, name)
    )""",
    "CREATE INDEX files_by_sha256 ON files (sha256)",
    """CREATE TABLE file_shares (
        file_id    TEXT NOT NULL REFERENCES files (id) ON DELETE CASCADE,
        kind       TEXT NOT NULL CHECK (kind IN ('user', 'role')),
        grantee    TEXT NOT NULL,
        mode       TEXT NOT NULL CHECK (mode IN ('read', 'write')),
        created_at REAL NOT NULL,
        PRIMARY KEY (file_id, kind, grantee)
    ) WITHOUT ROWID""",
    "CREATE INDEX file_shares_by_grantee ON file_shares (kind, grantee)",
    """CREATE TABLE file_uploads (
        id         TEXT PRIMARY KEY,
        owner      TEXT NOT NULL,           -- charged for it, owns the result
        uploader   TEXT NOT NULL,           -- may continue it
        name       TEXT NOT NULL,
        size       INTEGER NOT NULL,
        sha256     TEXT NOT NULL,
        file_id    TEXT,                    -- the file whose contents it replaces, or NULL
        overwrite  INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
    "CREATE INDEX file_uploads_by_owner ON file_uploads (owner)",
    """CREATE TABLE file_blobs (
        sha256             TEXT PRIMARY KEY,
        size               INTEGER NOT NULL,
        state              TEXT NOT NULL DEFAULT 'live' CHECK (state IN ('live', 'deleting')),
        unreferenced_since REAL,
        pinned_until       REAL,
        claimed_by         TEXT,
        claimed_at         REAL
    ) WITHOUT ROWID""",
)

POSTGRES_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE files (
        id         TEXT PRIMARY KEY,
        owner      TEXT NOT NULL,
        name       TEXT NOT NULL,
        size       BIGINT NOT NULL,
        sha256     TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        UNIQUE (owner, name)
    )""",
    "CREATE INDEX files_by_sha256 ON files (sha256)",
    """CREATE TABLE file_shares (
        file_id    TEXT NOT NULL REFERENCES files (id) ON DELETE CASCADE,
        kind       TEXT NOT NULL CHECK (kind IN ('user', 'role')),
        grantee    TEXT NOT NULL,
        mode       TEXT NOT NULL CHECK (mode IN ('read', 'write')),
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (file_id, kind, grantee)
    )""",
    "CREATE INDEX file_shares_by_grantee ON file_shares (kind, grantee)",
    """CREATE TABLE file_uploads (
        id         TEXT PRIMARY KEY,
        owner      TEXT NOT NULL,
        uploader   TEXT NOT NULL,
        name       TEXT NOT NULL,
        size       BIGINT NOT NULL,
        sha256     TEXT NOT NULL,
        file_id    TEXT,
        overwrite  BOOLEAN NOT NULL DEFAULT FALSE,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX file_uploads_by_owner ON file_uploads (owner)",
    """CREATE TABLE file_blobs (
        sha256             TEXT PRIMARY KEY,
        size               BIGINT NOT NULL,
        state              TEXT NOT NULL DEFAULT 'live' CHECK (state IN ('live', 'deleting')),
        unreferenced_since DOUBLE PRECISION,
        pinned_until       DOUBLE PRECISION,
        claimed_by         TEXT,
        claimed_at         DOUBLE PRECISION
    )""",
)

#: Migration 19 (both backends): an upload may replace only the contents it expects (compare-and-swap).
EXPECTED_CONTENTS = "files: an upload's expected contents of the file it replaces"
EXPECTED_CONTENTS_SCHEMA: tuple[str, ...] = ("ALTER TABLE file_uploads ADD COLUMN expected_sha256 TEXT",)
#: Migration 18 (both backends): a share to a user name nobody held was accepted, and whoever registered the
#: name later got the file; the service now refuses such shares, and this drops those already made -- only
#: where the store keeps users: a store with none serves another authenticator's principals, whose shares stand.
UNKNOWN_GRANTEES = "files: drop shares to user names that no user holds"
UNKNOWN_GRANTEES_SCHEMA: tuple[str, ...] = (
    "DELETE FROM file_shares WHERE kind = 'user' AND grantee NOT IN (SELECT name FROM users) "
    "AND EXISTS (SELECT 1 FROM users)",
)

#: Migration 20 (both backends): a share to a user goes with the user's row, whoever deletes it. A share that
#: raced ``auth.delete_user`` (recorded after the shares to the name were dropped, before the row went) stayed,
#: and the name's next holder got the file; and the shares such races left are dropped (while users are kept).
USER_SHARES_GO = "files: shares to a user are deleted with the user"
_ORPHANS = (
    "DELETE FROM file_shares WHERE kind = 'user' AND grantee NOT IN (SELECT name FROM users) "
    "AND EXISTS (SELECT 1 FROM users)"
)
USER_SHARES_GO_SQLITE: tuple[str, ...] = (
    """CREATE TRIGGER file_shares_user_delete AFTER DELETE ON users BEGIN
        DELETE FROM file_shares WHERE kind = 'user' AND grantee = OLD.name;
    END""",
    _ORPHANS,
)
USER_SHARES_GO_POSTGRES: tuple[str, ...] = (
    # The table is named in the trigger's own schema (TG_TABLE_SCHEMA), not looked up on the deleting session's
    # search_path: a deletion naming "schema".users from another search_path, or a renamed schema, still works.
    """CREATE FUNCTION file_shares_user_delete() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        EXECUTE format('DELETE FROM %I.file_shares WHERE kind = ''user'' AND grantee = $1', TG_TABLE_SCHEMA)
            USING OLD.name;
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER file_shares_user_delete AFTER DELETE ON users "
    "FOR EACH ROW EXECUTE FUNCTION file_shares_user_delete()",
    _ORPHANS,
)

#: Migration 21 (both backends): each owner's number of files, kept by triggers on ``files`` (whoever writes,
#: older code included) and filled from the files already stored, for ``files.max_files``: a new-file
#: ``begin_upload`` read COUNT(*) of the owner's files inside its write transaction. An owner with no files
#: has no row.
FILE_COUNTS = "files: each owner's number of files, for files.max_files"
FILE_COUNTS_SQLITE: tuple[str, ...] = (
    """CREATE TABLE file_counts (
        owner TEXT PRIMARY KEY,
        files INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TRIGGER file_counts_insert AFTER INSERT ON files BEGIN
        INSERT INTO file_counts (owner, files) VALUES (NEW.owner, 1)
        ON CONFLICT (owner) DO UPDATE SET files = files + 1;
    END""",
    """CREATE TRIGGER file_counts_delete AFTER DELETE ON files BEGIN
        UPDATE file_counts SET files = files - 1 WHERE owner = OLD.owner;
        DELETE FROM file_counts WHERE owner = OLD.owner AND files <= 0;
    END""",
    """CREATE TRIGGER file_counts_move AFTER UPDATE OF owner ON files WHEN OLD.owner <> NEW.owner BEGIN
        UPDATE file_counts SET files = files - 1 WHERE owner = OLD.owner;
        DELETE FROM file_counts WHERE owner = OLD.owner AND files <= 0;
        INSERT INTO file_counts (owner, files) VALUES (NEW.owner, 1)
        ON CONFLICT (owner) DO UPDATE SET files = files + 1;
    END""",
    "INSERT INTO file_counts (owner, files) SELECT owner, count(*) FROM files GROUP BY owner",
)
FILE_COUNTS_POSTGRES: tuple[str, ...] = (
    """CREATE TABLE file_counts (
        owner TEXT COLLATE "C" PRIMARY KEY,
        files BIGINT NOT NULL
    )""",
    # The table is named in the trigger's own schema (TG_TABLE_SCHEMA), not looked up on the writer's
    # search_path: a write naming "schema".files from another search_path, or a schema renamed by a restore,
    # still counts.
    """CREATE FUNCTION file_counts_track() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' AND OLD.owner = NEW.owner THEN
            RETURN NULL;
        END IF;
        IF TG_OP <> 'INSERT' THEN
            EXECUTE format('UPDATE %I.file_counts SET files = files - 1 WHERE owner = $1', TG_TABLE_SCHEMA)
                USING OLD.owner;
            EXECUTE format('DELETE FROM %I.file_counts WHERE owner = $1 AND files <= 0', TG_TABLE_SCHEMA)
                USING OLD.owner;
        END IF;
        IF TG_OP <> 'DELETE' THEN
            EXECUTE format('INSERT INTO %I.file_counts AS c (owner, files) VALUES ($1, 1) '
                'ON CONFLICT (owner) DO UPDATE SET files = c.files + 1', TG_TABLE_SCHEMA)
                USING NEW.owner;
        END IF;
        RETURN NULL;
    END $$""",
    # Created before the backfill: it locks files against writers until the migration commits.
    "CREATE TRIGGER file_counts_track AFTER INSERT OR DELETE OR UPDATE OF owner ON files "
    "FOR EACH ROW EXECUTE FUNCTION file_counts_track()",
    "INSERT INTO file_counts (owner, files) SELECT owner, count(*) FROM files GROUP BY owner",
)
