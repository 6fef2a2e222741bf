"""The built-in ``files`` service: streamed, verified, resumable file storage.

Theory of operation
-------------------

Identity. A file has a server-made id (``f-`` and 32 hex digits) and a name,
a ``/``-separated path unique among its owner's files (``reports/q3.pdf``).
Methods name a file by ``file_id``, or by ``name`` (with ``owner`` for
someone else's file; default: the caller's). Names are labels in the
database only: contents never live at a user-chosen path. The name rules
(NFC; no control or invisible bidirectional characters: ``check_name``) and
the records the methods return are in bastion/services/files_records.py;
the methods themselves (argument checks, calls into ``Files``) in
bastion/services/files_methods.py.

Contents live under the files directory, outside the database: blobs
named by their SHA-256 and uploads in progress; bastion/services/files_disk.py
lays them out and does the blocking I/O.

Upload, resumable. ``begin_upload(name, size, sha256)`` reserves ``size`` of
the owner's quota and returns an upload id. ``upload(upload_id, offset,
<stream of bytes>)`` appends the stream at ``offset``, which must equal what
the server holds (``upload_status`` tells an interrupted client where to
continue). Chunks go to disk as they arrive -- the protocol's credit window
bounds how many are in flight -- and into a running SHA-256, which this
process keeps between calls; a resumed upload whose hash it does not have
(another worker wrote it, or a restart) re-hashes the part on disk when its
first byte arrives, in bounded blocks. When the upload reaches its declared
size it is fsynced, checked against the declared SHA-256 (a mismatch, or a
byte too many, discards it with INVALID_ARGUMENT), hard-linked into place
as a blob (pinned against the sweep first, directory fsynced; an existing
blob of the same SHA-256 is replaced by these verified bytes, so one that
decayed on disk is mended, not reused), and
only then recorded as a file: an acknowledged upload survives a crash.
New contents for an existing file may name the contents they replace
(``expected_sha256``): the commit then replaces only those, in the same
transaction (compare-and-swap; ABORTED, the upload discarded, otherwise). The
upload file goes only once the file is recorded, so a store failing at that
last step loses no bytes: sending ``offset=size`` again finishes it.

Download. ``download`` streams ``chunk_bytes`` pieces read one at a time
from the blob, from an optional ``offset``; ``stat`` (or the ``sha256``
guard of ``download``) gives the size and SHA-256 the client verifies.
Memory stays bounded by the credit window whatever the file size. About
once a second (``ACCESS_RECHECK``) a download checks that its caller may
still read the file, with its roles of now: a share withdrawn, the role
that granted it taken away, or the file deleted, ends it NOT_FOUND (after
the chunks already in flight).

Deletion is late. Deleting a file (or replacing its contents) never deletes
a blob: the background sweep deletes blobs no file has named for longer than
``blob_grace`` (so a backup being taken never misses one), expires uploads
idle longer than ``upload_ttl``, and removes upload files whose record is
gone (bastion/services/files_sweep.py). See bastion/store/files.py for how
pins and sweep claims keep a blob being reused from being unlinked. The
open uploads of new contents for a deleted file go with it (their
reservations released at once).

Access. The owner and admins may do anything; a ``read`` share lets its
grantees stat, list and download; a ``write`` share also lets them replace
the contents and delete. Sharing and renaming are the owner's (and
admins'). A file the caller cannot read is NOT_FOUND, exactly like a missing
one; a file it can read but not change is PERMISSION_DENIED.

Uploads and quotas. An upload is charged to the owner of what it makes: new
contents begun through a write share reserve the *owner's* quota -- at most
``max_grantee_reserved_bytes`` of it per uploader, and nobody holds more
than ``max_open_uploads`` uploads open. An owner holds at most ``max_files``
files, counting the open uploads that may make new ones. The owner sees those uploads
(``uploads``, ``upload_status``, naming the uploader) and may
``cancel_upload`` them, releasing the reservation at once (an upload not open
for the caller -- cancelled by an earlier try, finished, expired, someone
else's -- answers false, all alike: a retry is no error, and the answer tells
nothing of others' uploads); only the uploader
(or an admin) sends their bytes. Withdrawing the share (or making it
read-only) cancels the open uploads of those it leaves without write
access (their streams end NOT_FOUND, the file keeps its contents) and so
releases the quota. Whatever took the access away (a role too), an upload
of new contents checks it again, with the uploader's current roles, just
before its commit (and the share it writes through is read again in the
commit's own transaction). A disabled user (its credential-store row says so) may
write nothing: its commit is refused, and a withdrawal cancels its uploads
for the file whatever share named them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec

from bastion.config import FilesConfig
from bastion.exceptions import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    Unavailable,
)
from bastion.security.credentials import CredentialStore
from bastion.security.principal import Principal
from bastion.service import Service
from bastion.services.files_disk import (
    _UPLOAD_ID,
    _append,
    _Disk,
    _disk_error,
    _Hashes,
    _in_thread,
    _open_upload,
    _read_blob,
)
from bastion.services.files_methods import declare
from bastion.services.files_records import (
    RANK,
    FileInfo,
    FilePage,
    ShareInfo,
    UploadInfo,
    UploadPage,
    UploadResult,
    Usage,
    _check_sha256,
    _info,
    _is_admin,
    access_of,
    check_name,
)
from bastion.services.files_sweep import sweep
from bastion.store.base import Store
from bastion.store.files import FileRecord, FileStore, UploadRecord

__all__ = [
    "FileInfo", "FilePage", "Files", "ShareInfo", "UploadInfo", "UploadPage", "UploadResult", "Usage", "check_name",
]  # fmt: skip

log = logging.getLogger("bastion.files")

#: How long a commit waits for a sweep that is deleting the same contents.
PIN_WAIT = 10.0
#: At most this many seconds (and a quarter of ``upload_ttl``) between an upload stream's marks of activity.
TOUCH_INTERVAL = 60.0
#: Seconds between a download's checks that its caller may still read the file.
ACCESS_RECHECK = 1.0
#: Uploaders' principals remembered for withdrawn shares (those without a credential store row).
SEEN_PRINCIPALS = 10_000
_FILE_ID = re.compile(r"^f-[0-9a-f]{32}\Z")


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(16)}"


def _no_upload(upload_id: str) -> NotFound:
    return NotFound(f"no upload {upload_id!r} (finished, cancelled or expired?)")


# -- the component ---------------------------------------------------------------------------


class Files:
    """The ``files`` service and its sweep; ``bastion serve`` starts and closes it."""

    def __init__(
        self,
        store: FileStore,
        directory: Path,
        config: FilesConfig | None = None,
        *,
        leader: bool = True,
        users: CredentialStore | None = None,
    ) -> None:
        """``leader``: run the sweep here (with several workers, only worker 0 does). ``users``: where
        uploaders' roles are read when a share is withdrawn (default: ``store``, if it keeps users)."""
        self.store = store
        self.users = users if users is not None else store if isinstance(store, Store) else None
        self.leader = leader
        self.directory = Path(directory)
        self.config = config or FilesConfig()
        self._disk = _Disk(self.directory)
        self._hashes = _Hashes()
        self._sweeper: asyncio.Task[None] | None = None
        #: The latest principal of each uploader seen here, for those without a credential store row.
        self._seen: dict[str, Principal] = {}
        self.service = Service(
            "files", doc="Streamed, verified, resumable file storage with quotas and sharing.", refuse_nul=True
        )
        declare(self, self.service)

    def blob_path(self, sha256: str) -> Path:
        """Where the contents with this SHA-256 live."""
        return self._disk.blob(sha256)

    async def start(self) -> None:
        await _in_thread(self._disk.prepare)
        if self.leader:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="bastion-files-sweep")

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("files sweep failed; trying again in %.0f s", self.config.sweep_interval)
            await asyncio.sleep(self.config.sweep_interval)

    async def sweep(self, now: float | None = None) -> dict[str, int]:
        """Expire idle uploads, delete long-unreferenced blobs and orphaned upload files; counts."""
        return await sweep(self.store, self._disk, self.config, time.time() if now is None else now)

    # -- access ------------------------------------------------------------------------

    def _remember(self, principal: Principal) -> None:
        self._seen.pop(principal.name, None)
        self._seen[principal.name] = principal
        if len(self._seen) > SEEN_PRINCIPALS:
            del self._seen[next(iter(self._seen))]  # the least recently seen

    async def _stored_roles(self, principal: Principal) -> Principal | None:
        """``principal`` with the roles its credential-store row holds now, when it has one: a role taken
        away counts at once, not at the session's next revalidation (seconds later, or never while
        revalidation fails); None if the row is disabled (no access at all, not even through a share to its
        name). A principal without a row (another authenticator's) as given."""
        user = None if self.users is None else await self.users.get_user(principal.name)
        if user is None:
            return principal
        if user.disabled:
            return None
        return principal if user.roles == principal.roles else msgspec.structs.replace(principal, roles=user.roles)

    async def _access(self, principal: Principal, record: FileRecord) -> str | None:
        return access_of(principal, record, await self.store.files_shares(record.id))

    async def _cancel_unwritable(self, record: FileRecord) -> int:
        """After a share of ``record`` was withdrawn (or made read-only): discard the open uploads of new
        contents for it whose uploaders can no longer write it (judged with their current roles; a disabled
        user writes nothing), releasing the owner's quota."""
        cancelled = 0
        for upload in await self.store.files_list_uploads(record.owner, charged=True):
            if upload.file_id != record.id or upload.uploader == record.owner:
                continue
            user = None if self.users is None else await self.users.get_user(upload.uploader)
            uploader = self._seen.get(upload.uploader) if user is None else Principal(upload.uploader, user.roles)
            if uploader is None:
                # No row (a principal of another authenticator: a deleted user's uploads went with it) and not
                # seen by this process: its roles are unknown here; the check at its next call decides.
                continue
            disabled = user is not None and user.disabled
            if disabled or RANK[await self._access(uploader, record) or "read"] < RANK["write"]:
                await self._discard(upload)
                cancelled += 1
        return cancelled

    async def _cancel_replacing(self, record: FileRecord) -> None:
        """After ``record`` was deleted: discard the open uploads of new contents for it (they can never
        finish), releasing the owner's quota now rather than at the uploaders' next call or ``upload_ttl``."""
        for upload in await self.store.files_list_uploads(record.owner, charged=True):
            if upload.file_id == record.id:
                await self._discard(upload)

    async def _find(
        self, principal: Principal, file_id: str | None, name: str | None, owner: str | None, need: str
    ) -> tuple[FileRecord, str]:
        """The file named, if ``principal`` may ``need`` ("read", "write" or "owner") it."""
        if (file_id is None) == (name is None):
            raise InvalidArgument("name the file by exactly one of file_id or name")
        record: FileRecord | None = None
        if file_id is not None:
            label = file_id
            if _FILE_ID.match(file_id):
                record = await self.store.files_get(file_id)
        else:
            assert name is not None
            who = owner or principal.name
            label = f"{who}:{name}" if owner else name
            record = await self.store.files_get_by_name(who, check_name(name))
            if record is None and check_name(name) != name:  # stored un-normalized by an older server
                record = await self.store.files_get_by_name(who, name)
        access = None if record is None else await self._access(principal, record)
        if record is None or access is None:
            raise NotFound(f"no file {label!r}")  # the same whether missing or not readable
        if RANK[access] < RANK[need]:
            what = "a read-only share" if access == "read" else "a share"
            raise PermissionDenied(f"file {label!r}: {what} does not allow this (needs {need} access)")
        return record, access

    async def _own_upload(self, principal: Principal, upload_id: str, *, or_charged: bool = False) -> UploadRecord:
        """The upload, if ``principal`` began it (or is an admin); ``or_charged``: also if it is charged
        to ``principal``'s quota (the owner may see and cancel it, not send its bytes)."""
        upload = await self.store.files_get_upload(upload_id) if _UPLOAD_ID.match(upload_id) else None
        if upload is None:
            raise _no_upload(upload_id)
        mine = upload.uploader == principal.name or (or_charged and upload.owner == principal.name)
        if not mine and not _is_admin(principal):
            raise _no_upload(upload_id)
        return upload

    def _upload_info(self, upload: UploadRecord, offset: int) -> UploadInfo:
        return UploadInfo(
            upload.id, upload.owner, upload.name, upload.size, upload.sha256, offset, upload.file_id,
            self.config.chunk_bytes, upload.updated_at + self.config.upload_ttl, upload.uploader,
            upload.expected_sha256,
        )  # fmt: skip

    async def _offset(self, upload_id: str) -> int:
        try:
            return (await _in_thread(os.stat, self._disk.upload(upload_id))).st_size
        except FileNotFoundError:
            return 0

    async def _discard(self, upload: UploadRecord) -> bool:
        """Drop ``upload``'s record and file; whether this call dropped the record (False: already gone)."""
        dropped = await self.store.files_delete_upload(upload.id)
        await _in_thread(self._disk.remove_upload, upload.id)
        return dropped

    # -- upload ------------------------------------------------------------------------

    async def begin_upload(
        self,
        principal: Principal,
        *,
        size: int,
        sha256: str,
        name: str | None = None,
        overwrite: bool = False,
        file_id: str | None = None,
        expected_sha256: str | None = None,
    ) -> UploadInfo:
        if size < 0:
            raise InvalidArgument("size must be >= 0")
        digest = _check_sha256(sha256)
        expected = None if expected_sha256 is None else _check_sha256(expected_sha256)
        if expected is not None and file_id is None and not overwrite:
            raise InvalidArgument("expected_sha256 guards a replacement: give file_id, or overwrite with the name")
        if file_id is not None:
            if name is not None or overwrite:
                raise InvalidArgument("replace a file's contents by file_id alone (no name, no overwrite)")
            target, _ = await self._find(principal, file_id, None, None, "write")
            owner, target_name = target.owner, target.name
        elif name is not None:
            owner, target_name = principal.name, check_name(name)
        else:
            raise InvalidArgument("give the new file's name, or the file_id whose contents to replace")
        self._remember(principal)
        now = time.time()
        upload = UploadRecord(
            _new_id("u"), owner, principal.name, target_name, size, digest, file_id, overwrite, now, now, expected
        )
        await self.store.files_begin_upload(
            upload,
            self.config.quota_bytes,
            max_open=self.config.max_open_uploads,
            max_grantee=self.config.max_grantee_reserved_bytes,
            max_files=self.config.max_files,
        )
        try:
            await _in_thread(self._disk.create_upload, upload.id)
        except BaseException as exc:
            await self.store.files_delete_upload(upload.id)
            if isinstance(exc, OSError):
                raise _disk_error(exc, "begin_upload", "nothing was reserved; try again later") from None
            raise
        return self._upload_info(upload, 0)

    async def upload(
        self,
        principal: Principal,
        upload_id: str,
        offset: int,
        chunks: AsyncIterator[bytes],
        *,
        current: Callable[[], Principal] | None = None,
    ) -> UploadResult:
        """``current``: the caller's principal as it stands now (its session's, revalidated), for the
        access check at the commit; default ``principal``."""
        upload = await self._own_upload(principal, upload_id)
        self._remember(principal if current is None else current())
        await self._may_still_write(principal, upload)
        try:
            fd, held = await _in_thread(_open_upload, self._disk.upload(upload.id))
        except OSError as exc:
            raise _disk_error(exc, f"upload {upload.id}") from None
        hasher: Any = None  # taken at the first byte, or to finish: a call bringing none reads nothing
        position = held
        try:
            if offset != held:
                raise FailedPrecondition(
                    f"upload {upload.id} holds {held} bytes: continue from offset {held}, not {offset}"
                )
            if not await self.store.files_touch_upload(upload.id, time.time()):
                # Cancelled (or expired) since it was looked up: its file, which the open may have made
                # again, goes too, and no byte is taken.
                await _in_thread(self._disk.remove_upload, upload.id)
                raise _no_upload(upload.id)
            # Bytes arriving are activity: keep the upload from expiring under a slow stream.
            touch_every, touched = min(self.config.upload_ttl / 4, TOUCH_INTERVAL), time.monotonic()
            async for chunk in chunks:
                if position + len(chunk) > upload.size:
                    await self._discard(upload)
                    raise InvalidArgument(
                        f"upload {upload.id}: more than the declared {upload.size} bytes; the upload is discarded"
                    )
                if hasher is None:
                    hasher = await self._hashes.take(upload.id, fd, held)
                if not await _in_thread(_append, fd, chunk, position, hasher):
                    raise _no_upload(upload.id)  # its file went (cancelled or expired): take no more bytes
                position += len(chunk)
                if time.monotonic() - touched >= touch_every:
                    touched = time.monotonic()
                    if not await self.store.files_touch_upload(upload.id, time.time()):
                        raise _no_upload(upload.id)  # cancelled or expired meanwhile: stop taking its bytes
            if position < upload.size:
                return UploadResult(upload.id, position, False, None)
            await _in_thread(os.fsync, fd)
            digest = (hasher or await self._hashes.take(upload.id, fd, held)).hexdigest()
            if digest != upload.sha256:
                await self._discard(upload)
                raise InvalidArgument(
                    f"upload {upload.id}: the contents' SHA-256 is {digest}, not the declared {upload.sha256}; "
                    "the upload is discarded"
                )
            # The bytes may have taken long: access is judged again, with the uploader's roles of now (the
            # credential store's row if there is one, else as the session's revalidation sees them).
            now_as = principal if current is None else current()
            self._remember(now_as)
            record = await self._commit(upload, await self._may_still_write(await self._stored_roles(now_as), upload))
        except OSError as exc:  # the disk failed: what it holds stays, for a retry once the operator mends it
            kept = (await _in_thread(os.fstat, fd)).st_size
            raise _disk_error(
                exc, f"upload {upload.id}", f"{kept} bytes are kept: continue from offset {kept}"
            ) from None
        finally:
            if hasher is not None and position < upload.size:
                self._hashes.keep(upload.id, position, hasher)
            await _in_thread(os.close, fd)
        return UploadResult(
            upload.id, position, True, _info(record, "owner" if record.owner == principal.name else "write")
        )

    async def _may_still_write(self, principal: Principal | None, upload: UploadRecord) -> frozenset[str] | None:
        """``NotFound``/``PermissionDenied`` -- and the upload discarded, the owner's quota given back -- if
        ``principal`` may no longer write what the upload makes: None, a disabled user, may write nothing (a
        new file neither); for new contents of an existing file, a share withdrawn or made read-only, a role
        taken away, the file deleted. ``principal``'s roles if it writes through a share (the commit checks
        the share again, in its own transaction: one withdrawn in between stops it), else None."""
        if principal is None:  # before anything else: a new file is writing too
            await self._discard(upload)  # it can never finish
            raise _no_upload(upload.id) if upload.file_id is None else NotFound(f"no file {upload.file_id!r}")
        if upload.file_id is None:
            return None
        try:
            _, access = await self._find(principal, upload.file_id, None, None, "write")
        except (NotFound, PermissionDenied):
            await self._discard(upload)  # it can never finish
            raise
        return principal.roles if access == "write" else None

    async def _commit(self, upload: UploadRecord, grantee_roles: frozenset[str] | None = None) -> FileRecord:
        deadline = time.monotonic() + PIN_WAIT
        while not await self.store.files_pin_blob(upload.sha256, upload.size, time.time()):
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"upload {upload.id}: the sweep is busy with these contents; send offset={upload.size} again"
                )
            await asyncio.sleep(0.05)  # a sweep is unlinking this very blob: let it finish
        try:
            await _in_thread(self._disk.place, upload.id, upload.sha256)
        except FileNotFoundError:
            # Cancelled (or expired) while its bytes were arriving: the upload file went with the record
            # (and if the record is still there, the bytes it stands for are not).
            await self.store.files_delete_upload(upload.id)
            raise _no_upload(upload.id) from None
        try:
            record = await self.store.files_commit_upload(
                upload.id, _new_id("f"), time.time(), grantee_roles=grantee_roles
            )
        except (AlreadyExists, NotFound, Aborted, PermissionDenied):
            # It can never be recorded (its name was taken, the file it replaces went or has other contents
            # than it expects, the share its uploader wrote through was withdrawn): the upload goes;
            # its contents, an unreferenced blob now, go at a later sweep.
            with contextlib.suppress(Exception):
                await self._discard(upload)
            raise
        except Unavailable as exc:  # the upload and its bytes stay: a retry of the last step finishes it
            raise Unavailable(
                f"upload {upload.id}: the file could not be recorded ({exc.message}); its {upload.size} bytes "
                f"are kept: send offset={upload.size} again",
                retry_after=exc.retry_after,
            ) from None
        with contextlib.suppress(OSError):  # recorded: a name left in uploads/ is the sweep's (an orphan)
            await _in_thread(self._disk.remove_upload, upload.id)
        return record

    # -- download ----------------------------------------------------------------------

    async def download(
        self,
        principal: Principal,
        record: FileRecord,
        offset: int,
        sha256: str | None,
        *,
        current: Callable[[], Principal] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """``current``: the caller's principal as it stands now (its session's, revalidated), for the access
        re-checks; default ``principal``."""
        if sha256 is not None and _check_sha256(sha256) != record.sha256:
            raise FailedPrecondition(f"file {record.id} now has other contents (SHA-256 {record.sha256})")
        if not 0 <= offset <= record.size:
            raise OutOfRange(f"offset {offset} is outside the file (0..{record.size})")
        checked = time.monotonic()
        blob = _read_blob(self._disk.blob(record.sha256), record.id, offset, record.size, self.config.chunk_bytes)
        async with contextlib.aclosing(blob):
            async for chunk in blob:
                if time.monotonic() - checked >= ACCESS_RECHECK:
                    await self._still_readable(principal if current is None else current(), record)
                    checked = time.monotonic()
                yield chunk

    async def _still_readable(self, principal: Principal, record: FileRecord) -> None:
        """``NotFound`` if ``principal`` can no longer read ``record`` (its share withdrawn, the role that
        granted it taken away, the file deleted or handed to someone else): a download in progress ends
        there, not at the end of the file. Judged with its roles of now, as an upload's commit is."""
        current, now_as = await self.store.files_get(record.id), await self._stored_roles(principal)
        if current is None or now_as is None or await self._access(now_as, current) is None:
            raise NotFound(f"file {record.id!r} is no longer there or no longer shared with you; the download ends")
