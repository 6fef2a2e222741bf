"""bastion's performance suite: every point of the performance issue, side by side, in one run.

    .venv/bin/python bench/perf.py [--quick] [--only unary redis stream idle workers kv]
                                   [--repeat 3] [--duration 2] [--warmup 0.5]
                                   [--idle-connections 10000] [--idle-repeat 1] [--stream-mib 1024]
                                   [--json out.json]

Points (bench/README.md says what each measures and how to read it):

* ``unary``: 32-byte echo calls at 1, 16 and 128 concurrent callers over
  one connection (ping-pong), and pipelined (16 connections x 64 in flight),
  against the raw asyncio+uvloop+msgspec floor (one write per read, and the
  issue's "minimal" one: a write per answer), grpc.aio and bastion (the
  whole stack on), each plaintext and TLS: calls/s, p50/p99, server and
  client CPU per call (bench/run.py's machinery);
* ``redis``: redis-server GET measured by redis-benchmark at the same
  concurrency levels (bench/redisref.py);
* ``stream``: a 1 GiB client-stream upload, bastion vs the floor, plaintext
  and TLS: MB/s and the server's RSS peak (bench/stream.py);
* ``idle``: server RSS per idle connection at 10,000 connections: bastion
  (TLS, authenticated) vs the floor with TLS and plaintext (bench/idle.py);
* ``workers``: ``bastion serve --workers 2`` vs 1 (bench/workers.py);
* ``kv``: durable ``kv.put`` and ``kv.get`` at 64 callers vs redis-server
  SET with ``appendfsync always`` (bench/kv.py).

Servers run pinned to the first allowed CPU and the load generator (this
process and its helpers) to the second. Every point runs ``--repeat`` times;
tables give the median and the min-max spread, then the targets with
PASS/FAIL. ``--quick`` shrinks windows and sizes for a ~1-2 minute smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # grpc's INFO lines (GOAWAY at each server stop) drown the tables
for _path in (HERE.parent, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import kv as kv_bench  # noqa: E402
import redisref  # noqa: E402
import workers as workers_bench  # noqa: E402
from certs import make_certs  # noqa: E402
from idle import hold_idle  # noqa: E402
from report import Target, fmt, markdown_table, summarize, targets  # noqa: E402
from run import NOISE_THRESHOLD, OPENERS, ServerProcess, cpu_busy, pick_cpus, run_point  # noqa: E402
from stream import CHUNK, transfer  # noqa: E402

SECTIONS = ("unary", "redis", "stream", "idle", "workers", "kv")
LEVELS = (1, 16, 128)
PIPELINE_CONNECTIONS, PIPELINE_DEPTH = 16, 64
HOLDER_CONNECTIONS = 2500  # idle connections per holder process
UNARY_KEYS = ("rps", "p50_us", "p99_us", "server_cpu_us_per_call", "client_cpu_us_per_call")
#: Rough redis GET rates here, to size redis-benchmark's request count to about ``--duration`` seconds.
REDIS_RATES = {"c=1": 25_000, "c=16": 100_000, "c=128": 120_000, "pipelined": 1_500_000}

Cpus = tuple[int | None, int | None]


def _label(kind: str, tls: Path | None) -> str:
    return f"{kind}+tls" if tls is not None else kind


def _points() -> list[tuple[str, int, int]]:
    """(name, connections, callers) of every unary point."""
    ping_pong = [(f"c={c}", 1, c) for c in LEVELS]
    return [*ping_pong, ("pipelined", PIPELINE_CONNECTIONS, PIPELINE_CONNECTIONS * PIPELINE_DEPTH)]


# -- sections -------------------------------------------------------------------------------


def bench_unary(opts: argparse.Namespace, certs: Path, cpus: Cpus, notes: list[str]) -> list[dict[str, Any]]:
    """Every unary point for floor, grpc and bastion, plaintext and TLS; one row per (server, point)."""
    import uvloop

    rows = []
    # One event loop for the whole section: grpc.aio binds its poller to the first loop it
    # runs on. grpc last: its client threads stay in this process afterwards.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for kind, tls in [(k, t) for k in ("floor", "floor-minimal", "bastion", "grpc") for t in (None, certs)]:
            server = ServerProcess(kind, cpus[0], tls)
            try:
                samples = runner.run(_unary_samples(server, tls, opts, cpus, notes))
            finally:
                server.stop()
            for name, runs in samples.items():
                if runs:
                    row = {"server": _label(kind, tls), "point": name, **summarize(runs, UNARY_KEYS)}
                    rows.append({**row, "runs": runs})
    return rows


async def _unary_samples(
    server: ServerProcess, tls: Path | None, opts: argparse.Namespace, cpus: Cpus, notes: list[str]
) -> dict[str, list[dict[str, Any]]]:
    opened = {}
    for connections in {connections for _, connections, _ in _points()}:
        async with asyncio.timeout(60):
            opened[connections] = await OPENERS[server.kind](server.port, tls, connections)
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in _points()}
    try:
        for _ in range(opts.repeat):  # repeats interleaved, so a noisy moment hits one sample of each
            for name, connections, callers in _points():
                try:
                    calls = opened[connections][0]
                    samples[name].append(await run_point(calls, server, callers, opts.warmup, opts.duration, cpus))
                except Exception as exc:  # one failing point (e.g. grpc.aio over ~1000 in flight) spares the rest
                    notes.append(f"{_label(server.kind, tls)} {name}: {type(exc).__name__}: {_one_line(exc)}")
    finally:
        for _, close in opened.values():
            await close()
    return samples


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else text or "no detail"


def bench_redis(opts: argparse.Namespace, cpus: Cpus) -> list[dict[str, Any]]:
    """redis-server GET (a 32-byte value) at the unary points, measured by redis-benchmark."""
    rows = []
    with redisref.RedisServer(cpus[0]) as server:
        redisref.run_benchmark(server, "set", clients=1, requests=1000, cpu=cpus[1])  # GET then finds its value
        for name, connections, callers in _points():
            pipeline = callers // connections
            requests = max(5_000, int(REDIS_RATES[name] * opts.duration))
            runs = [
                redisref.run_benchmark(
                    server, "get", clients=connections, requests=requests, pipeline=pipeline, cpu=cpus[1]
                )["GET"]
                for _ in range(opts.repeat)
            ]
            rows.append({"server": "redis", "point": name, **summarize(runs, UNARY_KEYS), "runs": runs})
    return rows


def bench_stream(opts: argparse.Namespace, certs: Path, cpus: Cpus) -> list[dict[str, Any]]:
    """The streamed upload, bastion vs floor, plaintext and TLS; a fresh server each (its RSS peak is ours)."""
    import uvloop

    total = opts.stream_mib * (1 << 20) // CHUNK * CHUNK
    rows = []
    for kind in ("floor", "bastion"):
        for tls in (None, certs):
            server = ServerProcess(kind, cpus[0], tls)
            try:
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    runs = runner.run(transfer(server, tls, total, opts.repeat))
            finally:
                server.stop()
            keys = ("mb_s", "server_cpu_s_per_gb", "client_cpu_s_per_gb", "rss_before_kib", "rss_peak_kib")
            rows.append({"server": _label(kind, tls), "bytes": total, **summarize(runs, keys), "runs": runs})
    return rows


def bench_idle(opts: argparse.Namespace, certs: Path, cpus: Cpus, allowed: set[int]) -> list[dict[str, Any]]:
    """RSS per idle connection: the floor plaintext and TLS, bastion TLS (authenticated); fresh server per run.

    ``--idle-repeat`` runs (default 1: a memory count varies by ~1% between runs, and
    10,000 TLS handshakes take ~30 s per server here).
    """
    holders = max(1, math.ceil(opts.idle_connections / HOLDER_CONNECTIONS))
    rows = []
    for kind, tls in (("floor", None), ("floor", certs), ("bastion", certs)):
        runs = []
        for _ in range(opts.idle_repeat):
            server = ServerProcess(kind, cpus[0], tls)
            try:
                runs.append(hold_idle(server, tls, opts.idle_connections, holders, allowed))
            finally:
                server.stop()
        keys = ("kib_per_connection", "connect_seconds", "rss_after_kib")
        row = {"server": _label(kind, tls), "connections": opts.idle_connections, **summarize(runs, keys)}
        rows.append({**row, "runs": runs})
    return rows


def bench_workers(opts: argparse.Namespace) -> dict[str, Any]:
    """bench/workers.py's scaling point (1 vs 2 workers), repeated; the load generator may use every CPU."""
    args = workers_bench.parse_args(["--duration", str(opts.workers_duration), "--warmup", str(opts.warmup)])
    runs = [workers_bench.measure(args) for _ in range(opts.repeat)]
    by_count = {
        count: summarize([r["points"][count] for r in runs], ("calls_per_s", "server_cpu_per_s"))
        for count in runs[0]["points"]
    }
    return {**summarize(runs, ("ratio",)), "points": by_count, "runs": runs}


