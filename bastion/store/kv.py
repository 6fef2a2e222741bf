"""The ``kv`` storage domain: its interface and records (the backends: kv_sqlite.py, kv_postgres.py).

Theory of operation
-------------------

Keys live in *namespaces*. A user's personal namespace is ``~<user>``
(``personal_namespace``) and exists implicitly; shared namespaces are rows of
``kv_namespaces`` carrying their access lists. The store does not check
access: the service does, before it calls the store. A put into a shared
namespace checks, in its own transaction, that the namespace still exists
(``NotFound`` otherwise): the service's check came before, and a
``kv_delete_namespace`` committed in between would otherwise leave the put's
keys behind it. It costs one indexed lookup, after the put has the
counter's lock (PostgreSQL) or inside the writer's transaction (SQLite), so a
namespace deletion is wholly before or wholly after it; personal puts skip it.

Revisions, as in etcd. One counter per store (``kv_meta.revision``) counts
every change to every key; each changed key takes the next value, and a
key's ``version`` is the revision of its last change, so versions are unique
across the store and grow with time. Compare-and-swap compares a caller's
``expected_version`` with the key's version (0: the key must not exist) in
the same transaction that writes it; a mismatch raises ``Aborted``.

The change log (``kv_log``) holds one row per change -- ``put`` with the new
value, or ``delete`` (explicit, by namespace deletion, by a user's data being
handed over, or by expiry) -- keyed by revision. It is what ``watch``
replays, and what the service's hub tails to feed live watchers, so
watchers see exactly the committed changes, in revision order, without gaps.
``kv_compact`` trims it to the newest ``keep`` changes (or through a given
revision: the service's byte bound, ``kv.history_bytes``, is counted from
``kv_log_bytes`` and ``kv_log_sizes``) and records the highest revision
removed (``compacted``).

Revision allocation is race-free on both backends because every kv write
reads and advances the counter inside its own transaction: SQLite has one
writer; PostgreSQL takes the counter row ``FOR UPDATE`` first, which
serialises kv writers across replicas, so revisions commit in order and a
rolled-back transaction leaves no gap.

Expiry: a key with ``expires_at <= now`` is invisible to every read at
once; ``kv_expire`` (the service's sweep) deletes such keys and logs each
as a ``delete``. A put over an expired key first logs its expiry.

Usage and quotas. ``kv_usage`` holds each namespace's live keys and bytes
(key, value and content type, in UTF-8 bytes), kept by triggers on
``kv_keys``: every path that changes a key -- a put, a delete, expiry, a
namespace deleted, a user's keys handed over, a restore -- counts itself,
and code that predates the table counts too (the migration is compatible).
A put given a ``KVQuota`` is refused (``ResourceExhausted``, nothing
written) when the namespace would then hold more keys or bytes than it
allows. The check costs one read of the namespace's usage row while the
put plainly fits (every write counted as a new key); only near the limit is
it exact (write, read the row again, undo if over).

Every time is a float UNIX timestamp passed in by the caller (``now``), so
the store has no clock of its own.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Sequence
from typing import Any, NamedTuple

import msgspec

from bastion.exceptions import Aborted, NotFound, ResourceExhausted
from bastion.store._access import Notifying

__all__ = [
    "POSTGRES_SCHEMA",
    "SQLITE_SCHEMA",
    "KVChange",
    "KVEntry",
    "KVNamespace",
    "KVQuota",
    "KVRevisions",
    "KVStore",
    "KVUsage",
    "KVWrite",
    "ValuesTooLarge",
    "personal_namespace",
    "prefix_end",
    "text_bytes",
    "write_bytes",
]

PERSONAL_PREFIX = "~"
PUT, DELETE = "put", "delete"

# Schema migration statements of this domain (its migration version is fixed in migrations.py).
SQLITE_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE kv_namespaces (
        name       TEXT PRIMARY KEY,
        readers    TEXT NOT NULL DEFAULT '[]',      -- JSON array of "user:NAME" / "role:NAME"
        writers    TEXT NOT NULL DEFAULT '[]',
        created_at REAL NOT NULL,
        created_by TEXT NOT NULL DEFAULT ''
    ) WITHOUT ROWID""",
    """CREATE TABLE kv_keys (
        namespace    TEXT NOT NULL,
        key          TEXT NOT NULL,
        value        BLOB NOT NULL,
        content_type TEXT NOT NULL DEFAULT '',
        version      INTEGER NOT NULL,             -- revision of the last change
        expires_at   REAL,
        PRIMARY KEY (namespace, key)
    )""",
    "CREATE INDEX kv_keys_expiry ON kv_keys (expires_at) WHERE expires_at IS NOT NULL",
    """CREATE TABLE kv_log (
        revision     INTEGER PRIMARY KEY,
        namespace    TEXT NOT NULL,
        key          TEXT NOT NULL,
        op           TEXT NOT NULL CHECK (op IN ('put', 'delete')),
        value        BLOB,                          -- the new value of a put
        content_type TEXT NOT NULL DEFAULT '',
        at           REAL NOT NULL
    )""",
    """CREATE TABLE kv_meta (
        id        INTEGER PRIMARY KEY CHECK (id = 1),
        revision  INTEGER NOT NULL,                 -- the latest revision handed out
        compacted INTEGER NOT NULL                  -- log rows up to this revision are gone
    )""",
    "INSERT INTO kv_meta (id, revision, compacted) VALUES (1, 0, 0)",
)
POSTGRES_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE kv_namespaces (
        name       TEXT COLLATE "C" PRIMARY KEY,
        readers    TEXT NOT NULL DEFAULT '[]',
        writers    TEXT NOT NULL DEFAULT '[]',
        created_at DOUBLE PRECISION NOT NULL,
        created_by TEXT NOT NULL DEFAULT ''
    )""",
    """CREATE TABLE kv_keys (
        namespace    TEXT COLLATE "C" NOT NULL,
        key          TEXT COLLATE "C" NOT NULL,    -- byte order, as SQLite: prefix ranges and cursors agree
        value        BYTEA NOT NULL,
        content_type TEXT NOT NULL DEFAULT '',
        version      BIGINT NOT NULL,
        expires_at   DOUBLE PRECISION,
        PRIMARY KEY (namespace, key)
    )""",
    "CREATE INDEX kv_keys_expiry ON kv_keys (expires_at) WHERE expires_at IS NOT NULL",
    """CREATE TABLE kv_log (
        revision     BIGINT PRIMARY KEY,
        namespace    TEXT COLLATE "C" NOT NULL,
        key          TEXT COLLATE "C" NOT NULL,
        op           TEXT NOT NULL CHECK (op IN ('put', 'delete')),
        value        BYTEA,
        content_type TEXT NOT NULL DEFAULT '',
        at           DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE kv_meta (
        id        INTEGER PRIMARY KEY CHECK (id = 1),
        revision  BIGINT NOT NULL,
        compacted BIGINT NOT NULL
    )""",
    "INSERT INTO kv_meta (id, revision, compacted) VALUES (1, 0, 0)",
    # Tell the other replicas' watch feeds (Store.listen("kv")) that the log grew; delivered
    # at commit, once per transaction, with the schema as payload.
    """CREATE FUNCTION kv_log_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('bastion_kv', current_schema());
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER kv_log_notify AFTER INSERT ON kv_log FOR EACH STATEMENT EXECUTE FUNCTION kv_log_notify()",
)


