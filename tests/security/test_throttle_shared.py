"""``SharedPending``: the login throttle's attempts in flight, counted across workers in a shared table.

Two throttles over one pair of tables stand for two workers (tests/integration/test_login_workers.py runs
real ones); a worker killed while holding attempts is a real child process, killed and reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.exceptions import ResourceExhausted
from bastion.security.ratelimit_shared import SharedTable
from bastion.security.throttle import LoginThrottle, LoginThrottled
from bastion.security.throttle_shared import SharedPending, pending_table
from bastion.store import open_store

KEYS = ["p:ada|10.0.0.1", "s:10.0.0.1", "u:ada"]

CHILD = """
import sys
from bastion.security.ratelimit_shared import SharedTable
from bastion.security.throttle_shared import SharedPending
table = SharedTable(int(sys.argv[1]))
pending = SharedPending(table, 1, 2)
with table.locked():
    assert pending.hold(sys.argv[2:])
print("held", flush=True)
sys.stdin.read()
"""


def test_attempts_in_flight_on_two_workers_add_up(tmp_path: Path) -> None:
    async def main() -> None:
        shared, table = SharedTable.create(1000), pending_table(2)
        try:
            async with open_store(tmp_path / "s.db") as store:
                first, second = (
                    LoginThrottle(store, max_failures=3, shared=shared, pending=SharedPending(table, i, 2))
                    for i in range(2)
                )
                async with contextlib.AsyncExitStack() as held:
                    await held.enter_async_context(first.attempt("ada", "10.0.0.1"))
                    await held.enter_async_context(second.attempt("ada", "10.0.0.1"))
                    await held.enter_async_context(first.attempt("ada", "10.0.0.1"))
                    for throttle in (first, second):  # the pair's three are in flight, on two workers
                        with pytest.raises(LoginThrottled, match="at once"):
                            await throttle.check("ada", "10.0.0.1")
                        with pytest.raises(LoginThrottled, match="at once"):
                            await held.enter_async_context(throttle.attempt("ada", "10.0.0.1"))
                    await second.check("ada", "10.0.0.2")  # another source is another pair
                    await second.check(None, "10.0.0.1")  # a token handshake tests the failures only
                for throttle in (first, second):  # all given back
                    await throttle.check("ada", "10.0.0.1")
        finally:
            shared.close()
            table.close()

    asyncio.run(main())


def test_a_killed_workers_attempts_stop_counting_once_it_is_reaped() -> None:
    table = pending_table(2)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(table.fileno()), *KEYS],
        pass_fds=(table.fileno(),),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        mine = SharedPending(table, 0, 2)
        with table.locked():
            assert [mine.counter()(key) for key in KEYS] == [1, 1, 1]
        child.send_signal(signal.SIGKILL)  # in the middle of a login: nobody counts it off
        child.wait(10)  # reaped, as the supervisor reaps a worker
        with table.locked():
            assert [mine.counter()(key) for key in KEYS] == [0, 0, 0]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        table.close()


def test_a_spray_of_names_is_refused_when_the_table_is_full_never_let_through() -> None:
    """A table with no room left refuses (fails closed), forgets none of the attempts it counts, and takes
    new ones once they are given back; a worker past its own limit is refused the same way."""
    table = SharedTable.create(8)  # 64 slots: room for a score of attempts at most
    try:
        pending = SharedPending(table, 0, 1, limit=1000)
        held: list[list[str]] = []
        with table.locked():
            for i in range(100):
                keys = [f"p:user{i}|10.0.0.{i}", f"s:10.0.0.{i}", f"u:user{i}"]
                if not pending.hold(keys):
                    break
                held.append(keys)
            assert 0 < len(held) < 100, "the table filled up"
            count = pending.counter()
            assert all(count(key) == 1 for keys in held for key in keys), "nothing counted was forgotten"
            assert pending.held == len(held)
        for keys in held:
            pending.release(keys)
        with table.locked():
            assert pending.hold(["p:late|10.0.0.1", "s:10.0.0.1", "u:late"]), "given back: room again"
        small = SharedPending(pending_table(1, per_worker=2), 0, 1, limit=2)
        with small.table.locked():
            assert small.hold(KEYS) and small.hold(KEYS) and not small.hold(KEYS)
            assert small.counter()(KEYS[0]) == 2
        small.table.close()
    finally:
        table.close()


def test_a_worker_past_its_logins_in_flight_refuses_with_a_coded_error(tmp_path: Path) -> None:
    async def main() -> None:
        shared, table = SharedTable.create(1000), pending_table(1, per_worker=2)
        try:
            async with open_store(tmp_path / "s.db") as store:
                throttle = LoginThrottle(store, shared=shared, pending=SharedPending(table, 0, 1, limit=2))
                async with contextlib.AsyncExitStack() as held:
                    await held.enter_async_context(throttle.attempt("ada", "10.0.0.1"))
                    await held.enter_async_context(throttle.attempt("bob", "10.0.0.2"))
                    with pytest.raises(ResourceExhausted, match="too many logins in flight") as refused:
                        await held.enter_async_context(throttle.attempt("carol", "10.0.0.3"))
                    assert isinstance(refused.value, LoginThrottled) and refused.value.retry_after == 1.0
                async with throttle.attempt("carol", "10.0.0.3"):  # given back: room again
                    pass
        finally:
            shared.close()
            table.close()

    asyncio.run(main())