def bench_kv(opts: argparse.Namespace, cpus: Cpus) -> dict[str, Any]:
    """Durable kv.put and kv.get at 64 callers (group commit, the defaults) vs redis SET appendfsync always."""
    args = argparse.Namespace(clients=64, duration=opts.kv_duration, warmup=opts.warmup)
    keys = ("ops", "p50_ms", "p99_ms", "server_cpu_us", "client_cpu_us")
    bastion = [kv_bench.bench_bastion(1024, args, cpus, ops=("put", "get")) for _ in range(opts.repeat)]
    out = {op: summarize([b[op] for b in bastion], (*keys, "writes_per_commit")) for op in ("put", "get")}
    engine = [kv_bench.bench_engine(args, cpus) for _ in range(opts.repeat)]
    out["sqlite_alone"] = summarize(engine, ("ops", "server_cpu_us"))
    if redisref.missing() is None:
        out["redis_set"] = summarize([kv_bench.bench_redis(args, cpus) for _ in range(opts.repeat)], keys)
    return {**out, "runs": bastion}


# -- report ---------------------------------------------------------------------------------


def render(results: dict[str, Any], checks: list[Target]) -> str:
    unary = [
        [r["server"], r["point"], fmt(r, "rps", 0), fmt(r, "p50_us"), fmt(r, "p99_us"),
         fmt(r, "server_cpu_us_per_call"), fmt(r, "client_cpu_us_per_call")]
        for r in [*results.get("unary", []), *results.get("redis", [])]
    ]  # fmt: skip
    stream = [
        [r["server"], f"{r['bytes'] / (1 << 20):,.0f}", fmt(r, "mb_s", 0), fmt(r, "server_cpu_s_per_gb", 2),
         fmt(r, "client_cpu_s_per_gb", 2), fmt(r, "rss_before_kib", 1, 1 / 1024), fmt(r, "rss_peak_kib", 1, 1 / 1024)]
        for r in results.get("stream", [])
    ]  # fmt: skip
    idle = [
        [r["server"], f"{r['connections']:,}", fmt(r, "kib_per_connection", 2), fmt(r, "rss_after_kib", 1, 1 / 1024),
         fmt(r, "connect_seconds", 1)]
        for r in results.get("idle", [])
    ]  # fmt: skip
    workers = results.get("workers", {})
    scaling = [
        [f"--workers {count}", fmt(p, "calls_per_s", 0), fmt(p, "server_cpu_per_s", 2)]
        for count, p in workers.get("points", {}).items()
    ]
    kv = results.get("kv", {})
    kv_rows = [
        [name, fmt(kv[op], "ops", 0), fmt(kv[op], "p50_ms", 2), fmt(kv[op], "p99_ms", 2),
         fmt(kv[op], "server_cpu_us", 0), fmt(kv[op], "client_cpu_us", 0)]
        for op, name in (
            ("put", "bastion kv.put"),
            ("get", "bastion kv.get"),
            ("sqlite_alone", "sqlite alone: kv.put's rows, 64 per commit, no server"),
            ("redis_set", "redis SET, fsync always"),
        )
        if op in kv
    ]  # fmt: skip
    verdicts = [[t.name, "-" if t.value is None else f"{t.value:.2f}", t.bound, t.verdict] for t in checks]
    parts = [
        markdown_table(
            "unary, 32-byte payload (median, min-max over repeats)",
            ["server", "point", "calls/s", "p50 µs", "p99 µs", "server CPU µs/call", "client CPU µs/call"],
            unary,
        ),
        markdown_table(
            "streamed upload, 256 KiB chunks",
            ["server", "MiB", "MB/s", "server CPU s/GB", "client CPU s/GB", "RSS before MiB", "RSS peak MiB"],
            stream,
        ),
        markdown_table(
            "idle connections", ["server", "connections", "RSS KiB/conn", "RSS after MiB", "connect s"], idle
        ),
        markdown_table("bastion serve --workers N, 1 ms handler", ["workers", "calls/s", "server CPU s/s"], scaling),
        markdown_table(
            "durable key-value, 64 callers",
            ["server", "ops/s", "p50 ms", "p99 ms", "server CPU µs/op", "client CPU µs/op"],
            kv_rows,
        ),
        markdown_table("targets", ["ratio", "measured", "target", "verdict"], verdicts),
    ]
    return "\n".join(p for p in parts if p)


