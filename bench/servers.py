"""Benchmark servers, one per subprocess: ``python bench/servers.py KIND [--cpu N] [--tls DIR]``.

KIND is ``floor`` (raw asyncio.Protocol, length-prefixed msgspec-msgpack
frames, one write per read), ``floor-minimal`` (the same, one write per
answer: the issue's "minimal" reference), ``grpc`` (grpc.aio generic bytes handler) or ``bastion`` (a
``Server`` with the whole stack on: token authentication, a role check, a
rate limit, the scheduler and msgspec validation). Each runs on uvloop,
listens on 127.0.0.1 with an ephemeral port, prints ``PORT <n>`` on stdout
once it accepts connections, and exits on SIGTERM, SIGINT or EOF on stdin
(so it never outlives the bench). With ``--tls DIR`` (bench/certs.py wrote
``cert.pem`` and ``key.pem`` there) it serves TLS 1.3 instead of plaintext.

Streaming. The floor counts the bytes of ``[0, chunk]`` frames and answers
``[-id, ...]`` (a frame with a negative id) with ``[id, total]``; bastion has
``bench.sink``, a client-stream method doing the same with bytes items.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

#: The token the bastion server accepts; the bench client presents it.
BENCH_TOKEN = "bst_bench-token-not-a-secret-0123456789abcdef"
#: More principals' tokens (``bench-1`` ...): the pipelined point gives each connection its own
#: caller, as 16 clients would be, so the scheduler's per-principal queue share is not one caller's.
BENCH_TOKENS = [BENCH_TOKEN, *(f"{BENCH_TOKEN}-{i}" for i in range(1, 16))]
GRPC_METHOD = "/bench.Echo/Echo"
BASTION_METHOD = "bench.echo"
BASTION_SINK = "bench.sink"
#: The role ``bench.echo`` and ``bench.sink`` require; the bench principal holds it.
BENCH_ROLE = "bencher"

_HEADER = 4


# -- floor --------------------------------------------------------------------------------


class FloorProtocol(asyncio.Protocol):
    """Echo every ``[id, payload]`` msgpack frame back, one write per read; count stream chunks (id 0)."""

    def __init__(self) -> None:
        import msgspec

        self._decode = msgspec.msgpack.Decoder().decode
        self._encode = msgspec.msgpack.Encoder().encode
        self._buf = bytearray()
        self._streamed = 0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        out = []
        pos = 0
        end = len(buf)
        decode, encode = self._decode, self._encode
        while end - pos >= _HEADER:
            size = int.from_bytes(buf[pos : pos + _HEADER], "big")
            if end - pos - _HEADER < size:
                break
            start = pos + _HEADER
            call_id, payload = decode(memoryview(buf)[start : start + size])
            pos = start + size
            if call_id == 0:
                self._streamed += len(payload)
                continue
            if call_id < 0:
                call_id, payload, self._streamed = -call_id, self._streamed, 0
            body = encode((call_id, payload))
            out.append(len(body).to_bytes(_HEADER, "big"))
            out.append(body)
        if pos:
            del buf[:pos]
        if out and self._transport is not None:
            self._transport.write(b"".join(out))


class MinimalFloorProtocol(FloorProtocol):
    """The floor as the performance issue describes it -- "a minimal ... echo server" -- answering
    each frame with its own write (uvloop sends it at once: a send, and a TLS record, per call)."""

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        decode, encode, transport = self._decode, self._encode, self._transport
        while end - pos >= _HEADER:
            size = int.from_bytes(buf[pos : pos + _HEADER], "big")
            if end - pos - _HEADER < size:
                break
            start = pos + _HEADER
            call_id, payload = decode(memoryview(buf)[start : start + size])
            pos = start + size
            body = encode((call_id, payload))
            if transport is not None:
                transport.write(len(body).to_bytes(_HEADER, "big") + body)
        if pos:
            del buf[:pos]


async def start_floor(
    tls: Path | None, protocol: type[FloorProtocol] = FloorProtocol
) -> tuple[int, Callable[[], Awaitable[None]]]:
    from certs import floor_server_context

    loop = asyncio.get_running_loop()
    context = floor_server_context(tls) if tls is not None else None
    server = await loop.create_server(protocol, "127.0.0.1", 0, backlog=1024, ssl=context)
    port = server.sockets[0].getsockname()[1]

    async def stop() -> None:
        server.close()
        await server.wait_closed()

    return port, stop


# -- grpc ---------------------------------------------------------------------------------


#: Above the pipelined point's 1,024 calls in flight (bench/perf.py: 16 connections x 64).
GRPC_MAX_PENDING = 4096


async def start_grpc(tls: Path | None) -> tuple[int, Callable[[], Awaitable[None]]]:
    import grpc

    async def echo(request: bytes, context: object) -> bytes:
        return request

    service, method = GRPC_METHOD.strip("/").split("/")
    # No (de)serializers: bytes in, bytes out; no codegen needed.
    handlers = {method: grpc.unary_unary_rpc_method_handler(echo)}
    handler = grpc.method_handlers_generic_handler(service, handlers)
    # grpc core cancels calls that wait unrequested past grpc.server.max_pending_requests (1,000 by
    # default): the pipelined point keeps 1,024 in flight, so raise it to measure grpc, not refuse it.
    server = grpc.aio.server(options=[("grpc.server.max_pending_requests", GRPC_MAX_PENDING)])
    server.add_generic_rpc_handlers((handler,))
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        chain = ((tls / "key.pem").read_bytes(), (tls / "cert.pem").read_bytes())
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([chain]))
    if not port:
        raise RuntimeError("grpc: could not bind 127.0.0.1:0")
    await server.start()

    async def stop() -> None:
        await server.stop(grace=None)

    return port, stop


# -- bastion ------------------------------------------------------------------------------


async def start_bastion(tls: Path | None) -> tuple[int, Callable[[], Awaitable[None]]]:
    from certs import bastion_server_context

    from bastion import Principal, Server, ServerLimits, Service
    from bastion.security.authn import StaticTokens
    from bastion.security.ratelimit import Limit, RateLimitConfig, RateLimiter, RateRule
    from bastion.server.scheduler import Scheduler

    svc = Service("bench")

    @svc.method(roles=[BENCH_ROLE])
    async def echo(data: bytes) -> bytes:
        return data

    @svc.method(roles=[BENCH_ROLE])
    async def sink(chunks: AsyncIterator[bytes]) -> int:
        total = 0
        async for chunk in chunks:
            total += len(chunk)
        return total

    # The whole stack on: token authentication, a role check, rate limits (a
    # per-principal bucket and a per-role rule on bench.*, both far above what
    # the bench offers, so they are charged but never refuse), the scheduler
    # and msgspec validation of every argument. Connection limits are raised
    # for the 10,000 idle connections point (all from 127.0.0.1).
    auth = StaticTokens(
        {token: Principal(f"bench-{i}", frozenset({BENCH_ROLE})) for i, token in enumerate(BENCH_TOKENS)}
    )
    huge = 1e12
    rules = [RateRule(method="bench.*", role=BENCH_ROLE, rate=huge, burst=huge)]
    limiter = RateLimiter(RateLimitConfig(per_principal=Limit(rate=huge, burst=huge), rules=rules))
    limits = ServerLimits(max_connections=30_000, max_connections_per_source=30_000, max_handshakes_per_source=30_000)
    server = Server(
        [svc],
        authenticator=auth,
        limiter=limiter,
        scheduler=Scheduler(),
        limits=limits,
        ssl_context=bastion_server_context(tls) if tls is not None else None,
    )
    await server.start("127.0.0.1", 0)

    async def stop() -> None:
        await server.shutdown(grace=1.0)

    return server.port, stop


async def start_minimal_floor(tls: Path | None) -> tuple[int, Callable[[], Awaitable[None]]]:
    return await start_floor(tls, MinimalFloorProtocol)


STARTERS: dict[str, Callable[[Path | None], Awaitable[tuple[int, Callable[[], Awaitable[None]]]]]] = {
    "floor": start_floor,
    "floor-minimal": start_minimal_floor,
    "grpc": start_grpc,
    "bastion": start_bastion,
}


async def serve(kind: str, tls: Path | None) -> None:
    loop = asyncio.get_running_loop()
    stopping = loop.create_future()

    def stop_now() -> None:
        if not stopping.done():
            stopping.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_now)

    class _StdinWatch(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            stop_now()

    await loop.connect_read_pipe(_StdinWatch, sys.stdin)

    port, stop = await STARTERS[kind](tls)
    # Every server gets the process settings ``bastion serve`` applies (bastion/allocator.py):
    # glibc malloc thresholds, and the start-up heap frozen out of the garbage collector.
    from bastion import allocator

    allocator.tune()
    allocator.settle_gc()
    print(f"PORT {port}", flush=True)
    await stopping
    await stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=sorted(STARTERS))
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    parser.add_argument("--tls", type=Path, default=None, metavar="DIR", help="serve TLS with DIR/cert.pem, key.pem")
    opts = parser.parse_args()
    if opts.cpu is not None:
        # Before any import that starts threads: they inherit the mask.
        os.sched_setaffinity(0, {opts.cpu})
    for path in (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(opts.kind, opts.tls))


if __name__ == "__main__":
    main()
