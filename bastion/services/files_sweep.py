"""The files service's background sweep: what is left behind goes, late and safely.

Each pass expires uploads idle longer than ``upload_ttl`` (their records,
hence their reservations, and their files), deletes the blobs no file has
named for longer than ``blob_grace`` (claimed in the store first, so a blob
a commit is reusing is never the one unlinked: bastion/store/files.py), and
removes upload files whose record is gone (a crash between the two), once
they are old enough that a record on its way cannot be missed.
"""

from __future__ import annotations

import logging
import secrets

from bastion.config import FilesConfig
from bastion.services.files_disk import _Disk, _in_thread
from bastion.store.files import FileStore

__all__ = ["ORPHAN_AGE", "sweep"]

log = logging.getLogger("bastion.files")

#: Upload files younger than this are never taken for orphans (their record may be on its way).
ORPHAN_AGE = 60.0


async def sweep(store: FileStore, disk: _Disk, config: FilesConfig, now: float) -> dict[str, int]:
    """One pass at time ``now``; how many uploads expired, blobs were deleted and orphans removed."""
    expired = await store.files_expire_uploads(now - config.upload_ttl)
    for upload_id in expired:
        await _in_thread(disk.remove_upload, upload_id)
    token = secrets.token_hex(8)
    claimed = await store.files_claim_blobs(now, config.blob_grace, token)
    for sha256 in claimed:
        await _in_thread(disk.remove_blob, sha256)
    if claimed:
        await store.files_forget_blobs(token, claimed)
    open_ids = {u.id for u in await store.files_list_uploads(None)}
    orphans = await _in_thread(disk.orphans, open_ids.__contains__, now - ORPHAN_AGE)
    for upload_id in orphans:
        if await store.files_get_upload(upload_id) is None:  # not begun since the listing
            await _in_thread(disk.remove_upload, upload_id)
    if expired or claimed or orphans:
        log.info("files sweep: %d uploads expired, %d blobs deleted, %d orphans removed",
                 len(expired), len(claimed), len(orphans))  # fmt: skip
    return {"uploads_expired": len(expired), "blobs_deleted": len(claimed), "orphans_removed": len(orphans)}
