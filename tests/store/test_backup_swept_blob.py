"""A blob whose last file is deleted while a long backup runs, and then swept, is still archived.

The files service removes a blob ``files.blob_grace`` (default an hour) after
its last file goes. A backup archives the blobs its snapshot names one after
the other, after the database: a large store's can take longer than that, and
a blob swept meanwhile failed the whole backup at its end ("vanished while the
backup ran; try again" -- and the next one could fail the same way). The
backup now holds each blob (a hard link beside the database) as soon as its
snapshot names it, so a sweep cannot take it from under the archive.

The sweep is played by a thread that deletes the blob once the archive is
being written, while a large blob before it is copied in.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
import threading
from pathlib import Path

from bastion.store import archive_read, backup
from bastion.store.leftovers import STAGING_PREFIX, partial_name
from tests.store.test_backup import FAST, make_blob, make_data_dir, pg_store_with_users, schema_of, sql
from tests.support.server import wait_for


def test_a_blob_swept_while_the_archive_is_written_is_still_archived(tmp_path: Path) -> None:
    db, files, digests = make_data_dir(tmp_path / "src")
    big = os.urandom(48 * 1024 * 1024)  # archived first (its hash sorts first), taking a while
    small = b"swept while the backup ran"
    while (big_digest := hashlib.sha256(big).hexdigest()) > (small_digest := hashlib.sha256(small).hexdigest()):
        small += b"."
    for i, digest in enumerate((make_blob(files, big), make_blob(files, small))):
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            conn.execute(
                "INSERT INTO files (id, owner, name, size, sha256, created_at, updated_at) VALUES (?,?,?,?,?,?,?)",
                (f"g{i}", "user0000", f"g{i}", 0, digest, 1.0, 1.0),
            )
    assert big_digest < small_digest
    out = tmp_path / "backups" / "a.bbk"
    partial = out.with_name(partial_name(out.name))
    swept = threading.Event()

    def sweep() -> None:
        wait_for(partial.exists, 60, interval=0.001, what="the archive to be begun")
        (files / "blobs" / small_digest[:2] / small_digest).unlink()
        swept.set()

    sweeper = threading.Thread(target=sweep)
    sweeper.start()
    try:
        info = backup.backup_sqlite(db, files, out, None, scrypt_log_n=FAST)
    finally:
        sweeper.join()
    assert swept.is_set()
    assert info.blobs == 4  # the two of make_data_dir, the big one and the swept one
    staging = tmp_path / "check"
    staging.mkdir()
    manifest = archive_read.read_archive(out, staging, None)
    assert f"files/blobs/{small_digest[:2]}/{small_digest}" in {m.path for m in manifest.members}
    assert (staging / "files" / "blobs" / small_digest[:2] / small_digest).read_bytes() == small
    assert digests[0] in {m.sha256 for m in manifest.members}


async def test_a_blob_swept_while_pg_dump_runs_is_still_archived(tmp_path: Path) -> None:
    """On PostgreSQL the blobs were looked for only after ``pg_dump`` had dumped the whole schema."""
    dsn, files = await pg_store_with_users(tmp_path, 1)
    (digest,) = [m[0] for m in await sql(f'SELECT sha256 FROM "{schema_of(dsn)}".files')]
    blob = files / "blobs" / digest[:2] / digest
    content = blob.read_bytes()
    out = tmp_path / "backups" / "a.bbk"

    def dumping() -> bool:
        return any(tmp_path.glob(f"{STAGING_PREFIX}*/postgres.dump"))

    def sweep() -> None:
        wait_for(dumping, 60, interval=0.001, what="pg_dump to be started")
        blob.unlink()

    sweeper = threading.Thread(target=sweep)
    sweeper.start()
    try:
        info = await backup.backup_postgres(dsn, files, out, None, scrypt_log_n=FAST)
    finally:
        await asyncio.to_thread(sweeper.join)
    assert info.blobs == 1
    staging = tmp_path / "check"
    await asyncio.to_thread(staging.mkdir)
    await asyncio.to_thread(archive_read.read_archive, out, staging, None)
    assert await asyncio.to_thread((staging / "files" / "blobs" / digest[:2] / digest).read_bytes) == content