# Migration 10: each namespace's usage, kept by triggers (see "Usage and quotas" above).
_SQLITE_ROW_BYTES = "length(CAST({0}.key AS BLOB)) + length({0}.value) + length(CAST({0}.content_type AS BLOB))"
SQLITE_USAGE_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE kv_usage (
        namespace TEXT PRIMARY KEY,
        keys      INTEGER NOT NULL,                 -- live keys (and expired ones not yet swept)
        bytes     INTEGER NOT NULL                  -- their keys, values and content types, UTF-8 bytes
    ) WITHOUT ROWID""",
    f"""CREATE TRIGGER kv_usage_insert AFTER INSERT ON kv_keys BEGIN
        INSERT INTO kv_usage (namespace, keys, bytes) VALUES (NEW.namespace, 1, {_SQLITE_ROW_BYTES.format("NEW")})
        ON CONFLICT (namespace) DO UPDATE SET keys = keys + 1, bytes = bytes + excluded.bytes;
    END""",
    # Every put over a live key comes here: the key is the same (the upsert's conflict target), and
    # only a content type that changed is measured again (a CAST to BLOB copies the text).
    """CREATE TRIGGER kv_usage_update AFTER UPDATE ON kv_keys
        WHEN OLD.namespace = NEW.namespace AND OLD.key = NEW.key BEGIN
        UPDATE kv_usage SET bytes = bytes + length(NEW.value) - length(OLD.value)
            + CASE WHEN NEW.content_type = OLD.content_type THEN 0
                   ELSE length(CAST(NEW.content_type AS BLOB)) - length(CAST(OLD.content_type AS BLOB)) END
        WHERE namespace = NEW.namespace;
    END""",
    f"""CREATE TRIGGER kv_usage_move AFTER UPDATE ON kv_keys
        WHEN OLD.namespace <> NEW.namespace OR OLD.key <> NEW.key BEGIN
        UPDATE kv_usage SET keys = keys - 1, bytes = bytes - ({_SQLITE_ROW_BYTES.format("OLD")})
        WHERE namespace = OLD.namespace;
        INSERT INTO kv_usage (namespace, keys, bytes) VALUES (NEW.namespace, 1, {_SQLITE_ROW_BYTES.format("NEW")})
        ON CONFLICT (namespace) DO UPDATE SET keys = keys + 1, bytes = bytes + excluded.bytes;
    END""",
    f"""CREATE TRIGGER kv_usage_delete AFTER DELETE ON kv_keys BEGIN
        UPDATE kv_usage SET keys = keys - 1, bytes = bytes - ({_SQLITE_ROW_BYTES.format("OLD")})
        WHERE namespace = OLD.namespace;
    END""",
    f"""INSERT INTO kv_usage (namespace, keys, bytes)
        SELECT namespace, count(*), sum({_SQLITE_ROW_BYTES.format("kv_keys")}) FROM kv_keys GROUP BY namespace""",
)
_PG_ROW_BYTES = "octet_length({0}.key) + octet_length({0}.value) + octet_length({0}.content_type)"
POSTGRES_USAGE_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE kv_usage (
        namespace TEXT COLLATE "C" PRIMARY KEY,
        keys      BIGINT NOT NULL,
        bytes     BIGINT NOT NULL
    )""",
    f"""CREATE FUNCTION kv_usage_track() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' AND OLD.namespace = NEW.namespace AND OLD.key = NEW.key THEN
            UPDATE kv_usage SET bytes = bytes + octet_length(NEW.value) - octet_length(OLD.value)
                + octet_length(NEW.content_type) - octet_length(OLD.content_type)
            WHERE namespace = NEW.namespace;
            RETURN NULL;
        END IF;
        IF TG_OP <> 'INSERT' THEN
            UPDATE kv_usage SET keys = keys - 1, bytes = bytes - ({_PG_ROW_BYTES.format("OLD")})
            WHERE namespace = OLD.namespace;
        END IF;
        IF TG_OP <> 'DELETE' THEN
            INSERT INTO kv_usage (namespace, keys, bytes) VALUES (NEW.namespace, 1, {_PG_ROW_BYTES.format("NEW")})
            ON CONFLICT (namespace) DO UPDATE SET keys = kv_usage.keys + 1, bytes = kv_usage.bytes + excluded.bytes;
        END IF;
        RETURN NULL;
    END $$""",
    # Created before the backfill: it locks kv_keys against writers until the migration commits.
    "CREATE TRIGGER kv_usage_track AFTER INSERT OR UPDATE OR DELETE ON kv_keys "
    "FOR EACH ROW EXECUTE FUNCTION kv_usage_track()",
    f"""INSERT INTO kv_usage (namespace, keys, bytes)
        SELECT namespace, count(*), sum({_PG_ROW_BYTES.format("kv_keys")}) FROM kv_keys GROUP BY namespace""",
)


