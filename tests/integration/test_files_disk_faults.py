"""The files service when its disk fails under a real ``bastion serve``: a full file system, a directory it
cannot write. Each answers a coded error, keeps what is already stored (files and the bytes of open uploads),
and the server goes on serving.

Needs root (to mount a small tmpfs, and ``chattr +i``); skipped otherwise, with the reason.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import bastion
from bastion.client.sync import SyncClient
from tests.conftest import StartServer
from tests.support.server import ServerProcess

KiB = 1024
CHUNK = 64 * KiB


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pieces(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), CHUNK):
        yield data[i : i + CHUNK]


@contextmanager
def small_fs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path`` (the test is skipped where one cannot be mounted)."""
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextmanager
def immutable(path: Path) -> Iterator[None]:
    """``path`` cannot be written, even by root (``chattr +i``), for the block."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("chattr +i needs root")
    if subprocess.run(["chattr", "+i", str(path)], check=False, capture_output=True).returncode != 0:
        pytest.skip("this file system has no immutable flag")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def client(server: ServerProcess) -> SyncClient:
    return SyncClient(server.address, token_file=str(server.token_file), timeout=20)


def get(c: SyncClient, name: str) -> bytes:
    return b"".join(c.stream("files.download", name=name))


def test_a_full_disk_is_resource_exhausted_and_the_upload_resumes_once_there_is_room(
    server_factory: StartServer, tmp_path: Path
) -> None:
    disk = small_fs(tmp_path / "small", "1m")
    directory = disk.__enter__()
    try:
        server = server_factory({"BASTION_FILES__DIRECTORY": str(directory)})
        kept, big = os.urandom(200 * KiB), os.urandom(1536 * KiB)
        with client(server) as c:
            info = c.call("files.begin_upload", name="kept", size=len(kept), sha256=sha(kept))
            assert c.upload("files.upload", pieces(kept), upload_id=info["upload_id"])["complete"]
            info = c.call("files.begin_upload", name="big", size=len(big), sha256=sha(big))
            with pytest.raises(bastion.ResourceExhausted, match="no space left") as full:
                c.upload("files.upload", pieces(big), upload_id=info["upload_id"])
            assert "continue from offset" in full.value.message
            assert get(c, "kept") == kept  # what was stored is intact, and the server still serves
            held = c.call("files.upload_status", upload_id=info["upload_id"])["offset"]
            assert 0 < held < len(big)
            subprocess.run(["mount", "-o", "remount,size=8m", str(directory)], check=True)
            done = c.upload("files.upload", pieces(big[held:]), upload_id=info["upload_id"], offset=held)
            assert done["complete"] and done["file"]["sha256"] == sha(big)
            assert get(c, "big") == big
            usage = c.call("files.usage")
            assert (usage["files_bytes"], usage["reserved_bytes"]) == (len(kept) + len(big), 0)
    finally:
        disk.__exit__(None, None, None)


def test_an_unwritable_files_directory_is_unavailable_and_reserves_nothing(server: ServerProcess) -> None:
    directory = server.data_dir / "files"
    kept = b"kept contents"
    with client(server) as c:
        info = c.call("files.begin_upload", name="kept", size=len(kept), sha256=sha(kept))
        assert c.upload("files.upload", [kept], upload_id=info["upload_id"])["complete"]
        with immutable(directory / "uploads"):
            with pytest.raises(bastion.Unavailable, match="cannot write"):
                c.call("files.begin_upload", name="new", size=3, sha256=sha(b"new"))
            assert c.call("files.usage")["reserved_bytes"] == 0
            assert c.call("files.uploads")["uploads"] == []
            assert get(c, "kept") == kept
        info = c.call("files.begin_upload", name="new", size=3, sha256=sha(b"new"))
        # The blobs' directory refuses the finished upload: the bytes stay, and sending offset=size again ends it.
        blob_dir = directory / "blobs" / sha(b"new")[:2]
        blob_dir.mkdir(mode=0o700, exist_ok=True)
        with immutable(blob_dir):
            with pytest.raises(bastion.Unavailable, match="cannot write"):
                c.upload("files.upload", [b"new"], upload_id=info["upload_id"])
            assert c.call("files.upload_status", upload_id=info["upload_id"])["offset"] == 3
        done = c.upload("files.upload", [], upload_id=info["upload_id"], offset=3)
        assert done["complete"] and get(c, "new") == b"new"
