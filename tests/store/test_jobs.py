"""The job queue of every store backend: claims, leases, recovery, cancel, retention, owners."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from bastion.exceptions import AlreadyExists, InternalError, ResourceExhausted
from bastion.store import PostgresStore, SQLiteStore, Store
from bastion.store.jobs import JobRecord, _list_query, _numbered
from bastion.store.jobs_postgres import _PG
from bastion.store.migrations import MIGRATIONS
from bastion.store.postgres import POSTGRES_MIGRATIONS
from tests.support.stores import store_location

NAMES = ["add", "nap"]
LOST = "runner lost (server stopped while it ran)"


def job(job_id: str, owner: str = "ada", name: str = "add", **fields: object) -> JobRecord:
    fields = {"args": b"\x80", "created_at": 1.0, **fields}
    return JobRecord(id=job_id, owner=owner, name=name, **fields)  # type: ignore[arg-type]


async def test_concurrent_submits_never_overshoot_max_pending(store: Store) -> None:
    await store.jobs_submit(job("done", state="succeeded"))  # finished jobs do not count
    submitted = await asyncio.gather(*(store.jobs_submit(job(f"j{i:02d}"), max_pending=5) for i in range(20)))
    assert submitted.count(True) == 5
    assert await store.jobs_submit(job("other", owner="bob"), max_pending=5)  # each owner has their own limit
    assert await store.jobs_count("ada", ("queued", "running")) == 5


async def test_submit_get_and_list(store: Store) -> None:
    await store.jobs_submit(job("j1"))
    await store.jobs_submit(job("j2", owner="bob"))
    await store.jobs_submit(job("j3"))
    with pytest.raises(AlreadyExists):
        await store.jobs_submit(job("j1"))
    got = await store.jobs_get("j1")
    assert got == job("j1")
    assert await store.jobs_get("nope") is None
    assert [j.id for j in await store.jobs_list(owner="ada")] == ["j1", "j3"]
    assert [j.id for j in await store.jobs_list()] == ["j1", "j2", "j3"]
    assert [j.id for j in await store.jobs_list(limit=1, after="j1")] == ["j2"]
    assert await store.jobs_list(state="running") == []
    assert await store.jobs_count("ada", ("queued", "running")) == 2


async def test_a_submit_refused_by_another_constraint_is_not_reported_as_already_exists(store: Store) -> None:
    # SQLite reported every integrity error of the insert as ALREADY_EXISTS: a row breaking a CHECK
    # (a state the table does not allow) claimed its id was taken. Only the id's conflict is that.
    with pytest.raises(InternalError, match="store: ") as info:
        await store.jobs_submit(job("j1", state="bogus"))
    assert not isinstance(info.value, AlreadyExists)
    assert await store.jobs_get("j1") is None
    await store.jobs_submit(job("j1"))
    with pytest.raises(AlreadyExists, match="job 'j1' exists"):
        await store.jobs_submit(job("j1"))


async def test_claim_takes_the_oldest_runnable_job_once(store: Store) -> None:
    await store.jobs_submit(job("j1", name="unknown"))
    await store.jobs_submit(job("j2"))
    await store.jobs_submit(job("j3", name="nap"))
    first = await store.jobs_claim("r1", NAMES, 100.0, 30.0)
    assert first is not None and first.id == "j2"
    assert (first.state, first.runner, first.lease_until, first.started_at, first.attempts) == (
        "running", "r1", 130.0, 100.0, 1,
    )  # fmt: skip
    second = await store.jobs_claim("r2", NAMES, 100.0, 30.0)
    assert second is not None and second.id == "j3"
    assert await store.jobs_claim("r3", NAMES, 100.0, 30.0) is None  # j1's name is not runnable here


async def test_concurrent_claims_never_share_a_job(store: Store) -> None:
    for i in range(20):
        await store.jobs_submit(job(f"j{i:02d}"))
    claims = await asyncio.gather(*(store.jobs_claim(f"r{i}", NAMES, 1.0, 30.0) for i in range(30)))
    ids = [c.id for c in claims if c is not None]
    assert sorted(ids) == [f"j{i:02d}" for i in range(20)]


async def test_renew_progress_and_finish_only_for_the_holder(store: Store) -> None:
    await store.jobs_submit(job("j1"))
    await store.jobs_claim("r1", NAMES, 1.0, 30.0)
    assert await store.jobs_renew("j1", "r1", 60.0) == "running"
    assert await store.jobs_renew("j1", "intruder", 60.0) == "lost"
    assert await store.jobs_progress("j1", "r1", 0.5, "half")
    assert not await store.jobs_progress("j1", "intruder", 0.9, "no")
    assert not await store.jobs_finish("j1", "intruder", "failed", now=2.0, error="no")
    assert await store.jobs_finish("j1", "r1", "succeeded", now=3.0, result=b"\x2a")
    done = await store.jobs_get("j1")
    assert done is not None
    assert (done.state, done.result, done.progress, done.finished_at, done.runner) == (
        "succeeded", b"\x2a", 1.0, 3.0, None,
    )  # fmt: skip
    assert await store.jobs_renew("j1", "r1", 90.0) == "lost"  # finished: no longer held
    with pytest.raises(ValueError):
        await store.jobs_finish("j1", "r1", "running", now=4.0)


async def test_cancel_queued_running_and_finished(store: Store) -> None:
    for i in range(3):
        await store.jobs_submit(job(f"j{i}"))
    await store.jobs_claim("r1", NAMES, 1.0, 30.0)  # j0 runs
    queued = await store.jobs_cancel("j1", 5.0)
    assert queued is not None and (queued.state, queued.finished_at) == ("cancelled", 5.0)
    running = await store.jobs_cancel("j0", 5.0)
    assert running is not None and (running.state, running.cancel_requested) == ("running", True)
    assert await store.jobs_renew("j0", "r1", 60.0) == "cancel"
    assert await store.jobs_finish("j0", "r1", "cancelled", now=6.0, error="cancelled while running")
    finished = await store.jobs_cancel("j0", 7.0)
    assert finished is not None and (finished.state, finished.finished_at) == ("cancelled", 6.0)
    assert await store.jobs_cancel("nope", 7.0) is None
    assert await store.jobs_claim("r1", NAMES, 8.0, 30.0) == msgspec.structs.replace(
        job("j2"), state="running", runner="r1", lease_until=38.0, started_at=8.0, attempts=1
    )


async def test_recovery_requeues_retryable_jobs_and_fails_the_rest(store: Store) -> None:
    await store.jobs_submit(job("a-retry", retryable=True, max_attempts=2))
    await store.jobs_submit(job("b-once"))
    await store.jobs_submit(job("c-cancelling"))
    await store.jobs_submit(job("d-fresh"))
    for _ in range(3):
        await store.jobs_claim("dead", NAMES, 1.0, 10.0)
    await store.jobs_cancel("c-cancelling", 2.0)
    await store.jobs_claim("alive", NAMES, 1.0, 100.0)  # lease still valid at 50
    assert await store.jobs_recover(50.0, LOST) == {"queued": 1, "failed": 1, "cancelled": 1}
    retry, once, cancelling, fresh = [await store.jobs_get(i) for i in ("a-retry", "b-once", "c-cancelling", "d-fresh")]
    assert retry is not None and (retry.state, retry.runner, retry.attempts, retry.error) == ("queued", None, 1, None)
    assert once is not None and (once.state, once.error, once.finished_at) == ("failed", LOST, 50.0)
    assert cancelling is not None and cancelling.state == "cancelled"
    assert fresh is not None and fresh.state == "running"
    assert await store.jobs_recover(50.0, LOST) == {}
    # The second run is the last attempt: losing it fails the job.
    again = await store.jobs_claim("dead2", NAMES, 60.0, 10.0)
    assert again is not None and (again.id, again.attempts) == ("a-retry", 2)
    assert await store.jobs_recover(80.0, LOST) == {"failed": 1}


async def test_abandon_gives_back_a_held_job(store: Store) -> None:
    await store.jobs_submit(job("retry", retryable=True, max_attempts=3))
    await store.jobs_submit(job("once"))
    await store.jobs_claim("r1", NAMES, 1.0, 30.0)
    await store.jobs_claim("r1", NAMES, 1.0, 30.0)
    assert await store.jobs_abandon("retry", "someone else", "stopped", 2.0) is None
    assert await store.jobs_abandon("retry", "r1", "stopped", 2.0) == "queued"
    assert await store.jobs_abandon("once", "r1", "stopped", 2.0) == "failed"
    once = await store.jobs_get("once")
    assert once is not None and once.error == "stopped"


async def test_sweep_deletes_only_old_finished_jobs(store: Store) -> None:
    for i in range(3):
        await store.jobs_submit(job(f"j{i}"))
    await store.jobs_cancel("j0", 10.0)
    await store.jobs_cancel("j1", 100.0)
    await store.jobs_claim("r1", NAMES, 1.0, 1.0)  # j2: running, with an expired lease
    assert await store.jobs_sweep(50.0) == 1
    assert [j.id for j in await store.jobs_list()] == ["j1", "j2"]


async def test_reassign_owner_hands_over_or_deletes(store: Store) -> None:
    await store.jobs_submit(job("j1"))
    await store.jobs_submit(job("j2"))
    await store.jobs_submit(job("j3", owner="bob"))
    assert await store.jobs_reassign_owner("ada", "cy") == 2
    assert {j.id for j in await store.jobs_list(owner="cy")} == {"j1", "j2"}
    assert await store.jobs_reassign_owner("cy", None) == 2
    assert [j.id for j in await store.jobs_list()] == ["j3"]
    assert await store.jobs_reassign_owner("nobody", None) == 0


async def test_submit_keeps_only_the_newest_finished_jobs_of_their_owner(store: Store) -> None:
    # Only queued and running jobs were bounded (max_pending): finished ones, with their arguments and
    # results, piled up for the whole retention, as many as one user cared to submit.
    for i in range(6):
        await store.jobs_submit(job(f"j{i}"), max_pending=10, max_kept=3)
        await store.jobs_cancel(f"j{i}", 2.0 + i)
    await store.jobs_submit(job("b0", owner="bob"))
    await store.jobs_cancel("b0", 2.0)
    await store.jobs_submit(job("q0"))  # queued: never pruned, whatever the limit
    await store.jobs_submit(job("r0"))
    await store.jobs_claim("r1", ["add"], 3.0, 30.0)  # j-jobs are finished: q0 runs
    assert [j.id for j in await store.jobs_list(owner="ada")] == ["j3", "j4", "j5", "q0", "r0"]
    assert await store.jobs_submit(job("x0"), max_pending=10, max_kept=1)
    # The newest job counts whatever its state; queued and running ones are never deleted.
    assert [j.id for j in await store.jobs_list(owner="ada")] == ["q0", "r0", "x0"]
    assert [j.id for j in await store.jobs_list(owner="bob")] == ["b0"]  # each owner has their own


async def test_release_puts_back_a_claimed_job_as_it_was(store: Store) -> None:
    await store.jobs_submit(job("j1", retryable=True, max_attempts=3))
    claimed = await store.jobs_claim("r1", NAMES, 1.0, 30.0)
    assert claimed is not None and claimed.attempts == 1
    assert not await store.jobs_release("j1", "someone else", 2.0)
    assert await store.jobs_release("j1", "r1", 2.0)
    assert await store.jobs_get("j1") == job("j1", retryable=True, max_attempts=3)
    assert not await store.jobs_release("j1", "r1", 2.0)  # no longer held
    # A cancel asked between the claim and the release is kept: the job never runs.
    await store.jobs_claim("r1", NAMES, 3.0, 30.0)
    await store.jobs_cancel("j1", 4.0)
    assert await store.jobs_release("j1", "r1", 5.0)
    cancelled = await store.jobs_get("j1")
    assert cancelled is not None
    assert (cancelled.state, cancelled.error, cancelled.finished_at, cancelled.attempts, cancelled.started_at) == (
        "cancelled", "cancelled before it ran", 5.0, 0, None,
    )  # fmt: skip


async def claim_and_finish(store: Store, now: float) -> str:
    """One slot's turn: claim the next job, finish it; the job's id."""
    claimed = await store.jobs_claim("r1", NAMES, now, 30.0)
    assert claimed is not None
    assert await store.jobs_finish(claimed.id, "r1", "succeeded", now=now)
    return claimed.id


async def test_one_owner_with_many_jobs_does_not_starve_the_others(store: Store) -> None:
    # The queue was one FIFO for everyone: bob's one job waited behind all ten of ada's, and with
    # ada submitting steadily it waited for as long as she liked.
    for i in range(10):
        await store.jobs_submit(job(f"a{i}", created_at=1.0 + i / 100))
    await store.jobs_submit(job("b0", owner="bob", created_at=2.0))
    await store.jobs_submit(job("c0", owner="cy", created_at=3.0))
    await store.jobs_submit(job("c1", owner="cy", created_at=3.1))
    order = [await claim_and_finish(store, 10.0 + turn) for turn in range(13)]
    # Round robin by who was served least recently; each owner's own jobs stay in submission order.
    assert order[:6] == ["a0", "b0", "c0", "a1", "c1", "a2"]
    assert order[6:] == [f"a{i}" for i in range(3, 10)]
    assert await store.jobs_claim("r1", NAMES, 30.0, 30.0) is None


async def test_an_owner_with_jobs_running_waits_for_owners_with_none(store: Store) -> None:
    for i in range(4):
        await store.jobs_submit(job(f"a{i}", created_at=1.0))
    first = await store.jobs_claim("r1", NAMES, 10.0, 30.0)
    second = await store.jobs_claim("r2", NAMES, 11.0, 30.0)
    assert (first and first.id, second and second.id) == ("a0", "a1")  # alone, ada takes every slot
    await store.jobs_submit(job("b0", owner="bob", created_at=12.0))
    await store.jobs_submit(job("b1", owner="bob", created_at=12.0))
    third = await store.jobs_claim("r3", NAMES, 13.0, 30.0)
    assert third is not None and third.id == "b0"  # bob has none running
    fourth = await store.jobs_claim("r4", NAMES, 14.0, 30.0)
    assert fourth is not None and fourth.id == "b1"  # ada 2 running, bob 1: bob again
    assert await store.jobs_finish("a0", "r1", "succeeded", now=15.0)
    assert await store.jobs_finish("a1", "r2", "succeeded", now=15.0)
    fifth = await store.jobs_claim("r1", NAMES, 16.0, 30.0)
    assert fifth is not None and fifth.id == "a2"


async def test_submit_bounds_the_bytes_an_owners_jobs_hold(store: Store) -> None:
    # Only the number of jobs was bounded (max_kept): 10000 jobs of a user could hold 10000 arguments
    # and results of up to a frame each.
    big = b"\xc4\x00" + b"x" * 98  # 100 bytes
    for i in range(3):
        assert await store.jobs_submit(job(f"q{i}", args=big), max_bytes=350)  # queued: 300 bytes
    with pytest.raises(ResourceExhausted, match=r"would hold 400 bytes .* limit of 350 bytes \(jobs.max_bytes\)"):
        await store.jobs_submit(job("q3", args=big), max_bytes=350)
    assert await store.jobs_get("q3") is None  # nothing stored
    # Finished jobs make room, oldest first; queued and running ones never do.
    for i in range(2):
        claimed = await store.jobs_claim("r1", NAMES, 10.0 + i, 30.0)
        assert claimed is not None
        assert await store.jobs_finish(claimed.id, "r1", "succeeded", now=20.0, result=b"\x01" * 10, max_bytes=350)
    assert await store.jobs_submit(job("bob1", owner="bob", args=big), max_bytes=350)  # each owner their own
    assert await store.jobs_submit(job("q4", args=big), max_bytes=350)  # deletes q0 (110 bytes), keeps q1
    assert [j.id for j in await store.jobs_list(owner="ada")] == ["q1", "q2", "q4"]
    assert await store.jobs_submit(job("q5", args=b"\xc4\x00"), max_bytes=350, max_kept=2)  # both bounds at once
    assert [j.id for j in await store.jobs_list(owner="ada")] == ["q2", "q4", "q5"]


async def test_a_result_that_does_not_fit_is_not_kept(store: Store) -> None:
    await store.jobs_submit(job("old", args=b"\xc4\x00" + b"x" * 98))
    await store.jobs_cancel("old", 2.0)
    await store.jobs_submit(job("j1"))
    await store.jobs_claim("r1", NAMES, 3.0, 30.0)
    assert await store.jobs_finish("j1", "r1", "succeeded", now=4.0, result=b"\x01" * 150, max_bytes=160) == (
        "succeeded"
    )
    done = await store.jobs_get("j1")
    assert done is not None and (done.state, done.result) == ("succeeded", b"\x01" * 150)
    assert await store.jobs_get("old") is None  # made room for it
    await store.jobs_submit(job("j2"))
    await store.jobs_claim("r1", NAMES, 5.0, 30.0)
    # Returned as it ended: failed (it was "succeeded", and logged so).
    assert await store.jobs_finish("j2", "r1", "succeeded", now=6.0, result=b"\x01" * 170, max_bytes=160) == "failed"
    failed = await store.jobs_get("j2")
    assert failed is not None and (failed.state, failed.result) == ("failed", None)
    assert failed.error is not None and "its result (170 bytes) does not fit in the 160 bytes" in failed.error
    assert await store.jobs_finish("j2", "r1", "succeeded", now=7.0, result=b"\x01", max_bytes=160) is None


async def test_a_finish_repeated_after_its_answer_was_lost_returns_what_the_first_recorded(store: Store) -> None:
    """The runner retries a finish whose write raised Unavailable, with the same arguments (the same ``now``):
    if that write had committed (its answer lost with the connection), the job is no longer held, and the
    retry must say what was recorded rather than that nothing was ("no longer held it: not recorded")."""
    for i in range(4):  # j2 bob's: finishing it prunes its owner's finished jobs to make room
        await store.jobs_submit(job(f"j{i}", owner="bob" if i == 2 else "ada"))
        assert await store.jobs_claim("r1", NAMES, 1.0 + i, 30.0) is not None
    for _ in range(2):
        assert await store.jobs_finish("j0", "r1", "succeeded", now=3.25, result=b"\x2a") == "succeeded"
    for _ in range(2):
        ended = await store.jobs_finish("j1", "r1", "succeeded", now=4.5, result=b"\x2a", max_bytes=10_000)
        assert ended == "succeeded"
    for _ in range(2):  # its result did not fit: failed instead
        ended = await store.jobs_finish("j2", "r1", "succeeded", now=5.5, result=b"\x01" * 170, max_bytes=160)
        assert ended == "failed"
    for _ in range(2):
        assert await store.jobs_finish("j3", "r1", "failed", now=6.5, error="boom") == "failed"
    # Not its own: another finish time (a later run's, a recovery's), or another outcome.
    assert await store.jobs_finish("j0", "r1", "succeeded", now=9.0, result=b"\x2a") is None
    assert await store.jobs_finish("j3", "r1", "succeeded", now=6.5, result=b"\x2a") is None
    assert await store.jobs_finish("j3", "r1", "failed", now=6.5, error="another") is None
    done = await store.jobs_get("j0")
    assert done is not None and (done.state, done.finished_at, done.result) == ("succeeded", 3.25, b"\x2a")


async def test_concurrent_submits_never_overshoot_max_bytes(store: Store) -> None:
    big = b"\xc4\x00" + b"x" * 98
    outcomes = await asyncio.gather(
        *(store.jobs_submit(job(f"j{i:02d}", args=big), max_bytes=1000) for i in range(20)), return_exceptions=True
    )
    assert outcomes.count(True) == 10
    assert all(isinstance(o, ResourceExhausted) for o in outcomes if o is not True)
    assert len(await store.jobs_list(owner="ada")) == 10


async def test_claims_follow_jobs_handed_over_deleted_and_given_back(store: Store) -> None:
    # The owners' counts the claims walk are kept by triggers on every change of a job.
    await store.jobs_submit(job("j1"))
    await store.jobs_submit(job("j2", owner="bob"))
    await store.jobs_submit(job("j3", owner="dee"))
    assert await store.jobs_reassign_owner("ada", "cy") == 1
    assert await store.jobs_reassign_owner("dee", None) == 1
    claimed = [await store.jobs_claim("r1", NAMES, 10.0 + i, 30.0) for i in range(2)]
    assert sorted(c.id for c in claimed if c is not None) == ["j1", "j2"]
    assert await store.jobs_claim("r1", NAMES, 12.0, 30.0) is None
    assert await store.jobs_release("j1", "r1", 13.0)  # queued again: claimable again
    again = await store.jobs_claim("r2", NAMES, 14.0, 30.0)
    assert again is not None and again.id == "j1"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_the_migration_counts_the_jobs_already_stored(backend: str, tmp_path: Path) -> None:
    location = store_location(backend, tmp_path)
    if backend == "sqlite":
        older: Store = SQLiteStore(location, migrations=tuple(m for m in MIGRATIONS if m.version < 14))
        newer: Store = SQLiteStore(location)
    else:
        before = tuple(m for m in POSTGRES_MIGRATIONS if m.version < 14)
        older, newer = PostgresStore(location, migrations=before), PostgresStore(location)
    async with older:  # a database written by bastion before migration 14
        for i in range(3):
            await older.jobs_submit(job(f"a{i}", args=b"\xc4\x00" + b"x" * 98))
        await older.jobs_submit(job("b0", owner="bob", created_at=2.0))
        await older.jobs_cancel("a0", 3.0)
    async with newer:
        claimed = await newer.jobs_claim("r1", NAMES, 10.0, 30.0)
        assert claimed is not None and claimed.id == "a1"
        claimed = await newer.jobs_claim("r1", NAMES, 11.0, 30.0)
        assert claimed is not None and claimed.id == "b0"  # ada has one running: bob's turn
        # Her three jobs' 300 bytes were counted: the cancelled one goes to make room, then no more fits.
        assert await newer.jobs_submit(job("a3", args=b"\xc4\x00" + b"x" * 98), max_bytes=300)
        assert await newer.jobs_get("a0") is None
        with pytest.raises(ResourceExhausted):
            await newer.jobs_submit(job("a4"), max_bytes=300)


# Whether any transaction waits on the one whose id is $1 (to hold one until another is blocked on it).
WAITING_ON = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid' AND NOT granted AND transactionid::text = $1"
)


async def test_a_cancel_racing_a_release_or_a_recovery_is_kept(backend: str, store: Store) -> None:
    # jobs_cancel was two statements: "cancel it if queued", then "flag it if running". A job going from
    # running back to queued between them (a runner giving it back, a recovery re-queueing it) was seen
    # running by the first and queued by the second: neither changed it, and the job ran after all.
    if backend != "postgresql":
        pytest.skip("SQLite runs one write at a time: nothing can come between the two")
    assert isinstance(store, PostgresStore)
    for reason, sql, args in (
        ("release", _PG["release"], (2.0, "j0", "r1")),
        ("recovery", _PG["recover"], ("runner lost", 100.0, 100.0)),
    ):
        job_id = "j0" if reason == "release" else "j1"
        await store.jobs_submit(job(job_id, retryable=True, max_attempts=3))
        await store.jobs_claim("r1", NAMES, 1.0, 30.0)
        async with store._pool.acquire() as conn, store._pool.acquire() as watcher:
            tx = conn.transaction()
            await tx.start()
            await conn.execute(sql, *args)  # the job is queued again, not yet committed
            xid = await conn.fetchval("SELECT pg_current_xact_id()::text")
            cancel = asyncio.create_task(store.jobs_cancel(job_id, 3.0))
            deadline = asyncio.get_running_loop().time() + 5.0
            while not await watcher.fetchval(WAITING_ON, xid):  # until the cancel waits on the job's row
                assert asyncio.get_running_loop().time() < deadline, "the cancel never waited on the row"
                await asyncio.sleep(0.01)
            await tx.commit()
        after = await cancel
        assert after is not None and (after.state, after.error) == ("cancelled", "cancelled before it ran"), reason
        assert await store.jobs_claim("r2", NAMES, 4.0, 30.0) is None, reason


async def test_concurrent_claims_across_owners_never_share_a_job_nor_miss_one(store: Store) -> None:
    owners = ["ada", "bob", "cy", "dee", "eve"]
    for i in range(4):
        for owner in owners:
            await store.jobs_submit(job(f"{owner}{i}", owner=owner))
    claims = await asyncio.gather(*(store.jobs_claim(f"r{i}", NAMES, 1.0 + i / 100, 30.0) for i in range(30)))
    ids = sorted(c.id for c in claims if c is not None)
    assert ids == sorted(f"{owner}{i}" for owner in owners for i in range(4))


async def test_a_replica_whose_clock_runs_ahead_does_not_send_an_owner_to_the_back_for_long(store: Store) -> None:
    # Turns were ordered by the claiming replica's clock: an owner served by a replica an hour ahead
    # waited until every other owner had been served an hour's worth of claims.
    for owner in ("ada", "bob", "cy"):
        for i in range(3):
            await store.jobs_submit(job(f"{owner}{i}", owner=owner))
    ahead = await store.jobs_claim("ahead", NAMES, 3600.0, 30.0)
    assert ahead is not None and ahead.id == "ada0"
    assert await store.jobs_finish("ada0", "ahead", "succeeded", now=3600.0)
    order = [await claim_and_finish(store, 10.0 + turn) for turn in range(5)]
    assert order == ["bob0", "cy0", "ada1", "bob1", "cy1"]


async def owner_rows(store: Store) -> dict[str, tuple[int, int, int]]:
    """``job_owners`` as stored: each owner's (queued, running, bytes)."""
    sql = "SELECT owner, queued, running, bytes FROM job_owners ORDER BY owner"
    if isinstance(store, PostgresStore):
        async with store._pool.acquire() as conn:
            rows = await conn.fetch(sql)
    else:
        assert isinstance(store, SQLiteStore)
        rows = await store._read(lambda c: c.execute(sql).fetchall())
    return {str(r[0]): (int(r[1]), int(r[2]), int(r[3])) for r in rows}


