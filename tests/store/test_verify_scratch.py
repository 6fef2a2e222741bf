"""Verifying an archive (bastion/store/backup.py ``verify_archive``, ``bastion restore --check``) without a
scratch directory: the decrypted database it checks is written to a private temporary directory, never
into the backup directory -- a directory meant to hold only (perhaps encrypted) archives, perhaps a share
or off-site -- and removed afterwards."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.store import backup
from tests.store.test_backup import FAST, make_data_dir
from tests.support.server import bastion_cli


@contextlib.contextmanager
def watching(directory: Path) -> Iterator[set[str]]:
    """Every name seen in ``directory`` by a thread scanning it over and over while the block runs."""
    seen: set[str] = set()
    done = threading.Event()

    def scan() -> None:
        while not done.is_set():
            with os.scandir(directory) as entries:
                seen.update(entry.name for entry in entries)

    thread = threading.Thread(target=scan, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join(30)


@pytest.fixture
def encrypted_archive(tmp_path: Path) -> Path:
    db, files, _ = make_data_dir(tmp_path / "data", users=5)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:  # a database that takes a while to unpack
        conn.execute("CREATE TABLE padding (b BLOB)")
        conn.executemany("INSERT INTO padding VALUES (?)", [(os.urandom(100_000),) for _ in range(100)])
    out = tmp_path / "backups" / "a.bbk"
    backup.backup_sqlite(db, files, out, b"pw", scrypt_log_n=FAST)
    return out


def test_verify_without_scratch_writes_the_decrypted_database_only_to_a_private_temporary_directory(
    encrypted_archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database is looked at where it is checked (``_check_integrity``, which runs while it is on disk):
    it was in a staging directory in the backup directory, beside the archive."""
    checked: list[tuple[Path, int, list[str]]] = []
    real = backup._check_integrity

    def check_integrity(conn: sqlite3.Connection, what: str) -> None:
        file = Path(conn.execute("PRAGMA database_list").fetchone()[2])
        checked.append((file, stat.S_IMODE(file.parent.stat().st_mode), os.listdir(encrypted_archive.parent)))
        real(conn, what)

    monkeypatch.setattr(backup, "_check_integrity", check_integrity)
    with watching(encrypted_archive.parent) as seen:
        manifest = backup.verify_archive(encrypted_archive, b"pw")
    assert manifest.backend == "sqlite"
    [(file, mode, listing)] = checked
    assert listing == [encrypted_archive.name]
    assert encrypted_archive.parent not in file.parents
    assert mode == 0o700 and not file.parent.exists()  # private, and gone once verified
    assert seen == {encrypted_archive.name}


def test_restore_check_without_a_data_directory_leaves_the_backup_directory_alone(
    encrypted_archive: Path, tmp_path: Path
) -> None:
    env = {"BASTION_BACKUP_PASSPHRASE": "pw"}
    with watching(encrypted_archive.parent) as seen:
        result = bastion_cli(
            "restore", str(encrypted_archive), "--check", "--data-dir", str(tmp_path / "none"), env=env, timeout=60
        )
    assert result.returncode == 0, result.stderr
    assert "archive OK" in result.stdout
    assert seen == {encrypted_archive.name}
    assert sorted(os.listdir(encrypted_archive.parent)) == [encrypted_archive.name]
    assert not (tmp_path / "none").exists()
