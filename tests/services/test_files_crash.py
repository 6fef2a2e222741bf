"""The files directory after the server crashed in the middle of a commit: a real process killed at the step
named (``os._exit``: no ``finally`` runs), then a sweep in the test's process (SQLite: the disk is the point)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from bastion.services.files import Files
from bastion.services.files_sweep import ORPHAN_AGE
from bastion.store import open_store

# Uploads contents a file already holds, and dies inside ``place``'s os.replace: after its link of the
# upload's verified bytes beside the blob, before the rename that puts them in the blob's place.
_CRASHING = textwrap.dedent(
    """
    import asyncio, hashlib, os, sys
    from pathlib import Path
    from bastion.security.principal import Principal
    from bastion.services.files import Files
    from bastion.store import open_store

    async def chunks(data):
        yield data

    async def main(root):
        async with open_store(str(root / "store.db")) as store:
            files = Files(store, root / "files")
            await files.start()
            alice, data = Principal("alice"), b"the same contents, twice" * 100
            digest = hashlib.sha256(data).hexdigest()
            for name in ("first", "second"):
                info = await files.begin_upload(alice, size=len(data), sha256=digest, name=name)
                print(info.upload_id, flush=True)
                if name == "second":
                    os.replace = lambda *args: os._exit(9)  # the crash, right there
                await files.upload(alice, info.upload_id, 0, chunks(data))

    asyncio.run(main(Path(sys.argv[1])))
    """
)


def test_a_crash_between_the_link_and_the_rename_of_a_commit_leaves_nothing_once_the_upload_expires(
    tmp_path: Path,
) -> None:
    """A commit of contents a blob already held linked the upload's bytes beside the blob
    (``blobs/<xx>/<sha256>.<upload id>``), then renamed them into its place. A crash between the two left
    that link; only a retry of the same upload removed it, and once the upload expired nothing did: the
    upload's size on disk for good, in no quota, unseen by the sweep. The link is made among the uploads
    now, and goes with its upload (expired, cancelled, or an orphan)."""
    done = subprocess.run(
        [sys.executable, "-c", _CRASHING, str(tmp_path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 9, done.stderr
    first, second = done.stdout.split()

    async def main() -> None:
        async with open_store(str(tmp_path / "store.db")) as store:
            files = Files(store, tmp_path / "files")
            assert [u.id for u in await store.files_list_uploads(None)] == [second]  # the crash's upload
            later = time.time() + files.config.upload_ttl + ORPHAN_AGE + 1
            counts = await files.sweep(later)
            assert counts["uploads_expired"] == 1
            record = await store.files_get_by_name("alice", "first")
            assert record is not None
            root = tmp_path / "files"
            left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
            assert left == [f"blobs/{record.sha256[:2]}/{record.sha256}"]
            assert first != second and os.stat(files.blob_path(record.sha256)).st_nlink == 1

    asyncio.run(main())
