"""Backup and restore end to end: real ``bastion serve`` processes, the real CLI, real TLS.

Acceptance: a backup taken while a client keeps writing, restored into a
fresh data directory, holds exactly the writes up to one point in time
(every write acknowledged before the backup started, none after it ended);
an archive with one flipped byte is refused and changes nothing; restoring
over a data directory a server is using is refused. On PostgreSQL (with
``BASTION_TEST_POSTGRES_DSN``): ``admin.backup`` of a ``--store postgresql://``
server, and ``bastion restore --store`` refusing a non-empty schema unless
``--force``.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from pathlib import Path

import asyncpg
import pytest

from bastion import NotFound, SyncClient
from tests.conftest import StartServer
from tests.support.server import ServerProcess, bastion_cli, start_server, wait_for
from tests.support.stores import postgres_dsn, run_sync, store_location


class Writer:
    """Keeps calling ``kv.put`` with keys k000000, k000001, … until stopped; counts acknowledgements."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.acknowledged = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(20)

    def _run(self) -> None:
        try:
            with SyncClient(self.server.address, token_file=str(self.server.token_file), timeout=10) as client:
                while not self._stop.is_set():
                    client.kv.put(key=f"k{self.acknowledged:06d}", value=b"v" * 100)
                    self.acknowledged += 1
        except BaseException as exc:  # reported by the test
            self.error = exc


def keys_present(server: ServerProcess, token_file: Path, limit: int) -> int:
    """How many of k000000, k000001, … exist, checking that none beyond the first gap does."""
    with SyncClient(server.address, token_file=str(token_file), timeout=10) as client:
        present = 0
        while present < limit:
            try:
                client.kv.get(key=f"k{present:06d}")
            except NotFound:
                break
            present += 1
        for i in range(present, limit):
            with pytest.raises(NotFound):
                client.kv.get(key=f"k{i:06d}")
    return present


def test_backup_during_writes_restores_to_the_backup_point(server: ServerProcess, tmp_path: Path) -> None:
    with Writer(server) as writer:
        wait_for(lambda: writer.acknowledged >= 100 or writer.error, 20, what="the first 100 writes")
        before = writer.acknowledged
        remote = bastion_cli("backup", "--address", server.address, "--token-file", str(server.token_file))
        after = writer.acknowledged
        offline = bastion_cli("backup", "--data-dir", str(server.data_dir), "--out", str(tmp_path / "offline.bbk"))
    assert writer.error is None, writer.error
    assert remote.returncode == 0, remote.stderr
    assert offline.returncode == 0, offline.stderr
    info = json.loads(remote.stdout)
    archive = server.data_dir / "backups" / info["name"]
    assert archive.stat().st_size == info["size"] and info["backend"] == "sqlite"

    # Not over a data directory a server is using.
    refused = bastion_cli("restore", str(archive), "--data-dir", str(server.data_dir))
    assert refused.returncode == 1 and "in use" in refused.stderr

    fresh = tmp_path / "fresh"
    done = bastion_cli("restore", str(archive), "--data-dir", str(fresh))
    assert done.returncode == 0, done.stderr
    restored = start_server(tmp_path / "restored-server", data_dir=fresh)
    try:
        present = keys_present(restored, server.token_file, after + 5)  # the same admin token: it is in the db
    finally:
        assert restored.stop() == 0
    assert before <= present <= after + 1  # +1: a put in flight may have committed before its answer came

    again = tmp_path / "fresh-offline"
    assert bastion_cli("restore", str(tmp_path / "offline.bbk"), "--data-dir", str(again)).returncode == 0
    assert (again / "bastion.db").stat().st_size > 0


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_a_flipped_byte_is_refused_and_changes_nothing(
    server_factory: StartServer, tmp_path: Path, encrypted: bool
) -> None:
    env = {"BASTION_BACKUP_PASSPHRASE": "a long test passphrase"} if encrypted else {}
    server = server_factory(env=env)
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as client:
        client.kv.put(key="kept", value=b"1")
        info = client.admin.backup()
    assert info["encrypted"] is encrypted
    archive = server.data_dir / "backups" / info["name"]
    target = tmp_path / "target"
    target.mkdir()
    (target / "bastion.db").write_bytes(b"old data")

    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0x04
    damaged = tmp_path / "damaged.bbk"
    damaged.write_bytes(bytes(data))
    result = bastion_cli("restore", str(damaged), "--data-dir", str(target), env=env)
    assert result.returncode == 1
    assert "DATA_LOSS" in result.stderr and "corrupt" in result.stderr
    assert sorted(p.name for p in target.iterdir()) == ["bastion.db"]
    assert (target / "bastion.db").read_bytes() == b"old data"

    if encrypted:
        wrong = bastion_cli(
            "restore", str(archive), "--data-dir", str(target), env={"BASTION_BACKUP_PASSPHRASE": "not it"}
        )
        assert wrong.returncode == 1 and "wrong passphrase" in wrong.stderr
        missing = bastion_cli("restore", str(archive), "--data-dir", str(target))
        assert missing.returncode == 1 and "encrypted" in missing.stderr

    good = bastion_cli("restore", str(archive), "--data-dir", str(target), env=env)
    assert good.returncode == 0, good.stderr
    assert any(p.name.startswith("bastion.db.pre-restore-") for p in target.iterdir())


