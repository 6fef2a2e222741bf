"""The ``files`` storage domain on PostgreSQL (``PostgresFiles``): see files.py for how it works."""

from __future__ import annotations

from typing import Any

from bastion.exceptions import AlreadyExists, NotFound
from bastion.store._access import USER_LOCK_SHARED_KEPT, PostgresAccess
from bastion.store.files import (  # the domain's records, its SQL and the row helpers both backends share
    _BLOB_IN_USE,
    _BLOB_REFERENCED,
    _BLOB_RELEASED,
    _BLOB_STATE,
    _CLAIM,
    _DELETE,
    _DELETE_UPLOAD,
    _DROP_SHARES_OF_OWNER,
    _DROP_UPLOADS_OF,
    _DROP_USER_SHARES,
    _EXPIRE_UPLOADS,
    _FILE_COUNT,
    _FILES_OF,
    _FORGET,
    _GET,
    _GET_BY_NAME,
    _GET_UPLOAD,
    _HAND_OVER,
    _INSERT_FILE,
    _INSERT_UPLOAD,
    _MARK_UNREFERENCED,
    _OPEN_UPLOADS_OF,
    _OWNED,
    _PIN,
    _RENAME,
    _REPLACE_CONTENTS,
    _RESERVED_BY,
    _SHARE_PG,
    _SHARES,
    _TOUCH_UPLOAD,
    _UNSHARE,
    _UPLOAD_COLUMNS,
    _UPLOADS_ALL,
    _UPLOADS_CHARGED,
    _UPLOADS_OF,
    _UPLOADS_PAGE,
    _USAGE_FILES,
    _USAGE_UPLOADS,
    _USER_ROW_PG,
    CLAIM_SECONDS,
    PIN_SECONDS,
    FileRecord,
    FileShare,
    FileStore,
    UploadRecord,
    _check_expected,
    _check_file_count,
    _check_grant,
    _check_uploader,
    _file,
    _handed_names,
    _list_args,
    _list_sql,
    _no_grantee,
    _no_user,
    _now,
    _quota_error,
    _replace_target_missing,
    _share,
    _upload,
    _upload_row,
    _upload_users,
)

__all__ = ["PostgresFiles"]

PgConn = Any  # asyncpg.Connection; asyncpg is an optional dependency


