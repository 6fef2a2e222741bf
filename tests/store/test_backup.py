"""Backup archives (bastion/store/backup.py): real SQLite files, real blobs on disk."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
import time
from pathlib import Path

import pytest

from bastion.exceptions import DataLoss, FailedPrecondition, InvalidArgument
from bastion.security.credentials import User
from bastion.store import backup as archive
from bastion.store.sqlite import SQLiteStore

FAST = 10  # scrypt log2(n) for tests: the format accepts 10..20; the default is 17


def make_blob(files_dir: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    path = files_dir / "blobs" / digest[:2] / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def make_data_dir(root: Path, users: int = 50) -> tuple[Path, Path, list[str]]:
    """A data dir with a migrated SQLite store, ``users`` users and two referenced blobs (and one orphan)."""

    async def fill() -> None:
        async with SQLiteStore(root / "bastion.db") as store:
            for i in range(users):
                await store.create_user(User(f"user{i:04d}", frozenset(), None, 1.0))

    asyncio.run(fill())
    files = root / "files"
    digests = [make_blob(files, os.urandom(70_000)), make_blob(files, b"hello" * 1000)]
    make_blob(files, b"orphan: no file row names me")
    with contextlib.closing(sqlite3.connect(root / "bastion.db")) as conn, conn:
        for i, digest in enumerate(digests):
            conn.execute(
                "INSERT INTO files (id, owner, name, size, sha256, created_at, updated_at) VALUES (?,?,?,?,?,?,?)",
                (f"f{i}", "user0000", f"n{i}", 0, digest, 1.0, 1.0),
            )
    return root / "bastion.db", files, digests


def users_in(db: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [row[0] for row in conn.execute("SELECT name FROM users ORDER BY name")]


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    return make_data_dir(tmp_path / "src")


@pytest.mark.parametrize("passphrase", [None, b"correct horse"], ids=["plain", "encrypted"])
def test_round_trip_restores_the_database_and_the_referenced_blobs(
    tmp_path: Path, source: tuple[Path, Path, list[str]], passphrase: bytes | None
) -> None:
    db, files, digests = source
    out = tmp_path / "backups" / archive.archive_name(time.time())
    info = archive.backup_sqlite(db, files, out, passphrase, scrypt_log_n=FAST)
    assert info.encrypted is bool(passphrase)
    assert info.size == out.stat().st_size and info.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert (info.backend, info.members, info.blobs) == ("sqlite", 3, 2)  # the orphan blob is not referenced
    assert out.stat().st_mode & 0o777 == 0o600

    target = tmp_path / "restored"
    target.mkdir()
    result = archive.restore_sqlite(out, target / "bastion.db", target / "files", passphrase)
    assert result.kept == []
    assert users_in(target / "bastion.db") == users_in(db)
    for digest in digests:
        restored = target / "files" / "blobs" / digest[:2] / digest
        assert hashlib.sha256(restored.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in (target / "files" / "blobs").rglob("*") if p.is_file()) == sorted(digests)
    assert [p.name for p in target.iterdir() if p.name.startswith(".restore")] == []  # staging removed


def test_restoring_again_keeps_the_old_data_aside(tmp_path: Path, source: tuple[Path, Path, list[str]]) -> None:
    db, files, _ = source
    out = tmp_path / "a.bbk"
    archive.backup_sqlite(db, files, out, None)
    target = tmp_path / "restored"
    target.mkdir()
    archive.restore_sqlite(out, target / "bastion.db", target / "files", None)
    with contextlib.closing(sqlite3.connect(target / "bastion.db")) as conn, conn:
        conn.execute("DELETE FROM users")
    result = archive.restore_sqlite(out, target / "bastion.db", target / "files", None)
    assert len(users_in(target / "bastion.db")) == 50
    kept = [Path(p) for p in result.kept]
    assert {p.name.split(".pre-restore-")[0] for p in kept} == {"bastion.db", "files"}
    assert users_in(next(p for p in kept if p.name.startswith("bastion.db"))) == []


def flip(path: Path, position: int) -> bytes:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))
    return bytes(data)


@pytest.mark.parametrize("passphrase", [None, b"pw"], ids=["plain", "encrypted"])
@pytest.mark.parametrize("where", ["magic", "header", "salt", "manifest", "middle", "last byte"])
def test_one_flipped_byte_anywhere_is_refused_and_nothing_changes(
    tmp_path: Path, source: tuple[Path, Path, list[str]], where: str, passphrase: bytes | None
) -> None:
    db, files, _ = source
    out = tmp_path / "a.bbk"
    archive.backup_sqlite(db, files, out, passphrase, scrypt_log_n=FAST)
    size = out.stat().st_size
    position = {"magic": 2, "header": 10, "salt": 25, "manifest": 100, "middle": size // 2, "last byte": size - 1}
    flip(out, position[where])

    target = tmp_path / "restored"
    target.mkdir()
    (target / "bastion.db").write_bytes(b"the old database")
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises((DataLoss, InvalidArgument)) as caught:
        archive.restore_sqlite(out, target / "bastion.db", target / "files", passphrase)
    if where not in ("salt", "header") or not passphrase:  # a damaged encrypted header reads as a wrong passphrase
        assert caught.type is DataLoss
    assert "corrupt" in str(caught.value) or "damaged" in str(caught.value) or "not a bastion" in str(caught.value)
    assert sorted(p.name for p in target.iterdir()) == before
    assert (target / "bastion.db").read_bytes() == b"the old database"


@pytest.mark.parametrize("passphrase", [None, b"pw"], ids=["plain", "encrypted"])
def test_truncated_or_extended_archives_are_refused(
    tmp_path: Path, source: tuple[Path, Path, list[str]], passphrase: bytes | None
) -> None:
    db, files, _ = source
    out = tmp_path / "a.bbk"
    archive.backup_sqlite(db, files, out, passphrase, scrypt_log_n=FAST)
    data = out.read_bytes()
    for damaged in (data[:-1], data[: len(data) // 2], data[:70], data + b"\0", data + data[66:]):
        out.write_bytes(damaged)
        with pytest.raises(DataLoss):
            archive.verify_archive(out, passphrase)


def test_encrypted_archives_need_the_right_passphrase(tmp_path: Path, source: tuple[Path, Path, list[str]]) -> None:
    db, files, _ = source
    out = tmp_path / "a.bbk"
    archive.backup_sqlite(db, files, out, b"right", scrypt_log_n=FAST)
    assert b"user0001" not in out.read_bytes()  # encrypted, not merely checksummed
    with pytest.raises(InvalidArgument, match="wrong passphrase"):
        archive.verify_archive(out, b"wrong")
    with pytest.raises(InvalidArgument, match="encrypted: give its passphrase"):
        archive.verify_archive(out, None)
    assert archive.verify_archive(out, b"right").backend == "sqlite"


def test_a_damaged_blob_fails_the_backup_instead_of_being_archived(
    tmp_path: Path, source: tuple[Path, Path, list[str]]
) -> None:
    db, files, digests = source
    blob = files / "blobs" / digests[0][:2] / digests[0]
    flip(blob, 5)
    out = tmp_path / "a.bbk"
    with pytest.raises(DataLoss, match="does not match its SHA-256"):
        archive.backup_sqlite(db, files, out, None)
    assert list(tmp_path.glob("*.bbk")) == [] and list(tmp_path.glob(".*partial")) == []


def test_restore_refuses_a_database_another_process_has_open(
    tmp_path: Path, source: tuple[Path, Path, list[str]]
) -> None:
    db, files, _ = source
    out = tmp_path / "a.bbk"
    archive.backup_sqlite(db, files, out, None)

    async def while_open() -> None:
        async with SQLiteStore(db):
            with pytest.raises(FailedPrecondition, match="in use"):
                archive.restore_sqlite(out, db, files, None)

    asyncio.run(while_open())
    archive.restore_sqlite(out, db, files, None)  # closed: fine


def test_backup_while_writes_continue_holds_exactly_a_prefix_of_them(tmp_path: Path) -> None:
    """Every write acknowledged before the backup started is in it; nothing after it ended is."""
    db = tmp_path / "live" / "bastion.db"
    out = tmp_path / "a.bbk"

    async def main() -> tuple[int, int]:
        async with SQLiteStore(db) as store:
            acknowledged = 0
            stop, warmed_up = asyncio.Event(), asyncio.Event()

            async def writer() -> None:
                nonlocal acknowledged
                while not stop.is_set():
                    await store.create_user(User(f"u{acknowledged:06d}", frozenset(), None, 1.0))
                    acknowledged += 1
                    if acknowledged == 200:
                        warmed_up.set()

            task = asyncio.create_task(writer())
            await warmed_up.wait()
            before = acknowledged
            await asyncio.to_thread(archive.backup_sqlite, db, tmp_path / "files", out, None)
            after = acknowledged
            stop.set()
            await task
            return before, after

    before, after = asyncio.run(main())
    target = tmp_path / "restored"
    target.mkdir()
    archive.restore_sqlite(out, target / "bastion.db", target / "files", None)
    names = users_in(target / "bastion.db")
    assert names == [f"u{i:06d}" for i in range(len(names))]  # a prefix: one consistent point in time
    assert before <= len(names) <= after + 1  # +1: the write in flight may have committed, unacknowledged


def test_the_manifest_may_only_name_known_paths(tmp_path: Path) -> None:
    bad = archive.Manifest(
        "bastion-backup", 1, "0", 4, "sqlite", 1.0, "all",
        [archive.Member("db/bastion.db", 1, "0" * 64), archive.Member("../../etc/passwd", 1, "0" * 64)],
    )  # fmt: skip
    import msgspec

    with pytest.raises(DataLoss, match="may not"):
        archive._decode_manifest(msgspec.json.encode(bad))


def test_archives_are_listed_by_time_and_old_scheduled_ones_pruned(tmp_path: Path) -> None:
    names = [archive.archive_name(1_700_000_000 + i, scheduled=i % 2 == 0) for i in range(6)]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an archive")
    assert [a.name for a in archive.list_archives(tmp_path)] == sorted(names)
    assert archive.list_archives(tmp_path)[0].created_at == 1_700_000_000
    removed = archive.prune_scheduled(tmp_path, keep=1)
    assert removed == [names[0], names[2]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names[1::2], names[4], "notes.txt"])


def test_highly_compressible_members_round_trip(tmp_path: Path) -> None:
    """A chunk that inflates to more than one read's worth (the decompressor's unconsumed tail)."""
    db, files, _ = make_data_dir(tmp_path / "src", users=10)
    digest = make_blob(files, b"\0" * 5_000_000)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("INSERT INTO files VALUES ('z', 'user0000', 'zeros', 5000000, ?, 1.0, 1.0)", (digest,))
    out = tmp_path / "a.bbk"
    info = archive.backup_sqlite(db, files, out, b"pw", scrypt_log_n=FAST)
    assert info.blobs == 3 and info.size < 100_000
    assert archive.verify_archive(out, b"pw").blobs == "referenced"
