"""kv against a real ``bastion serve``: the CLI, and acknowledged writes surviving kill -9.

The durability check (issue 5's acceptance): 16 concurrent clients put keys
over TLS; partway through, the server gets SIGKILL; it is restarted on the
same data directory, and every put that was acknowledged must be there with
its value and version, and SQLite's ``PRAGMA integrity_check`` must say ok.
Five rounds on one data directory, each a workload of 10,000 puts killed
about half way (at a different point each round). It runs at full size in
CI: about 15 s.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from bastion.client.aio import Client
from bastion.exceptions import BastionError
from tests.conftest import StartServer
from tests.support.server import ServerProcess, bastion_cli, clean_env, start_server

CLIENTS = 16
# One principal putting as fast as it can would meet the default per-principal rate limit.
LOAD_ENV = {"BASTION_RATE_LIMITS__ENABLED": "false"}


def test_cli_put_get_ls_rm_watch(server: ServerProcess, tmp_path: Path) -> None:
    addr, token = server.address, ["--token-file", str(server.token_file)]
    assert bastion_cli("kv", "put", addr, "greeting", "hello", *token).stdout.strip().isdigit()
    blob = bytes(range(256)) * 4
    (tmp_path / "blob").write_bytes(blob)
    version = int(bastion_cli("kv", "put", addr, "dir/blob", f"@{tmp_path / 'blob'}", *token).stdout)
    piped = bastion_cli("kv", "put", addr, "dir/piped", "-", "--ttl", "600", *token, stdin="from stdin")
    assert piped.returncode == 0, piped.stderr
    got = subprocess.run(
        [sys.executable, "-m", "bastion", "kv", "get", addr, "dir/blob", *token],
        env=clean_env(), capture_output=True, timeout=20, check=True,
    )  # fmt: skip
    assert got.stdout == blob and f"version {version}" in got.stderr.decode()
    assert bastion_cli("kv", "get", addr, "dir/piped", *token).stdout == "from stdin"
    assert bastion_cli("kv", "ls", addr, "dir/", *token).stdout.split("\n")[:2] == [
        f"dir/blob\t{version}", f"dir/piped\t{version + 1}",
    ]  # fmt: skip
    conflict = bastion_cli("kv", "put", addr, "greeting", "again", "--if-version", "0", *token)
    assert conflict.returncode == 1 and "ABORTED: compare-and-swap failed" in conflict.stderr
    assert bastion_cli("kv", "rm", addr, "greeting", *token).returncode == 0
    gone = bastion_cli("kv", "get", addr, "greeting", *token)
    assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr
    denied = bastion_cli("kv", "get", addr, "x", "-n", "~someone", "--insecure", *token)
    assert denied.returncode != 0
    watch = subprocess.Popen(
        [sys.executable, "-m", "bastion", "kv", "watch", addr, "dir/", "--from-version", str(version), *token],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert watch.stdout is not None
        lines = [watch.stdout.readline().rstrip("\n") for _ in range(2)]
    finally:
        watch.kill()
        watch.wait(10)
    assert lines == [f"{version}\tput\tdir/blob\t<1024 bytes>", f"{version + 1}\tput\tdir/piped\tfrom stdin"]


# -- kill -9 during acknowledged puts -------------------------------------------------------


Acked = dict[str, tuple[bytes, int]]


async def _load(server: ServerProcess, round_no: int, total: int, kill_after: int, acked: Acked) -> int:
    """``CLIENTS`` clients put up to ``total`` keys; SIGKILL the server after ``kill_after`` acks."""
    token = server.token
    done = 0
    killed = asyncio.Event()

    async def client(c: int) -> None:
        nonlocal done
        async with Client(server.address, token=token, timeout=10) as cl:
            for i in range(c, total, CLIENTS):
                key, value = f"r{round_no}/{i:05}", f"{round_no}:{i}:{'x' * (i % 50)}".encode()
                try:
                    version = await cl.kv.put(key=key, value=value)
                except BastionError:
                    assert killed.is_set(), "a put failed before the server was killed"
                    return
                acked[key] = (value, version)
                done += 1
                if done == kill_after:
                    server.signal(signal.SIGKILL)
                    killed.set()

    await asyncio.gather(*(client(c) for c in range(CLIENTS)))
    return done


async def _verify(server: ServerProcess, acked: Acked) -> None:
    keys = sorted(acked)
    async with Client(server.address, token=server.token, timeout=30) as cl:
        for start in range(0, len(keys), 256):
            batch = keys[start : start + 256]
            items = await cl.kv.get_many(keys=batch)
            missing = [k for k, item in zip(batch, items, strict=True) if item is None]
            assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
            got = {item["key"]: (item["value"], item["version"]) for item in items}
            assert got == {k: acked[k] for k in batch}


def _integrity(db: Path) -> str:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def _durability(tmp_path: Path, rounds: int, per_round: int) -> None:
    workdir = tmp_path / "durable"
    acked: Acked = {}
    server = start_server(workdir, env=LOAD_ENV)
    try:
        for round_no in range(rounds):
            kill_after = per_round // 2 + round_no * per_round // (4 * rounds)  # a different point each round
            done = asyncio.run(_load(server, round_no, per_round, kill_after, acked))
            assert done >= kill_after
            server.process.wait(10)
            assert server.process.returncode == -signal.SIGKILL
            server.stop()
            server = start_server(workdir, env=LOAD_ENV)  # same data directory: recovers from the WAL
            assert _integrity(server.data_dir / "bastion.db") == "ok"
            asyncio.run(_verify(server, acked))
    finally:
        assert server.stop() == 0


def test_acknowledged_puts_survive_kill_9(tmp_path: Path) -> None:
    _durability(tmp_path, rounds=5, per_round=10_000)  # full size: about 15 s on the 2-core CI machine


def test_kv_serves_from_a_running_server(server_factory: StartServer) -> None:
    """The kv component starts with ``bastion serve`` and its sweep runs there (TTL → gone)."""
    server = server_factory(env={"BASTION_KV__SWEEP_INTERVAL": "0.05"})

    async def main() -> None:
        async with Client(server.address, token=server.token, timeout=10) as cl:
            stream = cl.stream("kv.watch")
            start = await anext(stream)
            version = await cl.kv.put(key="brief", value=b"x", ttl=0.1)
            put, expired = await anext(stream), await anext(stream)
            await stream.aclose()  # type: ignore[attr-defined]
            assert start["type"] == "start" and (put["type"], put["version"]) == ("put", version)
            assert (expired["type"], expired["key"], expired["version"]) == ("delete", "brief", version + 1)

    asyncio.run(main())
