"""Argument memory: calls whose arguments may decode to far more than their bytes are counted, and
refused past ``limits.max_args_memory``, before they are decoded; typed scalar arguments of 1 KiB
or more count twice their bytes (they wait in queues too: tests/adversity/test_queued_bytes.py).

A frame of empty MessagePack maps decodes to about 73 times its size in Python objects, and calls
wait in queues decoded: 256 such 1 MiB calls on one connection were about 18 GB. Each test drives
an in-process server over real TCP with raw frames.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from bastion import Principal, Server, ServerLimits, Service
from bastion.protocol.messages import Call, Cancel, Hello
from bastion.security.authn import StaticTokens
from bastion.server.dispatch import GROWTH_WORST
from bastion.server.scheduler import Scheduler, SchedulerConfig
from bastion.status import Status
from tests.adversity.test_hostile_peers import ERROR, RESULT, TOKEN, WELCOME, Raw, encode, poll

ADA = Principal("ada", frozenset({"user"}))
#: About 8 KiB of one-byte empty maps: about 600 KB once decoded.
MAPS: list[dict[str, Any]] = [{}] * 8190
#: What one call of MAPS counts: its argument bytes times the worst growth.
COST = len(msgspec.msgpack.encode({"value": MAPS})) * GROWTH_WORST
#: Bytes of a flat 10,000-byte argument as counted: twice its encoding.
FLAT = 2 * len(msgspec.msgpack.encode({"value": b"x" * 10_000}))
#: Room for three such calls held at once, and a flat one, not four.
LIMITS = ServerLimits(max_frame=16_384, max_args_memory=3 * COST + FLAT + 1000)


def held_service(release: asyncio.Event) -> Service:
    svc = Service("am")

    @svc.method
    async def hold_any(value: Any) -> int:
        await release.wait()
        return len(value)

    @svc.method
    async def hold_bytes(value: bytes) -> int:
        await release.wait()
        return len(value)

    return svc


def call(call_id: int, method: str, value: object) -> bytes:
    return encode(Call(call_id, method, msgspec.Raw(msgspec.msgpack.encode({"value": value}))))


def test_calls_past_the_argument_memory_are_refused_before_decoding_and_the_room_comes_back() -> None:
    async def main() -> None:
        release = asyncio.Event()
        server = Server([held_service(release)], authenticator=StaticTokens({TOKEN: ADA}), limits=LIMITS)
        await server.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            peer = Raw(reader, writer)
            peer.send(encode(Hello(1, "am/1", TOKEN)))
            assert (await peer.read())[0] == WELCOME
            maps = MAPS
            peer.send(*(call(i, "am.hold_any", maps) for i in (1, 2, 3)))
            await poll(lambda: server.args_memory == 3 * COST, "three calls counted")
            # The fourth does not fit: refused at once, retryable, and counted.
            peer.send(call(4, "am.hold_any", maps))
            refused = await peer.read()
            assert refused[:3] == [ERROR, 4, Status.RESOURCE_EXHAUSTED]
            assert "limits.max_args_memory" in refused[3]
            assert server.stats()["rejected_args_memory"] == 1
            assert server.stats()["rejected_rate_limited"] == 0
            # Bytes decode to their own size: counted twice (the frame and the copy), and they fit.
            peer.send(call(5, "am.hold_bytes", b"x" * 10_000))
            await poll(lambda: server.args_memory == 3 * COST + FLAT, "the bytes call counted")
            # Small calls are not counted either (below ARGS_COUNTED).
            peer.send(call(6, "am.hold_any", [1, 2, 3]))
            await poll(lambda: server.stats()["calls_in_flight"] == 5, "five calls in flight")
            release.set()
            answers: dict[int, list[Any]] = {}
            for i in (1, 2, 3, 5, 6):
                if i not in answers:
                    answers.update(await peer.answers_until(i))
            assert {i: answers[i][:3] for i in (1, 2, 3)} == {i: [RESULT, i, 8190] for i in (1, 2, 3)}
            assert answers[5] == [RESULT, 5, 10_000] and answers[6] == [RESULT, 6, 3]
            await poll(lambda: server.args_memory == 0, "the room given back")
            peer.send(call(7, "am.hold_any", maps))
            assert (await peer.answers_until(7))[7] == [RESULT, 7, 8190]
            peer.close()
        finally:
            await server.shutdown(grace=1)

    asyncio.run(main())


def test_a_cancelled_or_refused_call_gives_its_room_back() -> None:
    async def main() -> None:
        release = asyncio.Event()
        server = Server([held_service(release)], authenticator=StaticTokens({TOKEN: ADA}), limits=LIMITS)
        await server.start("127.0.0.1", 0)
        try:
            peer = await Raw.connect(server)
            peer.send(call(1, "am.hold_any", MAPS), call(2, "am.hold_any", MAPS))
            await poll(lambda: server.args_memory == 2 * COST, "two calls counted")
            peer.send(encode(Cancel(1)))
            await poll(lambda: server.args_memory == COST, "call 1's room given back")
            peer.close()  # call 2 ends with its connection
            await poll(lambda: server.args_memory == 0, "call 2's room given back")
        finally:
            release.set()
            await server.shutdown(grace=1)

    asyncio.run(main())


def test_an_inline_call_of_flat_arguments_counts_only_if_it_queues() -> None:
    # An inline call (a handler with no await) runs at once and lets go of its arguments as it ends:
    # with max_args_memory full, one with 1 KiB or more of flat arguments still runs. A call that
    # waits -- a handler that awaits, or an inline one finding every slot taken -- is counted, so refused.
    async def main() -> None:
        release = asyncio.Event()
        svc = held_service(release)

        @svc.method
        async def size(value: bytes) -> int:
            return len(value)

        @svc.method
        async def size_any(value: Any) -> int:
            return len(value)

        scheduler = Scheduler(SchedulerConfig(max_concurrency=5, control_reserve=0))
        server = Server([svc], authenticator=StaticTokens({TOKEN: ADA}), limits=LIMITS, scheduler=scheduler)
        await server.start("127.0.0.1", 0)
        try:
            peer = await Raw.connect(server)
            peer.send(*(call(i, "am.hold_any", MAPS) for i in (1, 2, 3)), call(4, "am.hold_bytes", b"x" * 10_000))
            await poll(lambda: server.args_memory == 3 * COST + FLAT, "four calls counted: full")
            peer.send(call(5, "am.hold_bytes", b"y" * 10_000))  # it would wait for its handler: refused
            assert (await peer.read())[:3] == [ERROR, 5, Status.RESOURCE_EXHAUSTED]
            peer.send(call(6, "am.size", b"z" * 10_000))  # inline: runs at once
            assert await peer.read() == [RESULT, 6, 10_000]
            peer.send(call(7, "am.size_any", MAPS))  # inline, but decoding it is the cost: refused
            assert (await peer.read())[:3] == [ERROR, 7, Status.RESOURCE_EXHAUSTED]
            assert server.args_memory == 3 * COST + FLAT
            # A fifth held call (too small to count) takes the last slot: an inline call now queues.
            peer.send(call(8, "am.hold_any", [1, 2, 3]))
            await poll(lambda: server.stats()["calls_in_flight"] == 5, "five calls in flight")
            peer.send(call(9, "am.size", b"z" * 10_000))
            refused = await peer.read()
            assert refused[:3] == [ERROR, 9, Status.RESOURCE_EXHAUSTED] and "limits.max_args_memory" in refused[3]
            assert server.stats()["rejected_args_memory"] == 3
            release.set()
            answers = await peer.answers_until(8)
            assert all(answers[i][:2] == [RESULT, i] for i in (1, 2, 3, 4, 8))
            await poll(lambda: server.args_memory == 0, "the room given back")
            peer.close()
        finally:
            release.set()
            await server.shutdown(grace=1)

    asyncio.run(main())