def noisy_points(results: dict[str, Any]) -> list[str]:
    """Unary samples during which other work took over NOISE_THRESHOLD of a pinned CPU."""
    out = []
    for row in results.get("unary", []):
        for run in row["runs"]:
            for role, frac in run["foreign_cpu_fraction"].items():
                if frac > NOISE_THRESHOLD:
                    out.append(f"{row['server']} {row['point']} ({role} CPU {frac:.0%})")
    return out


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short windows, 1 repeat, 1,000 idle conns, 128 MiB")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=None, metavar="NAME", help="run these only")
    parser.add_argument("--repeat", type=int, default=None, help="samples per point (default 3; quick 1)")
    parser.add_argument("--duration", type=float, default=None, help="measured s per unary point (2; quick 0.5)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up s per point (0.5; quick 0.2)")
    parser.add_argument("--idle-connections", type=int, default=None, help="idle point size (10000; quick 1000)")
    parser.add_argument("--stream-mib", type=int, default=None, help="streamed MiB (1024; quick 128)")
    parser.add_argument("--idle-repeat", type=int, default=1, help="runs of the idle point (default 1)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    opts = parser.parse_args(argv)
    defaults = {
        "repeat": (3, 1),
        "duration": (2.0, 0.5),
        "warmup": (0.5, 0.2),
        "idle_connections": (10_000, 1_000),
        "stream_mib": (1024, 128),
    }
    for name, (full, quick) in defaults.items():
        if getattr(opts, name) is None:
            setattr(opts, name, quick if opts.quick else full)
    if (
        min(opts.repeat, opts.idle_repeat) < 1
        or opts.duration <= 0
        or opts.warmup < 0
        or opts.idle_connections < 1
        or opts.stream_mib < 1
    ):
        parser.error("--repeat, --duration, --idle-connections and --stream-mib must be positive, --warmup >= 0")
    opts.workers_duration = 1.0 if opts.quick else 3.0
    opts.kv_duration = 1.0 if opts.quick else 3.0
    opts.only = opts.only or list(SECTIONS)
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    from bastion import allocator

    allocator.tune()  # the load generators too: as for the servers, whichever client they drive
    allowed = os.sched_getaffinity(0)
    cpus = pick_cpus()
    if cpus[1] is not None:
        os.sched_setaffinity(0, {cpus[1]})
        pinning = f"servers on CPU {cpus[0]}, load generators on CPU {cpus[1]}"
        for cpu, frac in cpu_busy([c for c in cpus if c is not None]).items():
            if frac > 0.15:
                print(f"warning: CPU {cpu} is {frac:.0%} busy with other work before the run; results will be noisy")
    else:
        pinning = "fewer than 2 CPUs: no pinning"
    header = (
        f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, uvloop; {pinning}; "
        f"repeat {opts.repeat}, unary {opts.warmup:g}s warm-up + {opts.duration:g}s per sample"
        + ("; QUICK run" if opts.quick else "")
    )
    print(header, flush=True)
    results: dict[str, Any] = {"config": {**vars(opts), "json": None, "header": header}}
    errors: list[str] = []  # failed sections: exit status 1
    notes: list[str] = []  # points skipped or failed alone
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bastion-bench-certs-") as tmp:
        certs = make_certs(Path(tmp))
        sections: dict[str, Callable[[], Any]] = {
            "unary": lambda: bench_unary(opts, certs, cpus, notes),
            "redis": lambda: bench_redis(opts, cpus),
            "stream": lambda: bench_stream(opts, certs, cpus),
            "idle": lambda: bench_idle(opts, certs, cpus, allowed),
            "workers": lambda: bench_workers(opts),
            "kv": lambda: bench_kv(opts, cpus),
        }
        for name in opts.only:
            if name in ("redis", "kv") and redisref.missing() is not None:
                notes.append(f"{name}: {redisref.missing()}")
                if name == "redis":
                    continue
            t0 = time.perf_counter()
            try:
                if name == "workers":
                    os.sched_setaffinity(0, allowed)  # two workers need both CPUs; so does their load
                results[name] = sections[name]()
                state = "done"
            except Exception as exc:
                state = f"failed: {type(exc).__name__}: {_one_line(exc)}"
                errors.append(f"{name} {state}")
            finally:
                if cpus[1] is not None:
                    os.sched_setaffinity(0, {cpus[1]})
            print(f"[{name}] {state} in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    checks = targets(results)
    print()
    print(render(results, checks))
    for line in [*notes, *errors]:
        print(f"note: {line}")
    noisy = noisy_points(results)
    if noisy:
        print("warning: other work ran on the pinned CPUs during: " + ", ".join(noisy) + "; rerun on a quiet machine")
    print(f"total {time.perf_counter() - started:.0f}s")
    if opts.json:
        results.update(targets=[t.as_dict() for t in checks], errors=errors, notes=notes, noisy=noisy)
        opts.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