def _count(status: str) -> int:
    """Rows affected, from asyncpg's command status ("UPDATE 3")."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


# A withdrawal of write access (unshare, a share made read-only) takes the file's row lock, as a grantee's
# commit does before it reads the shares, so the two are ordered: neither sees the other half done.
_LOCK_FILE = "SELECT 1 FROM files WHERE id = $1 FOR UPDATE"


class PostgresFiles(PostgresAccess, FileStore):
    """``FileStore`` on the PostgreSQL core (``_call``)."""

    async def _files_one(self, sql: str, *args: Any) -> Any:
        async def one(conn: PgConn) -> Any:
            return await conn.fetchrow(sql, *args)

        return await self._call(one)

    async def _files_all(self, sql: str, *args: Any) -> list[Any]:
        async def fetch(conn: PgConn) -> list[Any]:
            return list(await conn.fetch(sql, *args))

        result: list[Any] = await self._call(fetch)
        return result

    async def _files_execute(self, sql: str, *args: Any) -> int:
        async def execute(conn: PgConn) -> int:
            return _count(await conn.execute(sql, *args))

        result: int = await self._call(execute)
        return result

    async def files_get(self, file_id: str) -> FileRecord | None:
        row = await self._files_one(_GET, file_id)
        return None if row is None else _file(row)

    async def files_get_by_name(self, owner: str, name: str) -> FileRecord | None:
        row = await self._files_one(_GET_BY_NAME, owner, name)
        return None if row is None else _file(row)

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
        ordered = sorted(roles) if viewer is not None else []
        sql, params = _list_sql(viewer is not None, owner is not None, after is not None, len(ordered))
        args = _list_args(params, viewer, ordered, owner, prefix, after, limit)
        return [_file(row) for row in await self._files_all(sql, *args)]

    async def files_usage(self, owner: str) -> tuple[int, int]:
        row = await self._files_one(f"SELECT ({_USAGE_FILES}), ({_USAGE_UPLOADS})", owner)
        return int(row[0]), int(row[1])

    async def files_count(self, owner: str) -> int:
        return int((await self._files_one(_FILES_OF, owner))[0])

    async def files_delete(self, file_id: str, at: float) -> FileRecord | None:
        async def delete(conn: PgConn) -> FileRecord | None:
            async with conn.transaction():
                row = await conn.fetchrow(_DELETE, file_id)
                if row is None:
                    return None
                record = _file(row)
                await conn.execute(_BLOB_RELEASED, record.sha256, at)
                return record

        result: FileRecord | None = await self._call(delete)
        return result

    async def files_rename(self, file_id: str, name: str, at: float) -> FileRecord:
        import asyncpg

        async def rename(conn: PgConn) -> FileRecord:
            try:
                row = await conn.fetchrow(_RENAME, file_id, name, at)
            except asyncpg.UniqueViolationError:
                raise AlreadyExists(f"a file named {name!r} already exists") from None
            if row is None:
                raise NotFound(f"no file {file_id}")
            return _file(row)

        result: FileRecord = await self._call(rename)
        return result

    async def files_share(self, share: FileShare) -> None:
        import asyncpg

        async def add(conn: PgConn) -> None:
            async with conn.transaction():
                # As a kv write to ~NAME: the grantee's advisory lock, shared, to the commit (delete_user takes
                # it exclusive before its DELETE), then the row checked by the insert, a statement of its own
                # (READ COMMITTED: its snapshot is taken once the lock is granted); whether the store keeps
                # users, though, as it was before the wait (see USER_LOCK_SHARED_KEPT). No row lock: a share
                # writes nothing to the users row.
                kept = True
                if share.kind == "user":
                    kept = bool((await conn.fetchrow(USER_LOCK_SHARED_KEPT, share.grantee))[1])
                if share.mode != "write":  # it may make a write share read-only: as files_unshare, the row first
                    await conn.execute(_LOCK_FILE, share.file_id)
                try:
                    row = (share.file_id, share.kind, share.grantee, share.mode, share.created_at, kept)
                    added = _count(await conn.execute(_SHARE_PG, *row))
                except asyncpg.ForeignKeyViolationError:
                    raise NotFound(f"no file {share.file_id}") from None
                if added != 1:
                    raise _no_grantee(share)

        await self._call(add)

    async def files_unshare(self, file_id: str, kind: str, grantee: str) -> bool:
        async def unshare(conn: PgConn) -> bool:
            async with conn.transaction():
                # The file's row first: a grantee's commit reads the shares with it locked (files_commit_upload)
                # and replaces the contents before it lets go, so a withdrawal waits for a commit that read the
                # share (and is acknowledged after it), and a commit after the withdrawal reads it gone.
                await conn.execute(_LOCK_FILE, file_id)
                return _count(await conn.execute(_UNSHARE, file_id, kind, grantee)) == 1

        result: bool = await self._call(unshare)
        return result

    async def files_shares(self, file_id: str) -> list[FileShare]:
        return [_share(row) for row in await self._files_all(_SHARES, file_id)]

    async def files_begin_upload(
        self,
        upload: UploadRecord,
        quota: int,
        *,
        max_open: int | None = None,
        max_grantee: int | None = None,
        max_files: int | None = None,
    ) -> None:
        users = [] if self.userless_owners else _upload_users(upload)

        async def begin(conn: PgConn) -> None:
            async with conn.transaction():
                # First, holding no lock yet: each user's advisory lock, shared, to the commit (delete_user
                # takes it exclusive before its DELETE; no row lock: nothing written to the users rows), then
                # the row, in a statement of its own. A deletion after this waits for the commit, then the
                # second pass of auth.delete_user drops the upload; one before it is waited for (if
                # uncommitted), and READ COMMITTED then, its snapshot taken after the lock, finds no row --
                # while whether the store keeps users is as the lock's statement read it, before the wait
                # (the last user's deletion leaves no users at all: see USER_LOCK_SHARED_KEPT).
                for name in users:
                    kept = bool((await conn.fetchrow(USER_LOCK_SHARED_KEPT, name))[1])
                    if await conn.fetchval(_USER_ROW_PG, name, kept) is None:
                        raise _no_user(name)
                # One reservation at a time per owner, then per uploader, across every replica (always in
                # this order, and in two lock spaces: no two transactions wait for each other).
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext('bastion.files.quota'), hashtext($1))", upload.owner
                )
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext('bastion.files.uploader'), hashtext($1))", upload.uploader
                )
                if await _pg_check_target(conn, upload) is None:  # it may make a new file
                    _check_file_count(upload, int(await conn.fetchval(_FILE_COUNT, upload.owner)), max_files)
                open_uploads = int(await conn.fetchval(_OPEN_UPLOADS_OF, upload.uploader))
                reserved = int(await conn.fetchval(_RESERVED_BY, upload.owner, upload.uploader))
                _check_uploader(upload, open_uploads, reserved, max_open, max_grantee)
                row = await conn.fetchrow(f"SELECT ({_USAGE_FILES}), ({_USAGE_UPLOADS})", upload.owner)
                used = int(row[0]) + int(row[1])
                if used + upload.size > quota:
                    raise _quota_error(upload.owner, used, upload.size, quota)
                await conn.execute(_INSERT_UPLOAD, *_upload_row(upload))

        await self._call(begin)

    async def files_get_upload(self, upload_id: str) -> UploadRecord | None:
        row = await self._files_one(_GET_UPLOAD, upload_id)
        return None if row is None else _upload(row)

    async def files_list_uploads(self, uploader: str | None, *, charged: bool = False) -> list[UploadRecord]:
        if uploader is None:
            rows = await self._files_all(_UPLOADS_ALL)
        else:
            rows = await self._files_all(_UPLOADS_CHARGED if charged else _UPLOADS_OF, uploader)
        return [_upload(row) for row in rows]

    async def files_page_uploads(self, user: str, after: tuple[float, str] | None, limit: int) -> list[UploadRecord]:
        at, upload_id = after or (float("-inf"), "")
        return [_upload(row) for row in await self._files_all(_UPLOADS_PAGE, user, at, upload_id, limit)]

    async def files_touch_upload(self, upload_id: str, at: float) -> bool:
        return await self._files_execute(_TOUCH_UPLOAD, upload_id, at) == 1

    async def files_delete_upload(self, upload_id: str) -> bool:
        return await self._files_execute(_DELETE_UPLOAD, upload_id) == 1

    async def files_expire_uploads(self, before: float) -> list[str]:
        return [str(row[0]) for row in await self._files_all(_EXPIRE_UPLOADS, before)]

    async def files_commit_upload(
        self, upload_id: str, new_id: str, at: float, *, grantee_roles: frozenset[str] | None = None
    ) -> FileRecord:
        async def commit(conn: PgConn) -> FileRecord:
            async with conn.transaction():
                row = await conn.fetchrow(_DELETE_UPLOAD + f" RETURNING {_UPLOAD_COLUMNS}", upload_id)
                if row is None:
                    raise NotFound(f"no upload {upload_id}")
                up = _upload(row)
                target = await _pg_target(conn, up, lock=True)
                if grantee_roles is not None and target is not None:  # read with the file's row locked
                    _check_grant(up, [_share(r) for r in await conn.fetch(_SHARES, target.id)], grantee_roles)
                if target is None:
                    status = await conn.execute(_INSERT_FILE, new_id, up.owner, up.name, up.size, up.sha256, at, at)
                    if _count(status) != 1:
                        raise AlreadyExists(f"a file named {up.name!r} already exists")
                    record = FileRecord(new_id, up.owner, up.name, up.size, up.sha256, at, at)
                else:
                    record = _file(await conn.fetchrow(_REPLACE_CONTENTS, target.id, up.size, up.sha256, at))
                await conn.execute(_BLOB_REFERENCED, up.sha256)
                if target is not None and target.sha256 != up.sha256:
                    await conn.execute(_BLOB_RELEASED, target.sha256, at)
                return record

        result: FileRecord = await self._call(commit)
        return result

    async def files_pin_blob(self, sha256: str, size: int, at: float) -> bool:
        async def pin(conn: PgConn) -> bool:
            async with conn.transaction():
                await conn.execute(_PIN, sha256, size, at + PIN_SECONDS)
                return bool(await conn.fetchval(_BLOB_STATE, sha256) == "live")

        result: bool = await self._call(pin)
        return result

    async def files_claim_blobs(self, now: float, grace: float, token: str, limit: int = 1000) -> list[str]:
        async def claim(conn: PgConn) -> list[str]:
            async with conn.transaction():
                await conn.execute(_MARK_UNREFERENCED, now)
                rows = await conn.fetch(_CLAIM, now, token, now - grace, now - CLAIM_SECONDS, limit)
                return [str(row[0]) for row in rows]

        result: list[str] = await self._call(claim)
        return result

    async def files_forget_blobs(self, token: str, sha256s: list[str]) -> int:
        async def forget(conn: PgConn) -> int:
            async with conn.transaction():
                return sum([_count(await conn.execute(_FORGET, sha, token)) for sha in sha256s])

        result: int = await self._call(forget)
        return result

    async def files_blob_referenced(self, sha256: str) -> bool:
        row = await self._files_one(_BLOB_IN_USE, sha256)
        return bool(row[0])

    async def files_reassign_owner(self, old: str, new: str | None) -> int:
        async def reassign(conn: PgConn) -> int:
            async with conn.transaction():
                owned = [_file(row) for row in await conn.fetch(_OWNED, old)]
                await conn.execute(_DROP_UPLOADS_OF, old)
                await conn.execute(_DROP_USER_SHARES, old)
                await conn.execute(_DROP_SHARES_OF_OWNER, old)
                now = _now()
                for record in owned:
                    if new is None:
                        await conn.fetch(_DELETE, record.id)
                        await conn.execute(_BLOB_RELEASED, record.sha256, now)
                    else:
                        for name in _handed_names(record.name, record.id):
                            if await conn.fetchrow(_GET_BY_NAME, new, name) is None:
                                break
                        await conn.execute(_HAND_OVER, record.id, new, name, now)
                return len(owned)

        result: int = await self._call(reassign)
        return result


async def _pg_target(conn: PgConn, up: UploadRecord, *, lock: bool = False) -> FileRecord | None:
    """The file an upload replaces (None: it makes a new one); ``NotFound`` if that file is gone, ``Aborted``
    if it does not have the contents the upload expects. ``lock``: its row, until the transaction ends (a
    commit's compare-and-swap must hold until the contents are replaced)."""
    suffix = " FOR UPDATE" if lock else ""
    target: FileRecord | None = None
    if up.file_id is not None:
        row = await conn.fetchrow(_GET + suffix, up.file_id)
        if row is None:
            raise _replace_target_missing(up)
        target = _file(row)
    elif up.overwrite:
        row = await conn.fetchrow(_GET_BY_NAME + suffix, up.owner, up.name)
        target = None if row is None else _file(row)
    _check_expected(up, target)
    return target


async def _pg_check_target(conn: PgConn, up: UploadRecord) -> FileRecord | None:
    """At begin: the file ``up`` replaces (None: it makes a new one), or why it cannot be begun."""
    if up.file_id is not None or up.overwrite:
        return await _pg_target(conn, up)
    if await conn.fetchrow(_GET_BY_NAME, up.owner, up.name) is not None:
        raise AlreadyExists(f"{up.owner!r} already has a file named {up.name!r} (ask to overwrite it)")
    return None
