"""Backups and their archives (bastion/store/backup.py, bastion/store/archive.py): real SQLite files, real
PostgreSQL schemas, real blobs on disk."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import sqlite3
import subprocess
import sys
import tarfile
import time
import tracemalloc
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from bastion.exceptions import DataLoss, FailedPrecondition, InvalidArgument, ResourceExhausted
from bastion.security.credentials import User
from bastion.store import PostgresStore, archive, archive_read, backup, backup_pg, leftovers, migrations, open_store
from bastion.store.sqlite import SQLiteStore
from tests.support.stores import postgres_dsn, run_sync, store_location

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
    info = backup.backup_sqlite(db, files, out, passphrase, scrypt_log_n=FAST)
    assert info.encrypted is bool(passphrase)
    assert info.size == out.stat().st_size and info.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert (info.backend, info.members, info.blobs) == ("sqlite", 3, 2)  # the orphan blob is not referenced
    assert out.stat().st_mode & 0o777 == 0o600

    target = tmp_path / "restored"
    target.mkdir()
    result = backup.restore_sqlite(out, target / "bastion.db", target / "files", passphrase)
    assert result.kept == []
    assert users_in(target / "bastion.db") == users_in(db)
    for digest in digests:
        restored = target / "files" / "blobs" / digest[:2] / digest
        assert hashlib.sha256(restored.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in (target / "files" / "blobs").rglob("*") if p.is_file()) == sorted(digests)
    assert [p.name for p in target.iterdir() if p.name.startswith(".restore")] == []  # staging removed


def test_restored_files_directories_are_private_whatever_the_umask(
    tmp_path: Path, source: tuple[Path, Path, list[str]]
) -> None:
    """The restored files directory and its ``blobs/`` were made with the umask's mode (0755 under 022), so
    other local users could list which contents (by SHA-256) the server holds: every directory is 0700."""
    db, files, _ = source
    out = tmp_path / "a.bbk"
    backup.backup_sqlite(db, files, out, None)
    target = tmp_path / "restored"
    target.mkdir(mode=0o700)
    old = os.umask(0o022)
    try:
        backup.restore_sqlite(out, target / "bastion.db", target / "files", None)
    finally:
        os.umask(old)
    directories = [target / "files", *(p for p in (target / "files").rglob("*") if p.is_dir())]
    assert len(directories) >= 3  # files/, blobs/ and a prefix directory
    assert {str(p.relative_to(target)): oct(p.stat().st_mode & 0o777) for p in directories} == {
        str(p.relative_to(target)): "0o700" for p in directories
    }


def test_old_blobs_linked_beside_a_restore_without_blobs_get_private_directories(tmp_path: Path) -> None:
    """A PostgreSQL restore links the old blobs into the staged files directory; for an archive with no blobs
    that made ``blobs/`` with the umask's mode (0755 under 022)."""
    files = tmp_path / "files"
    make_blob(files, b"an old blob")
    staged = tmp_path / "staged"
    staged.mkdir(mode=0o700)
    old = os.umask(0o022)
    try:
        assert len(backup_pg.link_old_blobs(staged, files)) == 1
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in staged.rglob("*") if p.is_dir()} == {"0o700"}