async def test_owners_with_no_jobs_left_leave_the_owners_table(store: Store) -> None:
    # An owner's row stayed, all zeros, once their last job was gone (deleted users, swept or pruned jobs):
    # the table every claim walks grew with every user who ever submitted a job.
    for owner in ("ada", "bob", "cy", "dee", "eve"):
        await store.jobs_submit(job(f"{owner}0", owner=owner))
    for _ in range(2):
        await claim_and_finish(store, 10.0)  # ada0 and bob0 finished, at 10
    assert await store.jobs_sweep(11.0) == 2  # past retention
    assert await store.jobs_reassign_owner("cy", None) == 1  # a deleted user
    assert await store.jobs_reassign_owner("dee", "eve") == 1  # handed over
    assert await owner_rows(store) == {"eve": (2, 0, 2)}
    await store.jobs_submit(job("ada1"))  # back again: a row again
    assert await owner_rows(store) == {"ada": (1, 0, 1), "eve": (2, 0, 2)}
    await store.jobs_cancel("ada1", 12.0)
    await store.jobs_submit(job("ada2"), max_kept=1)  # pruning her only other job empties her row: made again
    assert await owner_rows(store) == {"ada": (1, 0, 1), "eve": (2, 0, 2)}
    claimed = [await store.jobs_claim("r1", NAMES, 13.0, 30.0) for _ in range(3)]
    assert sorted(c.id for c in claimed if c is not None) == ["ada2", "dee0", "eve0"]
    assert await store.jobs_recover(100.0, LOST) == {"failed": 3}
    assert await store.jobs_sweep(101.0) == 3
    assert await owner_rows(store) == {}


