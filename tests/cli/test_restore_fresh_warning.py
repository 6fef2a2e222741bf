"""``bastion restore`` into a fresh place says that kv versions and topic offsets go back to the archive's.

A restore over the store it replaces carries that store's kv counter and
topic offsets over (docs/operations.md, "Restores and kv versions"); into a
fresh data directory (or an empty PostgreSQL schema) there is nothing to
carry, and versions and offsets handed out since the backup will be handed
out again. The documented remedy (clients drop the versions and offsets they
hold) needs the operator to know it applies: the restore printed only
"restore complete". It now says so on stderr; over an existing store it
does not.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from bastion.store import backup
from tests.store.test_backup import FAST, make_data_dir, pg_cleanup, pg_store_with_users, schema_of, sql
from tests.support.server import bastion_cli

__all__ = ["pg_cleanup"]  # the fixture, imported to be used here

WARNING = "nothing to carry kv versions and topic offsets over from"


def test_a_restore_into_a_fresh_data_directory_warns_that_versions_and_offsets_go_back(tmp_path: Path) -> None:
    db, files, _ = make_data_dir(tmp_path / "src")
    out = tmp_path / "a.bbk"
    backup.backup_sqlite(db, files, out, None, scrypt_log_n=FAST)

    fresh = bastion_cli("restore", str(out), "--data-dir", str(tmp_path / "fresh"))
    assert fresh.returncode == 0, fresh.stderr
    assert WARNING in fresh.stderr and "from_version" in fresh.stderr and "from_offset" in fresh.stderr

    over = bastion_cli("restore", str(out), "--data-dir", str(tmp_path / "src"))
    assert over.returncode == 0, over.stderr
    assert WARNING not in over.stderr
    assert "restore complete" in over.stderr


def test_a_postgres_restore_warns_only_when_no_store_was_replaced(tmp_path: Path, pg_cleanup: list[str]) -> None:
    dsn, files = asyncio.run(pg_store_with_users(tmp_path, 3))
    schema = schema_of(dsn)
    pg_cleanup.append(schema + "_")
    out = tmp_path / "a.bbk"
    asyncio.run(backup.backup_postgres(dsn, files, out, None, scrypt_log_n=FAST))
    data = tmp_path / "data"
    data.mkdir()
    args = ("restore", str(out), "--store", dsn, "--data-dir", str(data), "--files-dir", str(tmp_path / "restored"))

    over = bastion_cli(*args, "--force", timeout=60)
    assert over.returncode == 0, over.stderr
    assert WARNING not in over.stderr

    asyncio.run(sql(f'DROP SCHEMA "{schema}" CASCADE'))
    asyncio.run(sql(f'CREATE SCHEMA "{schema}"'))  # empty: a fresh place
    fresh = bastion_cli(*args, timeout=60)
    assert fresh.returncode == 0, fresh.stderr
    assert WARNING in fresh.stderr
