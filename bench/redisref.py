"""Redis, the C reference: a throwaway ``redis-server`` measured with its own ``redis-benchmark``.

``RedisServer`` runs redis-server on a free loopback port with its data in a
temporary directory (``durable=True``: ``appendonly yes`` + ``appendfsync
always``, every write fsynced before it is acknowledged; otherwise no
persistence at all), pinned to a CPU if asked, and waits (with a deadline) for
it to answer PING. ``run_benchmark`` runs ``redis-benchmark --csv`` against
it, pinned to the load CPU, and returns per test the requests/s and the p50
and p99 latencies from its CSV, plus the server's and the benchmark's CPU
time per request (from /proc and the child's rusage).
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

STARTUP_DEADLINE = 20.0
#: The columns of ``redis-benchmark --csv`` (redis 7).
CSV_COLUMNS = ("test", "rps", "avg_latency_ms", "min_latency_ms", "p50_latency_ms", "p95_latency_ms", "p99_latency_ms")


def missing() -> str | None:
    """Why the Redis reference cannot run here, or None when it can."""
    absent = [tool for tool in ("redis-server", "redis-benchmark") if shutil.which(tool) is None]
    return f"{' and '.join(absent)} not installed: redis points skipped" if absent else None


def pin(proc: subprocess.Popen[Any], cpu: int | None) -> None:
    """Pin a child just started to ``cpu`` (None: leave it).

    Not with ``preexec_fn``: a fork in a process that has loaded grpc runs
    grpc's fork handlers, which break the child's start.
    """
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RedisServer:
    """A redis-server subprocess on a free port; use as a context manager."""

    def __init__(self, cpu: int | None, *, durable: bool = False) -> None:
        self.directory = tempfile.mkdtemp(prefix="bastion-bench-redis-")
        self.port = free_port()
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
             "--dir", self.directory],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        pin(self.proc, cpu)
        deadline = time.monotonic() + STARTUP_DEADLINE
        while not self._answers():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def parse_csv(text: str) -> dict[str, dict[str, float]]:
    """``redis-benchmark --csv`` output -> {test: {rps, p50_us, p99_us}}."""
    out = {}
    for line in text.splitlines():
        fields = [f.strip('"') for f in line.split(",")]
        if len(fields) < len(CSV_COLUMNS) or fields[0] == "test":
            continue
        row = dict(zip(CSV_COLUMNS, fields, strict=False))
        out[row["test"]] = {
            "rps": float(row["rps"]),
            "p50_us": float(row["p50_latency_ms"]) * 1000,
            "p99_us": float(row["p99_latency_ms"]) * 1000,
        }
    return out


def run_benchmark(
    server: RedisServer,
    tests: str,
    *,
    clients: int,
    requests: int,
    pipeline: int = 1,
    cpu: int | None = None,
    keyspace: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``redis-benchmark -t TESTS`` (32-byte values) and return its CSV rows with CPU per request.

    CPU per request is over the whole run (all its tests): the server's
    from /proc, the benchmark's from its rusage.
    """
    cmd = ["redis-benchmark", "-p", str(server.port), "-c", str(clients), "-n", str(requests), "-t", tests,
           "-d", "32", "-P", str(pipeline), "--csv"]  # fmt: skip
    if keyspace is not None:
        cmd += ["-r", str(keyspace)]
    server_cpu0 = process_cpu_seconds(server.proc.pid)
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    bench = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pin(bench, cpu)
    stdout, stderr = bench.communicate(timeout=600)
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu = process_cpu_seconds(server.proc.pid) - server_cpu0
    rows = parse_csv(stdout)
    if not rows:
        raise RuntimeError(f"redis-benchmark gave no results: {stdout[-300:]} {stderr[-300:]}")
    client_cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    total = requests * len(rows)
    for row in rows.values():
        row["server_cpu_us_per_call"] = server_cpu * 1e6 / total
        row["client_cpu_us_per_call"] = client_cpu * 1e6 / total
    return rows