async def recount(store: Store) -> dict[str, tuple[int, int, int]]:
    """What ``job_owners`` should hold, counted from the jobs themselves."""
    counts: dict[str, tuple[int, int, int]] = {}
    for j in await store.jobs_list(limit=10_000):
        queued, running, size = counts.get(j.owner, (0, 0, 0))
        size += len(j.args) + len(j.result or b"")
        counts[j.owner] = (queued + (j.state == "queued"), running + (j.state == "running"), size)
    return counts


async def test_owners_emptied_while_others_submit_stay_counted_right(store: Store) -> None:
    # A row deleted by one writer as another adds a job of the same owner (PostgreSQL: concurrently).
    for turn in range(5):
        for owner in ("ada", "bob", "cy"):
            await store.jobs_submit(job(f"{owner}{turn}", owner=owner))
        for _ in range(3):
            await claim_and_finish(store, 10.0 + turn)
        await asyncio.gather(
            store.jobs_sweep(20.0 + turn),
            *(store.jobs_submit(job(f"{owner}{turn}x", owner=owner)) for owner in ("ada", "bob")),
            store.jobs_reassign_owner("cy", None),
        )
        assert await owner_rows(store) == await recount(store)
        for owner in ("ada", "bob"):
            await store.jobs_cancel(f"{owner}{turn}x", 30.0 + turn)
    assert await store.jobs_sweep(100.0) == 10
    assert await owner_rows(store) == {}


