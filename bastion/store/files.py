"""The ``files`` storage domain: its interface and records (the backends: files_sqlite.py, files_postgres.py).

Theory of operation
-------------------

The store keeps only metadata; file contents live on disk beside it (the
``files`` service owns that directory). Four tables:

``files``
    one row per file: a random id, its owner, a per-owner path ``name``
    (unique per owner), size, and the ``sha256`` of its contents, which names
    the immutable blob ``<files dir>/blobs/<sha256[:2]>/<sha256>``. Two files
    with the same contents share one blob.
``file_shares``
    grants on one file to a user or a role, ``read`` or ``write``; deleted
    with the file.
``file_uploads``
    uploads in progress: who is charged for them (the owner of the file
    being made or replaced), who may continue them (the uploader), the
    declared size and SHA-256, and what they will become (a new name, or a
    file whose contents they replace). An upload's reserved size counts
    toward its owner's quota until it is committed or discarded.
``file_blobs``
    one row per blob on disk, and the bookkeeping that lets blobs be deleted
    *late*: ``unreferenced_since`` is set when the last file naming a blob
    goes, and the sweep deletes a blob only once that is older than a grace
    period, so a backup that read the ``files`` table a moment ago still
    finds every blob it names.

Blob life cycle, safe against a sweep running concurrently (even on another
replica): a commit first *pins* the blob row (``files_pin_blob``: live, not
unreferenced, pinned for ten minutes), then moves the verified contents into
place, then commits the file row (``files_commit_upload``). The sweep
(``files_claim_blobs``) claims only rows that are unreferenced past the
grace period and not pinned, by flipping them to ``deleting`` with its own
claim token; it unlinks their blobs and then drops the rows
(``files_forget_blobs``). A pin refuses a row in ``deleting`` (the caller
waits for the sweep to finish), so a blob being put in place is never the
one being unlinked. A claim left by a crashed sweep is taken over after ten
minutes.

Quotas: ``files_begin_upload`` checks and reserves in one transaction (on
PostgreSQL under an advisory lock per owner, then one per uploader), so
concurrent uploads cannot together exceed a quota, nor an uploader's bounds
(uploads open, bytes reserved in another user's quota). ``file_counts``
(migration 21, bastion/store/files_schema.py) holds each owner's number of
files, kept by triggers on ``files``, so ``max_files`` costs one row read
however many files the owner has. Files handed to an heir
(``files_reassign_owner``) are counted but not checked: the heir may end up
over ``max_files`` (and its quota).

The SQL is written once, with PostgreSQL's ``$n`` placeholders; SQLite reads
the same statements with ``?n``.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import msgspec

from bastion.exceptions import Aborted, NotFound, PermissionDenied, ResourceExhausted
from bastion.store.files_schema import POSTGRES_SCHEMA, SQLITE_SCHEMA

__all__ = [
    "MAX_NAME_BYTES",
    "POSTGRES_SCHEMA",
    "SQLITE_SCHEMA",
    "FileRecord",
    "FileShare",
    "FileStore",
    "UploadRecord",
]

#: The longest file name, in UTF-8 bytes (the service's rule, bastion/services/files_records.py; a name
#: handed to an heir is shortened to fit).
MAX_NAME_BYTES = 1024
#: Seconds a pin keeps a blob from the sweep while a commit moves it into place.
PIN_SECONDS = 600.0
#: Seconds after which a sweep's unfinished claim (it crashed) may be taken over.
CLAIM_SECONDS = 600.0


class FileRecord(msgspec.Struct, frozen=True):
    """A finished file."""

    id: str
    owner: str
    name: str
    size: int
    sha256: str
    created_at: float
    updated_at: float


class FileShare(msgspec.Struct, frozen=True):
    """A grant on one file: ``kind`` is "user" or "role", ``mode`` "read" or "write"."""

    file_id: str
    kind: str
    grantee: str
    mode: str
    created_at: float


class UploadRecord(msgspec.Struct, frozen=True):
    """An upload in progress.

    ``owner`` is charged for it (and will own the result); ``uploader`` may
    continue it. ``file_id`` is the file whose contents it replaces (None: it
    creates ``name``; with ``overwrite``, an existing ``name`` of the owner
    gets the new contents). ``expected_sha256``: replace only contents with
    this SHA-256 (compare-and-swap; checked at begin and again at commit).
    """

    id: str
    owner: str
    uploader: str
    name: str
    size: int
    sha256: str
    file_id: str | None
    overwrite: bool
    created_at: float
    updated_at: float
    expected_sha256: str | None = None


class FileStore(ABC):
    """What every backend offers for files (metadata only; contents are the service's)."""

    #: As ``KVStore.userless_owners``: False (``bastion serve``), an upload begins only while its owner and
    #: its uploader have user rows (if the store keeps users); True (default) where principals with no user
    #: row own files, as an embedder's may.
    userless_owners: bool = True

    @abstractmethod
    async def files_get(self, file_id: str) -> FileRecord | None: ...

    @abstractmethod
    async def files_get_by_name(self, owner: str, name: str) -> FileRecord | None: ...

    @abstractmethod
    async def files_list(
        self,
        *,
        viewer: str | None,
        roles: frozenset[str] = frozenset(),
        owner: str | None = None,
        prefix: str = "",
        after: tuple[str, str] | None = None,
        limit: int = 100,
    ) -> list[FileRecord]:
        """Files ordered by ``(owner, name)``, after ``after`` (an ``(owner, name)`` key).

        ``viewer``: only files it owns or that are shared with it (as a user or
        through one of ``roles``); None: every file. ``owner``: only that owner's.
        ``prefix``: only names starting with it.
        """

    @abstractmethod
    async def files_usage(self, owner: str) -> tuple[int, int]:
        """Bytes ``owner`` holds: (finished files, reserved by open uploads)."""

    @abstractmethod
    async def files_count(self, owner: str) -> int:
        """How many files ``owner`` has (kept by triggers: one row read)."""

    @abstractmethod
    async def files_delete(self, file_id: str, at: float) -> FileRecord | None:
        """Delete a file and its shares; its blob becomes unreferenced if no file names it. The deleted record."""

    @abstractmethod
    async def files_rename(self, file_id: str, name: str, at: float) -> FileRecord:
        """Rename within the owner's names; ``NotFound``, or ``AlreadyExists`` if the name is taken."""

    # -- shares ---------------------------------------------------------------------------

    @abstractmethod
    async def files_share(self, share: FileShare) -> None:
        """Add or replace the grant of ``(file_id, kind, grantee)``; ``NotFound`` for an unknown file, or for
        a user grantee without a user row while the store keeps any users (checked in the same statement;
        deleting a user row deletes the shares to its name). A read grant is ordered with a grantee's
        ``files_commit_upload`` as ``files_unshare`` is."""

    @abstractmethod
    async def files_unshare(self, file_id: str, kind: str, grantee: str) -> bool:
        """Withdraw the grant of ``(file_id, kind, grantee)``; whether there was one. Ordered with a grantee's
        ``files_commit_upload`` (as ``files_share`` making a grant read-only is): a commit that read the grant
        lands before the withdrawal is answered, and one after it reads the grant gone."""

    @abstractmethod
    async def files_shares(self, file_id: str) -> list[FileShare]:
        """The grants on a file, by ``(kind, grantee)``."""

    # -- uploads --------------------------------------------------------------------------

    @abstractmethod
    async def files_begin_upload(
        self,
        upload: UploadRecord,
        quota: int,
        *,
        max_open: int | None = None,
        max_grantee: int | None = None,
        max_files: int | None = None,
    ) -> None:
        """Record an upload, reserving ``upload.size`` of its owner's ``quota``.

        ``ResourceExhausted`` if finished files plus open uploads plus this one
        would exceed ``quota``, if its uploader already has ``max_open`` uploads
        open, or if it is charged to someone other than its uploader and the
        uploader's open uploads charged to that owner would then reserve more
        than ``max_grantee`` bytes, or if it may make a new file (it replaces
        none that exists now) and the owner's files plus open uploads that may
        make new ones already number ``max_files``; ``AlreadyExists`` if it creates a name the owner
        already has (and ``overwrite`` is false); ``NotFound`` if the file it
        replaces does not exist, or if its owner or uploader has no user row
        (see ``userless_owners``); ``Aborted`` if its ``expected_sha256`` is not
        the contents of the file it replaces (or there is no such file).
        """

    @abstractmethod
    async def files_get_upload(self, upload_id: str) -> UploadRecord | None: ...

    @abstractmethod
    async def files_list_uploads(self, uploader: str | None, *, charged: bool = False) -> list[UploadRecord]:
        """Open uploads of ``uploader`` (every one if None), oldest first; ``charged``: also the uploads
        charged to ``uploader``'s quota (others' new contents for its files)."""

    @abstractmethod
    async def files_page_uploads(self, user: str, after: tuple[float, str] | None, limit: int) -> list[UploadRecord]:
        """Up to ``limit`` of the open uploads ``user`` began or is charged for, oldest first (by
        ``(created_at, id)``), after ``after`` (a ``(created_at, id)`` key)."""

    @abstractmethod
    async def files_touch_upload(self, upload_id: str, at: float) -> bool:
        """Mark an upload active at ``at`` (it expires ``upload_ttl`` after its last activity)."""

    @abstractmethod
    async def files_delete_upload(self, upload_id: str) -> bool: ...

    @abstractmethod
    async def files_expire_uploads(self, before: float) -> list[str]:
        """Delete uploads last active before ``before``; their ids."""

    @abstractmethod
    async def files_commit_upload(
        self, upload_id: str, new_id: str, at: float, *, grantee_roles: frozenset[str] | None = None
    ) -> FileRecord:
        """Turn a finished upload into a file, in one transaction, and drop the upload.

        A new file gets id ``new_id``; a replacement (``file_id``, or an
        overwritten name) keeps its id, shares and ``created_at``, and the
        blob it named may become unreferenced. The blob must have been pinned
        (``files_pin_blob``) and put in place first. ``NotFound`` if the
        upload or the file it replaces is gone; ``AlreadyExists`` if its name
        was taken meanwhile; ``Aborted`` (nothing changed) if the file it
        replaces no longer has the ``expected_sha256`` contents.

        ``grantee_roles``: the uploader writes the file it replaces through a
        share (it is neither the owner nor an admin), holding these roles; the
        commit reads the file's shares in its own transaction and goes ahead
        only while one, ``write``, names the uploader or one of the roles:
        ``NotFound`` (``PermissionDenied`` if a read share remains), nothing
        changed, if the share was withdrawn since the caller checked.
        """

    # -- blobs ----------------------------------------------------------------------------

    @abstractmethod
    async def files_pin_blob(self, sha256: str, size: int, at: float) -> bool:
        """Keep blob ``sha256`` from the sweep while a commit puts it in place.

        False if a sweep is deleting it right now (wait and try again).
        """

    @abstractmethod
    async def files_claim_blobs(self, now: float, grace: float, token: str, limit: int = 1000) -> list[str]:
        """For the sweep: mark newly unreferenced blobs, then claim (as ``token``) those
        unreferenced for more than ``grace`` seconds and not pinned; their SHA-256s."""

    @abstractmethod
    async def files_forget_blobs(self, token: str, sha256s: list[str]) -> int:
        """Drop the rows of claimed blobs the sweep has unlinked."""

    @abstractmethod
    async def files_blob_referenced(self, sha256: str) -> bool:
        """Whether a file names ``sha256`` or its blob row is live."""

    # -- users ----------------------------------------------------------------------------

    @abstractmethod
    async def files_reassign_owner(self, old: str, new: str | None) -> int:
        """Hand every file of ``old`` to ``new`` (delete them if None); the number of files changed.

        Uploads of ``old`` are dropped, shares granted to the user ``old``
        removed, and the shares ``old`` made of its files withdrawn (they do
        not follow the files to ``new``) either way. A handed-over name that
        ``new`` already uses becomes ``<name>~<file id>`` (``~2``, ``~3``... after that, if taken too; the
        name's start shortened to keep it within ``MAX_NAME_BYTES``).
        """


# -- SQL shared by both dialects ($n placeholders; SQLite reads them as ?n) ----------------

_FILE_COLUMNS = "id, owner, name, size, sha256, created_at, updated_at"
_SHARE_COLUMNS = "file_id, kind, grantee, mode, created_at"
_UPLOAD_COLUMNS = "id, owner, uploader, name, size, sha256, file_id, overwrite, created_at, updated_at, expected_sha256"

_GET = f"SELECT {_FILE_COLUMNS} FROM files WHERE id = $1"
_GET_BY_NAME = f"SELECT {_FILE_COLUMNS} FROM files WHERE owner = $1 AND name = $2"
_USAGE_FILES = "SELECT COALESCE(SUM(size), 0) FROM files WHERE owner = $1"
_USAGE_UPLOADS = "SELECT COALESCE(SUM(size), 0) FROM file_uploads WHERE owner = $1"
_DELETE = f"DELETE FROM files WHERE id = $1 RETURNING {_FILE_COLUMNS}"
_RENAME = f"UPDATE files SET name = $2, updated_at = $3 WHERE id = $1 RETURNING {_FILE_COLUMNS}"
# A share to a user is recorded only if the user's row is there (or no users are kept at all: the server's
# principals come from another authenticator), in the same statement: a share racing auth.delete_user either
# lands before the row goes (and migration 20's trigger deletes it with the row) or not at all. PostgreSQL
# runs it after taking the grantee's advisory lock shared (_access.USER_LOCK_SHARED_KEPT; delete_user takes it
# exclusive), in a statement of its own, so the delete waits for the share, and the share for the delete; and
# whether users are kept is what the lock's statement read ($6), before any wait: a share to the last user,
# waiting for its deletion, would otherwise find no users at all and pass.
_SHARE_IF = (
    f"INSERT INTO file_shares ({_SHARE_COLUMNS}) SELECT CAST($1 AS TEXT), CAST($2 AS TEXT), CAST($3 AS TEXT), "
    "CAST($4 AS TEXT), CAST($5 AS DOUBLE PRECISION) WHERE $2 <> 'user' "
    "OR EXISTS (SELECT 1 FROM users WHERE name = $3) OR @NO_USERS "
    "ON CONFLICT (file_id, kind, grantee) DO UPDATE SET mode = excluded.mode, created_at = excluded.created_at"
)
_SHARE = _SHARE_IF.replace("@NO_USERS", "NOT EXISTS (SELECT 1 FROM users)")
_SHARE_PG = _SHARE_IF.replace("@NO_USERS", "NOT CAST($6 AS BOOLEAN)")
# Whether $1 has a user row (or no users are kept), asked by files_begin_upload in its transaction: an
# upload begun after auth.delete_user's passes (which drop the user's uploads) would make a file of nobody.
# PostgreSQL asks it after taking the user's advisory lock (_access.USER_LOCK_SHARED_KEPT), held to the commit,
# with whether users are kept as the lock's statement read it ($2), before any wait (see _SHARE_IF).
_USER_ROW_IF = "SELECT 1 WHERE EXISTS (SELECT 1 FROM users WHERE name = $1) OR @NO_USERS"
_USER_ROW = _USER_ROW_IF.replace("@NO_USERS", "NOT EXISTS (SELECT 1 FROM users)")
_USER_ROW_PG = _USER_ROW_IF.replace("@NO_USERS", "NOT CAST($2 AS BOOLEAN)")
_UNSHARE = "DELETE FROM file_shares WHERE file_id = $1 AND kind = $2 AND grantee = $3"
_SHARES = f"SELECT {_SHARE_COLUMNS} FROM file_shares WHERE file_id = $1 ORDER BY kind, grantee"
_INSERT_UPLOAD = f"INSERT INTO file_uploads ({_UPLOAD_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
_GET_UPLOAD = f"SELECT {_UPLOAD_COLUMNS} FROM file_uploads WHERE id = $1"
_OPEN_UPLOADS_OF = "SELECT COUNT(*) FROM file_uploads WHERE uploader = $1"
# An owner's files (migration 21's count: one row) and the open uploads that may make new ones (an overwrite
# may: its name can go meanwhile; at most files.max_open_uploads, the owner's own).
_FILES_OF = "SELECT COALESCE((SELECT files FROM file_counts WHERE owner = $1), 0)"
_FILE_COUNT = f"SELECT ({_FILES_OF}) + (SELECT COUNT(*) FROM file_uploads WHERE owner = $1 AND file_id IS NULL)"
_RESERVED_BY = "SELECT COALESCE(SUM(size), 0) FROM file_uploads WHERE owner = $1 AND uploader = $2"
_UPLOADS_OF = f"SELECT {_UPLOAD_COLUMNS} FROM file_uploads WHERE uploader = $1 ORDER BY created_at, id"
_UPLOADS_CHARGED = (
    f"SELECT {_UPLOAD_COLUMNS} FROM file_uploads WHERE uploader = $1 OR owner = $1 ORDER BY created_at, id"
)
_UPLOADS_ALL = f"SELECT {_UPLOAD_COLUMNS} FROM file_uploads ORDER BY created_at, id"
_UPLOADS_PAGE = (
    f"SELECT {_UPLOAD_COLUMNS} FROM file_uploads WHERE (uploader = $1 OR owner = $1) "
    "AND (created_at, id) > (CAST($2 AS DOUBLE PRECISION), CAST($3 AS TEXT)) ORDER BY created_at, id LIMIT $4"
)
_TOUCH_UPLOAD = "UPDATE file_uploads SET updated_at = $2 WHERE id = $1"
_DELETE_UPLOAD = "DELETE FROM file_uploads WHERE id = $1"
_EXPIRE_UPLOADS = "DELETE FROM file_uploads WHERE updated_at < $1 RETURNING id"
_INSERT_FILE = f"INSERT INTO files ({_FILE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING"
_REPLACE_CONTENTS = f"UPDATE files SET size = $2, sha256 = $3, updated_at = $4 WHERE id = $1 RETURNING {_FILE_COLUMNS}"
# The blob of a file is referenced again (a commit, or a file handed over).
_BLOB_REFERENCED = "UPDATE file_blobs SET unreferenced_since = NULL WHERE sha256 = $1"
# After a file went or changed contents: its old blob is unreferenced from now if no file names it.
_BLOB_RELEASED = (
    "UPDATE file_blobs SET unreferenced_since = $2 WHERE sha256 = $1 AND state = 'live' "
    "AND NOT EXISTS (SELECT 1 FROM files WHERE files.sha256 = file_blobs.sha256)"
)
_PIN = (
    "INSERT INTO file_blobs (sha256, size, state, unreferenced_since, pinned_until) VALUES ($1, $2, 'live', NULL, $3) "
    "ON CONFLICT (sha256) DO UPDATE SET unreferenced_since = NULL, pinned_until = excluded.pinned_until "
    "WHERE file_blobs.state = 'live'"
)
_BLOB_STATE = "SELECT state FROM file_blobs WHERE sha256 = $1"
_MARK_UNREFERENCED = (
    "UPDATE file_blobs SET unreferenced_since = $1 WHERE state = 'live' AND unreferenced_since IS NULL "
    "AND NOT EXISTS (SELECT 1 FROM files WHERE files.sha256 = file_blobs.sha256)"
)
_CLAIMABLE = (
    "((state = 'live' AND unreferenced_since < $3 AND (pinned_until IS NULL OR pinned_until < $1)"
    " AND NOT EXISTS (SELECT 1 FROM files WHERE files.sha256 = file_blobs.sha256))"
    " OR (state = 'deleting' AND claimed_at < $4))"
)
# The condition is repeated outside the subquery: on PostgreSQL a row another sweep (or a
# pin) changed meanwhile is re-checked against it, so two sweeps never claim one blob.
_CLAIM = (
    "UPDATE file_blobs SET state = 'deleting', claimed_by = $2, claimed_at = $1 WHERE sha256 IN ("
    f"SELECT sha256 FROM file_blobs WHERE {_CLAIMABLE} LIMIT $5) AND {_CLAIMABLE} RETURNING sha256"
)
_FORGET = "DELETE FROM file_blobs WHERE sha256 = $1 AND state = 'deleting' AND claimed_by = $2"
_BLOB_IN_USE = (
    "SELECT EXISTS (SELECT 1 FROM files WHERE sha256 = $1) "
    "OR EXISTS (SELECT 1 FROM file_blobs WHERE sha256 = $1 AND state = 'live')"
)
_OWNED = f"SELECT {_FILE_COLUMNS} FROM files WHERE owner = $1 ORDER BY name"
_DROP_UPLOADS_OF = "DELETE FROM file_uploads WHERE owner = $1 OR uploader = $1"
_DROP_USER_SHARES = "DELETE FROM file_shares WHERE kind = 'user' AND grantee = $1"
# The shares an owner made: they do not follow the files to an heir (the heir chooses whom to share with).
_DROP_SHARES_OF_OWNER = "DELETE FROM file_shares WHERE file_id IN (SELECT id FROM files WHERE owner = $1)"
_HAND_OVER = "UPDATE files SET owner = $2, name = $3, updated_at = $4 WHERE id = $1"


def _list_sql(viewer: bool, owner: bool, after: bool, n_roles: int) -> tuple[str, list[str]]:
    """The ``files_list`` query and the order of its parameters (by name)."""
    # Not LIKE: SQLite's ignores ASCII case, PostgreSQL's does not.
    where = ["substr(name, 1, length(CAST($1 AS TEXT))) = CAST($1 AS TEXT)"]
    params = ["pattern"]

    def param(name: str) -> str:
        params.append(name)
        return f"${len(params)}"

    if owner:
        where.append(f"owner = {param('owner')}")
    if after:
        where.append(f"(owner, name) > ({param('after_owner')}, {param('after_name')})")
    if viewer:
        me = param("viewer")
        grantees = [f"(s.kind = 'user' AND s.grantee = {me})"]
        roles = [param(f"role{i}") for i in range(n_roles)]
        if roles:
            grantees.append(f"(s.kind = 'role' AND s.grantee IN ({', '.join(roles)}))")
        where.append(
            f"(owner = {me} OR EXISTS (SELECT 1 FROM file_shares s WHERE s.file_id = files.id "
            f"AND ({' OR '.join(grantees)})))"
        )
    sql = f"SELECT {_FILE_COLUMNS} FROM files WHERE {' AND '.join(where)} ORDER BY owner, name LIMIT {param('limit')}"
    return sql, params


def _list_args(
    params: list[str],
    viewer: str | None,
    roles: list[str],
    owner: str | None,
    prefix: str,
    after: tuple[str, str] | None,
    limit: int,
) -> list[Any]:
    values: dict[str, Any] = {"pattern": prefix, "viewer": viewer, "owner": owner, "limit": limit}
    if after is not None:
        values["after_owner"], values["after_name"] = after
    values.update({f"role{i}": role for i, role in enumerate(roles)})
    return [values[name] for name in params]


def _quota_error(owner: str, used: int, size: int, quota: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"quota exceeded for {owner!r}: {used} bytes used or reserved + {size} requested > limit {quota} bytes"
    )


def _check_uploader(
    upload: UploadRecord, open_uploads: int, reserved: int, max_open: int | None, max_grantee: int | None
) -> None:
    """``ResourceExhausted`` if ``upload`` would pass its uploader's bounds (see ``files_begin_upload``)."""
    if max_open is not None and open_uploads >= max_open:
        raise ResourceExhausted(
            f"{upload.uploader!r} has {open_uploads} uploads open, the limit (files.max_open_uploads): "
            "finish or cancel some first"
        )
    if max_grantee is not None and upload.owner != upload.uploader and reserved + upload.size > max_grantee:
        raise ResourceExhausted(
            f"uploads by {upload.uploader!r} for another user's files: {reserved} bytes reserved in "
            f"{upload.owner!r}'s quota + {upload.size} requested > limit {max_grantee} bytes "
            "(files.max_grantee_reserved_bytes)"
        )


def _check_file_count(upload: UploadRecord, count: int, max_files: int | None) -> None:
    """``ResourceExhausted`` if ``upload``, making a new file, would pass its owner's ``max_files``."""
    if max_files is not None and count >= max_files:
        raise ResourceExhausted(
            f"{upload.owner!r} holds {count} files or uploads of new ones, the limit (files.max_files): "
            "delete some files or cancel some uploads first"
        )


def _upload_users(upload: UploadRecord) -> list[str]:
    """The users an upload needs rows of: its owner and its uploader, in one order (PostgreSQL locks them)."""
    return sorted({upload.owner, upload.uploader})


def _no_user(name: str) -> NotFound:
    return NotFound(f"no user {name!r}: deleted, or never created")


def _no_grantee(share: FileShare) -> NotFound:
    return NotFound(f"no user {share.grantee!r} to share with")


def _handed_names(name: str, file_id: str) -> Iterator[str]:
    """The names a file handed to an heir may take, first choice first: its own, ``<name>~<file id>``, then
    ``<name>~<file id>~2``, ``~3``... (the heir may use any of them: it can read the ids of files shared
    with it), ``<name>`` shortened to keep each within ``MAX_NAME_BYTES``."""
    yield name
    suffix, n = f"~{file_id}", 1
    while True:
        room = MAX_NAME_BYTES - len(suffix.encode())
        yield name.encode()[:room].decode("utf-8", "ignore") + suffix  # cut on a character boundary
        n += 1
        suffix = f"~{file_id}~{n}"


_PLACEHOLDER = re.compile(r"\$(\d+)")


def _sqlite(sql: str) -> str:
    return _PLACEHOLDER.sub(r"?\1", sql)


def _file(row: Any) -> FileRecord:
    return FileRecord(str(row[0]), str(row[1]), str(row[2]), int(row[3]), str(row[4]), float(row[5]), float(row[6]))


def _share(row: Any) -> FileShare:
    return FileShare(str(row[0]), str(row[1]), str(row[2]), str(row[3]), float(row[4]))


def _upload(row: Any) -> UploadRecord:
    return UploadRecord(
        str(row[0]), str(row[1]), str(row[2]), str(row[3]), int(row[4]), str(row[5]),
        None if row[6] is None else str(row[6]), bool(row[7]), float(row[8]), float(row[9]),
        None if row[10] is None else str(row[10]),
    )  # fmt: skip


def _upload_row(u: UploadRecord) -> tuple[Any, ...]:
    return (
        u.id, u.owner, u.uploader, u.name, u.size, u.sha256, u.file_id, u.overwrite, u.created_at, u.updated_at,
        u.expected_sha256,
    )  # fmt: skip


def _check_expected(up: UploadRecord, target: FileRecord | None) -> None:
    """``Aborted`` if ``up`` expects contents the file it replaces (``target``) does not have."""
    if up.expected_sha256 is None:
        return
    if target is None:
        raise Aborted(
            f"no file {up.name!r} of {up.owner!r} to replace, but contents {up.expected_sha256} were expected; "
            "nothing changed"
        )
    if target.sha256 != up.expected_sha256:
        raise Aborted(
            f"file {target.id} now has other contents (SHA-256 {target.sha256}), not the expected "
            f"{up.expected_sha256}; nothing changed: read it again and retry"
        )


def _check_grant(up: UploadRecord, shares: list[FileShare], roles: frozenset[str]) -> None:
    """At a grantee's commit: ``NotFound`` (``PermissionDenied`` if it may still read) unless one of ``shares``
    (of the file ``up`` replaces) lets its uploader, holding ``roles``, write it."""
    modes = {
        s.mode
        for s in shares
        if (s.kind == "user" and s.grantee == up.uploader) or (s.kind == "role" and s.grantee in roles)
    }
    if "write" in modes:
        return
    if modes:
        raise PermissionDenied(f"file {up.file_id!r}: a read-only share does not allow this (needs write access)")
    raise NotFound(f"no file {up.file_id!r}")


def _replace_target_missing(upload: UploadRecord) -> NotFound:
    return NotFound(f"the file this upload replaces ({upload.file_id}) no longer exists; the upload is discarded")


def _now() -> float:
    return time.time()


# The statements above in SQLite's dialect, by name (made here: it reads this module's globals).
_Q = {name: _sqlite(value) for name, value in list(globals().items()) if name.isupper() and isinstance(value, str)}
