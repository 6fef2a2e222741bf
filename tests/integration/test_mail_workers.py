"""``messages.max_watchers_per_user`` (and ``kv.max_watchers_per_user``,
``messages.topics.max_subscribers_per_user``) hold across the workers of
``bastion serve --workers 2``.

Each worker counted the watches its own connections held, so a user
whose connections the kernel spread over N workers could open N times the
limit. Real supervisor and worker processes; which worker serves a
connection is learnt as in test_workers.py. ``SharedHolds`` itself is also
checked in process (two workers' counts over one table).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import bastion
from bastion import SyncClient
from bastion.security.ratelimit_shared import SharedHolds, SharedTable
from tests.integration.test_workers import _running
from tests.support.server import ServerProcess, wait_for

LIMIT = 2
ENV = {
    "BASTION_MESSAGES__MAX_WATCHERS_PER_USER": str(LIMIT),
    "BASTION_KV__MAX_WATCHERS_PER_USER": str(LIMIT),
    "BASTION_MESSAGES__TOPICS__MAX_SUBSCRIBERS_PER_USER": str(LIMIT),
}
#: The streams limited per user, each with its setting.
STREAMS = [
    ("messages.watch", {}, "messages.max_watchers_per_user"),
    ("kv.watch", {"prefix": "x"}, "kv.max_watchers_per_user"),
    ("messages.subscribe", {"pattern": "user.admin.>"}, "messages.topics.max_subscribers_per_user"),
]


def _spread(server: ServerProcess, per_worker: int, tries: int = 120) -> dict[int, list[SyncClient]]:
    """Connections of the admin until each of the two workers has ``per_worker``; {pid: clients}."""
    found: dict[int, list[SyncClient]] = {}
    spare: list[SyncClient] = []
    for _ in range(tries):
        client = SyncClient(server.address, token=server.token, timeout=10, retry=None)
        client.connect()
        mine = found.setdefault(client.worker.pid(), [])
        (mine if len(mine) < per_worker else spare).append(client)
        if len(found) == 2 and all(len(c) == per_worker for c in found.values()):
            break
    for client in spare:
        client.close()
    assert len(found) == 2 and all(len(c) == per_worker for c in found.values()), {p: len(c) for p, c in found.items()}
    return found


def _watch(
    client: SyncClient, method: str = "messages.watch", **args: Any
) -> Iterator[Any] | bastion.ResourceExhausted:
    """A watch open on ``client`` (its "start" item read), or the refusal."""
    events = client.stream(method, **args)
    try:
        assert next(events)["type"] == "start"
    except bastion.ResourceExhausted as exc:
        return exc
    return events


@pytest.mark.parametrize(("method", "args", "setting"), STREAMS)
def test_a_users_watches_are_limited_across_workers(
    tmp_path: Path, method: str, args: dict[str, Any], setting: str
) -> None:
    with _running(tmp_path, env=ENV) as server:
        clients = _spread(server, per_worker=LIMIT + 1)
        try:
            first, second = sorted(clients)
            order = [c for pair in zip(clients[first], clients[second], strict=True) for c in pair]
            opened = {id(c): _watch(c, method, **args) for c in order}
            held = [c for c in order if not isinstance(opened[id(c)], bastion.ResourceExhausted)]
            refused = [opened[id(c)] for c in order if c not in held]
            assert len(held) == LIMIT, f"{len(held)} {method} streams open with a limit of {LIMIT} per user"
            assert all(setting in str(exc) for exc in refused), refused

            # Closing one (its connection goes) frees a place for a watch on either worker.
            held[0].close()
            waiting = next(c for c in clients[first] + clients[second] if c not in held)

            def reopened() -> bool:
                opened[id(waiting)] = _watch(waiting, method, **args)
                return not isinstance(opened[id(waiting)], bastion.ResourceExhausted)

            wait_for(reopened, timeout=10, interval=0.1, what="a watch once another closed")
            another = next(c for c in order if c not in (*held, waiting))
            assert isinstance(_watch(another, method, **args), bastion.ResourceExhausted)
        finally:
            for group in clients.values():
                for client in group:
                    with contextlib.suppress(Exception):
                        client.close()


def test_a_killed_workers_watches_stop_counting_once_it_is_replaced(tmp_path: Path) -> None:
    with _running(tmp_path, env=ENV) as server:
        clients = _spread(server, per_worker=LIMIT)
        victim, survivor = sorted(clients)
        try:
            watches = [_watch(c) for c in clients[victim]]  # kept: a dropped stream is cancelled
            assert not any(isinstance(w, bastion.ResourceExhausted) for w in watches), watches
            assert isinstance(_watch(clients[survivor][0]), bastion.ResourceExhausted)
            os.kill(victim, signal.SIGKILL)  # its watches end without anyone counting them off

            def room() -> bool:
                try:
                    return not isinstance(_watch(clients[survivor][0]), bastion.ResourceExhausted)
                except bastion.BastionError:
                    return False

            wait_for(room, timeout=15, interval=0.2, what="the killed worker's watches forgotten")
        finally:
            for group in clients.values():
                for client in group:
                    with contextlib.suppress(Exception):
                        client.close()


def test_holds_over_one_table_add_up_and_a_restarted_workers_old_holds_stop_counting() -> None:
    table = SharedTable.create(64)
    try:
        first, second = SharedHolds(table, "w", 0, 2), SharedHolds(table, "w", 1, 2)
        assert [first.acquire("ada", 3), second.acquire("ada", 3), second.acquire("ada", 3)] == [0, 1, 2]
        assert first.acquire("ada", 3) == 3  # refused: nothing taken
        assert first.acquire("bob", 3) == 0  # another key counts apart
        second.release("ada")
        assert first.acquire("ada", 3) == 2
        SharedHolds(table, "w", 1, 2)  # worker 1 dies and a new one starts: its holds go with it
        assert first.acquire("ada", 3) == 2  # worker 0's two
        first.release("nobody")  # nothing held: nothing happens
        assert first.acquire("nobody", 3) == 0
    finally:
        table.close()


HOLDING_CHILD = """
import sys
from bastion.security.ratelimit_shared import SharedHolds, SharedTable
holds = SharedHolds(SharedTable(int(sys.argv[1])), "w", 1, 2)
for _ in range(int(sys.argv[2])):
    holds.acquire("ada", 100)
print("held", flush=True)
sys.stdin.read()
"""


def test_a_killed_workers_holds_stop_counting_once_it_is_reaped_before_any_replacement() -> None:
    """Worker 1 is a real process holding ada's watches, SIGKILLed (nobody counts them off) and reaped as the
    supervisor reaps a worker: its holds stop counting at once, without waiting for a replacement's epoch."""
    table = SharedTable.create(64)
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDING_CHILD, str(table.fileno()), str(LIMIT)],
        pass_fds=(table.fileno(),),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        mine = SharedHolds(table, "w", 0, 2)
        assert mine.acquire("ada", LIMIT) == LIMIT  # at the limit: refused, nothing taken
        child.send_signal(signal.SIGKILL)
        child.wait(10)  # reaped; no worker 1 has started again
        assert mine.acquire("ada", LIMIT) == 0, "the killed worker's watches still count"
        assert mine.acquire("ada", LIMIT) == 1
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        table.close()