async def test_a_new_or_reassigned_owner_waits_behind_the_owners_already_waiting(store: Store) -> None:
    # A new owner's row started "never served", ahead of everyone who was waiting: jobs handed to another
    # user jumped the queue, and so did the jobs of a user whose row had gone with their last job.
    for owner in ("ada", "bob"):
        for i in range(3):
            await store.jobs_submit(job(f"{owner}{i}", owner=owner))
    await store.jobs_submit(job("cy0", owner="cy"))
    assert [await claim_and_finish(store, 10.0 + turn) for turn in range(2)] == ["ada0", "bob0"]
    assert await store.jobs_reassign_owner("cy", "eve") == 1  # cy was next; eve's row is new
    await store.jobs_submit(job("dee0", owner="dee"))
    order = [await claim_and_finish(store, 20.0 + turn) for turn in range(6)]
    assert order == ["ada1", "bob1", "cy0", "dee0", "ada2", "bob2"]
    await store.jobs_sweep(100.0)  # every row gone with its jobs
    for owner in ("bob", "ada"):
        await store.jobs_submit(job(f"{owner}3", owner=owner))
    assert [await claim_and_finish(store, 200.0 + turn) for turn in range(2)] == ["bob3", "ada3"]  # as they came


async def test_lease_renewals_and_progress_do_not_fire_the_owners_trigger(backend: str, store: Store) -> None:
    # On PostgreSQL the trigger keeping job_owners ran on every UPDATE of jobs (a statement trigger over
    # transition tables cannot name columns), lease renewals and progress reports included.
    if backend != "postgresql":
        pytest.skip("SQLite's trigger has named its columns since migration 14")
    assert isinstance(store, PostgresStore)
    async with store._pool.acquire() as conn:
        definition = await conn.fetchval(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'job_owners_update' "
            "AND tgrelid = 'jobs'::regclass"
        )
    assert "AFTER UPDATE OF owner, state, args, result ON" in definition
    for statement in (_PG["renew"], _PG["progress"]):
        assert statement.startswith("UPDATE jobs SET ")
        assert not {"owner", "state", "args", "result"} & set(re.findall(r"(\w+) = ", statement.split(" WHERE ")[0]))


