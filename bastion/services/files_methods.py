"""The ``files`` service's methods: the wire surface of bastion/services/files.py's ``Files``.

Each method checks and converts its arguments and calls into ``Files``, where the theory of
operation is; the records they return are in bastion/services/files_records.py.
"""

from __future__ import annotations

import contextlib
import time
import unicodedata
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TypeVar

import msgspec

from bastion.exceptions import InvalidArgument, NotFound, PermissionDenied
from bastion.security.principal import Principal
from bastion.service import Context, Service
from bastion.services.files_records import (
    FileInfo,
    FilePage,
    ShareInfo,
    UploadInfo,
    UploadPage,
    UploadResult,
    Usage,
    _info,
    _is_admin,
    _share_info,
    check_grantee,
    check_name,
)
from bastion.store.files import FileShare

if TYPE_CHECKING:
    from bastion.services.files import Files

__all__ = ["MAX_PAGE", "declare"]

MAX_PAGE = 1000

_Key = TypeVar("_Key", tuple[float, str], tuple[str, str])


def _cursor(method: str, after: str | None, form: type[_Key]) -> _Key | None:
    """A page cursor: ``after``, the ``next`` of a previous page of ``method``, decoded as ``form``.

    INVALID_ARGUMENT if it is not one -- or if a text it holds decodes to NUL: the dispatcher's rule (no NUL
    in any text argument) sees only the JSON, where NUL may come escaped (``\\u0000``), so the rule's own
    answer is given here, on every store, before the cursor reaches one (PostgreSQL text cannot hold NUL)."""
    if after is None:
        return None
    try:
        key = msgspec.json.decode(after, type=form)
    except msgspec.DecodeError:
        raise InvalidArgument("after must be the 'next' of a previous page") from None
    if any(isinstance(part, str) and "\x00" in part for part in key):
        raise InvalidArgument(f"{method}: argument after must not contain NUL characters")
    return key


