"""Unary echo benchmark: Python floor vs grpc.aio vs bastion.

    .venv/bin/python bench/run.py [--concurrency 1 16] [--duration 3] [--warmup 1] [--json out.json]

Each server runs alone in its own subprocess (``bench/servers.py``, uvloop,
pinned to one CPU); this process is the load generator (uvloop, pinned to
another CPU). For every concurrency level C it runs C callers over ONE
connection, warms up, then measures for ``--duration`` seconds: requests/s,
p50/p99 latency and the server process's CPU time per call (utime+stime
from /proc/<pid>/stat, all threads, over the measured window).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from servers import BASTION_METHOD, BENCH_TOKEN, BENCH_TOKENS, GRPC_METHOD  # noqa: E402

__all__ = [
    "OPENERS",
    "ServerProcess",
    "StartupError",
    "bastion_client",
    "cpu_busy",
    "cpu_ticks",
    "percentile",
    "pick_cpus",
    "process_cpu_seconds",
    "run_point",
]

SERVERS = ("floor", "grpc", "bastion")
PAYLOAD = bytes(range(32))
STARTUP_DEADLINE = 20.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
NOISE_THRESHOLD = 0.10  # foreign busy fraction of a pinned CPU that makes a point suspect

Call = Callable[[], Awaitable[bytes]]
Close = Callable[[], Awaitable[None]]


class StartupError(RuntimeError):
    pass


# -- server processes -----------------------------------------------------------------------


class ServerProcess:
    """One benchmark server subprocess; ``port`` once it said it is listening."""

    def __init__(self, kind: str, cpu: int | None, tls: Path | None = None) -> None:
        self.kind = kind
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        cmd = [sys.executable, str(HERE / "servers.py"), kind]
        if cpu is not None:
            cmd += ["--cpu", str(cpu)]
        if tls is not None:
            cmd += ["--tls", str(tls)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        self.port = self._wait_port(time.monotonic() + STARTUP_DEADLINE)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_port(self, deadline: float) -> int:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                tail = self._stderr_tail()
                self.stop()
                raise StartupError(f"{self.kind}: no port within {STARTUP_DEADLINE:.0f}s{tail}")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                code = self.proc.wait()
                tail = self._stderr_tail()
                self.stop()
                raise StartupError(f"{self.kind}: server exited with status {code}{tail}")
            buf += chunk
        line = buf.split(b"\n", 1)[0].decode(errors="replace").strip()
        word, _, port = line.partition(" ")
        if word != "PORT" or not port.isdigit():
            tail = self._stderr_tail()
            self.stop()
            raise StartupError(f"{self.kind}: unexpected startup line {line!r}{tail}")
        return int(port)

    def _stderr_tail(self) -> str:
        self.stderr.seek(0)
        text = self.stderr.read().decode(errors="replace").strip()
        return "\n--- server stderr ---\n" + text[-2000:] if text else ""

    def cpu_seconds(self) -> float:
        """utime + stime of the server process (all its threads), in seconds."""
        return process_cpu_seconds(self.pid)

    def memory_kib(self) -> dict[str, int]:
        """The server's resident set now (``rss``) and its peak so far (``hwm``), in KiB."""
        return process_memory_kib(self.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()
        self.stderr.close()


# -- clients --------------------------------------------------------------------------------


class _FloorClientProtocol(asyncio.Protocol):
    """Id-tagged pipelining over one connection; writes coalesced per loop turn."""

    def __init__(self) -> None:
        import msgspec

        self._decode = msgspec.msgpack.Decoder().decode
        self._encode = msgspec.msgpack.Encoder().encode
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.next_id = 0
        self.buf = bytearray()
        self.out: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.closed: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = exc or ConnectionError("floor: connection closed")
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(self.closed)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, end = 0, len(buf)
        while end - pos >= 4:
            size = int.from_bytes(buf[pos : pos + 4], "big")
            if end - pos - 4 < size:
                break
            call_id, payload = self._decode(memoryview(buf)[pos + 4 : pos + 4 + size])
            pos += 4 + size
            fut = self.pending.pop(call_id, None)
            if fut is not None and not fut.done():
                fut.set_result(payload)
        if pos:
            del buf[:pos]

    def _flush(self) -> None:
        out, self.out = self.out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def call(self, payload: bytes) -> asyncio.Future[bytes]:
        if self.closed is not None:
            raise self.closed
        self.next_id += 1
        body = self._encode((self.next_id, payload))
        if not self.out:
            self.loop.call_soon(self._flush)
        self.out.append(len(body).to_bytes(4, "big"))
        self.out.append(body)
        fut = self.pending[self.next_id] = self.loop.create_future()
        return fut


async def open_floor(port: int, tls: Path | None = None, connections: int = 1) -> tuple[list[Call], Close]:
    """``connections`` floor client connections (TLS with the certificates in ``tls``); one call per connection."""
    from certs import floor_client_context

    loop = asyncio.get_running_loop()
    context = floor_client_context(tls) if tls is not None else None
    conns = [
        await loop.create_connection(_FloorClientProtocol, "127.0.0.1", port, ssl=context) for _ in range(connections)
    ]

    def caller(proto: _FloorClientProtocol) -> Call:
        def call() -> Awaitable[bytes]:
            return proto.call(PAYLOAD)

        return call

    async def close() -> None:
        for transport, _ in conns:
            transport.close()

    return [caller(proto) for _, proto in conns], close


async def open_grpc(port: int, tls: Path | None = None, connections: int = 1) -> tuple[list[Call], Close]:
    """``connections`` grpc.aio channels (TLS with the certificates in ``tls``); one call per channel."""
    import grpc

    channels = []
    for _ in range(connections):
        # Distinct channel args keep grpc from sharing one subchannel between the channels.
        options = [("bench.channel", len(channels))]
        if tls is None:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=(tls / "ca.pem").read_bytes())
            channel = grpc.aio.secure_channel(f"localhost:{port}", creds, options=options)
        await asyncio.wait_for(channel.channel_ready(), 10)
        channels.append(channel)

    def caller(channel: Any) -> Call:
        stub = channel.unary_unary(GRPC_METHOD)  # no serializers: bytes in, bytes out

        def call() -> Awaitable[bytes]:
            return stub(PAYLOAD)  # type: ignore[no-any-return]

        return call

    async def close() -> None:
        for channel in channels:
            await channel.close()

    return [caller(channel) for channel in channels], close