async def test_every_kind_of_job_write_keeps_the_owners_counts(store: Store) -> None:
    async def check() -> None:
        assert await owner_rows(store) == await recount(store)

    for i in range(4):
        await store.jobs_submit(job(f"a{i}", retryable=True, max_attempts=3))
        await store.jobs_submit(job(f"b{i}", owner="bob", args=b"\xc4\x00" + b"x" * 30))
    await check()
    running = [await store.jobs_claim("r1", NAMES, 1.0, 30.0) for _ in range(6)]
    assert all(running)
    await check()
    assert await store.jobs_renew("a0", "r1", 60.0) == "running"
    assert await store.jobs_progress("b0", "r1", 0.5, "half")
    await check()
    assert await store.jobs_finish("a0", "r1", "succeeded", now=2.0, result=b"\x01" * 20)
    assert await store.jobs_finish("b0", "r1", "succeeded", now=2.0, result=b"\x01" * 500, max_bytes=200)  # unkept
    await check()
    await store.jobs_cancel("b1", 3.0)  # running: only flagged
    await store.jobs_cancel("b3", 3.0)  # queued: cancelled
    assert await store.jobs_release("a1", "r1", 3.0)
    assert await store.jobs_abandon("a2", "r1", "gone", 3.0) == "queued"
    await check()
    assert await store.jobs_recover(100.0, LOST)
    await check()
    assert await store.jobs_reassign_owner("bob", "ada") == 4
    await check()
    assert await store.jobs_sweep(1000.0)
    await check()