def declare(files: Files, svc: Service) -> None:
    """Declare the ``files`` service's methods on ``svc``, each calling into ``files``."""
    store = files.store

    @svc.method
    async def begin_upload(
        ctx: Context,
        size: int,
        sha256: str,
        name: str | None = None,
        overwrite: bool = False,
        file_id: str | None = None,
        expected_sha256: str | None = None,
    ) -> UploadInfo:
        """Start an upload of ``size`` bytes with SHA-256 ``sha256``: a new file ``name`` (``overwrite``:
        replace the caller's file of that name), or new contents for ``file_id`` (needs write access).
        ``expected_sha256``: replace only a file whose contents are these, when the upload finishes
        (compare-and-swap; ABORTED otherwise). Reserves ``size`` of the owner's quota; returns the upload
        id to send the bytes to."""
        return await files.begin_upload(
            ctx.principal, size=size, sha256=sha256, name=name, overwrite=overwrite, file_id=file_id,
            expected_sha256=expected_sha256,
        )  # fmt: skip

    @svc.method
    async def upload(ctx: Context, upload_id: str, chunks: AsyncIterator[bytes], offset: int = 0) -> UploadResult:
        """Append a stream of byte chunks to an upload at ``offset`` (what the server holds); at the
        declared size the contents are verified and become the file."""
        current = [ctx.principal]  # the connection's principal, as revalidation replaces it

        def on_principal(principal: Principal) -> None:
            current[0] = principal

        unwatch = ctx.watch_principal(on_principal)
        try:
            return await files.upload(ctx.principal, upload_id, offset, chunks, current=lambda: current[0])
        finally:
            unwatch()

    @svc.method(idempotent=True)
    async def upload_status(ctx: Context, upload_id: str) -> UploadInfo:
        """An open upload (the caller's, or one charged to its quota) and the offset to continue it from."""
        found = await files._own_upload(ctx.principal, upload_id, or_charged=True)
        return files._upload_info(found, await files._offset(found.id))

    @svc.method(idempotent=True)
    async def uploads(ctx: Context, after: str | None = None, limit: int = 100) -> UploadPage:
        """The caller's open uploads and those charged to its quota (others' new contents for its
        files, each naming its ``uploader``), oldest first, a page of at most ``limit``."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidArgument(f"limit must be 1..{MAX_PAGE}")
        key = _cursor("files.uploads", after, tuple[float, str])
        found = await store.files_page_uploads(ctx.principal.name, key, limit)
        infos = [files._upload_info(u, await files._offset(u.id)) for u in found]
        last = found[-1] if len(found) == limit else None
        cursor = None if last is None else msgspec.json.encode((last.created_at, last.id)).decode()
        return UploadPage(infos, cursor)

    @svc.method(idempotent=True)
    async def cancel_upload(ctx: Context, upload_id: str) -> bool:
        """Discard an open upload (the caller's, or one charged to its quota) and release its reservation;
        False if none by that id is open for the caller (already cancelled -- a retry's answer --, finished,
        expired, or not the caller's: all alike, so the answer tells nothing of others' uploads)."""
        try:
            found = await files._own_upload(ctx.principal, upload_id, or_charged=True)
        except NotFound:
            return False
        return await files._discard(found)

    @svc.method(idempotent=True)
    async def stat(
        ctx: Context, file_id: str | None = None, name: str | None = None, owner: str | None = None
    ) -> FileInfo:
        """A file's metadata: size, SHA-256, owner, times, and the caller's access."""
        return _info(*await files._find(ctx.principal, file_id, name, owner, "read"))

    @svc.method(name="list", idempotent=True)
    async def list_files(
        ctx: Context,
        prefix: str = "",
        owner: str | None = None,
        all: bool = False,
        after: str | None = None,
        limit: int = 100,
    ) -> FilePage:
        """The caller's files and files shared with it, by (owner, name); ``all``: every file (admin)."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidArgument(f"limit must be 1..{MAX_PAGE}")
        if all and not _is_admin(ctx.principal):
            raise PermissionDenied("listing every user's files needs the admin role")
        key = _cursor("files.list", after, tuple[str, str])
        p = ctx.principal
        viewer = None if all else p.name
        records = await store.files_list(
            viewer=viewer, roles=p.roles, owner=owner, prefix=unicodedata.normalize("NFC", prefix), after=key,
            limit=limit,
        )  # fmt: skip
        infos = []
        for record in records:
            access = await files._access(p, record)
            infos.append(_info(record, access or "admin"))
        last = records[-1] if len(records) == limit else None
        cursor = None if last is None else msgspec.json.encode((last.owner, last.name)).decode()
        return FilePage(infos, cursor)

    @svc.method
    async def download(
        ctx: Context,
        file_id: str | None = None,
        name: str | None = None,
        owner: str | None = None,
        offset: int = 0,
        sha256: str | None = None,
    ) -> AsyncIterator[bytes]:
        """Stream a file's contents in chunks from ``offset``; ``sha256``: fail if the contents changed."""
        record, _ = await files._find(ctx.principal, file_id, name, owner, "read")
        current = [ctx.principal]  # the connection's principal, as revalidation replaces it

        def on_principal(principal: Principal) -> None:
            current[0] = principal

        unwatch = ctx.watch_principal(on_principal)
        try:
            chunks = files.download(ctx.principal, record, offset, sha256, current=lambda: current[0])
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:  # aclosing: the blob's descriptor is closed when the call ends
                    yield chunk
        finally:
            unwatch()

    @svc.method
    async def delete(
        ctx: Context, file_id: str | None = None, name: str | None = None, owner: str | None = None
    ) -> FileInfo:
        """Delete a file (owner, write share or admin); its contents go at a later sweep, the open uploads
        of new contents for it at once."""
        record, access = await files._find(ctx.principal, file_id, name, owner, "write")
        deleted = await store.files_delete(record.id, time.time())
        await files._cancel_replacing(record)  # also when it was gone already: a retry finishes the job
        if deleted is None:
            raise NotFound(f"no file {record.id!r}")
        return _info(deleted, access)

    @svc.method
    async def rename(
        ctx: Context, new_name: str, file_id: str | None = None, name: str | None = None, owner: str | None = None
    ) -> FileInfo:
        """Give a file a new name among its owner's files (owner or admin)."""
        record, access = await files._find(ctx.principal, file_id, name, owner, "owner")
        return _info(await store.files_rename(record.id, check_name(new_name), time.time()), access)

    @svc.method(idempotent=True)
    async def share(
        ctx: Context,
        mode: str = "read",
        user: str | None = None,
        role: str | None = None,
        file_id: str | None = None,
        name: str | None = None,
        owner: str | None = None,
    ) -> ShareInfo:
        """Share a file with a user or a role, ``mode`` "read" or "write" (owner or admin)."""
        if mode not in ("read", "write"):
            raise InvalidArgument('mode must be "read" or "write"')
        kind, grantee = check_grantee(user, role)
        record, _ = await files._find(ctx.principal, file_id, name, owner, "owner")
        grant = FileShare(record.id, kind, grantee, mode, time.time())
        # A user grantee must hold a user row (if the store keeps users): not a share in waiting, which whoever
        # registered the name later would get. The store checks it as it records the share (NOT_FOUND).
        await store.files_share(grant)
        if mode == "read":  # replacing a write share: as good as withdrawing it
            await files._cancel_unwritable(record)
        return _share_info(grant)

    @svc.method(idempotent=True)
    async def unshare(
        ctx: Context,
        user: str | None = None,
        role: str | None = None,
        file_id: str | None = None,
        name: str | None = None,
        owner: str | None = None,
    ) -> bool:
        """Withdraw a share (owner or admin); False if there was none."""
        kind, grantee = check_grantee(user, role)
        record, _ = await files._find(ctx.principal, file_id, name, owner, "owner")
        withdrawn = await store.files_unshare(record.id, kind, grantee)
        await files._cancel_unwritable(record)  # also when there was none: a retry finishes the job
        return withdrawn

    @svc.method(idempotent=True)
    async def shares(
        ctx: Context, file_id: str | None = None, name: str | None = None, owner: str | None = None
    ) -> list[ShareInfo]:
        """The shares of a file (owner or admin)."""
        record, _ = await files._find(ctx.principal, file_id, name, owner, "owner")
        return [_share_info(s) for s in await store.files_shares(record.id)]

    @svc.method(idempotent=True)
    async def usage(ctx: Context, user: str | None = None) -> Usage:
        """Bytes a user holds against the quota (another user's: admin)."""
        who = user or ctx.principal.name
        if who != ctx.principal.name and not _is_admin(ctx.principal):
            raise PermissionDenied("another user's usage needs the admin role")
        used, reserved = await store.files_usage(who)
        return Usage(who, used, reserved, files.config.quota_bytes)
