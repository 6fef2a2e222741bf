"""Calls waiting for a slot are bounded in bytes, not only in count, whatever their argument types.

The scheduler's queues hold up to ``queue_limit`` calls per level (3 x 1024) and a connection up
to ``read_high_water`` (256): counts. A call of flat arguments (text, bytes) up to ``max_frame``
holds its frame and its decoded copy while it waits, so 3,000 queued 1 MiB calls were 6 GB. Such
calls of 1 KiB or more now count twice their bytes against ``limits.max_args_memory`` as the
calls whose arguments may hold containers do, and past it they are refused RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bastion import SyncClient
from bastion.status import Status
from tests.support.raw import CALL, ERROR, RESULT, RawPeer, frame
from tests.support.server import ServerProcess

KIB = 1 << 10
TEXT = "a" * (60 * KIB)  # demo.length(text: str): flat, counted 2 x its ~60 KiB
LIMIT = 80 * 64 * KIB  # the least max_args_memory for a 64 KiB max_frame: 5 MiB, room for 42 such calls


def test_queued_calls_of_large_text_are_refused_past_the_argument_memory(
    server_factory: Callable[..., ServerProcess],
) -> None:
    env = {
        "BASTION_LIMITS__MAX_FRAME": str(64 * KIB),
        "BASTION_LIMITS__MAX_ARGS_MEMORY": str(LIMIT),
        "BASTION_FILES__CHUNK_BYTES": str(32 * KIB),  # what one message carries must fit the frame (config.py)
        "BASTION_JOBS__MAX_RESULT_BYTES": str(32 * KIB),
        "BASTION_KV__MAX_VALUE_BYTES": str(32 * KIB),
        "BASTION_MESSAGES__MAX_BODY_BYTES": str(32 * KIB),
        "BASTION_MESSAGES__TOPICS__MAX_PAYLOAD_BYTES": str(32 * KIB),
        "BASTION_SCHEDULER__MAX_CONCURRENCY": "1",
    }
    server = server_factory(insecure=True, env=env)
    with RawPeer(server.host, server.port, timeout=30) as peer:
        peer.hello(server.token)
        # The one slot is held for 2 s: the next 60 calls wait in the queue, each holding ~120 KiB.
        peer.send(frame([CALL, 1, "demo.slow", {"seconds": 2.0}, None, None, False]))
        calls = range(3, 123, 2)
        peer.send(b"".join(frame([CALL, i, "demo.length", {"text": TEXT}, None, None, False]) for i in calls))
        answers: dict[int, Any] = {}
        while len(answers) < 1 + len(calls):
            message = peer.read_message(timeout=30)
            answers[message[1]] = message
        refused = [i for i in calls if answers[i][0] == ERROR]
        served = [i for i in calls if answers[i][0] == RESULT]
        assert refused and served, f"{len(refused)} refused, {len(served)} served"
        assert len(served) <= LIMIT // (2 * len(TEXT)), len(served)
        for i in refused:
            assert answers[i][2] == Status.RESOURCE_EXHAUSTED and "limits.max_args_memory" in answers[i][3]
        for i in served:
            assert answers[i][2] == len(TEXT)
        # The room came back with the answers.
        peer.send(b"".join(frame([CALL, i, "demo.length", {"text": TEXT}, None, None, False]) for i in (201, 203)))
        again = {peer.read_message(timeout=10)[1]: None for _ in range(2)}
        assert sorted(again) == [201, 203]
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10, insecure=True) as admin:
        assert admin.call("admin.stats")["rejected_args_memory"] == len(refused)
