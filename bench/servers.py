"""Benchmark servers, one per subprocess: ``python bench/servers.py KIND [--cpu N]``.

KIND is ``floor`` (raw asyncio.Protocol, length-prefixed msgspec-msgpack
frames), ``grpc`` (grpc.aio generic bytes handler) or ``bastion`` (a
``Server`` with a token-authenticated ``bench.echo`` method). Each runs on
uvloop, listens on 127.0.0.1 with an ephemeral port, prints
``PORT <n>`` on stdout once it accepts connections, and exits on SIGTERM,
SIGINT or EOF on stdin (so it never outlives the bench).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

#: The token the bastion server accepts; the bench client presents it.
BENCH_TOKEN = "bst_bench-token-not-a-secret-0123456789abcdef"
GRPC_METHOD = "/bench.Echo/Echo"
BASTION_METHOD = "bench.echo"

_HEADER = 4


# -- floor --------------------------------------------------------------------------------


class FloorProtocol(asyncio.Protocol):
    """Echo every ``[id, payload]`` msgpack frame back, one write per read."""

    def __init__(self) -> None:
        import msgspec

        self._decode = msgspec.msgpack.Decoder().decode
        self._encode = msgspec.msgpack.Encoder().encode
        self._buf = bytearray()
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
            msg = decode(memoryview(buf)[start : start + size])
            body = encode(msg)
            out.append(len(body).to_bytes(_HEADER, "big"))
            out.append(body)
            pos = start + size
        if pos:
            del buf[:pos]
        if out and self._transport is not None:
            self._transport.write(b"".join(out))


async def start_floor() -> tuple[int, Callable[[], Awaitable[None]]]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FloorProtocol, "127.0.0.1", 0, backlog=128)
    port = server.sockets[0].getsockname()[1]

    async def stop() -> None:
        server.close()
        await server.wait_closed()

    return port, stop


# -- grpc ---------------------------------------------------------------------------------


async def start_grpc() -> tuple[int, Callable[[], Awaitable[None]]]:
    import grpc

    async def echo(request: bytes, context: object) -> bytes:
        return request

    service, method = GRPC_METHOD.strip("/").split("/")
    # No (de)serializers: bytes in, bytes out; no codegen needed.
    handlers = {method: grpc.unary_unary_rpc_method_handler(echo)}
    handler = grpc.method_handlers_generic_handler(service, handlers)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    if not port:
        raise RuntimeError("grpc: could not bind 127.0.0.1:0")
    await server.start()

    async def stop() -> None:
        await server.stop(grace=None)

    return port, stop


# -- bastion ------------------------------------------------------------------------------


async def start_bastion() -> tuple[int, Callable[[], Awaitable[None]]]:
    from bastion import Principal, Server, Service
    from bastion.security.authn import StaticTokens
    from bastion.security.ratelimit import RateLimitConfig, RateLimiter

    svc = Service("bench")

    @svc.method
    async def echo(data: bytes) -> bytes:
        return data

    auth = StaticTokens({BENCH_TOKEN: Principal("bench")})
    # The whole stack on: authentication, authorization, rate limiting (with
    # limits high enough not to refuse the bench), the scheduler, validation.
    limiter = RateLimiter(RateLimitConfig(per_principal=None))
    server = Server([svc], authenticator=auth, limiter=limiter)
    await server.start("127.0.0.1", 0)

    async def stop() -> None:
        await server.shutdown(grace=1.0)

    return server.port, stop


STARTERS: dict[str, Callable[[], Awaitable[tuple[int, Callable[[], Awaitable[None]]]]]] = {
    "floor": start_floor,
    "grpc": start_grpc,
    "bastion": start_bastion,
}


async def serve(kind: str) -> None:
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

    port, stop = await STARTERS[kind]()
    print(f"PORT {port}", flush=True)
    await stopping
    await stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=sorted(STARTERS))
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    opts = parser.parse_args()
    if opts.cpu is not None:
        # Before any import that starts threads: they inherit the mask.
        os.sched_setaffinity(0, {opts.cpu})
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(opts.kind))


if __name__ == "__main__":
    main()
