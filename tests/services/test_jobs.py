"""The jobs service over a real SQLite store, through the in-memory pair; jobs run in real processes."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

import bastion
from bastion.cli.loading import load_job_registries
from bastion.client.aio import Client
from bastion.config import JobsConfig
from bastion.exceptions import UsageError
from bastion.jobs import JobRegistry
from bastion.security.principal import Principal
from bastion.services.jobs import Jobs, new_job_id
from bastion.store import open_store
from bastion.store.jobs import JobRecord
from bastion.testing import TESTER, MemoryServer
from tests.support.demo_jobs import registry
from tests.support.server import wait_for
from tests.support.stores import service_store

pytestmark = pytest.mark.usefixtures("service_backend")

ADA = Principal("ada", frozenset({"user"}))
BOB = Principal("bob", frozenset({"user"}))
CONFIG = JobsConfig(concurrency=2, lease=1.5, poll_interval=0.2, memory_mb=512)


class World:
    def __init__(self, server: MemoryServer, jobs: Jobs, store: Any, tmp_path: Path) -> None:
        self.server, self.jobs, self.store, self.dir = server, jobs, store, tmp_path

    def client(self, principal: Principal = ADA) -> Client:
        return self.server.client(principal=principal)


@asynccontextmanager
async def world(tmp_path: Path, config: JobsConfig = CONFIG) -> AsyncIterator[World]:
    async with open_store(service_store(tmp_path)) as store:
        jobs = Jobs(store, [registry], config)
        await jobs.start()
        try:
            async with MemoryServer([jobs.service]) as server:
                yield World(server, jobs, store, tmp_path)
        finally:
            await jobs.aclose()


def run(test: Callable[[World], Awaitable[None]], tmp_path: Path, config: JobsConfig = CONFIG) -> None:
    async def main() -> None:
        async with asyncio.timeout(30), world(tmp_path, config) as w:
            await test(w)

    asyncio.run(main())


async def finish(client: Client, job_id: str) -> dict[str, Any]:
    """Watch the job to its end; the last status."""
    last: dict[str, Any] = {}
    async for status in client.stream("jobs.watch", id=job_id):
        last = status
    return last


async def wait_file(path: Path, timeout: float = 10.0) -> str:
    """The text of ``path`` once it exists (polled on a thread, under a deadline)."""
    await asyncio.to_thread(wait_for, path.exists, timeout, what=str(path))
    return await asyncio.to_thread(path.read_text)


def test_a_job_runs_in_its_own_process_and_returns_its_result(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        job_id = await ada.jobs.submit(name="add", args={"a": 2, "b": 40})
        final = await finish(ada, job_id)
        assert (final["state"], final["progress"], final["owner"]) == ("succeeded", 1.0, "ada")
        assert await ada.jobs.result(id=job_id) == {"id": job_id, "state": "succeeded", "result": 42, "error": None}
        shifted = await ada.jobs.submit(name="shift", args={"point": {"x": 1, "y": 2}, "by": 3})
        await finish(ada, shifted)
        assert (await ada.jobs.result(id=shifted))["result"] == {"x": 4, "y": 5}

    run(test, tmp_path)


def test_progress_is_streamed_until_the_job_finishes(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        job_id = await ada.jobs.submit(name="steps", args={"n": 8, "delay": 0.15})
        seen = [s async for s in ada.stream("jobs.watch", id=job_id)]
        states = [s["state"] for s in seen]
        assert states[-1] == "succeeded" and "running" in states
        fractions = [s["progress"] for s in seen if s["state"] == "running"]
        assert fractions == sorted(fractions) and any(0 < f < 1 for f in fractions)
        assert any(s["message"].startswith("step ") for s in seen)
        assert (await ada.jobs.result(id=job_id))["result"] == 8

    run(test, tmp_path)


def test_bad_submissions_are_refused_with_clear_errors(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        with pytest.raises(bastion.NotFound, match="no job named 'nope'"):
            await ada.jobs.submit(name="nope", args={})
        with pytest.raises(bastion.InvalidArgument, match="Expected `int`, got `str`"):
            await ada.jobs.submit(name="add", args={"a": "x", "b": 1})
        with pytest.raises(bastion.InvalidArgument, match="missing required field `b`"):
            await ada.jobs.submit(name="add", args={"a": 1})
        with pytest.raises(bastion.InvalidArgument, match="unknown field `c`"):
            await ada.jobs.submit(name="add", args={"a": 1, "b": 2, "c": 3})
        with pytest.raises(bastion.InvalidArgument, match="state must be one of"):
            await ada.jobs.list(state="done")
        assert await ada.jobs.list() == []  # nothing was queued by the refusals

    run(test, tmp_path)


def test_errors_name_an_oversized_argument_briefly_instead_of_echoing_it(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        huge = "x" * 500_000
        # Each error echoed the whole argument back: half a megabyte of answer for a few bytes of question.
        for call, args in (("submit", {"name": huge}), ("status", {"id": huge}), ("list", {"state": huge})):
            with pytest.raises((bastion.NotFound, bastion.InvalidArgument)) as info:
                await getattr(ada.jobs, call)(**args)
            assert len(info.value.message) < 200 and "(500000 characters)" in info.value.message, call
        with pytest.raises(bastion.NotFound, match="no job named 'nope'"):
            await ada.jobs.submit(name="nope")  # a short one is still named in full
        # msgspec names an unknown field, or a value no Literal or Enum allows, in full: the refusal of a
        # submission carried its half-megabyte argument name back.
        with pytest.raises(bastion.InvalidArgument) as info:
            await ada.jobs.submit(name="shift", args={"point": {"x": 1, "y": 2}, huge: 1})
        message = info.value.message
        assert len(message) < 300 and message.startswith("job 'shift': Object contains unknown field `xxx"), message
        assert message.endswith("... (500032 characters)"), message
        with pytest.raises(bastion.InvalidArgument, match=r"^job 'add': Expected `int`, got `str` - at `\$.b`$"):
            await ada.jobs.submit(name="add", args={"a": 1, "b": "2"})  # a short one is kept whole

    run(test, tmp_path)


def test_failures_are_reported_with_a_reason_and_break_nothing(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        cases = {
            ("boom", '{"message": "no luck"}'): "ValueError: no luck",
            ("hog", '{"mb": 1024}'): "out of memory: the job's limit is 200 MB",
            ("oversleep", '{"seconds": 30}'): "timed out: killed at its limit of 1 s",
            ("crash", '{"how": "exit"}'): "exited with code 3 without a result",
            ("crash", '{"how": "abort"}'): "killed by SIGABRT",
        }
        import json

        ids = {key: await ada.jobs.submit(name=key[0], args=json.loads(key[1])) for key in cases}
        for key, job_id in ids.items():
            final = await finish(ada, job_id)
            assert final["state"] == "failed", (key, final)
            assert cases[key] in final["error"], (key, final["error"])
            assert (await ada.jobs.result(id=job_id))["error"] == final["error"]
        # The runner is unharmed: a later job still runs, and prints do not corrupt the channel.
        after = await ada.jobs.submit(name="chatty", args={"text": "still here"})
        await finish(ada, after)
        assert (await ada.jobs.result(id=after))["result"] == "still here"

    run(test, tmp_path)


def test_a_failure_reason_and_progress_message_holding_nul_are_recorded_as_the_jobs_own(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        job_id = await ada.jobs.submit(name="report_then_fail", args={"message": "bad\x00byte"})
        seen = [s async for s in ada.stream("jobs.watch", id=job_id)]
        final = seen[-1]
        # On PostgreSQL (text cannot hold NUL) the finish was refused: the job stayed running until its
        # lease ran out, was re-run as if its runner were lost, and ended "runner lost (server stopped …)".
        assert (final["state"], final["error"], final["attempts"]) == ("failed", "ValueError: bad\\x00byte", 1)
        assert any(s["message"] == "bad\\x00byte" for s in seen)

    run(test, tmp_path)


def test_a_result_messagepack_cannot_hold_fails_the_job_with_that_reason(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        # Only TypeError was caught: these crashed the job's process, which ended "exited with code 1".
        for kind, reason in (
            ("int", "can't serialize ints"),
            ("deep", "maximum recursion depth exceeded"),
            ("text", "surrogates not allowed"),
        ):
            final = await finish(ada, await ada.jobs.submit(name="unencodable", args={"kind": kind}))
            assert final["state"] == "failed", (kind, final)
            assert final["error"].startswith("the job's result cannot be encoded: "), (kind, final["error"])
            assert reason in final["error"], (kind, final["error"])

    run(test, tmp_path)


def test_a_result_that_does_not_match_its_declared_return_type_fails_the_job(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        # The declared return type was never checked: a job declared "-> int" that returned "seven" succeeded,
        # and every client decoding its result by that type failed instead.
        for kind, got in (("text", "str"), ("float", "float"), ("bool", "bool"), ("none", "None")):
            job_id = await ada.jobs.submit(name="mistyped", args={"kind": kind})
            final = await finish(ada, job_id)
            assert final["state"] == "failed", (kind, final)
            assert final["error"] == (
                f"the job's result does not match its return type int: Expected `int`, got `{got}`"
            ), kind
            assert await ada.jobs.result(id=job_id) == {
                "id": job_id, "state": "failed", "result": None, "error": final["error"]
            }  # fmt: skip
        bad = await ada.jobs.submit(name="as_point", args={"value": {"x": 1, "y": "2"}})
        final = await finish(ada, bad)
        assert final["state"] == "failed"
        assert final["error"] == (
            "the job's result does not match its return type Point: Expected `int`, got `str` - at `result.y`"
        )
        # What matches is converted to the declared type, as a client decoding it by that type gets it.
        good = await ada.jobs.submit(name="mistyped", args={"kind": "int"})
        assert (await finish(ada, good))["state"] == "succeeded"
        assert (await ada.jobs.result(id=good))["result"] == 7
        point = await ada.jobs.submit(name="as_point", args={"value": {"y": 2, "x": 1}})
        assert (await finish(ada, point))["state"] == "succeeded"
        assert (await ada.jobs.result(id=point))["result"] == {"x": 1, "y": 2}
        wide = await ada.jobs.submit(name="widened", args={"n": 3})
        await finish(ada, wide)
        value = (await ada.jobs.result(id=wide))["result"]
        assert (value, type(value)) == (3.0, float)
        # The runner is unharmed.
        after = await ada.jobs.submit(name="add", args={"a": 1, "b": 2})
        await finish(ada, after)
        assert (await ada.jobs.result(id=after))["result"] == 3

    run(test, tmp_path)


def test_an_unexpected_error_while_running_a_job_fails_it_instead_of_leaving_it_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        # The conversion of a result to its return type ran the type's __post_init__, which raised a
        # LookupError (no ValidationError): it escaped _run, and the job stayed "running" until its lease
        # ran out -- then was recovered as lost, and a retryable one run again.
        job_id = await ada.jobs.submit(name="as_checked", args={"value": -1})
        final = await asyncio.wait_for(finish(ada, job_id), 10)
        assert final["state"] == "failed", final
        reason = "the server failed while running the job (LookupError); its log has the details"
        assert final["error"] == reason, final["error"]
        assert (await w.store.jobs_get(job_id)).attempts == 1
        # The runner is unharmed, and a result that converts still succeeds.
        good = await ada.jobs.submit(name="as_checked", args={"value": 1})
        assert (await finish(ada, good))["state"] == "succeeded"
        assert (await ada.jobs.result(id=good))["result"] == {"value": 1}

    with caplog.at_level(logging.ERROR, logger="bastion.jobs"):
        run(test, tmp_path)
    logged = [r for r in caplog.records if r.exc_info and "no entry for -1" in str(r.exc_info[1])]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]  # once, with its traceback
    assert "as_checked" in logged[0].getMessage()


def test_a_result_is_answered_as_stored_not_decoded_and_encoded_again(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        job_id = await ada.jobs.submit(name="shift", args={"point": {"x": 1, "y": 2}, "by": 3})
        await finish(ada, job_id)
        stored = (await w.store.jobs_get(job_id)).result
        # jobs.result decoded the stored MessagePack into Python objects, then the answer encoded them again:
        # a large result cost its decoded size (many times its bytes) and two passes for nothing.
        method = w.jobs.service.methods["result"]
        ctx = bastion.Context(method=method, principal=ADA, request_id="r1", peer="test", deadline=None,
                              metadata={}, server=w.server.server.info)  # fmt: skip
        answer = await method.handler(ctx, id=job_id)
        assert isinstance(answer.result, msgspec.Raw) and bytes(answer.result) == stored
        # What a client gets is unchanged, over the wire.
        assert await ada.jobs.result(id=job_id) == {
            "id": job_id, "state": "succeeded", "result": {"x": 4, "y": 5}, "error": None
        }  # fmt: skip
        failed = await ada.jobs.submit(name="boom", args={"message": "no"})
        await finish(ada, failed)
        assert (await ada.jobs.result(id=failed))["result"] is None

    run(test, tmp_path)


def test_a_result_its_conversion_makes_too_large_fails_the_job(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        # An int is 1 byte of MessagePack, the float it becomes 9: past max_result_bytes (which keeps a
        # result within the frame a client is sent), it would have been stored all the same.
        final = await finish(ada, await ada.jobs.submit(name="widened", args={"n": 3}))
        assert (final["state"], final["error"]) == ("failed", "the job's result is 9 bytes, over the limit of 5")

    run(test, tmp_path, msgspec.structs.replace(CONFIG, max_result_bytes=5))


def test_progress_and_failure_text_that_is_not_utf8_is_recorded_escaped(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        job_id = await ada.jobs.submit(name="undecodable_name")
        seen = [s async for s in ada.stream("jobs.watch", id=job_id)]
        # progress() raised UnicodeEncodeError into the job, and its failure could not be sent at all.
        assert any(s["message"] == "reading caf\\udce9" for s in seen), seen
        assert (seen[-1]["state"], seen[-1]["error"]) == ("failed", "ValueError: cannot read caf\\udce9")

    run(test, tmp_path)


def test_a_job_ends_when_its_process_does_whatever_its_forked_children_hold_open(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        started = asyncio.get_running_loop().time()
        returned = await ada.jobs.submit(name="leave_a_child", args={"seconds": 60})
        died = await ada.jobs.submit(name="leave_a_child", args={"seconds": 60, "then": "exit"})
        # Each stayed "running" (holding a slot) until its child let go of the result channel: here a
        # minute, for a forked worker pool left open, the job's whole timeout.
        final = await finish(ada, returned)
        assert final["state"] == "succeeded" and isinstance((await ada.jobs.result(id=returned))["result"], int)
        final = await finish(ada, died)
        assert final["state"] == "failed" and "exited with code 3 without a result" in final["error"]
        assert asyncio.get_running_loop().time() - started < 20

    run(test, tmp_path)


def test_watching_jobs_another_replica_runs_leaves_nothing_behind(tmp_path: Path) -> None:
    async def main() -> None:
        async with open_store(service_store(tmp_path)) as store:
            runner, front = Jobs(store, [registry], CONFIG), Jobs(store, [], CONFIG)  # two replicas of one store
            await runner.start()
            await front.start()
            try:
                async with MemoryServer([runner.service]) as back, MemoryServer([front.service]) as server:
                    ids = [
                        await back.client(principal=ADA).jobs.submit(name="add", args={"a": i, "b": 1})
                        for i in range(5)
                    ]
                    ada = server.client(principal=ADA)
                    assert [(await finish(ada, job_id))["state"] for job_id in ids] == ["succeeded"] * 5
                    # Each watch used to leave an event for its job behind for good: only a job's own runner
                    # wakes (and drops) it, and this replica ran none.
                    assert front._changes == {} and front._watchers == {}
            finally:
                await front.aclose()
                await runner.aclose()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_cancel_a_queued_and_a_running_job(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        args = {"directory": str(w.dir), "seconds": 30}
        running = [await ada.jobs.submit(name="nap", args={**args, "tag": f"r{i}"}) for i in range(2)]
        queued = await ada.jobs.submit(name="nap", args={**args, "tag": "q"})  # both slots are taken
        pids = [int(await wait_file(w.dir / f"r{i}.pid")) for i in range(2)]
        status = await ada.jobs.cancel(id=queued)
        assert (status["state"], status["error"]) == ("cancelled", "cancelled before it ran")
        status = await ada.jobs.cancel(id=running[0])
        assert status["cancel_requested"] is True
        final = await finish(ada, running[0])
        assert (final["state"], final["error"]) == ("cancelled", "cancelled while running")
        with pytest.raises(ProcessLookupError):
            os.kill(pids[0], 0)  # the job's process is gone (and reaped)
        os.kill(pids[1], 0)  # the other job is untouched
        assert not (w.dir / "q.pid").exists()
        assert (await ada.jobs.cancel(id=queued))["state"] == "cancelled"  # idempotent
        await ada.jobs.cancel(id=running[1])
        assert (await finish(ada, running[1]))["state"] == "cancelled"

    run(test, tmp_path)


def test_only_the_owner_or_an_admin_sees_a_job(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada, bob, admin = w.client(ADA), w.client(BOB), w.client(TESTER)
        job_id = await ada.jobs.submit(name="add", args={"a": 1, "b": 1})
        await finish(ada, job_id)
        for call in ("status", "result", "cancel"):
            with pytest.raises(bastion.NotFound) as info:
                await getattr(bob.jobs, call)(id=job_id)
            with pytest.raises(bastion.NotFound) as unknown:
                await getattr(bob.jobs, call)(id="0" * 24)
            assert info.value.message.replace(job_id, "X") == unknown.value.message.replace("0" * 24, "X")
        with pytest.raises(bastion.NotFound):
            await finish(bob, job_id)
        assert await bob.jobs.list() == []
        assert [s["id"] for s in await ada.jobs.list()] == [job_id]
        assert [s["id"] for s in await admin.jobs.list()] == [job_id]
        assert (await admin.jobs.result(id=job_id))["result"] == 2

    run(test, tmp_path)


def test_a_job_id_holding_nul_is_refused_alike_on_every_backend(tmp_path: Path) -> None:
    """Job ids are hex: one holding NUL names no job. SQLite answered NOT_FOUND, but PostgreSQL (whose text cannot
    hold NUL) failed the call with the store's own error ("store: value rejected: CharacterNotInRepertoireError").
    The dispatcher's rule (refuse_nul) now answers INVALID_ARGUMENT naming the argument on both."""

    async def test(w: World) -> None:
        ada = w.client(ADA)
        for call in ("status", "result", "cancel"):
            with pytest.raises(bastion.InvalidArgument, match=rf"jobs\.{call}: argument id must not contain NUL"):
                await getattr(ada.jobs, call)(id="01\x00")
        with pytest.raises(bastion.InvalidArgument, match=r"jobs\.watch: argument id must not contain NUL"):
            await anext(aiter(ada.stream("jobs.watch", id="01\x00")))

    run(test, tmp_path)