def personal_namespace(user: str) -> str:
    """The name of ``user``'s personal namespace."""
    return PERSONAL_PREFIX + user


def prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix`` (None: no bound)."""
    chars = list(prefix)
    while chars:
        code = ord(chars.pop()) + 1
        if 0xD800 <= code <= 0xDFFF:  # surrogates cannot be stored: skip past them
            code = 0xE000
        if code <= 0x10FFFF:
            return "".join(chars) + chr(code)
    return None


# -- records --------------------------------------------------------------------------------


class KVEntry(msgspec.Struct, frozen=True):
    """A live key: its value and the revision of its last change."""

    key: str
    value: bytes
    version: int
    content_type: str = ""
    expires_at: float | None = None


class KVWrite(msgspec.Struct, frozen=True):
    """One key to put. ``expected_version``: None (any), 0 (must not exist) or the current version."""

    key: str
    value: bytes
    content_type: str = ""
    expected_version: int | None = None
    expires_at: float | None = None


class KVChange(msgspec.Struct, frozen=True):
    """One row of the change log. ``value`` is None for a delete."""

    revision: int
    namespace: str
    key: str
    op: str
    value: bytes | None
    content_type: str
    at: float


class KVNamespace(msgspec.Struct, frozen=True):
    """A shared namespace and its access lists ("user:NAME" or "role:NAME" entries)."""

    name: str
    readers: list[str] = []
    writers: list[str] = []
    created_at: float = 0.0
    created_by: str = ""


class KVQuota(NamedTuple):
    """The most keys and bytes (keys, values and content types, UTF-8) one namespace may hold."""

    keys: int
    bytes: int


class KVUsage(NamedTuple):
    """What one namespace holds: live keys (and expired ones the sweep has not removed yet), and their bytes."""

    keys: int
    bytes: int


def usage_of(row: Any) -> KVUsage:
    """A ``kv_usage`` row (keys, bytes) as ``KVUsage``; None (nothing stored yet) as zeros."""
    return KVUsage(0, 0) if row is None else KVUsage(int(row[0]), int(row[1]))


def text_bytes(text: str) -> int:
    """The UTF-8 bytes of ``text`` (a lone surrogate counted as three)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def write_bytes(w: KVWrite) -> int:
    """The bytes ``w`` counts toward its namespace's usage once written."""
    return text_bytes(w.key) + len(w.value) + text_bytes(w.content_type)