async def test_list_newest_first_pages_back_from_the_newest(store: Store) -> None:
    # Every job here was created in the same instant: the cursor is the id (unique), not the time, so no page
    # skips or repeats a job of the same created_at.
    for i in range(7):
        owner = "bob" if i == 3 else "ada"
        await store.jobs_submit(job(f"j{i}", owner=owner, state="succeeded" if i % 2 else "queued"))
    assert [j.id for j in await store.jobs_list(newest_first=True)] == ["j6", "j5", "j4", "j3", "j2", "j1", "j0"]
    seen: list[str] = []
    while page := await store.jobs_list(limit=2, after=seen[-1] if seen else None, newest_first=True):
        assert len(page) <= 2
        seen += [j.id for j in page]
    assert seen == ["j6", "j5", "j4", "j3", "j2", "j1", "j0"]
    assert [j.id for j in await store.jobs_list(owner="ada", newest_first=True)] == ["j6", "j5", "j4", "j2", "j1", "j0"]
    assert [j.id for j in await store.jobs_list(state="succeeded", newest_first=True)] == ["j5", "j3", "j1"]
    assert [j.id for j in await store.jobs_list(owner="ada", state="queued", after="j6", newest_first=True)] == [
        "j4", "j2", "j0",
    ]  # fmt: skip
    # The cursor itself is never listed again; a cursor need not be an id (past the newest: from the newest).
    assert [j.id for j in await store.jobs_list(limit=2, after="j4", newest_first=True)] == ["j3", "j2"]
    assert [j.id for j in await store.jobs_list(limit=2, after="j9", newest_first=True)] == ["j6", "j5"]
    assert await store.jobs_list(after="j0", newest_first=True) == []
    assert await store.jobs_list(after="", newest_first=True) == []
    # The default is unchanged: oldest first, after the cursor.
    assert [j.id for j in await store.jobs_list(after="j4")] == ["j5", "j6"]


