"""kv.put throughput: group commit vs single-row commits vs redis-server with appendfsync always.

    .venv/bin/python bench/kv.py [--clients 64] [--duration 5] [--warmup 1] [--json out.json]

Four points, one after another, each server alone in its own subprocess
(pinned to CPU 0 when there are 2+ CPUs; the load generator to CPU 1):

* ``bastion``: a bastion ``Server`` hosting the real ``kv`` service over a
  ``SQLiteStore`` with its defaults (WAL, ``synchronous=FULL``, group commit
  up to ``max_batch=1024`` writes per transaction) in a fresh temporary
  directory, plaintext on 127.0.0.1, token authentication, rate limiter off.
  ``--clients`` connections (one ``bastion.Client`` each, uvloop) call
  ``kv.put`` in a closed loop: random keys from 100,000, 32-byte values.
* ``single-row``: the same server and store with ``max_batch=1``: one
  transaction, one fsync, per put -- what the store would do without group
  commit. Same clients, same load.
* ``sqlite alone``: no server, no network: one process (pinned like the
  server) writing the same rows as the store's batched ``kv.put`` -- an upsert
  into ``kv_keys`` (its usage counted by trigger, read once per commit for the
  quota), an insert into ``kv_log``, the ``kv_meta`` revision -- in
  transactions of ``--clients`` puts each (the most a group commit can gather
  from that many callers), with the store's own schema and writer pragmas
  (WAL, ``synchronous=FULL``, ``temp_store=MEMORY``). The rows go out as the
  store writes them: per chunk of up to 64, one multi-row upsert and one
  multi-row log insert (kv_rows.py's statements, as ``put_rows``). What any server that commits kv.put to SQLite
  this way can reach on this machine, before its own work: the store's one
  writer commits one transaction at a time, at most 64 puts each with 64
  callers, so this point's puts/s bounds a server's; and its CPU per put, on
  the server's one core, bounds it too (1e6 / µs puts/s). The lower of the
  two is the bound.
* ``redis``: ``redis-server --appendonly yes --appendfsync always`` on a free
  port with its data in a temporary directory, measured with
  ``redis-benchmark -c CLIENTS -t set -d 32 -r 100000`` (its own C client).

Every bastion put that returned was durably committed (fsync) before its
answer was sent. The table gives puts/s and the ratios bastion/single-row
(the issue's target: at least 5x) and bastion/redis, and SQLite's bound as
a ratio to redis. Run it on a quiet machine: fsync latency dominates, and
other disk traffic changes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOKEN = "bst_bench-token-not-a-secret-0123456789abcdef"
KEYSPACE = 100_000
VALUE = bytes(range(32))
STARTUP_DEADLINE = 20.0


# -- the bastion server (``bench/kv.py --serve MAX_BATCH DIR``) -----------------------------


async def _serve(max_batch: int, directory: str) -> None:
    import signal

    from bastion import Principal, Server
    from bastion.security.authn import StaticTokens
    from bastion.services.kv import KV
    from bastion.store.sqlite import SQLiteStore

    if os.environ.get("BENCH_SWITCH"):
        sys.setswitchinterval(float(os.environ["BENCH_SWITCH"]))
    loop = asyncio.get_running_loop()
    stopping = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stopping.done() or stopping.set_result(None))
    async with SQLiteStore(Path(directory) / "bastion.db", max_batch=max_batch) as store:
        kv = KV(store)
        await kv.start()
        server = Server([kv.service], authenticator=StaticTokens({TOKEN: Principal("bench")}))
        await server.start("127.0.0.1", 0)
        from bastion import allocator

        allocator.tune()  # what bastion serve does at start
        allocator.settle_gc()
        print(f"PORT {server.port}", flush=True)
        await stopping
        await server.shutdown(grace=1.0)
        await kv.aclose()
        stats = dict(store.stats)
    print(f"STATS {json.dumps(stats)}", flush=True)


# -- SQLite alone (``bench/kv.py --engine BATCH DIR SECONDS``) -----------------------------------


def _engine(batch: int, directory: str, seconds: float) -> None:
    """Commit batches of ``batch`` kv.put rows for ``seconds``; print puts/s and CPU µs per put."""
    import sqlite3

    from bastion.store.kv_rows import COPY_MAX, MAX_ROWS, rows_sql
    from bastion.store.kv_sqlite import _USAGE
    from bastion.store.sqlite import SQLiteStore

    path = Path(directory) / "bastion.db"

    async def create() -> None:  # the store's schema, by its own migrations
        async with SQLiteStore(path):
            pass

    asyncio.run(create())
    conn = sqlite3.connect(path, isolation_level=None, cached_statements=512)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # the store's writer's pragmas (SQLiteStore._open_files)
    conn.execute("PRAGMA temp_store=MEMORY")
    rng = random.Random(0)
    revision = 0
    assert len(VALUE) <= COPY_MAX  # so bound as a bytearray copy, as put_rows does

    def commit() -> None:
        """One group of ``batch`` plain puts to one namespace, written as ``_SQLiteTx.put_rows`` writes
        them: per chunk (powers of two, up to MAX_ROWS) one multi-row upsert and one multi-row log insert
        (kv_rows.py's statements: no content type or expiry bound, the namespace bound once)."""
        nonlocal revision
        now = time.time()
        keys, log = [], []
        for _ in range(batch):
            key, value = f"key:{rng.randrange(KEYSPACE):06}", bytearray(VALUE)
            keys += (key, value)
            log += (key, value, now)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(_USAGE, ("~bench",)).fetchone()  # the quota check of a batch that fits (kv_sqlite.py)
        done = 0
        while done < batch:
            n = min(MAX_ROWS, 1 << ((batch - done).bit_length() - 1))
            key_sql, log_sql = rows_sql(n, True, True)
            first = [revision + done + 1, "~bench"]
            conn.execute(key_sql, first + keys[done * 2 : (done + n) * 2])
            conn.execute(log_sql, first + log[done * 3 : (done + n) * 3])
            done += n
        revision += batch
        conn.execute("UPDATE kv_meta SET revision = ? WHERE id = 1", (revision,))
        conn.execute("COMMIT")

    warm_until = time.monotonic() + 1.0
    while time.monotonic() < warm_until:
        commit()
    puts, cpu0, t0 = 0, os.times(), time.monotonic()
    while time.monotonic() - t0 < seconds:
        commit()
        puts += batch
    cpu1, elapsed = os.times(), time.monotonic() - t0
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    result = {"ops": puts / elapsed, "server_cpu_us": 1e6 * cpu / puts, "writes_per_commit": float(batch)}
    print(f"ENGINE {json.dumps(result)}", flush=True)


def sqlite_bound(ops: float, cpu_us: float) -> float:
    """The puts/s no server committing to SQLite as the store does can pass: the writer commits one
    transaction at a time (``ops``, 64 puts each), and one core has 1e6 µs a second (``cpu_us`` each)."""
    return min(ops, 1e6 / cpu_us)


def bench_engine(opts: argparse.Namespace, cpus: tuple[int | None, int | None]) -> dict[str, Any]:
    """SQLite alone: the store's kv.put rows in commits of ``opts.clients``, pinned as the server is."""
    directory = tempfile.mkdtemp(prefix="bastion-bench-sqlite-")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--engine", str(opts.clients), directory, str(opts.duration)]
    if cpus[0] is not None:
        cmd += ["--cpu", str(cpus[0])]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        try:
            line = _read_line(proc, "ENGINE ", opts.duration + STARTUP_DEADLINE)
        finally:
            proc.wait(10)
        return dict(json.loads(line.split(" ", 1)[1]))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class BastionProcess:
    def __init__(self, max_batch: int, directory: str, cpu: int | None) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", str(max_batch), directory]
        if cpu is not None:
            cmd += ["--cpu", str(cpu)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.port = int(_read_line(self.proc, "PORT ").split()[1])

    def stop(self) -> dict[str, int]:
        self.proc.terminate()
        stats = json.loads(_read_line(self.proc, "STATS ").split(" ", 1)[1])
        self.proc.wait(10)
        return dict(stats)


def _read_line(proc: subprocess.Popen[str], prefix: str, within: float = STARTUP_DEADLINE) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith(prefix):
                return line.strip()
    proc.kill()
    raise RuntimeError(f"bench server: no {prefix.strip()} line within {within:.0f}s")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    if os.environ.get("BENCH_CPU_SPLIT"):
        print(f"pid {pid} utime {int(fields[11])} stime {int(fields[12])}", file=sys.stderr)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


HOT_KEYS = 1024  # keys kv.get reads (all written first)


async def _drive(
    port: int, clients: int, warmup: float, duration: float, server_pid: int, op: str = "put"
) -> dict[str, Any]:
    """``clients`` connections calling ``kv.<op>`` in a closed loop: random keys, 32-byte values."""
    from bastion.client.aio import Client

    conns = [Client(f"127.0.0.1:{port}", token=TOKEN, insecure=True, timeout=30) for _ in range(clients)]
    for c in conns:
        await c.connect()
    if op == "get":

        async def preload(c: Any, first: int) -> None:  # one call in flight per client, like the load
            for i in range(first, HOT_KEYS, clients):
                await c.kv.put(key=f"hot:{i:04}", value=VALUE)

        await asyncio.gather(*(preload(c, i) for i, c in enumerate(conns)))
    counting = False
    count = 0
    latencies: list[float] = []
    stop_at = time.monotonic() + warmup + duration

    async def worker(c: Any) -> None:
        nonlocal count
        rng = random.Random(id(c))
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            if op == "get":
                await c.kv.get(key=f"hot:{rng.randrange(HOT_KEYS):04}")
            else:
                await c.kv.put(key=f"key:{rng.randrange(KEYSPACE):06}", value=VALUE)
            if counting:
                count += 1
                latencies.append(time.perf_counter() - t0)

    tasks = [asyncio.create_task(worker(c)) for c in conns]
    await asyncio.sleep(warmup)
    counting, t0 = True, time.monotonic()
    client_cpu0, server_cpu0 = time.process_time(), _cpu_seconds(server_pid)
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - t0
    client_cpu, server_cpu = time.process_time() - client_cpu0, _cpu_seconds(server_pid) - server_cpu0
    for c in conns:
        await c.close()
    latencies.sort()
    return {
        "ops": count / elapsed,
        "server_cpu_us": 1e6 * server_cpu / max(1, count),
        "client_cpu_us": 1e6 * client_cpu / max(1, count),
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None,
    }


def bench_bastion(
    max_batch: int, opts: argparse.Namespace, cpus: tuple[int | None, int | None], ops: tuple[str, ...] = ("put",)
) -> dict[str, dict[str, Any]]:
    """Run each of ``ops`` ("put", "get") in turn against one fresh server; results by op."""
    directory = tempfile.mkdtemp(prefix="bastion-bench-kv-")
    allowed = os.sched_getaffinity(0)
    results = {}
    try:
        server = BastionProcess(max_batch, directory, cpus[0])
        try:
            if cpus[1] is not None:
                os.sched_setaffinity(0, {cpus[1]})
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                for op in ops:
                    drive = _drive(server.port, opts.clients, opts.warmup, opts.duration, server.proc.pid, op)
                    results[op] = runner.run(drive)
        finally:
            os.sched_setaffinity(0, allowed)
            stats = server.stop()
        if "put" in results:
            # Commits also count the hot keys written before kv.get: nothing else writes.
            results["put"]["writes_per_commit"] = stats["writes"] / max(1, stats["commits"])
        return results
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- redis ----------------------------------------------------------------------------------


def bench_redis(opts: argparse.Namespace, cpus: tuple[int | None, int | None]) -> dict[str, Any]:
    """SET with ``appendfsync always``, measured by redis-benchmark (bench/redisref.py)."""
    from redisref import RedisServer, missing, run_benchmark

    reason = missing()
    if reason is not None:
        return {"error": reason}
    with RedisServer(cpus[0], durable=True) as server:
        requests = max(20_000, int(opts.duration * 40_000))
        rows = run_benchmark(server, "set", clients=opts.clients, requests=requests, cpu=cpus[1], keyspace=KEYSPACE)
    row = rows["SET"]
    return {
        "ops": row["rps"],
        "p50_ms": row["p50_us"] / 1000,
        "p99_ms": row["p99_us"] / 1000,
        "server_cpu_us": row["server_cpu_us_per_call"],
        "client_cpu_us": row["client_cpu_us_per_call"],
    }


# -- main -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--serve", nargs=2, metavar=("MAX_BATCH", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--engine", nargs=3, metavar=("BATCH", "DIR", "SECONDS"), help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    for path in (HERE, ROOT):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    if opts.cpu is not None and (opts.serve or opts.engine):
        os.sched_setaffinity(0, {opts.cpu})
    if opts.engine:
        _engine(int(opts.engine[0]), opts.engine[1], float(opts.engine[2]))
        return 0
    if opts.serve:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(int(opts.serve[0]), opts.serve[1]))
        return 0
    allowed = sorted(os.sched_getaffinity(0))
    cpus: tuple[int | None, int | None] = (allowed[0], allowed[1]) if len(allowed) >= 2 else (None, None)
    results = {
        "bastion": bench_bastion(1024, opts, cpus)["put"],
        "single-row": bench_bastion(1, opts, cpus)["put"],
        "sqlite alone": bench_engine(opts, cpus),
        "redis": bench_redis(opts, cpus),
    }
    os.sched_setaffinity(0, allowed)
    print(f"\nkv.put / SET, {opts.clients} concurrent clients, {opts.duration:.0f} s measured per point\n")
    print("| server | puts/s | p50 ms | p99 ms | writes per commit | server CPU µs/put | client CPU µs/put |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | error: {r['error']} | | | | | |")
            continue
        per_commit = f"{r['writes_per_commit']:.1f}" if "writes_per_commit" in r else "-"
        p50 = f"{r['p50_ms']:.2f}" if r.get("p50_ms") is not None else "-"
        p99 = f"{r['p99_ms']:.2f}" if r.get("p99_ms") is not None else "-"
        cpu = [f"{r[k]:.0f}" if k in r else "-" for k in ("server_cpu_us", "client_cpu_us")]
        print(f"| {name} | {r['ops']:,.0f} | {p50} | {p99} | {per_commit} | {cpu[0]} | {cpu[1]} |")
    base = results["bastion"]["ops"]
    print(f"\nbastion / single-row commits: {base / results['single-row']['ops']:.1f}x (target >= 5x)")
    if "ops" in results["redis"]:
        print(f"bastion / redis (appendfsync always): {base / results['redis']['ops']:.2f}x")
        engine = results["sqlite alone"]
        bound = sqlite_bound(engine["ops"], engine["server_cpu_us"])
        print(
            f"sqlite alone: {engine['ops']:,.0f} puts/s committed 64 at a time, {engine['server_cpu_us']:.0f} µs of "
            f"CPU per put: no server committing to it reaches more than {bound:,.0f} puts/s here, "
            f"{bound / results['redis']['ops']:.2f}x redis"
        )
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