def quota_error(namespace: str, usage: KVUsage, quota: KVQuota) -> ResourceExhausted:
    return ResourceExhausted(
        f"namespace {namespace!r} is full: this write would leave it {usage.keys} keys and {usage.bytes} bytes, "
        f"over its quota of {quota.keys} keys (kv.quota_keys) or {quota.bytes} bytes (kv.quota_bytes); "
        "delete some keys first",
        details={"namespace": namespace, "keys": usage.keys, "bytes": usage.bytes,
                 "quota_keys": quota.keys, "quota_bytes": quota.bytes},
    )  # fmt: skip


def over_quota(usage: KVUsage, quota: KVQuota) -> bool:
    return usage.keys > quota.keys or usage.bytes > quota.bytes


class ValuesTooLarge(Exception):
    """The values ``kv_get_many`` was asked for come to ``total`` bytes, more than its ``max_bytes``."""

    def __init__(self, total: int) -> None:
        super().__init__(f"the values come to {total} bytes")
        self.total = total


class KVRevisions(msgspec.Struct, frozen=True):
    """``current``: the latest revision (0: no change yet); log rows up to ``compacted`` are gone."""

    current: int
    compacted: int


def _mismatch(key: str, expected: int, actual: int) -> Aborted:
    found = f"version {actual}" if actual else "no such key"
    want = "no such key" if expected == 0 else f"version {expected}"
    return Aborted(
        f"compare-and-swap failed on {key!r}: expected {want}, found {found}",
        details={"key": key, "expected_version": expected, "version": actual},
    )


#: Whether a shared namespace exists (its primary key), asked by a put in its own transaction.
NAMESPACE_EXISTS = "SELECT 1 FROM kv_namespaces WHERE name = {}"


def no_namespace(namespace: str) -> NotFound:
    return NotFound(f"no namespace {namespace!r}: it was deleted, or never created")


#: Whether user ``{0}`` -- a personal namespace's owner -- may hold keys: it has a row, or the store keeps no
#: users at all (the server's principals come from another authenticator), asked by a write in its own
#: transaction (SQLite; PostgreSQL asks it after the user's advisory lock, with "keeps no users" as the lock's
#: statement read it before any wait: ``_access.USER_LOCK_SHARED_KEPT``, kv_postgres.py ``_check_owner``).
OWNER_EXISTS = "SELECT 1 WHERE EXISTS (SELECT 1 FROM users WHERE name = {0}) OR NOT EXISTS (SELECT 1 FROM users)"


