"""The job runner's edges, over a real store (SQLite and PostgreSQL) and real job processes: what a job's
process inherits, where its output goes, and job processes that misbehave (garbage on the result channel,
processes left outside the job's group)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import msgspec
import pytest

from bastion.config import JobsConfig
from bastion.jobs import job_specs
from bastion.services.jobs import Jobs
from bastion.services.jobs_runner import FRAMES_PER_TURN, Done, JobProcess
from bastion.store import open_store
from bastion.testing import MemoryServer
from tests.services.test_jobs import CONFIG, World, finish, wait_file
from tests.support import demo_jobs, runner_jobs
from tests.support.stores import service_store

pytestmark = pytest.mark.usefixtures("service_backend")


@asynccontextmanager
async def world(tmp_path: Path, config: JobsConfig) -> AsyncIterator[World]:
    async with open_store(service_store(tmp_path)) as store:
        jobs = Jobs(store, [demo_jobs.registry, runner_jobs.registry], config)
        await jobs.start()
        try:
            async with MemoryServer([jobs.service]) as server:
                yield World(server, jobs, store, tmp_path)
        finally:
            await jobs.aclose()


def run(test: Callable[[World], Awaitable[None]], tmp_path: Path, config: JobsConfig = CONFIG) -> None:
    async def main() -> None:
        async with asyncio.timeout(40), world(tmp_path, config) as w:
            await test(w)

    asyncio.run(main())


def test_a_job_gets_a_minimal_environment_never_the_servers_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BASTION_JOBS_TEST_SECRET", "hunter2-bastion")
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:hunter2-dsn@db/app")
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/ssl/passed.pem")
    monkeypatch.setenv("LC_TIME", "C")

    async def test(w: World) -> None:
        ada = w.client()
        job_id = await ada.jobs.submit(name="environment")
        assert (await finish(ada, job_id))["state"] == "succeeded"
        env = (await ada.jobs.result(id=job_id))["result"]
        # The job's process inherited the server's whole environment: every BASTION_* setting, the
        # database's DSN with its password, any token the server was started with.
        assert not any("hunter2" in value for value in env.values()), env
        assert not [name for name in env if name.startswith("BASTION_")], env
        assert "DATABASE_URL" not in env
        assert env["PATH"] == os.environ["PATH"] and env["LC_TIME"] == "C"  # what a program needs to run
        assert env["SSL_CERT_FILE"] == "/etc/ssl/passed.pem"  # passed on because the config names it
        assert env["JOB_SETTING"] == "from the config"  # set by the config

    config = msgspec.structs.replace(CONFIG, env_pass=["SSL_CERT_FILE"], env={"JOB_SETTING": "from the config"})
    run(test, tmp_path, config)


def test_what_a_job_prints_is_logged_with_its_id_bounded_not_passed_to_the_servers_stderr(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    ids: dict[str, str] = {}

    async def test(w: World) -> None:
        ada = w.client()
        ids["ok"] = await ada.jobs.submit(name="loud", args={"kib": 256})
        ids["bad"] = await ada.jobs.submit(name="loud", args={"kib": 1, "fail": True})
        assert (await finish(ada, ids["ok"]))["state"] == "succeeded"
        assert (await finish(ada, ids["bad"]))["state"] == "failed"

    def output(job_id: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if f"job {job_id} (loud) output: " in r.getMessage()]

    caplog.set_level(logging.INFO, logger="bastion.jobs")
    run(test, tmp_path, msgspec.structs.replace(CONFIG, output_bytes=4096))
    # 256 KiB of the job's prints went straight to the server's stderr, among its log lines.
    assert "FIRST LINE" not in capfd.readouterr().err
    shown = [r.getMessage().split(" output: ", 1)[1] for r in output(ids["ok"])]
    assert "LAST LINE" in shown and "FIRST LINE" not in shown  # the tail...
    assert shown[0].endswith("earlier bytes not kept)")  # ...saying it is one
    assert sum(len(line) + 1 for line in shown[1:]) <= 4096  # bounded by output_bytes
    assert {r.levelno for r in output(ids["ok"])} == {logging.INFO}
    failed = output(ids["bad"])
    assert "FIRST LINE" in failed[0].getMessage() and "ValueError: loud and failed" in failed[-1].getMessage()
    assert {r.levelno for r in failed} == {logging.WARNING}  # a failed job's output (its traceback): a warning


def test_a_job_printing_many_short_lines_logs_a_bounded_number_of_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        job_id = await ada.jobs.submit(name="blank_lines", args={"n": 60_000})
        assert (await finish(ada, job_id))["state"] == "succeeded"

    caplog.set_level(logging.INFO, logger="bastion.jobs")
    run(test, tmp_path)
    shown = [
        r.getMessage().split(" output: ", 1)[1] for r in caplog.records if "(blank_lines) output: " in r.getMessage()
    ]
    # 64 KiB of empty lines made 60000 log records for one job.
    assert shown[-1] == "LAST LINE" and len(shown) <= 1001
    assert shown[0] == "(59001 earlier bytes not kept)"  # all but the last 999 newlines


def test_stopping_the_server_is_not_held_up_by_a_process_a_running_job_left_outside_its_group(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        try:
            async with world(tmp_path, CONFIG) as w:
                ada = w.client()
                args = {"directory": str(tmp_path), "tag": "e", "how": "fork", "seconds": 30}
                job_id = await ada.jobs.submit(name="escape", args=args)
                await wait_file(tmp_path / "e.pid")
                stopping = time.monotonic()
            # The stop killed the job's group, then waited for the channel to close: for as long as the
            # process outside the group lived.
            assert time.monotonic() - stopping < 10
            async with open_store(service_store(tmp_path)) as store:
                job = await store.jobs_get(job_id)
            assert job is not None and (job.state, job.error) == ("failed", "server stopped while it ran")
        finally:
            _end(tmp_path / "e.pid")

    asyncio.run(asyncio.wait_for(main(), 40))


def _end(path: Path) -> None:
    with suppress(FileNotFoundError, ProcessLookupError, ValueError):
        os.kill(int(path.read_text()), signal.SIGKILL)


@pytest.mark.parametrize("how", ["fork", "spawn"])
def test_a_process_the_job_leaves_outside_its_group_does_not_hold_the_job(tmp_path: Path, how: str) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        try:
            started = time.monotonic()
            job_id = await ada.jobs.submit(name="escape", args={"directory": str(w.dir), "tag": "e", "how": how})
            # A process in a session of its own keeps the channel open: the job stayed "running" (its slot
            # taken) for the minute that process lived, past the job's own timeout; a stop of the server
            # waited for it too.
            final = await finish(ada, job_id)
            assert final["state"] == "succeeded" and (await ada.jobs.result(id=job_id))["result"] == "e"
            assert time.monotonic() - started < 10
        finally:
            _end(w.dir / "e.pid")

    run(test, tmp_path, msgspec.structs.replace(CONFIG, timeout=5.0))


def test_frames_a_job_writes_itself_are_bounded_and_checked(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        for kind in ("progress", "nan"):
            job_id = await ada.jobs.submit(name="raw_frame", args={"kind": kind})
            seen = [s async for s in ada.stream("jobs.watch", id=job_id)]
            assert seen[-1]["state"] == "succeeded", seen[-1]
            # A job writing its own progress frame stored a 300000-character message (kept in its row,
            # sent to every watcher) and any fraction, NaN among them.
            assert all(len(s["message"]) <= 200 for s in seen), kind
            assert all(0.0 <= s["progress"] <= 1.0 for s in seen), (kind, [s["progress"] for s in seen])
        for kind, error in (
            ("garbage", "the job's process sent a malformed message"),
            ("huge", "the job's process sent a 2147483648-byte message"),
            # Stored as the job's result: every jobs.result of it then failed decoding it on the server.
            ("done", "the job's process sent a result that is not MessagePack"),
        ):
            job_id = await ada.jobs.submit(name="raw_frame", args={"kind": kind})
            final = await finish(ada, job_id)
            assert final["state"] == "failed" and error in final["error"], (kind, final)
            assert (await ada.jobs.result(id=job_id))["error"] == final["error"]

    run(test, tmp_path)


def test_frames_a_job_writes_itself_holding_text_that_is_not_utf8_fail_the_job(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        # msgspec raises UnicodeDecodeError for such text, no DecodeError: it escaped the runner, whose task
        # died with the job left "running" until its lease ran out, to be failed as "runner lost" (or run
        # again, if retryable) -- after waiting for the job's process to end, its timeout at worst.
        for kind, error in (
            ("badtext", "the job's process sent a malformed message"),
            ("badresult", "the job's process sent a result that is not MessagePack"),
        ):
            job_id = await ada.jobs.submit(name="raw_frame", args={"kind": kind})
            async with asyncio.timeout(10):
                final = await finish(ada, job_id)
            assert final["state"] == "failed" and error in final["error"], (kind, final)
            assert final["attempts"] == 1, (kind, final)

    run(test, tmp_path)


def test_a_failure_a_job_writes_itself_is_bounded_like_its_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def test(w: World) -> None:
        ada = w.client()
        # A failure frame the job wrote itself was stored whole: 300000 characters in its row, in every status
        # a watcher was sent, and in one line of the server's log -- where the runner's own are cut to 2000.
        job_id = await ada.jobs.submit(name="raw_frame", args={"kind": "failed"})
        final = await finish(ada, job_id)
        assert (final["state"], final["error"]) == ("failed", "f" * 2000)

    caplog.set_level(logging.INFO, logger="bastion.jobs")
    run(test, tmp_path)
    assert max(len(record.getMessage()) for record in caplog.records) < 3000


def test_the_timeout_covers_a_job_process_that_never_reads_its_request(tmp_path: Path) -> None:
    # The timer was armed only once the request had been written to the process's stdin: a process that
    # never read it (here stuck at start-up, in a sitecustomize) with a request past the pipe's buffer
    # held its slot, unkillable by the timeout, for ever.
    stuck = tmp_path / "stuck"
    stuck.mkdir()
    (stuck / "sitecustomize.py").write_text("import time\ntime.sleep(3600)\n")
    python_path = os.pathsep.join(p for p in (str(stuck), os.environ.get("PYTHONPATH", "")) if p)

    async def test(w: World) -> None:
        ada = w.client()
        started = time.monotonic()
        job_id = await ada.jobs.submit(name="raw_frame", args={"kind": "x" * 300_000})  # past 64 KiB
        async with asyncio.timeout(20):
            final = await finish(ada, job_id)
        assert (final["state"], final["error"]) == ("failed", "timed out: killed at its limit of 2 s")
        assert time.monotonic() - started < 15

    run(test, tmp_path, msgspec.structs.replace(CONFIG, timeout=2.0, env={"PYTHONPATH": python_path}))


def test_a_job_whose_result_was_not_kept_is_logged_as_the_failure_it_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ids: dict[str, str] = {}

    async def test(w: World) -> None:
        ada = w.client()
        ids["kept"] = await ada.jobs.submit(name="chatty", args={"text": "z" * 400})
        assert (await finish(ada, ids["kept"]))["state"] == "succeeded"
        ids["unkept"] = await ada.jobs.submit(name="chatty", args={"text": "z" * 600})
        done = await finish(ada, ids["unkept"])  # its result cannot fit beside its own arguments
        assert done["state"] == "failed" and "does not fit" in done["error"]

    caplog.set_level(logging.INFO, logger="bastion.jobs")
    run(test, tmp_path, msgspec.structs.replace(CONFIG, max_bytes=1000, max_result_bytes=1000))
    logged = {name: [r for r in caplog.records if f"jobs: job {job_id} (chatty) " in r.getMessage()]
              for name, job_id in ids.items()}  # fmt: skip
    ends = {name: [r.getMessage() for r in records if " output: " not in r.getMessage()]
            for name, records in logged.items()}  # fmt: skip
    assert ends["kept"] == [f"jobs: job {ids['kept']} (chatty) succeeded"]
    # The job whose result was not kept was logged "succeeded", though it is stored failed, without its result.
    (end,) = ends["unkept"]
    assert end.startswith(f"jobs: job {ids['unkept']} (chatty) failed: its result (") and "not kept" in end
    assert {r.levelno for r in logged["unkept"] if " output: " in r.getMessage()} == {logging.WARNING}


def test_a_server_path_entry_that_is_not_utf8_neither_strands_nor_fails_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A directory on the server's sys.path whose name is not UTF-8 (os.fsdecode gives it a lone surrogate)
    # could not be encoded into the job's request: starting every job raised, the job stayed "running"
    # until its lease ran out, and was then failed as "runner lost" (a retryable one was run again).
    odd = os.fsdecode(b"/nonexistent/caf\xe9")
    monkeypatch.setattr(sys, "path", [*sys.path, odd])

    async def test(w: World) -> None:
        ada = w.client()
        job_id = await ada.jobs.submit(name="environment")
        async with asyncio.timeout(10):
            final = await finish(ada, job_id)
        assert (final["state"], final["error"], final["attempts"]) == ("succeeded", None, 1)

    run(test, tmp_path)


def test_a_job_that_redirects_or_closes_its_standard_input_still_runs_to_its_end(tmp_path: Path) -> None:
    # The watchdog that kills the job's group once the server is gone read the job's own fd 0: a job that
    # pointed it at /dev/null (as daemonizing libraries do) read as "the server is gone" and was killed
    # with its whole group, failing as "killed by SIGKILL (perhaps out of memory ...)".
    async def test(w: World) -> None:
        ada = w.client()
        for how in ("devnull", "close"):
            final = await finish(ada, await ada.jobs.submit(name="quiet_stdin", args={"how": how}))
            assert (final["state"], final["error"]) == ("succeeded", None), (how, final)
            assert (await ada.jobs.result(id=final["id"]))["result"] == how

    run(test, tmp_path)


def test_a_job_flooding_its_channel_lets_the_event_loop_run_between_small_batches() -> None:
    # A job writing progress frames as fast as it can (past the progress callable's throttle) had every frame
    # buffered from its pipe -- thousands -- read, decoded and handled in one step of the event loop: each
    # flood stalled every other call on the server for tens of milliseconds at a time.
    spec = job_specs([runner_jobs.registry])["flood"]

    async def main() -> tuple[int, int, Done | None]:
        ticks = 0

        async def ticker() -> None:  # one tick per pass of the event loop
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        process = await JobProcess.start(
            spec.module, spec.qualname, spec.validate({"frames": 20_000}), memory_mb=512, max_result_bytes=4096
        )
        ticking = asyncio.create_task(ticker())
        frames, most, run, tick, done = 0, 0, 0, -1, None
        try:
            async for message in process.messages():
                if isinstance(message, Done):
                    done = message
                    continue
                frames += 1
                run = run + 1 if ticks == tick else 1
                tick, most = ticks, max(most, run)
            await process.wait()
        finally:
            ticking.cancel()
        return frames, most, done

    async def guarded() -> tuple[int, int, Done | None]:
        async with asyncio.timeout(30):
            return await main()

    frames, most, done = asyncio.run(guarded())
    assert done is not None and msgspec.msgpack.decode(done.result) == 20_000
    assert frames == 20_000  # none lost: each one is still read
    assert most <= 2 * FRAMES_PER_TURN, f"{most} frames handled in one pass of the event loop"
