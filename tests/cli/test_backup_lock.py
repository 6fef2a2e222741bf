"""``bastion backup`` takes the backup directory's lock, as a server's backups do: real subprocesses, a real
``flock`` held by this test process."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bastion.security.credentials import User
from bastion.services.backup import LOCK_FILE
from bastion.store.archive import list_archives
from bastion.store.backup import verify_archive
from bastion.store.sqlite import SQLiteStore
from tests.support.server import LineReader, bastion_cli, clean_env


def make_store(data_dir: Path) -> None:
    async def fill() -> None:
        async with SQLiteStore(data_dir / "bastion.db") as store:
            await store.create_user(User("ada", frozenset(), None, 1.0))

    data_dir.mkdir(mode=0o700)
    asyncio.run(fill())


@contextmanager
def held(directory: Path) -> Iterator[int]:
    """The backup directory's lock, held as a server taking a backup holds it."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield fd
    finally:
        os.close(fd)


def test_a_cli_backup_does_not_run_while_another_backup_holds_the_directory(tmp_path: Path) -> None:
    """The CLI took no lock: it wrote (and published) its archive while a server's scheduled backup was
    being taken in the same directory. With --wait 0 it now fails at once, exit 3, and writes nothing."""
    data = tmp_path / "data"
    make_store(data)
    with held(data / "backups"):
        result = bastion_cli("backup", "--data-dir", str(data), "--wait", "0", timeout=60)
        assert result.returncode == 3, (result.returncode, result.stderr)
        assert "another backup is being taken" in result.stderr
        assert list_archives(data / "backups") == []
    result = bastion_cli("backup", "--data-dir", str(data), "--wait", "0", timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(list_archives(data / "backups")) == 1


def test_a_cli_backup_waits_for_the_lock_then_runs(tmp_path: Path) -> None:
    """By default it waits (up to --wait seconds) for the other backup to finish, saying so, then runs."""
    data = tmp_path / "data"
    make_store(data)
    directory = tmp_path / "elsewhere"  # backup.directory: the server's directory, so the CLI's default too
    env = clean_env({"BASTION_BACKUP__DIRECTORY": str(directory)})
    with held(directory):
        proc = subprocess.Popen(
            [sys.executable, "-m", "bastion", "backup", "--data-dir", str(data), "--wait", "60"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            errors = LineReader(proc.stderr)
            line = errors.next_line(timeout=30)
            assert line is not None and "waiting" in line, line
            assert proc.poll() is None and list_archives(directory) == []
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    start = time.monotonic()
    assert proc.wait(timeout=60) == 0, errors.drain()
    assert time.monotonic() - start < 30
    archives = list_archives(directory)
    assert len(archives) == 1 and not (data / "backups").exists()
    verify_archive(directory / archives[0].name, None)
