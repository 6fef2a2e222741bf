"""Password guesses sent at once hold to the login throttle across the workers of ``bastion serve --workers 2``.

The throttle counts a login being verified as pending against the
(username, source) pair, so guesses sent at once cannot all be verified
before the first failure is counted. Those pending counts were each worker's
own: guesses for one account from one address, spread by the kernel over two
workers, got a round of ``max_failures_per_user_source`` on each. Real
supervisor and worker processes over TCP+TLS; the victim's stored hash is
made slow to verify (argon2 with a high time cost, written into the store as
an older server's parameters would be), so guesses sent together are
certainly all in flight at once, and a worker can be killed in the middle of
verifying one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from pathlib import Path

import argon2
import pytest

import bastion
from bastion import SyncClient
from bastion.store import open_store
from tests.integration.test_workers import _close_all, _one_per_worker, _running
from tests.support.server import ServerProcess, wait_for

MAX_FAILURES = 3
ENV = {"BASTION_AUTH__MAX_FAILURES_PER_USER_SOURCE": str(MAX_FAILURES), "BASTION_AUTH__LOCKOUT": "60"}
RIGHT = "the right password 42"


def _victim(server: ServerProcess) -> None:
    """User ``victim`` (password RIGHT), its hash slow to verify (about 1.2 s of CPU on the test machine: at
    time_cost 100 it had become 0.3 s, all but gone by the time a test saw its verification begin)."""
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as root:
        root.auth.create_user(name="victim", password=RIGHT)
    slow = argon2.PasswordHasher(time_cost=400, memory_cost=8192, parallelism=1).hash(RIGHT)

    async def write() -> None:
        async with open_store(server.data_dir / "bastion.db") as store:
            assert await store.set_password_hash("victim", slow)

    asyncio.run(write())


def _per_worker(server: ServerProcess, each: int) -> dict[int, list[SyncClient]]:
    """``each`` connections on each of the two workers; {pid: clients}."""
    groups: dict[int, list[SyncClient]] = {}
    try:
        for _ in range(each):
            for pid, client in _one_per_worker(server).items():
                groups.setdefault(pid, []).append(client)
    except BaseException:
        for group in groups.values():
            _close_all(dict(enumerate(group)))
        raise
    return groups


def _guess_at_once(clients: list[SyncClient], password: str) -> list[BaseException | None]:
    """One login per client, all sent at once; each one's error (None: logged in)."""
    results: list[BaseException | None] = [None] * len(clients)
    start = threading.Barrier(len(clients))

    def guess(i: int) -> None:
        start.wait()
        try:
            clients[i].auth.login(username="victim", password=password)
        except bastion.BastionError as exc:
            results[i] = exc

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_guesses_sent_at_once_to_both_workers_get_one_round_not_one_per_worker(tmp_path: Path) -> None:
    with _running(tmp_path, env=ENV) as server:
        _victim(server)
        groups = _per_worker(server, MAX_FAILURES)
        try:
            clients = [client for group in groups.values() for client in group]
            results = _guess_at_once(clients, "a wrong guess")
            verified = [r for r in results if isinstance(r, bastion.Unauthenticated)]
            refused = [r for r in results if isinstance(r, bastion.ResourceExhausted)]
            assert len(verified) + len(refused) == len(results), results
            # As with one process: no more guesses verified than the pair's allowance, whatever the workers.
            assert len(verified) <= MAX_FAILURES, f"{len(verified)} guesses verified on 2 workers: {results}"
            assert all("at once" in str(r) and 0 < (r.retry_after or 0) <= 1 for r in refused), refused
            for group in groups.values():  # the allowance spent: the pair is locked out on both workers
                with contextlib.suppress(bastion.ResourceExhausted):
                    group[0].auth.login(username="victim", password=RIGHT)
                    raise AssertionError("the pair should be locked out")
        finally:
            for group in groups.values():
                _close_all(dict(enumerate(group)))


def _cpu_seconds(pid: int) -> float:
    """The CPU time process ``pid`` has used (user and system), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_guess_a_killed_worker_was_verifying_stops_counting(tmp_path: Path) -> None:
    # One failure locks the pair: one guess in flight on one worker is refused "at once" on the other.
    env = {**ENV, "BASTION_AUTH__MAX_FAILURES_PER_USER_SOURCE": "1"}
    with _running(tmp_path, env=env) as server:
        _victim(server)
        groups = _per_worker(server, 1)
        victim, survivor = sorted(groups)
        idle = _cpu_seconds(victim)
        guess = threading.Thread(target=_guess_at_once, args=(groups[victim], "a wrong guess"))
        try:
            guess.start()
            # Held as pending before the hash is verified: an idle worker burning CPU is verifying it.
            wait_for(lambda: _cpu_seconds(victim) - idle > 0.1, timeout=10, what="the guess being verified")
            with pytest.raises(bastion.ResourceExhausted, match="at once"):  # a right password: nothing spent
                groups[survivor][0].auth.login(username="victim", password=RIGHT)
            os.kill(victim, signal.SIGKILL)  # in the middle of verifying it: nobody counts it off

            def logs_in() -> bool:
                try:
                    groups[survivor][0].auth.login(username="victim", password=RIGHT)
                except bastion.ResourceExhausted as exc:
                    assert "at once" in str(exc), exc
                    return False
                return True

            wait_for(logs_in, timeout=15, interval=0.05, what="the killed worker's guess forgotten")
        finally:
            guess.join(30)
            for group in groups.values():
                _close_all(dict(enumerate(group)))