async def test_list_newest_first_reads_the_indexes_backwards(store: Store) -> None:
    # No sort of the owner's jobs (up to jobs.max_kept of them) to answer one page: the same index, read backwards.
    for i in range(3):
        await store.jobs_submit(job(f"j{i}"))
    if isinstance(store, SQLiteStore):
        for owner, state in ((None, None), ("ada", None), (None, "queued"), ("ada", "queued")):
            sql, args = _list_query(owner, state, 10, "j9", newest_first=True)
            plan = await store._read(lambda c: c.execute(f"EXPLAIN QUERY PLAN {sql}", args).fetchall())  # noqa: B023
            text = " ".join(str(row[-1]) for row in plan)
            assert "TEMP B-TREE" not in text and ("INDEX" in text), text
    else:
        assert isinstance(store, PostgresStore)
        for owner, state in ((None, None), ("ada", None), (None, "queued"), ("ada", "queued")):
            sql, args = _list_query(owner, state, 10, "j9", newest_first=True)

            async def plan(conn: Any, sql: str = sql, args: list[Any] = args) -> list[Any]:
                async with conn.transaction():  # three rows: seq scans would win, so they are ruled out
                    await conn.execute("SET LOCAL enable_seqscan = off")
                    return list(await conn.fetch(f"EXPLAIN {_numbered(sql)}", *args))

            text = " ".join(str(row[0]) for row in await store._call(plan))
            assert "Sort" not in text and "Index" in text, text
