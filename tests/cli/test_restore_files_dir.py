"""``bastion restore --files-dir`` may not name the data directory, one of its parents, or any directory the
data directory is inside: restoring renames the files directory aside, and with it would go the database
(SQLite), the admin token, the TLS material and the audit log. Real CLI runs on a real SQLite data directory
and a real PostgreSQL schema; the store functions refuse it too."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from bastion.exceptions import InvalidArgument
from bastion.store import backup
from bastion.store.archive import archive_name
from tests.store.test_backup import FAST, make_data_dir, pg_store_with_users, pg_users, schema_of, schemas_like
from tests.support.server import bastion_cli


def server_files(data: Path) -> dict[str, bytes]:
    """What a server keeps in its data directory besides the store, which a restore must leave alone."""
    (data / "tls").mkdir(exist_ok=True)
    found = {"admin.token": b"secret token\n", "audit.log": b"{}\n", "tls/server.key": b"key"}
    for name, content in found.items():
        (data / name).write_bytes(content)
    return found


def unchanged(data: Path, expected: dict[str, bytes]) -> bool:
    return all((data / name).read_bytes() == content for name, content in expected.items())


def aside(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*pre-restore*"))


@pytest.mark.parametrize("which", ["data-dir", "parent", "symlink", "database"])
def test_a_sqlite_restore_refuses_a_files_dir_holding_the_data_dir(tmp_path: Path, which: str) -> None:
    root = tmp_path / "srv"
    data = root / "data"
    data.mkdir(parents=True)
    db, files, _ = make_data_dir(data)
    kept = server_files(data)
    out = tmp_path / "backups" / archive_name(time.time())
    backup.backup_sqlite(db, files, out, None, scrypt_log_n=FAST)
    target = {"data-dir": data, "parent": root, "symlink": tmp_path / "link", "database": db}[which]
    if which == "symlink":
        target.symlink_to(data)

    result = bastion_cli("restore", str(out), "--data-dir", str(data), "--files-dir", str(target), timeout=60)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert str(target) in result.stderr and str(data) in result.stderr, result.stderr
    assert unchanged(data, kept) and db.is_file() and aside(tmp_path) == []

    with pytest.raises(InvalidArgument, match="files directory"):
        backup.restore_sqlite(out, db, target, None)
    assert unchanged(data, kept) and db.is_file() and aside(tmp_path) == []


@pytest.mark.parametrize("which", ["data-dir", "parent"])
def test_a_postgres_restore_refuses_a_files_dir_holding_the_data_dir(tmp_path: Path, which: str) -> None:
    dsn, files = asyncio.run(pg_store_with_users(tmp_path, 3))
    out = tmp_path / "a.bbk"
    asyncio.run(backup.backup_postgres(dsn, files, out, None, scrypt_log_n=FAST))
    before = asyncio.run(pg_users(schema_of(dsn)))
    root = tmp_path / "srv"
    data = root / "data"
    data.mkdir(parents=True)
    kept = server_files(data)
    target = data if which == "data-dir" else root
    schema = schema_of(dsn)

    result = bastion_cli(
        "restore", str(out), "--store", dsn, "--data-dir", str(data), "--files-dir", str(target), "--force",
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert str(target) in result.stderr and str(data) in result.stderr, result.stderr
    assert unchanged(data, kept) and aside(tmp_path) == []
    assert asyncio.run(pg_users(schema)) == before and asyncio.run(schemas_like(schema)) == [schema]

    with pytest.raises(InvalidArgument, match="files directory"):
        asyncio.run(backup.restore_postgres(out, dsn, target, None, force=True, data_dir=data))
    assert unchanged(data, kept) and aside(tmp_path) == []
    assert asyncio.run(schemas_like(schema)) == [schema]  # nothing renamed aside (no schema left to drop)


def test_the_usual_files_dir_inside_the_data_dir_still_restores(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    db, files, _ = make_data_dir(data)
    out = tmp_path / "a.bbk"
    backup.backup_sqlite(db, files, out, None, scrypt_log_n=FAST)
    result = bastion_cli("restore", str(out), "--data-dir", str(data), "--files-dir", str(files), timeout=60)
    assert result.returncode == 0, result.stderr
    assert (data / "files" / "blobs").is_dir()


@pytest.mark.parametrize("which", ["data-dir", "parent"])
def test_restore_postgres_without_data_dir_still_refuses_a_files_dir_that_is_or_holds_a_data_dir(
    tmp_path: Path, which: str
) -> None:
    """The library function is not told the data directory: it recognises one by what a server keeps in it
    (admin.token, audit.log, tls/, bastion.db), in the files directory itself or a directory directly in it."""
    dsn, files = asyncio.run(pg_store_with_users(tmp_path, 3))
    out = tmp_path / "a.bbk"
    asyncio.run(backup.backup_postgres(dsn, files, out, None, scrypt_log_n=FAST))
    root = tmp_path / "srv"
    data = root / "data"
    data.mkdir(parents=True)
    kept = server_files(data)
    target = data if which == "data-dir" else root
    schema = schema_of(dsn)

    with pytest.raises(InvalidArgument, match="files directory") as caught:
        asyncio.run(backup.restore_postgres(out, dsn, target, None, force=True))
    assert str(target) in str(caught.value) and str(data) in str(caught.value)
    assert unchanged(data, kept) and aside(tmp_path) == []
    assert asyncio.run(schemas_like(schema)) == [schema]

    with pytest.raises(InvalidArgument, match="files directory"):  # restore_sqlite: the same check
        backup.restore_sqlite(out, tmp_path / "elsewhere" / "bastion.db", target, None)
    assert unchanged(data, kept) and aside(tmp_path) == []
