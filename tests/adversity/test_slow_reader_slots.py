"""A client that stops reading its answers does not keep other callers' calls from running.

A real server (in-process, loopback TCP) with four scheduler slots. One
client (127.0.0.2, anonymous) sends calls whose answers are large and never
reads them; another (127.0.0.3) makes a small call. A finished unary call
waits to send its answer while the peer is not reading (the answers must not
pile up in memory), and it used to wait *in its scheduler slot*: the
non-reader's calls held every slot until ``write_stall_timeout`` (10 s by
default) dropped its connection, and every other caller's calls waited --
or, past the CoDel target, were shed -- meanwhile. One connection, re-opened
every ten seconds, kept the server unavailable to everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from bastion import Principal, Server, Service
from bastion.config import ServerLimits
from bastion.security.authn import StaticTokens
from bastion.server.calls import PARKED_SHARE
from bastion.server.dispatch import IdempotencyKeys
from bastion.server.scheduler import Scheduler, SchedulerConfig
from bastion.status import Status
from bastion.store import open_store

HELLO, WELCOME, CALL, RESULT = 1, 2, 3, 4
ANSWER = 256 * 1024
CALLS = 40
TOKEN = "bst_slow-reader-token-0123456789abcdef"


def frame(message: object) -> bytes:
    body = msgspec.msgpack.encode(message)
    return len(body).to_bytes(4, "big") + body


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def read_message(reader: asyncio.StreamReader) -> Any:
    length = int.from_bytes(await reader.readexactly(4), "big")
    return msgspec.msgpack.decode(await reader.readexactly(length))


async def connect(
    port: int, source: str, *, rcvbuf: int | None = None, token: str | None = None
) -> tuple[Any, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect: the window it advertises stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(frame([HELLO, 1, "raw/1", token, 16, 1 << 20, {}]))
    assert (await read_message(reader))[0] == WELCOME
    return reader, writer


def make_service() -> Service:
    svc = Service("sr")

    @svc.method()
    async def big() -> bytes:
        await asyncio.sleep(0)
        return b"x" * ANSWER

    @svc.method(public=True)
    async def small() -> int:
        await asyncio.sleep(0)
        return 1

    return svc


async def attack(server: Server, keyed: bool) -> None:
    stats = server.scheduler.stats
    _, attacker = await connect(server.port, "127.0.0.2", rcvbuf=4096, token=TOKEN)
    calls = [
        [CALL, 1 + 2 * i, "sr.big", {}, None, None, False, {"idempotency-key": f"k{i}"} if keyed else None]
        for i in range(CALLS)
    ]
    attacker.write(b"".join(frame(call) for call in calls))
    # Its first answers fill the socket buffers, then its finished calls wait for it to read.
    await until(lambda: stats()["started"] >= 4 and stats()["completed"] < CALLS, "the calls to start")
    await until(lambda: server.stats()["calls_in_flight"] >= 4, "answers to wait for the reader")
    reader, victim = await connect(server.port, "127.0.0.3")
    victim.write(frame([CALL, 1, "sr.small", {}]))
    answer = await asyncio.wait_for(read_message(reader), 3)  # before: after write_stall_timeout
    assert answer[:3] == [RESULT, 1, 1]
    assert server.stats()["calls_in_flight"] >= 4  # the non-reader's answers still wait
    await until(lambda: server.args_memory > 0, "waiting answers to be counted (limits.max_args_memory)")
    attacker.transport.abort()
    victim.close()
    await until(lambda: server.stats()["calls_in_flight"] == 0, "the connection's calls to be dropped")
    await until(lambda: server.args_memory == 0, "their waiting answers to be let go as their tasks end")
    assert stats()["running"] == 0 and stats()["queued"] == 0


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "idempotency-keyed"])
def test_a_client_that_stops_reading_does_not_hold_the_slots_its_finished_calls_had(
    keyed: bool, tmp_path: Path
) -> None:
    """Keyed: the non-reader's calls carry idempotency keys (once.py answers those)."""

    async def main() -> None:
        limits = ServerLimits(write_high_water=64 * 1024, write_stall_timeout=60)
        config = SchedulerConfig(max_concurrency=4, control_reserve=0, codel_target=30, codel_interval=30)
        tokens = StaticTokens({TOKEN: Principal("mallory", frozenset())})
        server = Server([make_service()], limits=limits, scheduler=Scheduler(config), authenticator=tokens)
        async with contextlib.AsyncExitStack() as stack:
            if keyed:
                server.idempotency = IdempotencyKeys(await stack.enter_async_context(open_store(tmp_path / "b.db")))
            await server.start("127.0.0.1", 0)
            try:
                async with asyncio.timeout(30):
                    await attack(server, keyed)
            finally:
                await server.shutdown(grace=1)

    asyncio.run(main())


