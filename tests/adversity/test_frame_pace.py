"""Frame pace: a peer that trickles a frame it never finishes is closed; honest senders are not.

A frame's bytes are traffic, so before the frame pace a peer could hold its
connection (and up to ``max_frame`` bytes of buffer) for ever by sending one
byte of an endless frame every few seconds: the idle timer and the keepalive
both saw a live peer. Each test drives an in-process server over real TCP
with raw frames (``run`` and ``Raw`` from the hostile-peer tests).
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from bastion import Server, ServerLimits
from bastion.protocol.messages import Call
from bastion.status import Status
from tests.adversity.test_hostile_peers import GOAWAY, RESULT, Raw, encode, poll, run

#: A 1 s frame clock and 100 bytes/s: a 200-byte frame begun may take 1 + 2 s.
PACED = ServerLimits(frame_timeout=1.0, frame_min_rate=100)


def echo_call(call_id: int, text: str) -> bytes:
    return encode(Call(call_id, "hp.echo", msgspec.Raw(msgspec.msgpack.encode({"value": text}))))


def test_a_frame_trickled_and_never_finished_closes_the_connection_and_others_keep_serving() -> None:
    async def body(server: Server) -> None:
        trickler, bystander = await Raw.connect(server), await Raw.connect(server)
        frame = echo_call(1, "x" * 4000)
        start = time.monotonic()
        trickler.send(frame[:10])

        async def trickle() -> None:  # a byte every 0.2 s: traffic enough for any idle or keepalive timer
            for i in range(10, 30):
                await asyncio.sleep(0.2)
                try:
                    trickler.send(frame[i : i + 1])
                except ConnectionError:
                    return

        trickling = asyncio.create_task(trickle())
        seen = await trickler.closed(timeout=5)
        elapsed = time.monotonic() - start
        trickling.cancel()
        # Due at 1 s + 30 bytes / 100 per second: at about 1.3 s, checked no later than 1.6 s.
        assert 1.0 <= elapsed < 3.0, elapsed
        assert [m[:3] for m in seen if m[0] == GOAWAY] == [[GOAWAY, 0, Status.DEADLINE_EXCEEDED]]
        assert seen[-1][3] == "frame too slow"
        assert server.stats()["closed_slow_sender"] == 1
        bystander.send(echo_call(7, "still here"))
        assert (await bystander.answers_until(7))[7] == [RESULT, 7, "still here"]
        bystander.close()

    run(body, limits=PACED)


def test_a_large_frame_sent_steadily_above_the_minimum_rate_is_answered() -> None:
    """4,000 bytes at about 1,000 bytes/s take 4 s, past the 1 s clock: the bytes received buy the
    time (1 s + 40 s at 100 bytes/s), so the frame arrives and is answered."""

    async def body(server: Server) -> None:
        peer = await Raw.connect(server)
        frame = echo_call(1, "y" * 4000)
        for i in range(0, len(frame), 200):
            peer.send(frame[i : i + 200])
            await asyncio.sleep(0.2)
        assert (await peer.answers_until(1))[1] == [RESULT, 1, "y" * 4000]
        assert server.stats()["closed_slow_sender"] == 0
        peer.close()

    run(body, limits=PACED)


def test_back_to_back_frames_whose_reads_end_mid_frame_are_not_one_slow_frame() -> None:
    """Every read ends inside the next frame, for twice the frame clock: each frame is timed from
    its own first bytes, not from the first partial frame of the stream."""

    async def body(server: Server) -> None:
        peer = await Raw.connect(server)
        frames = b"".join(echo_call(i, "z" * 50) for i in range(1, 41))
        step = 37  # not a multiple of a frame's length: reads end partway through frames
        for i in range(0, len(frames), step):
            peer.send(frames[i : i + step])
            await asyncio.sleep(0.05)
        answers = await peer.answers_until(40)
        assert sorted(answers) == list(range(1, 41))
        assert server.stats()["closed_slow_sender"] == 0
        peer.close()

    run(body, limits=PACED)


def test_the_frame_clock_leaves_no_timer_after_the_connection_closes() -> None:
    async def body(server: Server) -> None:
        peer = await Raw.connect(server)
        peer.send(echo_call(1, "w" * 100)[:20])
        await poll(lambda: any(s._frame_timer is not None for s in server.sessions), "the frame watch")
        (session,) = server.sessions
        peer.close()
        await poll(lambda: not server.sessions, "the session to end")
        assert session._frame_timer is not None and session._frame_timer.cancelled()

    run(body, limits=PACED)