def bastion_client(port: int, tls: Path | None, token: str | None = BENCH_TOKEN, **options: Any) -> Any:
    """A public ``bastion.Client`` for the bench server (TLS with the certificates in ``tls``)."""
    from certs import bastion_client_context

    import bastion

    address = f"127.0.0.1:{port}"
    if tls is None:
        return bastion.Client(address, token=token, insecure=True, **options)
    return bastion.Client(address, token=token, ssl_context=bastion_client_context(tls), **options)


async def open_bastion(port: int, tls: Path | None = None, connections: int = 1) -> tuple[list[Call], Close]:
    """``connections`` public ``bastion.Client`` objects, each with its own bench token; one call per client."""
    import bastion

    # Auth must really be on: an anonymous caller is refused.
    anon = bastion_client(port, tls, token=None, timeout=5)
    try:
        await anon.call(BASTION_METHOD, data=PAYLOAD)
    except (bastion.Unauthenticated, bastion.PermissionDenied):
        pass
    else:
        raise RuntimeError("bastion: anonymous call succeeded; auth is not on")
    finally:
        await anon.close()

    clients = [bastion_client(port, tls, BENCH_TOKENS[i % len(BENCH_TOKENS)]) for i in range(connections)]
    for client in clients:
        await client.connect()

    def caller(client: Any) -> Call:
        def call() -> Awaitable[bytes]:
            return client.call(BASTION_METHOD, data=PAYLOAD)  # type: ignore[no-any-return]

        return call

    async def close() -> None:
        for client in clients:
            await client.close()

    return [caller(client) for client in clients], close


OPENERS = {"floor": open_floor, "floor-minimal": open_floor, "grpc": open_grpc, "bastion": open_bastion}


# -- measurement ----------------------------------------------------------------------------


