"""Gateway cost per small call vs a bare Starlette-on-uvicorn JSON echo, measured in the same run.

    .venv/bin/python bench/gateway.py [--connections 32] [--duration 4] [--warmup 1] [--repeat 3] [--tls]
                                     [--json out.json]

A server subprocess (pinned to CPU 0 when there are 2+ CPUs; the load
generator to CPU 1) runs, in one event loop, a bastion ``Server`` hosting a
one-method ``bench.echo`` service, on uvloop as ``bastion serve`` runs, behind the gateway (``bastion.gateway.serve``,
uvicorn + httptools, token authentication, rate limiter off), and a bare
Starlette app on the same uvicorn settings whose only route decodes the JSON
body and answers it. Each point is measured alone (the other port idle):

* ``bare``: ``POST /echo`` ``{"value": 1}`` on the bare app;
* ``v1``: ``POST /v1/bench/echo`` ``{"value": 1}`` with ``Authorization: Bearer``;
* ``rpc``: ``POST /rpc`` with one JSON-RPC call to ``bench.echo``.

The load generator is a small asyncio HTTP/1.1 client: ``--connections``
keep-alive connections, each sending one request after another (closed
loop). The table gives calls/s, mean latency, the server process's CPU per
call (from /proc: the cost, whether or not the load generator saturates the
server), and each gateway point's cost per call relative to ``bare`` (the
issue's target: within 1.3x). Each point runs ``--repeat`` times, the points
interleaved; the table shows the median. With ``--tls`` both ports serve
HTTPS (TLS 1.3, bench/certs.py's throwaway certificate): the gateway through
its own TLS layer (bastion/gateway/_tls.py: uvloop's, made by the gateway to
count failed handshakes), the bare app through uvicorn's (uvloop's too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

from run import process_cpu_seconds  # noqa: E402

TOKEN = "bst_" + "b" * 43


# -- server side (subprocess) ------------------------------------------------------------------


async def _serve(tls: Path | None) -> None:
    import msgspec
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from bastion import Service
    from bastion.gateway import GatewayConfig, serve
    from bastion.security.authn import StaticTokens
    from bastion.security.principal import Principal
    from bastion.server.server import Server

    service = Service("bench")

    @service.method
    async def echo(value: Any) -> Any:
        return value

    server = Server([service], authenticator=StaticTokens({TOKEN: Principal("bench", frozenset())}))
    cert_files = (str(tls / "cert.pem"), str(tls / "key.pem")) if tls is not None else None
    gateway = await serve(server, GatewayConfig(http_port=0), cert_files=cert_files)

    async def bare(request: Request) -> Response:
        return Response(msgspec.json.encode(msgspec.json.decode(await request.body())), media_type="application/json")

    app = Starlette(routes=[Route("/echo", bare, methods=["POST"])])
    config = uvicorn.Config(app, host="127.0.0.1", port=0, http="httptools", lifespan="off", log_level="warning",
                            access_log=False, ssl_certfile=cert_files and cert_files[0],
                            ssl_keyfile=cert_files and cert_files[1])  # fmt: skip
    uv = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(uv.serve())
    while not uv.started:  # uvicorn offers no event for this
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    bare_port = uv.servers[0].sockets[0].getsockname()[1]
    from bastion import allocator

    allocator.tune()  # what bastion serve does at start; the bare app shares the process
    allocator.settle_gc()
    print(json.dumps({"gateway": gateway.port, "bare": bare_port}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    uv.should_exit = True
    await task
    await gateway.aclose()


# -- load generator -------------------------------------------------------------------------------


def _request(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


_CLIENT_TLS: Any = None  # an ssl.SSLContext trusting bench/certs.py's CA, with --tls


async def _connection(port: int, request: bytes, stop: float, latencies: list[float], expect: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_CLIENT_TLS)
    try:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200") or expect not in body:
                raise RuntimeError(f"unexpected answer: {head[:40]!r} {body[:80]!r}")
            latencies.append(time.perf_counter() - start)
    finally:
        writer.close()


async def _measure(
    port: int, request: bytes, expect: bytes, connections: int, duration: float, server_pid: int | None = None
) -> dict[str, float]:
    latencies: list[float] = []
    stop = time.perf_counter() + duration
    cpu_before = process_cpu_seconds(server_pid) if server_pid is not None else 0.0
    started = time.perf_counter()
    await asyncio.gather(*(_connection(port, request, stop, latencies, expect) for _ in range(connections)))
    elapsed = time.perf_counter() - started
    cpu = process_cpu_seconds(server_pid) - cpu_before if server_pid is not None else 0.0
    latencies.sort()
    return {
        "calls_per_s": len(latencies) / elapsed,
        "mean_ms": 1000 * sum(latencies) / len(latencies),
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "server_cpu_us_per_call": 1e6 * cpu / len(latencies),
        "calls": len(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tls", action="store_true", help="HTTPS on both ports")
    parser.add_argument("--serve", type=Path, nargs="?", const=Path(), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # the loop `bastion serve` runs on
            runner.run(_serve(args.serve if args.serve != Path() else None))
        return
    cpus = os.cpu_count() or 1
    cmd = [sys.executable, __file__, "--serve"]
    if args.tls:
        global _CLIENT_TLS
        import ssl
        import tempfile

        from certs import make_certs

        certs = make_certs(Path(tempfile.mkdtemp(prefix="bastion-bench-gateway-")))
        _CLIENT_TLS = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        cmd.append(str(certs))
    if cpus >= 2:
        cmd = ["taskset", "-c", "0", *cmd]
        os.sched_setaffinity(0, {1})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None
        ports = json.loads(proc.stdout.readline())
        auth = {"Authorization": f"Bearer {TOKEN}"}
        rpc_body = b'{"jsonrpc":"2.0","method":"bench.echo","params":{"value":1},"id":1}'
        points = {
            "bare": (ports["bare"], _request("/echo", b'{"value":1}', {}), b'{"value":1}'),
            "v1": (ports["gateway"], _request("/v1/bench/echo", b'{"value":1}', auth), b"1"),
            "rpc": (ports["gateway"], _request("/rpc", rpc_body, auth), b'"result":1'),
        }
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in points}
        for port, request, expect in points.values():
            asyncio.run(_measure(port, request, expect, args.connections, args.warmup))
        for _ in range(args.repeat):  # interleaved, so a noisy moment hits one sample of each
            for name, (port, request, expect) in points.items():
                runs[name].append(
                    asyncio.run(_measure(port, request, expect, args.connections, args.duration, proc.pid))
                )
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(30)
    results = {
        name: {key: statistics.median(r[key] for r in samples) for key in samples[0]} for name, samples in runs.items()
    }
    bare = results["bare"]["server_cpu_us_per_call"]
    print(f"{'point':6} {'calls/s':>10} {'mean ms':>9} {'p99 ms':>8} {'server us/call':>15} {'cost vs bare':>13}")
    for name, r in results.items():
        r["cost_vs_bare"] = r["server_cpu_us_per_call"] / bare
        spread = [s["server_cpu_us_per_call"] / bare for s in runs[name]] if name != "bare" else []
        extra = f"  ({min(spread):.2f}-{max(spread):.2f})" if spread else ""
        print(
            f"{name:6} {r['calls_per_s']:10.0f} {r['mean_ms']:9.2f} {r['p99_ms']:8.2f} "
            f"{r['server_cpu_us_per_call']:15.1f} {r['cost_vs_bare']:12.2f}x{extra}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"median": results, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