def no_owner(owner: str) -> NotFound:
    """The store's refusal of a write to ``~owner`` with no user ``owner``: the user's own write, its row
    deleted while it was still connected (an admin's is refused by the service, in its words)."""
    return NotFound(f"no user {owner!r}: deleted, so ~{owner} takes no more writes")


def check_version(key: str, expected: int | None, actual: int) -> None:
    if expected is not None and expected != actual:
        raise _mismatch(key, expected, actual)


# -- the interface --------------------------------------------------------------------------


class KVStore(Notifying, ABC):
    """What every backend offers for kv. Every write is one transaction; see the module docstring."""

    #: False: a write to a personal namespace ``~NAME`` is refused (``no_owner``, in its own transaction)
    #: while the store keeps users and none is NAME, so none lands after ``auth.delete_user``; ``bastion
    #: serve`` sets it so, its principals all being users (unless ``tls.client_subjects = "any"``).
    #: True (default, for embedders): not checked, as principals with no user row -- ``bastion.testing``'s,
    #: ``StaticTokens``', a custom authenticator's -- own their ``~NAME`` too. Set False where every
    #: principal writing ``~NAME`` is user NAME (the store's own authenticator).
    userless_owners: bool = True

    @abstractmethod
    def kv_get_many(
        self, namespace: str, keys: Sequence[str], now: float, max_bytes: int | None = None
    ) -> Awaitable[list[KVEntry | None]]:
        """The live entry of each key (None: absent or expired), in the order asked.

        ``ValuesTooLarge`` if their values come to more than ``max_bytes``: measured (in the same
        statement) before any value is read, and then none is. (An awaitable, as ``kv_put``: SQLite
        hands back its read's future for one key without ``max_bytes``, kv.get's read.)
        """

    @abstractmethod
    def kv_put(
        self, namespace: str, writes: Sequence[KVWrite], now: float, quota: KVQuota | None = None
    ) -> Awaitable[list[int]]:
        """Put every write atomically (all or none); the new version of each.

        A compare-and-swap mismatch raises ``Aborted`` and writes nothing; so
        does ``ResourceExhausted`` when, with ``quota``, the namespace would
        then hold more than it allows, and ``NotFound`` when ``namespace`` is
        a shared one that does not exist (any more), or a personal one whose
        user does not (see ``userless_owners``; so is ``kv_delete``). (An awaitable rather than a coroutine,
        so SQLite can hand back its queued write's future; PostgreSQL's is a
        coroutine.)
        """

    @abstractmethod
    async def kv_usage(self, namespace: str) -> KVUsage:
        """What ``namespace`` holds (zeros for one that holds nothing)."""

    @abstractmethod
    async def kv_delete(self, namespace: str, key: str, expected_version: int | None, now: float) -> int:
        """Delete ``key``; the revision of the delete, 0 if there was no live key (and none was expected).

        ``expected_version`` as for ``KVWrite``; a mismatch raises ``Aborted``.
        """

    @abstractmethod
    async def kv_list(
        self,
        namespace: str,
        prefix: str,
        after: str | None,
        limit: int,
        now: float,
        max_bytes: int | None = None,
        keys_only: bool = False,
    ) -> list[KVEntry]:
        """Live entries whose key starts with ``prefix`` and sorts after ``after``, by key (bytewise).

        ``max_bytes`` bounds the values read: once the entries' values come to more than it, one
        more entry follows with an empty value (it says only that more keys follow), and no other.
        ``keys_only``: every value empty, none read.
        """

    @abstractmethod
    async def kv_revisions(self) -> KVRevisions: ...

    @abstractmethod
    async def kv_changes(
        self, after: int, upto: int | None, limit: int, namespace: str | None = None, prefix: str = ""
    ) -> list[KVChange]:
        """Logged changes with ``after < revision <= upto`` (no upper bound: None), by revision."""

    @abstractmethod
    async def kv_expire(self, now: float, limit: int) -> int:
        """Delete up to ``limit`` keys expired at ``now``, logging each; how many."""

    @abstractmethod
    async def kv_compact(self, keep: int | None = None, through: int = 0) -> int:
        """Trim the change log to its newest ``keep`` changes, or (``keep`` None) through revision
        ``through``; how many were removed."""

    @abstractmethod
    async def kv_log_bytes(self, after: int, upto: int) -> int:
        """The bytes (``LOG_ENTRY_BYTES``) of the logged changes after revision ``after`` up to ``upto``."""

    @abstractmethod
    async def kv_log_sizes(self, after: int, limit: int) -> list[tuple[int, int]]:
        """The oldest ``limit`` logged changes after revision ``after``: (revision, bytes), oldest first."""

    @abstractmethod
    async def kv_create_namespace(self, namespace: KVNamespace) -> bool:
        """Insert; False if the name is taken."""

    @abstractmethod
    async def kv_get_namespace(self, name: str) -> KVNamespace | None: ...

    @abstractmethod
    async def kv_update_namespace(self, name: str, readers: list[str], writers: list[str]) -> KVNamespace | None:
        """Replace the access lists; the updated record, None if there is no such namespace."""

    @abstractmethod
    async def kv_delete_namespace(self, name: str, now: float) -> int | None:
        """Delete the namespace and every key in it (each logged); keys deleted, None if unknown."""

    @abstractmethod
    async def kv_list_namespaces(self) -> list[KVNamespace]:
        """Every shared namespace, by name."""

    @abstractmethod
    async def kv_reassign_owner(self, old: str, new: str | None) -> int:
        """Hand user ``old``'s data to ``new`` (or delete it when None); items changed.

        Keys of ``~old`` move to ``~new`` under ``from-<old>/`` (replacing any
        key already there), each move logged as a delete and a put; access
        list entries ``user:old`` become ``user:new`` (or are dropped).
        Repeating it after an interruption finishes the job.
        """