def test_postgres_backup_through_the_server_and_restore_with_force(server_factory: StartServer, tmp_path: Path) -> None:
    """``bastion serve --store postgresql://…``: admin.backup during use; ``bastion restore --store`` refuses
    the live schema, then with --force renames it aside and brings back exactly the archived state."""
    url = store_location("postgresql", tmp_path, "service")  # skips without BASTION_TEST_POSTGRES_DSN
    schema = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["search_path"][0]
    server = server_factory(env={"BASTION_STORE": url})
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as client:
        for i in range(20):
            client.kv.put(key=f"k{i:06d}", value=b"v" * 100)
        info = client.admin.backup()
        client.kv.put(key="late", value=b"after the backup")
    assert (info["backend"], info["encrypted"]) == ("postgresql", False)
    archive = server.data_dir / "backups" / info["name"]
    assert archive.stat().st_size == info["size"]
    direct = bastion_cli(
        "backup", "--store", url, "--data-dir", str(server.data_dir), "--out", str(tmp_path / "direct.bbk")
    )
    assert direct.returncode == 0, direct.stderr
    assert json.loads(direct.stdout)["backend"] == "postgresql"
    with_password = bastion_cli("backup", "--store", url.replace("postgres@", "postgres:secret@", 1))
    assert with_password.returncode == 2 and "must not contain a password" in with_password.stderr

    refused = bastion_cli("restore", str(archive), "--store", url, "--data-dir", str(tmp_path / "restored"))
    assert refused.returncode == 1 and "not empty" in refused.stderr
    assert server.stop() == 0
    try:
        done = bastion_cli(
            "restore", str(archive), "--force", "--data-dir", str(tmp_path / "restored"),
            env={"BASTION_STORE": url},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        kept = json.loads(done.stdout)["kept"]
        assert any(k.startswith(f"schema {schema}_pre_restore_") for k in kept)
        restored = start_server(tmp_path / "restored-server", data_dir=server.data_dir, env={"BASTION_STORE": url})
        try:
            present = keys_present(restored, server.token_file, 25)
            with (
                SyncClient(restored.address, token_file=str(server.token_file), timeout=10) as client,
                pytest.raises(NotFound),
            ):
                client.kv.get(key="late")
        finally:
            assert restored.stop() == 0
        assert present == 20
    finally:
        run_sync(lambda: _drop_like(f"{schema}_"))


async def _drop_like(prefix: str) -> None:
    conn = await asyncpg.connect(postgres_dsn(), timeout=10)
    try:
        for row in await conn.fetch("SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)", prefix):
            await conn.execute(f'DROP SCHEMA "{row[0]}" CASCADE')
    finally:
        await conn.close()