def test_non_readers_answers_waiting_encoded_do_not_take_the_memory_other_callers_arguments_need() -> None:
    """Two non-readers (127.0.0.2, 127.0.0.4) with ~60 KB answers, 200 calls each: the answers waiting
    for them encoded used to fill ``limits.max_args_memory`` between them, and a bystander's call with
    40 KB of arguments (127.0.0.3) was refused RESOURCE_EXHAUSTED at once until ``write_stall_timeout``
    dropped them. A connection's waiting answers now hold at most a sixteenth of the limit."""
    svc = Service("sr")

    @svc.method(public=True)
    async def big() -> bytes:
        await asyncio.sleep(0)
        return b"x" * 60_000

    @svc.method(public=True)
    async def upload(blob: bytes) -> int:
        await asyncio.sleep(0)
        return len(blob)

    async def main() -> None:
        limits = ServerLimits(
            max_frame=65536, max_args_memory=80 * 65536, write_high_water=16384, write_stall_timeout=60
        )
        share = limits.max_args_memory // PARKED_SHARE
        config = SchedulerConfig(max_concurrency=4, control_reserve=0, codel_target=30, codel_interval=30)
        server = Server([svc], limits=limits, scheduler=Scheduler(config))
        stats = server.scheduler.stats
        await server.start("127.0.0.1", 0)
        try:
            async with asyncio.timeout(30):
                attackers = []
                for source in ("127.0.0.2", "127.0.0.4"):
                    _, writer = await connect(server.port, source, rcvbuf=4096)
                    writer.write(b"".join(frame([CALL, 1 + 2 * i, "sr.big", {}]) for i in range(200)))
                    attackers.append(writer)
                # No call starts any more: the non-readers' queued calls are held (scheduler.py, "Held jobs"), and
                # any slot still taken is held by a call whose answer could not be put aside.
                last = [-1, 0.0]

                def settled() -> bool:
                    now = asyncio.get_running_loop().time()
                    if stats()["started"] != last[0]:
                        last[:] = [stats()["started"], now]
                    return now - last[1] >= 0.3

                await until(settled, "the slots to be held")
                await until(lambda: server.args_memory > 0, "answers to wait encoded")
                assert server.args_memory <= 2 * share  # before: all of limits.max_args_memory
                assert 0 < server.parked_memory <= server.args_memory
                reader, victim = await connect(server.port, "127.0.0.3")
                victim.write(frame([CALL, 1, "sr.upload", {"blob": b"z" * 40_000}, 1000]))
                answer = await asyncio.wait_for(read_message(reader), 5)
                assert answer[1] == 1 and answer[2] != int(Status.RESOURCE_EXHAUSTED), answer
                assert server.stats()["rejected_args_memory"] == 0
                for writer in attackers:
                    writer.transport.abort()
                victim.close()
                await until(lambda: server.stats()["calls_in_flight"] == 0, "the connections' calls to be dropped")
                await until(lambda: server.args_memory == 0, "their waiting answers to be let go")
                assert server.parked_memory == 0
        finally:
            await server.shutdown(grace=1)

    asyncio.run(main())