def test_a_list_cursor_holding_nul_is_refused_on_every_backend(tmp_path: Path) -> None:
    """Job ids are hex: a cursor holding NUL is no id. SQLite answered a page, but PostgreSQL (whose text cannot hold
    NUL) failed the call with the store's own error ("store: value rejected: CharacterNotInRepertoireError")."""

    async def test(w: World) -> None:
        with pytest.raises(bastion.InvalidArgument, match="argument after must not contain NUL"):
            await w.client(ADA).jobs.list(after="01\x00")

    run(test, tmp_path)


def test_list_pages_and_filters_by_state(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        ids = [await ada.jobs.submit(name="add", args={"a": i, "b": 0}) for i in range(5)]
        for job_id in ids:
            await finish(ada, job_id)
        first = await ada.jobs.list(limit=2)
        rest = await ada.jobs.list(limit=10, after=first[-1]["id"])
        assert [s["id"] for s in first + rest] == ids
        assert len(await ada.jobs.list(state="succeeded")) == 5
        assert await ada.jobs.list(state="queued") == []

    run(test, tmp_path)


def test_a_list_of_jobs_with_long_errors_stops_early_to_fit_one_answer(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        # A job's error may hold 2000 characters (its exception's): 1000 such jobs made a 2 MB answer, past
        # the 1 MiB frame clients take, so jobs.list at its largest limit (the web console's) failed outright.
        ids = [new_job_id() for _ in range(1000)]
        for job_id in ids:
            failed = JobRecord(
                id=job_id, owner="ada", name="boom", args=b"\x80", state="failed", error="é" * 2000,
                created_at=1.0, finished_at=2.0,
            )  # fmt: skip
            await w.store.jobs_submit(failed)
        seen: list[str] = []
        while page := await ada.jobs.list(limit=1000, after=seen[-1] if seen else None):
            assert 0 < len(page) < 1000
            assert len(msgspec.msgpack.encode(page)) <= 512 * 1024
            seen += [status["id"] for status in page]
        assert seen == ids

    run(test, tmp_path)


def test_list_newest_first_pages_back_from_the_newest(tmp_path: Path) -> None:
    """jobs.list paged forward from the oldest only: a caller with more jobs than they would page through (the
    console stops at 1000, and 10,000 are kept) never saw their newest. ``newest_first`` lists from the newest,
    ``after`` still the last id seen."""

    async def test(w: World) -> None:
        ada = w.client()
        ids = [await ada.jobs.submit(name="add", args={"a": i, "b": 0}) for i in range(5)]
        for job_id in ids:
            await finish(ada, job_id)
        await w.client(BOB).jobs.submit(name="add", args={"a": 0, "b": 0})
        first = await ada.jobs.list(limit=2, newest_first=True)
        rest = await ada.jobs.list(limit=10, after=first[-1]["id"], newest_first=True)
        assert [s["id"] for s in first + rest] == ids[::-1]
        assert [s["id"] for s in await ada.jobs.list(state="succeeded", newest_first=True)] == ids[::-1]
        assert await ada.jobs.list(after=ids[0], newest_first=True) == []
        assert [s["id"] for s in await ada.jobs.list(limit=2)] == ids[:2]  # the default: oldest first, as before
        with pytest.raises(bastion.InvalidArgument, match="argument after must not contain NUL"):
            await ada.jobs.list(after="01\x00", newest_first=True)

    run(test, tmp_path)


def test_a_newest_first_list_of_jobs_with_long_errors_pages_on_past_short_pages(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        ids = [new_job_id() for _ in range(1000)]
        for job_id in ids:
            failed = JobRecord(
                id=job_id, owner="ada", name="boom", args=b"\x80", state="failed", error="é" * 2000,
                created_at=1.0, finished_at=2.0,
            )  # fmt: skip
            await w.store.jobs_submit(failed)
        seen: list[str] = []
        while page := await ada.jobs.list(limit=1000, after=seen[-1] if seen else None, newest_first=True):
            assert 0 < len(page) < 1000
            assert len(msgspec.msgpack.encode(page)) <= 512 * 1024
            seen += [status["id"] for status in page]
        assert seen == ids[::-1]

    run(test, tmp_path)


def test_result_of_an_unfinished_job_is_a_failed_precondition(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        job_id = await ada.jobs.submit(name="nap", args={"directory": str(w.dir), "tag": "t", "seconds": 30})
        with pytest.raises(bastion.FailedPrecondition, match="result is not ready"):
            await ada.jobs.result(id=job_id)
        await ada.jobs.cancel(id=job_id)

    run(test, tmp_path)


def test_pending_jobs_per_user_are_limited(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada, bob = w.client(ADA), w.client(BOB)
        args = {"directory": str(w.dir), "seconds": 30}
        first = [await ada.jobs.submit(name="nap", args={**args, "tag": f"a{i}"}) for i in range(2)]
        with pytest.raises(bastion.ResourceExhausted, match="2 jobs queued or running"):
            await ada.jobs.submit(name="add", args={"a": 1, "b": 1})
        await bob.jobs.submit(name="add", args={"a": 1, "b": 1})  # others are not affected
        for job_id in first:
            await ada.jobs.cancel(id=job_id)

    config = JobsConfig(concurrency=2, lease=1.5, poll_interval=0.2, max_pending=2)
    run(test, tmp_path, config)


def test_a_user_keeps_only_their_newest_finished_jobs(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada, bob = w.client(ADA), w.client(BOB)
        kept = await bob.jobs.submit(name="add", args={"a": 0, "b": 0})
        await finish(bob, kept)
        ids = []
        for i in range(6):
            ids.append(await ada.jobs.submit(name="add", args={"a": i, "b": 0}))
            await finish(ada, ids[-1])
        # Each job's arguments and result were kept for the whole retention, however many one user ran.
        assert [s["id"] for s in await ada.jobs.list()] == ids[-3:]
        assert [s["id"] for s in await bob.jobs.list()] == [kept]
        with pytest.raises(bastion.NotFound):
            await ada.jobs.result(id=ids[0])

    run(test, tmp_path, msgspec.structs.replace(CONFIG, max_kept=3))


def test_users_take_turns_in_the_queue(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada, bob = w.client(ADA), w.client(BOB)
        args = {"directory": str(w.dir), "seconds": 0.3}
        mine = [await ada.jobs.submit(name="nap", args={**args, "tag": f"a{i}"}) for i in range(4)]
        await wait_file(w.dir / "a0.pid")  # ada's first job runs, her others wait
        theirs = await bob.jobs.submit(name="nap", args={**args, "tag": "b0"})
        # One FIFO for everyone: bob's one job waited until all of ada's had run. Now he joins the round
        # behind those already waiting (ada), and goes before her next one.
        for job_id in mine:
            assert (await finish(ada, job_id))["state"] == "succeeded"
        assert (await finish(bob, theirs))["state"] == "succeeded"
        started = {s["id"]: s["started_at"] for s in await w.client(TESTER).jobs.list()}
        assert sorted(started, key=started.__getitem__) == [mine[0], mine[1], theirs, mine[2], mine[3]]

    run(test, tmp_path, msgspec.structs.replace(CONFIG, concurrency=1))


def test_the_bytes_a_users_jobs_hold_are_bounded(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada, bob = w.client(ADA), w.client(BOB)
        args = {"directory": str(w.dir), "seconds": 30, "tag": "x" * 500}
        first = await ada.jobs.submit(name="nap", args=args)
        with pytest.raises(bastion.ResourceExhausted, match=r"jobs.max_bytes") as refused:
            await ada.jobs.submit(name="nap", args={**args, "tag": "y" * 500})
        assert refused.value.status == bastion.Status.RESOURCE_EXHAUSTED
        other = await bob.jobs.submit(name="nap", args=args)  # others are not affected
        for client, job_id in ((ada, first), (bob, other)):
            await client.jobs.cancel(id=job_id)
            assert (await finish(client, job_id))["state"] == "cancelled"
        # Finished jobs make room: the cancelled one is deleted for the next.
        again = await ada.jobs.submit(name="chatty", args={"text": "z" * 400})
        assert (await finish(ada, again))["state"] == "succeeded"
        assert [s["id"] for s in await ada.jobs.list()] == [again]
        too_big = await ada.jobs.submit(name="chatty", args={"text": "z" * 600})
        done = await finish(ada, too_big)  # its result cannot fit beside its own arguments
        assert done["state"] == "failed" and "does not fit" in done["error"]

    run(test, tmp_path, msgspec.structs.replace(CONFIG, max_bytes=1000, max_result_bytes=1000))


def test_registered_lists_jobs_with_their_argument_schemas(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        listing = {j["name"]: j for j in await w.client().jobs.registered()}
        assert {"add", "steps", "hog", "durable_nap"} <= set(listing)
        add = listing["add"]
        assert add["params"]["required"] == ["a", "b"] and add["params"]["properties"]["a"] == {"type": "integer"}
        assert "progress" not in listing["steps"]["params"]["properties"]
        assert (listing["hog"]["memory_mb"], listing["oversleep"]["timeout"]) == (200, 1.0)
        assert listing["durable_nap"]["retryable"] is True and listing["add"]["retryable"] is False

    run(test, tmp_path)


def test_stopping_the_server_requeues_retryable_jobs_and_fails_the_rest(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            ada = w.client()
            args = {"directory": str(tmp_path), "seconds": 30}
            again = await ada.jobs.submit(name="durable_nap", args={**args, "tag": "again"})
            once = await ada.jobs.submit(name="nap", args={**args, "tag": "once"})
            pids = [int(await wait_file(tmp_path / f"{tag}.pid")) for tag in ("again", "once")]
        # world() closed the component: both processes are gone, neither job is lost.
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        async with open_store(service_store(tmp_path)) as store:
            requeued, failed = await store.jobs_get(again), await store.jobs_get(once)
        assert requeued is not None and (requeued.state, requeued.attempts) == ("queued", 1)
        assert failed is not None and (failed.state, failed.error) == ("failed", "server stopped while it ran")

    asyncio.run(main())


@asynccontextmanager
async def writes_held(location: str) -> AsyncIterator[None]:
    """Another process holds the store's write lock (SQLite) or a lock on the jobs table (PostgreSQL):
    the store's writes wait for it (and, past SQLite's busy timeout, fail)."""
    if location.endswith(".db"):
        blocker = sqlite3.connect(location, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        return
    pg = await asyncpg.connect(location)
    try:
        async with pg.transaction():
            await pg.execute("LOCK TABLE jobs IN EXCLUSIVE MODE")
            yield
    finally:
        await pg.close()


async def until_awaiting(name: str, timeout: float = 10.0) -> None:
    """Poll until some task is suspended inside a coroutine function called ``name``."""

    def inside(task: asyncio.Task[Any]) -> bool:
        coro: Any = task.get_coro()
        while coro is not None and hasattr(coro, "cr_frame"):
            if coro.cr_frame is not None and coro.cr_frame.f_code.co_name == name:
                return True
            coro = coro.cr_await
        return False

    deadline = asyncio.get_running_loop().time() + timeout
    while not any(inside(task) for task in asyncio.all_tasks()):
        assert asyncio.get_running_loop().time() < deadline, f"nothing awaited {name}"
        await asyncio.sleep(0.005)


def test_a_claim_in_flight_when_the_runner_closes_gives_its_job_back(tmp_path: Path) -> None:
    async def main() -> None:
        location = service_store(tmp_path)
        async with open_store(location) as store:
            spec = registry.get("add")
            assert spec is not None
            job_id = "0" * 24
            await store.jobs_submit(JobRecord(job_id, "ada", "add", spec.validate({"a": 1, "b": 2}), created_at=1.0))
            async with writes_held(location):  # so the runner's claim waits on the store
                jobs = Jobs(store, [registry], CONFIG, leader=False)
                await jobs.start()
                await until_awaiting("jobs_claim")
                closing = asyncio.create_task(jobs.aclose())
                await asyncio.sleep(0)  # close runs to its first wait: it has cancelled the dispatcher, mid-claim
                assert jobs._background[-1].cancelling()
                await asyncio.sleep(0)  # and the dispatcher has taken the cancel
            await closing
            await store.jobs_sweep(0.0)  # a write: any write queued before it has run
            job = await store.jobs_get(job_id)
        # The claim went on after the runner stopped: the job stayed "running" under a runner that was gone,
        # and after the lease it failed "runner lost (server stopped while it ran)" without ever running.
        assert job is not None and (job.state, job.runner, job.attempts) == ("queued", None, 0)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_job_whose_outcome_arrived_as_the_server_stops_keeps_it(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            ada = w.client()
            args = {"directory": str(tmp_path), "seconds": 30}
            done = await ada.jobs.submit(name="linger_after_result", args={**args, "tag": "done"})
            failed = await ada.jobs.submit(name="linger_after_result", args={**args, "tag": "bad", "fail": True})
            for tag in ("done", "bad"):
                await wait_file(tmp_path / f"{tag}.pid")  # the outcome is sent; the process lingers on
        async with open_store(service_store(tmp_path)) as store:
            succeeded, own_failure = await store.jobs_get(done), await store.jobs_get(failed)
        # The stop killed the lingering processes and gave both jobs back as if they had not finished: the
        # result and the job's own failure were thrown away for "server stopped while it ran".
        assert succeeded is not None and (succeeded.state, succeeded.error, succeeded.result) == (
            "succeeded", None, b"\xa4done",
        )  # fmt: skip
        assert own_failure is not None
        assert (own_failure.state, own_failure.error) == ("failed", "ValueError: bad failed on its own")

    asyncio.run(asyncio.wait_for(main(), 30))


def test_an_outcome_the_store_could_not_take_at_once_is_recorded_once_it_can(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if service_store(tmp_path).startswith("postgres"):
        pytest.skip("a lock held on PostgreSQL makes writes wait, not fail: SQLite's busy timeout makes them fail")

    async def test(w: World) -> None:
        ada = w.client()
        job_id = await ada.jobs.submit(name="nap", args={"directory": str(w.dir), "tag": "t", "seconds": 0.5})
        pid = int(await wait_file(w.dir / "t.pid"))
        async with writes_held(service_store(tmp_path)):
            await asyncio.to_thread(wait_for, lambda: not process_exists(pid), 10, what="the job to end")
            # Its finish waits out the busy timeout (5 s) and fails: the store is unavailable for a while.
            await asyncio.to_thread(
                wait_for, lambda: any("outcome" in r.getMessage() or "runner task failed" in r.getMessage()
                                      for r in caplog.records), 20, what="the finish to fail"
            )  # fmt: skip
        # The runner gave up on the first failure: the job stayed "running" under it until its lease ran out,
        # then failed "runner lost (server stopped while it ran)", its result thrown away.
        final = await finish(ada, job_id)
        assert (final["state"], final["error"]) == ("succeeded", None)
        assert (await ada.jobs.result(id=job_id))["result"] == "t"

    caplog.set_level(logging.WARNING, logger="bastion.jobs")
    run(test, tmp_path, msgspec.structs.replace(CONFIG, lease=60.0))


def test_a_runner_that_cannot_renew_a_lease_stops_the_job_when_the_lease_ends(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        job_id = await ada.jobs.submit(name="nap", args={"directory": str(w.dir), "tag": "t", "seconds": 30})
        pid = int(await wait_file(w.dir / "t.pid"))
        async with writes_held(service_store(tmp_path)):
            # Renewals fail (SQLite) or wait (PostgreSQL). Past the lease a recovery may queue the job again
            # and another runner start it: the runner went on running its copy beside that one.
            await asyncio.to_thread(wait_for, lambda: not process_exists(pid), 10, what="the job to be stopped")
        final = await finish(ada, job_id)
        assert (final["state"], final["error"]) == ("failed", "runner lost (server stopped while it ran)")

    run(test, tmp_path, msgspec.structs.replace(CONFIG, lease=1.5))


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _double(a: int) -> int:
    return 2 * a


def _returns_what_msgspec_cannot_decode(a: int) -> str | bytes:
    """A union of two str-like types: msgspec cannot tell them apart in MessagePack."""
    return str(a)


def test_registry_refuses_what_it_cannot_run() -> None:
    reg = JobRegistry()

    def local(a: int) -> int:
        return a

    with pytest.raises(UsageError, match="top level"):
        reg.job(local)

    async def coro(a: int) -> int:
        return a

    with pytest.raises(UsageError, match="plain"):
        reg.job(coro)
    with pytest.raises(UsageError, match="return type is not supported"):
        reg.job(_returns_what_msgspec_cannot_decode)
    # A NaN or infinite timeout passed "timeout <= 0": every submission of the job then failed on SQLite
    # (which stores NaN as NULL, in a NOT NULL column: reported as ALREADY_EXISTS), and no timer held it.
    for timeout in (float("nan"), float("inf")):
        with pytest.raises(UsageError, match="timeout and memory_mb must be positive"):
            reg.job(timeout=timeout)(_double)
    with pytest.raises(UsageError, match="memory_mb must be at most 2147483647"):
        reg.job(memory_mb=2**31)(_double)  # stored with each job: PostgreSQL's INTEGER column cannot hold it
    with pytest.raises(UsageError, match="registered twice"):
        reg_twice = JobRegistry()
        reg_twice.job(registry.get("add").func)  # type: ignore[union-attr]
        reg_twice.job(registry.get("add").func)  # type: ignore[union-attr]


_OTHER = JobRegistry()


@_OTHER.job(name="add")
def _concatenate(a: str, b: str) -> str:
    """Another job named "add", in another registry."""
    return a + b


def test_two_registries_offering_one_job_name_are_refused(tmp_path: Path) -> None:
    # The first registry's job silently won: a server given both ran "add" as the first one's function, and
    # submissions meant for the second failed their argument checks (or, worse, ran the wrong code).
    async def main() -> None:
        async with open_store(service_store(tmp_path)) as store:
            with pytest.raises(UsageError) as info:
                Jobs(store, [registry, _OTHER])
            assert str(info.value).startswith(
                "job 'add' is registered twice: tests.support.demo_jobs.add and tests.services.test_jobs._concatenate"
            )
            Jobs(store, [registry, registry])  # the same registry named twice is the same jobs

    asyncio.run(main())
    # bastion serve (and serve --check) refuses them up front, not in each worker.
    with pytest.raises(UsageError, match="job 'add' is registered twice"):
        load_job_registries(["tests.support.demo_jobs:registry", "tests.services.test_jobs:_OTHER"])


def test_job_ids_made_in_one_millisecond_sort_in_the_order_they_were_made() -> None:
    # They sorted by their random part, so jobs.list (oldest first) and the queue's
    # order within a user came out shuffled for jobs submitted in the same millisecond.
    from bastion.services.jobs import new_job_id

    ids = [new_job_id() for _ in range(2000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