def heir_key(old: str, key: str) -> str:
    return f"from-{old}/{key}"


def acl_replace(entries: list[str], old: str, new: str | None) -> list[str]:
    gone = f"user:{old}"
    out = [e for e in entries if e != gone]
    if new is not None and len(out) != len(entries) and f"user:{new}" not in out:
        out.append(f"user:{new}")
    return sorted(out)


# -- rows, as both backends read them -------------------------------------------------------

ENTRY_COLUMNS = "key, value, version, content_type, expires_at"
LOG_COLUMNS = "revision, namespace, key, op, value, content_type, at"
#: A logged change's size, as the byte bound on the change log counts it: its key, value and
#: content type, in bytes (SQLite's length() counts a text's characters, PostgreSQL's its bytes).
LOG_ENTRY_BYTES = {
    "sqlite": "length(CAST(key AS BLOB)) + ifnull(length(value), 0) + length(CAST(content_type AS BLOB))",
    "postgresql": "octet_length(key) + coalesce(octet_length(value), 0) + octet_length(content_type)",
}


def entries_within(rows: Sequence[tuple[Any, ...]], max_bytes: int) -> list[KVEntry]:
    """The rows of a ``kv_get_many`` with ``max_bytes`` (entry columns, then the values' total), as entries;
    ``ValuesTooLarge`` if that total is over ``max_bytes`` (then no row holds its value)."""
    if rows and int(rows[0][5]) > max_bytes:
        raise ValuesTooLarge(int(rows[0][5]))
    return [entry_of(tuple(row[:5])) for row in rows]


def entry_of(row: tuple[Any, ...]) -> KVEntry:
    key, value, version, content_type, expires_at = row
    return KVEntry(key, bytes(value), int(version), content_type, expires_at)


def change_of(row: tuple[Any, ...]) -> KVChange:
    revision, namespace, key, op, value, content_type, at = row
    return KVChange(int(revision), namespace, key, op, None if value is None else bytes(value), content_type, at)


def namespace_of(row: tuple[Any, ...]) -> KVNamespace:
    name, readers, writers, created_at, created_by = row
    return KVNamespace(name, json.loads(readers), json.loads(writers), float(created_at), created_by)


def key_range(prefix: str, after: str | None) -> tuple[str, str, list[Any]]:
    """SQL conditions (``?`` placeholders) for keys starting with ``prefix`` and after ``after``."""
    low = prefix if after is None or after < prefix else after
    op = ">" if after is not None and after >= prefix else ">="
    end = prefix_end(prefix)
    if end is None:
        return f"key {op} ?", "", [low]
    return f"key {op} ?", "AND key < ?", [low, end]