def test_restoring_again_keeps_the_old_data_aside(tmp_path: Path, source: tuple[Path, Path, list[str]]) -> None:
    db, files, _ = source
    out = tmp_path / "a.bbk"
    backup.backup_sqlite(db, files, out, None)
    target = tmp_path / "restored"
    target.mkdir()
    backup.restore_sqlite(out, target / "bastion.db", target / "files", None)
    with contextlib.closing(sqlite3.connect(target / "bastion.db")) as conn, conn:
        conn.execute("DELETE FROM users")
    result = backup.restore_sqlite(out, target / "bastion.db", target / "files", None)
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
    backup.backup_sqlite(db, files, out, passphrase, scrypt_log_n=FAST)
    size = out.stat().st_size
    position = {"magic": 2, "header": 10, "salt": 25, "manifest": 100, "middle": size // 2, "last byte": size - 1}
    flip(out, position[where])

    target = tmp_path / "restored"
    target.mkdir()
    (target / "bastion.db").write_bytes(b"the old database")
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises((DataLoss, InvalidArgument)) as caught:
        backup.restore_sqlite(out, target / "bastion.db", target / "files", passphrase)
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
    backup.backup_sqlite(db, files, out, passphrase, scrypt_log_n=FAST)
    data = out.read_bytes()
    for damaged in (data[:-1], data[: len(data) // 2], data[:70], data + b"\0", data + data[66:]):
        out.write_bytes(damaged)
        with pytest.raises(DataLoss):
            backup.verify_archive(out, passphrase)


def test_an_archive_whose_database_is_not_at_its_manifests_version_is_refused_and_changes_nothing(
    tmp_path: Path, source: tuple[Path, Path, list[str]]
) -> None:
    """A well-formed archive whose manifest names another schema version than its SQLite copy holds: the
    restore (and verify) refuse it with DataLoss, as the PostgreSQL restore does, before touching anything."""
    db, files, _ = source
    good = tmp_path / "good.bbk"
    info = backup.backup_sqlite(db, files, good, None, scrypt_log_n=FAST)
    assert info.schema_version is not None
    out = tmp_path / "a.bbk"
    reseal_with_version(good, out, info.schema_version - 1)
    target = tmp_path / "restored"
    target.mkdir()
    (target / "bastion.db").write_bytes(b"the old database")
    before = sorted(p.name for p in target.iterdir())

    with pytest.raises(DataLoss, match="schema version"):
        backup.verify_archive(out, None)
    with pytest.raises(DataLoss, match="schema version"):
        backup.restore_sqlite(out, target / "bastion.db", target / "files", None)
    assert sorted(p.name for p in target.iterdir()) == before
    assert (target / "bastion.db").read_bytes() == b"the old database"


def test_encrypted_archives_need_the_right_passphrase(tmp_path: Path, source: tuple[Path, Path, list[str]]) -> None:
    db, files, _ = source
    out = tmp_path / "a.bbk"
    backup.backup_sqlite(db, files, out, b"right", scrypt_log_n=FAST)
    assert b"user0001" not in out.read_bytes()  # encrypted, not merely checksummed
    with pytest.raises(InvalidArgument, match="wrong passphrase"):
        backup.verify_archive(out, b"wrong")
    with pytest.raises(InvalidArgument, match="encrypted: give its passphrase"):
        backup.verify_archive(out, None)
    assert backup.verify_archive(out, b"right").backend == "sqlite"


def test_a_damaged_blob_fails_the_backup_instead_of_being_archived(
    tmp_path: Path, source: tuple[Path, Path, list[str]]
) -> None:
    db, files, digests = source
    blob = files / "blobs" / digests[0][:2] / digests[0]
    flip(blob, 5)
    out = tmp_path / "a.bbk"
    with pytest.raises(DataLoss, match="does not match its SHA-256"):
        backup.backup_sqlite(db, files, out, None)
    assert list(tmp_path.glob("*.bbk")) == [] and list(tmp_path.glob(".*partial")) == []


def test_restore_refuses_a_database_another_process_has_open(
    tmp_path: Path, source: tuple[Path, Path, list[str]]
) -> None:
    db, files, _ = source
    out = tmp_path / "a.bbk"
    backup.backup_sqlite(db, files, out, None)

    async def while_open() -> None:
        async with SQLiteStore(db):
            with pytest.raises(FailedPrecondition, match="in use"):
                backup.restore_sqlite(out, db, files, None)

    asyncio.run(while_open())
    backup.restore_sqlite(out, db, files, None)  # closed: fine


def test_a_restore_that_cannot_put_the_files_in_place_moves_the_old_database_back(
    tmp_path: Path, source: tuple[Path, Path, list[str]]
) -> None:
    """The files directory cannot be renamed aside (here: its aside name is too long; in life, e.g. a mount
    point): refused after the database was already swapped, the restored one must not stay in place."""
    db, files, _ = source
    out = tmp_path / "a.bbk"
    backup.backup_sqlite(db, files, out, None)
    target = tmp_path / "restored"
    target.mkdir()
    backup.restore_sqlite(out, target / "bastion.db", target / "files", None)
    with contextlib.closing(sqlite3.connect(target / "bastion.db")) as conn, conn:
        conn.execute("DELETE FROM users WHERE name != 'user0000'")
    stuck = target / ("f" * 250)  # "<name>.pre-restore-<time>" is longer than a file name may be
    stuck.mkdir()
    (stuck / "kept").write_bytes(b"old files")
    before = sorted(p.name for p in target.iterdir())

    with pytest.raises(FailedPrecondition, match="cannot put the restored data in place"):
        backup.restore_sqlite(out, target / "bastion.db", stuck, None)
    assert sorted(p.name for p in target.iterdir()) == before
    assert users_in(target / "bastion.db") == ["user0000"]  # the old database, not the archive's
    assert (stuck / "kept").read_bytes() == b"old files"


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
            await asyncio.to_thread(backup.backup_sqlite, db, tmp_path / "files", out, None)
            after = acknowledged
            stop.set()
            await task
            return before, after

    before, after = asyncio.run(main())
    target = tmp_path / "restored"
    target.mkdir()
    backup.restore_sqlite(out, target / "bastion.db", target / "files", None)
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
        archive_read._decode_manifest(msgspec.json.encode(bad))


def test_archives_are_listed_by_time_and_old_scheduled_ones_pruned(tmp_path: Path) -> None:
    mine, theirs = "0123456789abcdef", "fedcba9876543210"
    names = [
        archive.archive_name(1_700_000_000 + i, scheduled=i % 2 == 0, owner=mine if i % 2 == 0 else None)
        for i in range(6)
    ]
    others = [
        archive.archive_name(1_700_000_000.5, scheduled=True, owner=theirs),  # another server's, in the same directory
        archive.archive_name(1_699_000_000, scheduled=True),  # an older bastion's: no owner, could be anyone's
    ]
    for name in names + others:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an archive")
    assert [a.name for a in archive.list_archives(tmp_path)] == sorted(names + others)
    assert archive.list_archives(tmp_path)[1].created_at == 1_700_000_000
    assert [a.owner for a in archive.list_archives(tmp_path)][:3] == [None, mine, theirs]
    removed = archive.prune_scheduled(tmp_path, keep=1, owner=mine)
    assert removed == [names[0], names[2]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names[1::2], names[4], *others, "notes.txt"])
    assert archive.prune_scheduled(tmp_path, keep=1, owner=theirs) == []


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/New_York", "Australia/Sydney"])
def test_archive_times_are_read_as_utc_whatever_the_local_zone_and_its_daylight_saving(
    tmp_path: Path, zone: str
) -> None:
    """Names carry UTC; reading them back must not depend on the zone or on whether DST is on (July, January)."""
    times = [1_720_000_000.25, 1_704_100_000.5]  # mid-July 2024, end of December 2023
    for at in times:
        (tmp_path / archive.archive_name(at)).write_bytes(b"x")
    script = (
        "import sys; from pathlib import Path; from bastion.store import archive; "
        "print(*[a.created_at for a in archive.list_archives(Path(sys.argv[1]))])"
    )
    env = {**os.environ, "TZ": zone, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True, check=True, timeout=60
    )
    assert [float(v) for v in out.stdout.split()] == sorted(times)


def test_highly_compressible_members_round_trip(tmp_path: Path) -> None:
    """A chunk that inflates to more than one read's worth (the decompressor's unconsumed tail)."""
    db, files, _ = make_data_dir(tmp_path / "src", users=10)
    digest = make_blob(files, b"\0" * 5_000_000)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("INSERT INTO files VALUES ('z', 'user0000', 'zeros', 5000000, ?, 1.0, 1.0)", (digest,))
    out = tmp_path / "a.bbk"
    info = backup.backup_sqlite(db, files, out, b"pw", scrypt_log_n=FAST)
    assert info.blobs == 3 and info.size < 200_000  # the 5 MB blob compressed; the rest is the database
    assert backup.verify_archive(out, b"pw").blobs == "referenced"


# -- PostgreSQL (skipped without BASTION_TEST_POSTGRES_DSN) --------------------------------------------


def schema_of(dsn: str) -> str:
    return urllib.parse.parse_qs(urllib.parse.urlsplit(dsn).query)["search_path"][0]


async def sql(query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(postgres_dsn(), timeout=10)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def schemas_like(prefix: str) -> list[str]:
    rows = await sql("SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1) ORDER BY 1", prefix)
    return [row[0] for row in rows]


async def pg_users(schema: str) -> list[str]:
    return [row[0] for row in await sql(f'SELECT name FROM "{schema}".users ORDER BY name')]


@pytest.fixture
def pg_cleanup() -> Iterator[list[str]]:
    """Prefixes of schemas a test made besides store_location's (renamed aside, restored): dropped after it."""
    prefixes: list[str] = []
    yield prefixes

    async def drop() -> None:
        for prefix in prefixes:
            for name in await schemas_like(prefix):
                await sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')

    if prefixes:
        run_sync(drop)


async def pg_store_with_users(tmp_path: Path, n: int) -> tuple[str, Path]:
    """A migrated PostgreSQL store (its DSN) with users u000000… and one referenced blob in ``files``."""
    dsn = store_location("postgresql", tmp_path, "live")
    files = tmp_path / "files"
    digest = make_blob(files, b"referenced " * 100)
    make_blob(files, b"an orphan blob")
    async with open_store(dsn) as store:
        for i in range(n):
            await store.create_user(User(f"u{i:06d}", frozenset(), None, 1.0))
        await sql(
            f'INSERT INTO "{schema_of(dsn)}".files (id, owner, name, size, sha256, created_at, updated_at)'
            " VALUES ('f0', 'u000000', 'n', 1100, $1, 1.0, 1.0)",
            digest,
        )
    return dsn, files


async def test_postgres_backup_during_writes_restores_exactly_a_prefix(tmp_path: Path, pg_cleanup: list[str]) -> None:
    live = store_location("postgresql", tmp_path, "live")
    pg_cleanup.append(schema_of(live) + "_")
    files = tmp_path / "files"
    digests = [make_blob(files, os.urandom(70_000)), make_blob(files, b"hello" * 1000)]
    make_blob(files, b"orphan: no file row names me")
    out = tmp_path / "backups" / archive.archive_name(time.time())
    async with open_store(live) as store:
        rows = [(f"f{i}", "u000000", f"n{i}", 1, d, 1.0, 1.0) for i, d in enumerate(digests)]
        await sql(
            f'INSERT INTO "{schema_of(live)}".files (id, owner, name, size, sha256, created_at, updated_at)'
            " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[],"
            " $6::float8[], $7::float8[])",
            *map(list, zip(*rows, strict=True)),
        )
        acknowledged = 0
        stop, warmed_up = asyncio.Event(), asyncio.Event()

        async def writer() -> None:
            nonlocal acknowledged
            while not stop.is_set():
                await store.create_user(User(f"u{acknowledged:06d}", frozenset(), None, 1.0))
                acknowledged += 1
                if acknowledged == 100:
                    warmed_up.set()

        task = asyncio.create_task(writer())
        await warmed_up.wait()
        before = acknowledged
        info = await backup.backup_postgres(store, files, out, b"pw", scrypt_log_n=FAST)
        after = acknowledged
        stop.set()
        await task
    assert (info.backend, info.members, info.blobs, info.encrypted) == ("postgresql", 3, 2, True)
    assert out.stat().st_mode & 0o777 == 0o600
    assert backup.verify_archive(out, b"pw").schema == schema_of(live)
    assert await pg_users(schema_of(live)) != []  # the source is untouched

    # Into a fresh schema of another name: the dump recreates its own schema name, so free it first.
    await sql(f'ALTER SCHEMA "{schema_of(live)}" RENAME TO "{schema_of(live)}_src"')
    target = store_location("postgresql", tmp_path, "restored")  # exists, empty
    result = await backup.restore_postgres(out, target, tmp_path / "restored-files", b"pw")
    assert result.restored[0] == f"schema {schema_of(target)}" and result.kept == []
    names = await pg_users(schema_of(target))
    assert names == [f"u{i:06d}" for i in range(len(names))]  # a prefix: one consistent point in time
    assert before <= len(names) <= after + 1  # +1: the write in flight may have committed, unacknowledged
    restored_blobs = sorted(p.name for p in (tmp_path / "restored-files" / "blobs").rglob("*") if p.is_file())
    assert restored_blobs == sorted(digests)  # the referenced ones, not the orphan
    assert await schemas_like(schema_of(live)) == [f"{schema_of(live)}_src"]  # nothing left under the old name
    async with open_store(target) as restored:  # a working store: migrated already, same rows
        assert restored.schema_version == info.schema_version
        assert (await restored.get_user("u000000")) is not None
        record = await restored.files_get("f0")
        assert record is not None and record.sha256 == digests[0]


async def test_postgres_restore_refuses_a_non_empty_schema_unless_forced(tmp_path: Path, pg_cleanup: list[str]) -> None:
    dsn, files = await pg_store_with_users(tmp_path, 5)
    schema = schema_of(dsn)
    pg_cleanup.append(schema + "_")
    out = tmp_path / "a.bbk"
    info = await backup.backup_postgres(dsn, files, out, None)  # from a DSN: a connection of its own
    assert (info.backend, info.blobs) == ("postgresql", 1)
    async with open_store(dsn) as store:
        await store.create_user(User("late", frozenset(), None, 1.0))
    before = await pg_users(schema)

    with pytest.raises(FailedPrecondition, match="not empty"):
        await backup.restore_postgres(out, dsn, tmp_path / "files-restored", None)
    assert await pg_users(schema) == before and "late" in before
    assert await schemas_like(schema) == [schema] and not (tmp_path / "files-restored").exists()

    result = await backup.restore_postgres(out, dsn, tmp_path / "files-restored", None, force=True)
    aside = result.kept[0].removeprefix("schema ")
    assert aside.startswith(f"{schema}_pre_restore_")
    assert await pg_users(aside) == before  # kept, not dropped
    assert await pg_users(schema) == [f"u{i:06d}" for i in range(5)]

    # An existing but empty schema of the archived name (e.g. made by a DBA, with its grants) is used as it is.
    await sql(f'DROP SCHEMA "{schema}" CASCADE')
    await sql(f'CREATE SCHEMA "{schema}"')
    await backup.restore_postgres(out, dsn, tmp_path / "files-restored", None)
    assert await pg_users(schema) == [f"u{i:06d}" for i in range(5)]


async def test_postgres_a_flipped_byte_or_the_wrong_archive_is_refused_and_changes_nothing(
    tmp_path: Path, pg_cleanup: list[str]
) -> None:
    dsn, files = await pg_store_with_users(tmp_path, 3)
    pg_cleanup.append(schema_of(dsn) + "_")
    out = tmp_path / "a.bbk"
    await backup.backup_postgres(dsn, files, out, None)
    good = out.read_bytes()
    target = store_location("postgresql", tmp_path, "restored")
    for position in (100, len(good) // 2, len(good) - 1):
        flip(out, position)
        with pytest.raises(DataLoss, match="corrupt"):
            await backup.restore_postgres(out, target, tmp_path / "files-restored", None)
        out.write_bytes(good)
        assert await schemas_like(schema_of(target)) == [schema_of(target)]  # still there, still empty
        assert await sql(f"SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = relnamespace "
                         f"WHERE nspname = '{schema_of(target)}'") == []  # fmt: skip
        assert not (tmp_path / "files-restored").exists()

    # The archived schema's name is taken (by the source itself): refused, told why.
    with pytest.raises(FailedPrecondition, match="exists in the target database"):
        await backup.restore_postgres(out, target, tmp_path / "files-restored", None)
    # A SQLite archive is not restored into PostgreSQL.
    db, sqlite_files, _ = await asyncio.to_thread(make_data_dir, tmp_path / "sqlite", 2)
    backup.backup_sqlite(db, sqlite_files, tmp_path / "s.bbk", None)
    with pytest.raises(InvalidArgument, match="holds a sqlite store"):
        await backup.restore_postgres(tmp_path / "s.bbk", target, tmp_path / "files-restored", None)
    assert await schemas_like(schema_of(target)) == [schema_of(target)]


async def test_postgres_a_restore_that_cannot_put_the_files_in_place_changes_nothing(
    tmp_path: Path, pg_cleanup: list[str]
) -> None:
    """The files directory cannot be renamed aside (its aside name is too long; in life, e.g. a mount point):
    the schema renamed aside comes back, and the archive's schema is not left in its place."""
    dsn, files = await pg_store_with_users(tmp_path, 3)
    schema = schema_of(dsn)
    pg_cleanup.append(schema + "_")
    out = tmp_path / "a.bbk"
    await backup.backup_postgres(dsn, files, out, None)
    async with open_store(dsn) as store:
        await store.create_user(User("late", frozenset(), None, 1.0))
    before = await pg_users(schema)
    stuck = tmp_path / ("f" * 250)  # "<name>.pre-restore-<time>" is longer than a file name may be
    stuck.mkdir()
    (stuck / "kept").write_bytes(b"old files")

    with pytest.raises(FailedPrecondition, match="cannot put the restored data in place"):
        await backup.restore_postgres(out, dsn, stuck, None, force=True)
    assert await schemas_like(schema) == [schema]
    assert await pg_users(schema) == before and "late" in before
    assert sorted(p.name for p in stuck.iterdir()) == ["kept"]


def reseal_with_version(src: Path, dest: Path, schema_version: int) -> None:
    """A plain archive like ``src`` whose manifest claims another schema version (its members untouched)."""
    with archive_read.staging_dir(dest.parent) as staging:
        manifest = archive_read.read_archive(src, staging, None)
        db = next(m.path for m in manifest.members if m.path.startswith("db/"))
        archive.write_archive(
            dest, backend=manifest.backend, schema_version=schema_version, created_at=manifest.created_at,
            db_member=(db, staging / db), passphrase=None, schema=manifest.schema,
            blobs=([(m.path, staging / m.path) for m in manifest.members if m.path != db], manifest.blobs),
        )  # fmt: skip


async def test_postgres_an_archive_whose_dump_is_not_at_its_manifests_version_changes_nothing(
    tmp_path: Path, pg_cleanup: list[str]
) -> None:
    """Refused before the target schema is touched: not restored, then found wrong with the old schema aside."""
    dsn, files = await pg_store_with_users(tmp_path, 3)
    schema = schema_of(dsn)
    pg_cleanup.append(schema + "_")
    good = tmp_path / "good.bbk"
    info = await backup.backup_postgres(dsn, files, good, None)
    assert info.schema_version is not None
    out = tmp_path / "a.bbk"
    reseal_with_version(good, out, info.schema_version - 1)
    async with open_store(dsn) as store:
        await store.create_user(User("late", frozenset(), None, 1.0))
    before = await pg_users(schema)

    with pytest.raises(DataLoss, match="version"):
        await backup.restore_postgres(out, dsn, tmp_path / "files-restored", None, force=True)
    assert await schemas_like(schema) == [schema]  # nothing renamed aside
    assert await pg_users(schema) == before and "late" in before
    assert not (tmp_path / "files-restored").exists()


def test_pg_tools_get_the_connection_and_password_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_STORE", "postgresql://u:not-for-children@h/db")
    monkeypatch.setenv("BASTION_BACKUP_PASSPHRASE", "nor this")
    dsn = "postgresql://alice:s%3Acret@db1:5433,db2/app%20db?sslmode=require&search_path=tenant&application_name=x"
    env = backup.pg_environment(PostgresStore(dsn))
    assert {k: env[k] for k in env if k.startswith("PG")} == {
        "PGUSER": "alice", "PGPASSWORD": "s:cret", "PGHOST": "db1,db2", "PGPORT": "5433,", "PGDATABASE": "app db",
        "PGSSLMODE": "require", "PGAPPNAME": "x", "PGOPTIONS": "-c search_path=tenant",
    }  # fmt: skip
    assert not any(k.startswith("BASTION_") for k in env)
    assert backup.pg_environment(PostgresStore("postgresql://bob@h/db", password="from a file"))["PGPASSWORD"] == (
        "from a file"
    )


def test_a_symlink_where_the_temporary_goes_is_not_followed(
    tmp_path: Path, source: tuple[Path, Path, list[str]]
) -> None:
    """In a shared directory another user may plant ``.<name>.partial`` as a symlink to a file of ours:
    opening it with O_TRUNC wrote the archive through it (and renamed the link into place)."""
    db, files, _ = source
    out = tmp_path / "shared" / "a.bbk"
    out.parent.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out.parent / leftovers.partial_name(out.name)).symlink_to(victim)
    info = backup.backup_sqlite(db, files, out, None)
    assert victim.read_text() == "precious"
    assert not out.is_symlink() and out.stat().st_size == info.size
    assert out.stat().st_mode & 0o777 == 0o600
    backup.verify_archive(out, None)


def test_a_backup_never_replaces_an_existing_file(tmp_path: Path, source: tuple[Path, Path, list[str]]) -> None:
    """``--out`` naming an existing file (an older archive, or by a slip the live database) is refused:
    the rename replaced it, and a replaced live database loses every write made after."""
    db, files, _ = source
    before = db.read_bytes()
    with pytest.raises(FailedPrecondition, match="exists"):
        backup.backup_sqlite(db, files, db, None)
    assert db.read_bytes() == before
    assert sorted(p.name for p in db.parent.iterdir() if p.name.startswith(".")) == []


class _Zeros:
    """A file object reading ``size`` zero bytes (a member's data, compressible to almost nothing)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


def craft_archive(path: Path, entries: list[tuple[tarfile.TarInfo, Any]]) -> None:
    """A plain archive framed and sealed exactly as bastion writes them, holding a tar stream of our making."""
    with open(path, "wb") as raw:
        framed = archive._FramedWriter(raw, None, FAST)
        with tarfile.open(fileobj=framed, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            for info, data in entries:
                tar.addfile(info, data)
        framed.finish()


def manifest_entries(db: Path) -> list[tuple[tarfile.TarInfo, Any]]:
    """The manifest and database members of a valid archive of the SQLite store ``db``."""
    member = archive._member(archive.SQLITE_MEMBER, db)
    manifest = archive.Manifest("bastion-backup", 1, "0", migrations.LATEST, "sqlite", 1.0, "all", [member])
    data = msgspec.json.encode(manifest)
    return [
        (archive._tarinfo(archive.MANIFEST, len(data), 1.0), io.BytesIO(data)),
        (archive._tarinfo(archive.SQLITE_MEMBER, member.size, 1.0), io.BytesIO(db.read_bytes())),
    ]


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME], ids=["pax", "gnu-longname"])
def test_an_absurd_extended_tar_header_is_refused_without_reading_it_into_memory(tmp_path: Path, kind: bytes) -> None:
    """tarfile reads a pax or GNU long-name header whole into memory before parsing it: 150 MB of zeros,
    a few hundred KB once compressed, cost 300 MB to verify. bastion writes none but small pax ones."""
    db, _, _ = make_data_dir(tmp_path / "src", users=2)
    bomb = tarfile.TarInfo("././@Bomb")
    bomb.type = kind
    bomb.size = 150 * 1024 * 1024
    path = tmp_path / "bomb.bbk"
    craft_archive(path, [(bomb, _Zeros(bomb.size)), *manifest_entries(db)])
    assert path.stat().st_size < 5 * 1024 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(DataLoss, match="header"):
            backup.verify_archive(path, None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 1024 * 1024, f"{peak / 2**20:.0f} MiB"


_KILL_ON_RENAME = """
import os, signal, sys
from pathlib import Path
from bastion.store import backup

real, calls, kill_at = os.rename, [0], int(sys.argv[4])

def rename(src, dst, *args, **kwargs):
    calls[0] += "restore-journal" not in str(dst)  # the data's renames, not the journal's own
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # the power went out
    return real(src, dst, *args, **kwargs)

os.rename = rename
backup.restore_sqlite(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), None)
"""


@pytest.mark.parametrize("kill_at", [2, 3, 4], ids=["database-aside", "database-in-place", "files-aside"])
def test_a_restore_killed_half_way_is_undone_not_left_half_done(
    tmp_path: Path, source: tuple[Path, Path, list[str]], kill_at: int
) -> None:
    """A restore renames the old database aside, the new one in, the old files aside, the new ones in. Killed
    between two of these, it left no database (a server started there created an empty one) or a new
    database with the old files. A store now refuses to open while a restore is unfinished, and the next
    restore first puts the old data back; so does running that restore again."""
    db, files, digests = source
    out = tmp_path / "a.bbk"
    backup.backup_sqlite(db, files, out, None)
    target = make_data_dir(tmp_path / "target", users=3)
    old_users = users_in(target[0])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    args = [sys.executable, "-c", _KILL_ON_RENAME, str(out), str(target[0]), str(target[1]), str(kill_at)]
    killed = subprocess.run(args, env=env, capture_output=True, timeout=120, check=False)
    assert killed.returncode == -9, killed.stderr.decode()

    async def open_store() -> None:
        async with SQLiteStore(target[0]):
            pass

    with pytest.raises(FailedPrecondition, match="restore"):
        run_sync(open_store)
    assert target[0].exists() or kill_at == 2  # nothing was created meanwhile

    result = backup.restore_sqlite(out, target[0], target[1], None)
    assert users_in(target[0]) == users_in(db)
    assert sorted(p.name for p in (target[1] / "blobs").rglob("*") if p.is_file()) == sorted(digests)
    kept_db = [Path(k) for k in result.kept if Path(k).name.startswith("bastion.db.pre-restore-")]
    assert [users_in(p) for p in kept_db if not p.name.endswith(("-wal", "-shm", "-journal"))] == [old_users]
    leftovers = [p.name for p in target[0].parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_verify_does_not_write_the_blobs_and_restore_checks_the_space_first(
    tmp_path: Path, small_filesystem: Path
) -> None:
    """``bastion restore --check`` verifies in the data directory, perhaps a running server's: it wrote every
    blob there (a disk filled, an OSError). Verifying now only hashes the blobs; a restore that cannot fit
    says how much it needs before it writes anything."""
    db, files, _ = make_data_dir(tmp_path / "src", users=2)
    digest = make_blob(files, os.urandom(3_000_000))  # incompressible: cannot fit in 1 MiB
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("INSERT INTO files VALUES ('big', 'user0000', 'big', 3000000, ?, 1.0, 1.0)", (digest,))
    out = tmp_path / "a.bbk"
    backup.backup_sqlite(db, files, out, None)
    manifest = backup.verify_archive(out, None, scratch=small_filesystem)
    assert len(manifest.members) == 4
    target = small_filesystem / "data"
    with pytest.raises(ResourceExhausted, match="needs"):
        backup.restore_sqlite(out, target / "bastion.db", target / "files", None)
    assert sorted(p.name for p in target.iterdir()) == []


_KILL_MID_BACKUP = """
import os, signal, sys
from pathlib import Path
from bastion.store import archive, backup

real = archive._add_checked

def add_checked(tar, member, source, mtime):
    if member.path.startswith("files/"):  # the database is in the archive: the power goes out
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tar, member, source, mtime)

archive._add_checked = add_checked
backup.backup_sqlite(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), b"pw", scrypt_log_n=10)
"""


def test_a_backup_killed_half_way_leaves_no_plaintext_copy_in_the_backup_directory_and_is_cleaned_up(
    tmp_path: Path, source: tuple[Path, Path, list[str]]
) -> None:
    """The database was copied into a staging directory *in the backup directory* -- unencrypted, though the
    archives are encrypted because that directory may be a share or off-site -- and a backup killed half way
    left that copy and its partial archive there for good (each crash one more copy). The copy is now made
    beside the database, and leftovers of dead processes are removed by the next backup."""
    db, files, _ = source
    backups_dir = tmp_path / "backups"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    args = [sys.executable, "-c", _KILL_MID_BACKUP, str(db), str(files), str(backups_dir / "a.bbk")]
    killed = subprocess.run(args, env=env, capture_output=True, timeout=120, check=False)
    assert killed.returncode == -9, killed.stderr.decode()
    for path in backups_dir.rglob("*"):
        assert not (path.is_file() and b"SQLite format 3" in path.read_bytes()), path

    info = backup.backup_sqlite(db, files, backups_dir / "b.bbk", b"pw", scrypt_log_n=FAST)
    assert sorted(p.name for p in backups_dir.iterdir()) == [info.name]
    assert sorted(p.name for p in db.parent.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("name", ["data#1", "what?", "100%25"])
def test_a_data_directory_whose_name_means_something_in_a_uri_backs_up_and_restores(tmp_path: Path, name: str) -> None:
    """The store was opened read-only through a ``file:`` URI built by pasting the path in: a ``#`` or ``?``
    cut the path short there and dropped ``mode=ro``: SQLite made an empty database there, and that was
    archived (verified, restorable, empty)."""
    db, files, digests = make_data_dir(tmp_path / name, users=5)
    out = tmp_path / "a.bbk"
    backup.backup_sqlite(db, files, out, None)
    assert backup.verify_archive(out, None, scratch=tmp_path / name).backend == "sqlite"
    target = tmp_path / f"restored-{name}"
    backup.restore_sqlite(out, target / "bastion.db", target / "files", None)
    assert users_in(target / "bastion.db") == users_in(db)
    assert sorted(p.name for p in (target / "files").rglob("*") if p.is_file()) == sorted(digests)


_FORGED_COST = """
import resource, secrets, sys
from pathlib import Path
from bastion.exceptions import DataLoss
from bastion.store import archive, backup

resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # 2 GiB of address space: a modest machine
fields = archive._HEADER.pack(archive.MAGIC, 1, 3, 20, 32, 4, 0, archive.CHUNK_SIZE, secrets.token_bytes(16))
path = Path(sys.argv[1])
path.write_bytes(fields + bytes(32) + bytes(archive.CHUNK_SIZE))
try:
    backup.verify_archive(path, b"any passphrase")
except DataLoss as exc:
    print("refused:", exc.message)
"""


def test_a_forged_header_cannot_make_the_key_derivation_take_gigabytes(tmp_path: Path) -> None:
    """The scrypt cost comes from the header, read before anything is authenticated: log2(n)=20, r=32, p=4
    passed the range check, and deriving the key needs 128*r*n = 4 GiB and four times the work -- for a
    file anyone can write. Costs beyond 256 MiB (bastion writes 128 MiB) are refused before deriving."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", _FORGED_COST, str(tmp_path / "forged.bbk")],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and "refused:" in done.stdout, done.stdout + done.stderr
    assert "key derivation" in done.stdout


def test_an_interrupted_restore_is_undone_even_after_its_staging_was_cleared_and_no_backup_is_taken_of_it(
    tmp_path: Path, source: tuple[Path, Path, list[str]]
) -> None:
    """Killed with the new database in place and the old files not yet aside: a backup of that data directory
    would archive a mix (it is refused), and the staging directory of the dead restore -- where undoing puts
    the new database back -- may have been cleared meanwhile by the next backup or restore there."""
    db, files, _ = source
    out = tmp_path / "a.bbk"
    backup.backup_sqlite(db, files, out, None)
    target = make_data_dir(tmp_path / "target", users=3)
    old_users = users_in(target[0])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    args = [sys.executable, "-c", _KILL_ON_RENAME, str(out), str(target[0]), str(target[1]), "3"]
    assert subprocess.run(args, env=env, capture_output=True, timeout=120, check=False).returncode == -9
    with pytest.raises(FailedPrecondition, match="interrupted"):
        backup.backup_sqlite(target[0], target[1], tmp_path / "mix.bbk", None)
    assert not (tmp_path / "mix.bbk").exists()
    with archive_read.staging_dir(target[0].parent):
        pass  # clears the dead restore's staging directory
    result = backup.restore_sqlite(out, target[0], target[1], None)
    assert users_in(target[0]) == users_in(db)
    kept_db = [Path(k) for k in result.kept if Path(k).name.startswith("bastion.db.pre-restore-")]
    assert [users_in(p) for p in kept_db if not p.name.endswith(("-wal", "-shm", "-journal"))] == [old_users]
