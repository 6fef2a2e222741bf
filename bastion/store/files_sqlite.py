"""The ``files`` storage domain on SQLite (``SQLiteFiles``): see files.py for how it works."""

from __future__ import annotations

import sqlite3

from bastion.exceptions import AlreadyExists, NotFound
from bastion.store._access import SQLiteAccess
from bastion.store.files import (  # the domain's records, its SQL and the row helpers both backends share
    _Q,
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
    _sqlite,
    _upload,
    _upload_row,
    _upload_users,
)

__all__ = ["SQLiteFiles"]

Conn = sqlite3.Connection


class SQLiteFiles(SQLiteAccess, FileStore):
    """``FileStore`` on the SQLite core (``_read``/``_write``)."""

    async def files_get(self, file_id: str) -> FileRecord | None:
        row = await self._read(lambda c: c.execute(_Q["_GET"], (file_id,)).fetchone())
        return None if row is None else _file(row)

    async def files_get_by_name(self, owner: str, name: str) -> FileRecord | None:
        row = await self._read(lambda c: c.execute(_Q["_GET_BY_NAME"], (owner, name)).fetchone())
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
        rows = await self._read(lambda c: c.execute(_sqlite(sql), args).fetchall())
        return [_file(row) for row in rows]

    async def files_usage(self, owner: str) -> tuple[int, int]:
        def usage(c: Conn) -> tuple[int, int]:
            return int(c.execute(_Q["_USAGE_FILES"], (owner,)).fetchone()[0]), int(
                c.execute(_Q["_USAGE_UPLOADS"], (owner,)).fetchone()[0]
            )

        return await self._read(usage)

    async def files_count(self, owner: str) -> int:
        return int(await self._read(lambda c: c.execute(_Q["_FILES_OF"], (owner,)).fetchone()[0]))

    async def files_delete(self, file_id: str, at: float) -> FileRecord | None:
        def delete(c: Conn) -> FileRecord | None:
            row = c.execute(_Q["_DELETE"], (file_id,)).fetchone()
            if row is None:
                return None
            record = _file(row)
            c.execute(_Q["_BLOB_RELEASED"], (record.sha256, at))
            return record

        return await self._write(delete)

    async def files_rename(self, file_id: str, name: str, at: float) -> FileRecord:
        def rename(c: Conn) -> FileRecord:
            try:
                row = c.execute(_Q["_RENAME"], (file_id, name, at)).fetchone()
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"a file named {name!r} already exists") from None
            if row is None:
                raise NotFound(f"no file {file_id}")
            return _file(row)

        return await self._write(rename)

    async def files_share(self, share: FileShare) -> None:
        def add(c: Conn) -> None:
            try:
                row = (share.file_id, share.kind, share.grantee, share.mode, share.created_at)
                added = c.execute(_Q["_SHARE"], row).rowcount
            except sqlite3.IntegrityError:
                raise NotFound(f"no file {share.file_id}") from None
            if added != 1:
                raise _no_grantee(share)

        await self._write(add)

    async def files_unshare(self, file_id: str, kind: str, grantee: str) -> bool:
        return await self._write(lambda c: c.execute(_Q["_UNSHARE"], (file_id, kind, grantee)).rowcount) == 1

    async def files_shares(self, file_id: str) -> list[FileShare]:
        rows = await self._read(lambda c: c.execute(_Q["_SHARES"], (file_id,)).fetchall())
        return [_share(row) for row in rows]

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

        def begin(c: Conn) -> None:
            for name in users:  # one writer: the check stands to the commit (see _USER_ROW_IF)
                if c.execute(_Q["_USER_ROW"], (name,)).fetchone() is None:
                    raise _no_user(name)
            if _sqlite_check_target(c, upload) is None:  # it may make a new file
                _check_file_count(upload, int(c.execute(_Q["_FILE_COUNT"], (upload.owner,)).fetchone()[0]), max_files)
            open_uploads = int(c.execute(_Q["_OPEN_UPLOADS_OF"], (upload.uploader,)).fetchone()[0])
            reserved = int(c.execute(_Q["_RESERVED_BY"], (upload.owner, upload.uploader)).fetchone()[0])
            _check_uploader(upload, open_uploads, reserved, max_open, max_grantee)
            used = int(c.execute(_Q["_USAGE_FILES"], (upload.owner,)).fetchone()[0])
            used += int(c.execute(_Q["_USAGE_UPLOADS"], (upload.owner,)).fetchone()[0])
            if used + upload.size > quota:
                raise _quota_error(upload.owner, used, upload.size, quota)
            c.execute(_Q["_INSERT_UPLOAD"], _upload_row(upload))

        await self._write(begin)

    async def files_get_upload(self, upload_id: str) -> UploadRecord | None:
        row = await self._read(lambda c: c.execute(_Q["_GET_UPLOAD"], (upload_id,)).fetchone())
        return None if row is None else _upload(row)

    async def files_list_uploads(self, uploader: str | None, *, charged: bool = False) -> list[UploadRecord]:
        if uploader is None:
            rows = await self._read(lambda c: c.execute(_Q["_UPLOADS_ALL"]).fetchall())
        else:
            sql = _Q["_UPLOADS_CHARGED" if charged else "_UPLOADS_OF"]
            rows = await self._read(lambda c: c.execute(sql, (uploader,)).fetchall())
        return [_upload(row) for row in rows]

    async def files_page_uploads(self, user: str, after: tuple[float, str] | None, limit: int) -> list[UploadRecord]:
        at, upload_id = after or (float("-inf"), "")
        rows = await self._read(lambda c: c.execute(_Q["_UPLOADS_PAGE"], (user, at, upload_id, limit)).fetchall())
        return [_upload(row) for row in rows]

    async def files_touch_upload(self, upload_id: str, at: float) -> bool:
        return await self._write(lambda c: c.execute(_Q["_TOUCH_UPLOAD"], (upload_id, at)).rowcount) == 1

    async def files_delete_upload(self, upload_id: str) -> bool:
        return await self._write(lambda c: c.execute(_Q["_DELETE_UPLOAD"], (upload_id,)).rowcount) == 1

    async def files_expire_uploads(self, before: float) -> list[str]:
        rows = await self._write(lambda c: c.execute(_Q["_EXPIRE_UPLOADS"], (before,)).fetchall())
        return [str(row[0]) for row in rows]

    async def files_commit_upload(
        self, upload_id: str, new_id: str, at: float, *, grantee_roles: frozenset[str] | None = None
    ) -> FileRecord:
        def commit(c: Conn) -> FileRecord:
            row = c.execute(_Q["_GET_UPLOAD"], (upload_id,)).fetchone()
            if row is None:
                raise NotFound(f"no upload {upload_id}")
            up = _upload(row)
            c.execute(_Q["_DELETE_UPLOAD"], (upload_id,))
            target = _sqlite_target(c, up)
            if grantee_roles is not None and target is not None:
                _check_grant(up, [_share(r) for r in c.execute(_Q["_SHARES"], (target.id,))], grantee_roles)
            if target is None:
                c.execute(_Q["_INSERT_FILE"], (new_id, up.owner, up.name, up.size, up.sha256, at, at))
                record = FileRecord(new_id, up.owner, up.name, up.size, up.sha256, at, at)
                if c.execute("SELECT changes()").fetchone()[0] != 1:
                    raise AlreadyExists(f"a file named {up.name!r} already exists")
            else:
                record = _file(c.execute(_Q["_REPLACE_CONTENTS"], (target.id, up.size, up.sha256, at)).fetchone())
            c.execute(_Q["_BLOB_REFERENCED"], (up.sha256,))
            if target is not None and target.sha256 != up.sha256:
                c.execute(_Q["_BLOB_RELEASED"], (target.sha256, at))
            return record

        return await self._write(commit)

    async def files_pin_blob(self, sha256: str, size: int, at: float) -> bool:
        def pin(c: Conn) -> bool:
            c.execute(_Q["_PIN"], (sha256, size, at + PIN_SECONDS))
            return bool(c.execute(_Q["_BLOB_STATE"], (sha256,)).fetchone()[0] == "live")

        return await self._write(pin)

    async def files_claim_blobs(self, now: float, grace: float, token: str, limit: int = 1000) -> list[str]:
        def claim(c: Conn) -> list[str]:
            c.execute(_Q["_MARK_UNREFERENCED"], (now,))
            rows = c.execute(_Q["_CLAIM"], (now, token, now - grace, now - CLAIM_SECONDS, limit)).fetchall()
            return [str(row[0]) for row in rows]

        return await self._write(claim)

    async def files_forget_blobs(self, token: str, sha256s: list[str]) -> int:
        def forget(c: Conn) -> int:
            return sum(c.execute(_Q["_FORGET"], (sha, token)).rowcount for sha in sha256s)

        return await self._write(forget)

    async def files_blob_referenced(self, sha256: str) -> bool:
        return bool(await self._read(lambda c: c.execute(_Q["_BLOB_IN_USE"], (sha256,)).fetchone()[0]))

    async def files_reassign_owner(self, old: str, new: str | None) -> int:
        def reassign(c: Conn) -> int:
            owned = [_file(row) for row in c.execute(_Q["_OWNED"], (old,)).fetchall()]
            c.execute(_Q["_DROP_UPLOADS_OF"], (old,))
            c.execute(_Q["_DROP_USER_SHARES"], (old,))
            c.execute(_Q["_DROP_SHARES_OF_OWNER"], (old,))
            now = _now()
            for record in owned:
                if new is None:
                    c.execute(_Q["_DELETE"], (record.id,)).fetchall()
                    c.execute(_Q["_BLOB_RELEASED"], (record.sha256, now))
                else:
                    for name in _handed_names(record.name, record.id):
                        if c.execute(_Q["_GET_BY_NAME"], (new, name)).fetchone() is None:
                            break
                    c.execute(_Q["_HAND_OVER"], (record.id, new, name, now))
            return len(owned)

        return await self._write(reassign)


def _sqlite_target(c: Conn, up: UploadRecord) -> FileRecord | None:
    """The file an upload replaces (None: it makes a new one); ``NotFound`` if that file is gone, ``Aborted``
    if it does not have the contents the upload expects."""
    target: FileRecord | None = None
    if up.file_id is not None:
        row = c.execute(_Q["_GET"], (up.file_id,)).fetchone()
        if row is None:
            raise _replace_target_missing(up)
        target = _file(row)
    elif up.overwrite:
        row = c.execute(_Q["_GET_BY_NAME"], (up.owner, up.name)).fetchone()
        target = None if row is None else _file(row)
    _check_expected(up, target)
    return target


def _sqlite_check_target(c: Conn, up: UploadRecord) -> FileRecord | None:
    """At begin: the file ``up`` replaces (None: it makes a new one), or why it cannot be begun."""
    if up.file_id is not None or up.overwrite:
        return _sqlite_target(c, up)
    if c.execute(_Q["_GET_BY_NAME"], (up.owner, up.name)).fetchone() is not None:
        raise AlreadyExists(f"{up.owner!r} already has a file named {up.name!r} (ask to overwrite it)")
    return None