def percentile(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return float("nan")
    idx = min(len(sorted_ns) - 1, max(0, round(q * (len(sorted_ns) - 1))))
    return sorted_ns[idx] / 1000.0


async def run_point(
    calls: list[Call],
    server: ServerProcess,
    concurrency: int,
    warmup: float,
    duration: float,
    cpus: tuple[int | None, int | None] = (None, None),
) -> dict[str, Any]:
    latencies: list[int] = []
    measuring = False
    stop = False

    async def worker(call: Call) -> None:
        clock = time.perf_counter_ns
        record = latencies.append
        while not stop:
            t0 = clock()
            reply = await call()
            t1 = clock()
            if reply != PAYLOAD:
                raise AssertionError(f"{server.kind}: echo mismatch: {reply!r}")
            if measuring:
                record(t1 - t0)

    # ``concurrency`` callers in all, spread evenly over the connections.
    tasks = [asyncio.create_task(worker(calls[i % len(calls)])) for i in range(concurrency)]

    async def wait(seconds: float) -> None:
        done, _ = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # raise a worker's failure now
        if done:
            raise RuntimeError(f"{server.kind}: a caller stopped early")

    try:
        await wait(warmup)
        pinned = [c for c in cpus if c is not None]
        ticks0, me0 = cpu_ticks(pinned), process_cpu_seconds("self")
        cpu0, t0 = server.cpu_seconds(), time.perf_counter()
        measuring = True
        await wait(duration)
        measuring = False
        t1, cpu1 = time.perf_counter(), server.cpu_seconds()
        ticks1, me1 = cpu_ticks(pinned), process_cpu_seconds("self")
        stop = True
        async with asyncio.timeout(10):
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    calls = len(latencies)
    latencies.sort()
    # CPU time on the pinned CPUs not spent by the server / this process:
    # other processes (or heavy softirq), i.e. measurement noise.
    foreign: dict[str, float] = {}
    for role, cpu, own in (("server", cpus[0], cpu1 - cpu0), ("client", cpus[1], me1 - me0)):
        if cpu is not None:
            total = ticks1[cpu][0] - ticks0[cpu][0]
            busy = total - (ticks1[cpu][1] - ticks0[cpu][1])
            foreign[role] = round(max(0.0, busy / CLK_TCK - own) / (t1 - t0), 3)
    return {
        "server": server.kind,
        "concurrency": concurrency,
        "calls": calls,
        "seconds": round(t1 - t0, 4),
        "rps": calls / (t1 - t0),
        "p50_us": percentile(latencies, 0.50),
        "p99_us": percentile(latencies, 0.99),
        "server_cpu_s": round(cpu1 - cpu0, 4),
        "server_cpu_us_per_call": (cpu1 - cpu0) * 1e6 / calls if calls else float("nan"),
        "client_cpu_us_per_call": (me1 - me0) * 1e6 / calls if calls else float("nan"),
        "foreign_cpu_fraction": foreign,
    }


async def bench_server(
    server: ServerProcess, levels: list[int], warmup: float, duration: float, cpus: tuple[int | None, int | None]
) -> list[dict]:
    async with asyncio.timeout(20):
        calls, close = await OPENERS[server.kind](server.port)
    try:
        return [await run_point(calls, server, c, warmup, duration, cpus) for c in levels]
    finally:
        await close()


def run_one(
    kind: str, cpus: tuple[int | None, int | None], levels: list[int], warmup: float, duration: float
) -> list[dict]:
    import uvloop

    server = ServerProcess(kind, cpus[0])
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(bench_server(server, levels, warmup, duration, cpus))
    finally:
        server.stop()


# -- report ---------------------------------------------------------------------------------


def ratios(results: list[dict], levels: list[int]) -> list[dict]:
    by = {(r["server"], r["concurrency"]): r for r in results}
    out = []
    for c in levels:
        b = by.get(("bastion", c))
        if b is None:
            continue
        row: dict[str, Any] = {"concurrency": c}
        for other in ("floor", "grpc"):
            o = by.get((other, c))
            cpu = "server_cpu_us_per_call"
            row[f"cpu_bastion_over_{other}"] = b[cpu] / o[cpu] if o and o[cpu] else None
            row[f"rps_bastion_over_{other}"] = b["rps"] / o["rps"] if o and o["rps"] else None
        out.append(row)
    return out


def _fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def print_report(results: list[dict], ratio_rows: list[dict], header: str) -> None:
    main_cols = ["server", "concurrency", "req/s", "p50 µs", "p99 µs", "server CPU µs/call"]
    main_rows = [
        [
            r["server"],
            str(r["concurrency"]),
            f"{r['rps']:,.0f}",
            f"{r['p50_us']:.1f}",
            f"{r['p99_us']:.1f}",
            f"{r['server_cpu_us_per_call']:.1f}",
        ]
        for r in results
    ]
    ratio_cols = [
        "concurrency",
        "CPU/call bastion/floor",
        "CPU/call bastion/grpc",
        "req/s bastion/floor",
        "req/s bastion/grpc",
    ]
    ratio_data = [
        [
            str(r["concurrency"]),
            _fmt_ratio(r["cpu_bastion_over_floor"]),
            _fmt_ratio(r["cpu_bastion_over_grpc"]),
            _fmt_ratio(r["rps_bastion_over_floor"]),
            _fmt_ratio(r["rps_bastion_over_grpc"]),
        ]
        for r in ratio_rows
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(header)
        for cols, rows in ((main_cols, main_rows), (ratio_cols, ratio_data)):
            if not rows:
                continue
            widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
            print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
            for row in rows:
                print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
            print()
        return
    console = Console()
    console.print(header)
    for title, cols, rows in (
        ("unary echo, 32-byte payload", main_cols, main_rows),
        ("ratios (CPU/call: lower is better for bastion; req/s: higher is better)", ratio_cols, ratio_data),
    ):
        table = Table(title=title)
        for i, col in enumerate(cols):
            table.add_column(col, justify="left" if i == 0 and col == "server" else "right")
        for row in rows:
            table.add_row(*row)
        if rows:
            console.print(table)


# -- main -----------------------------------------------------------------------------------


def cpu_ticks(cpus: list[int]) -> dict[int, tuple[int, int]]:
    """(total, idle) clock ticks of each CPU in ``cpus``, from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                ticks = [int(v) for v in vals]
                out[int(name[3:])] = (sum(ticks[:8]), ticks[3] + ticks[4])  # idle + iowait
    return out


def process_cpu_seconds(pid: int | str) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_memory_kib(pid: int | str) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of a process, in KiB, from /proc/<pid>/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line[2:5].lower()] = int(line.split()[1])
    return out


def cpu_busy(cpus: list[int], seconds: float = 0.3) -> dict[int, float]:
    """Fraction of time each CPU was busy over a short sample (before any server starts)."""
    a = cpu_ticks(cpus)
    time.sleep(seconds)
    b = cpu_ticks(cpus)
    busy = {}
    for cpu, (total, idle) in b.items():
        dt = total - a[cpu][0]
        busy[cpu] = 1.0 - (idle - a[cpu][1]) / dt if dt else 0.0
    return busy


def pick_cpus() -> tuple[int | None, int | None]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Unary echo benchmark: floor vs grpc.aio vs bastion.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16], help="levels (default: 1 16)")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per point (default 3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per point (default 1)")
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS), help="subset to run")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    opts = parser.parse_args(argv)
    if any(c < 1 for c in opts.concurrency) or opts.duration <= 0 or opts.warmup < 0:
        parser.error("concurrency must be >= 1, duration > 0, warmup >= 0")

    server_cpu, client_cpu = pick_cpus()
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
        pinning = f"server on CPU {server_cpu}, load generator on CPU {client_cpu}"
    else:
        pinning = "fewer than 2 CPUs: no pinning"
    if client_cpu is not None and server_cpu is not None:
        for cpu, frac in cpu_busy([server_cpu, client_cpu]).items():
            if frac > 0.15:
                print(
                    f"warning: CPU {cpu} is {frac:.0%} busy with other work before the run; results will be noisy",
                    file=sys.stderr,
                )
    header = (
        f"python {platform.python_version()}, uvloop both sides, {pinning}; "
        f"warmup {opts.warmup:g}s + {opts.duration:g}s per point, one connection per server"
    )

    results: list[dict] = []
    errors: dict[str, str] = {}
    for kind in opts.servers:
        try:
            results += run_one(kind, (server_cpu, client_cpu), opts.concurrency, opts.warmup, opts.duration)
        except StartupError as exc:
            errors[kind] = f"startup failed: {exc}"
        except Exception as exc:
            errors[kind] = f"{type(exc).__name__}: {exc or 'no detail'}"
        if kind in errors:
            print(f"[{kind}] {errors[kind]}", file=sys.stderr)

    ratio_rows = ratios(results, opts.concurrency)
    print_report(results, ratio_rows, header)
    noisy = [
        f"{r['server']} c={r['concurrency']} ({role} CPU {frac:.0%})"
        for r in results
        for role, frac in r["foreign_cpu_fraction"].items()
        if frac > NOISE_THRESHOLD
    ]
    if noisy:
        print(
            "warning: other work ran on the pinned CPUs during: " + ", ".join(noisy) + "; rerun on a quiet machine",
            file=sys.stderr,
        )
    if opts.json:
        doc = {
            "config": {
                "concurrency": opts.concurrency,
                "duration": opts.duration,
                "warmup": opts.warmup,
                "payload_bytes": len(PAYLOAD),
                "server_cpu": server_cpu,
                "client_cpu": client_cpu,
                "python": platform.python_version(),
            },
            "results": results,
            "ratios": ratio_rows,
            "errors": errors,
        }
        Path(opts.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
