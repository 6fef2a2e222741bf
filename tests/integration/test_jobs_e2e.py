"""Jobs through real ``bastion serve`` processes: the CLI, crashes, kill -9, replicas on PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bastion.client.sync import SyncClient
from tests.support.server import ServerProcess, bastion_cli, start_server, wait_for
from tests.support.stores import store_location

SUPPORT = Path(__file__).resolve().parent.parent / "support"
LOST = "runner lost (server stopped while it ran)"

StartServer = Callable[..., ServerProcess]


def jobs_env(**extra: str) -> dict[str, str]:
    """Serve ``demo_jobs:registry`` (from tests/support) with short leases, so recovery is quick."""
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, (str(SUPPORT), os.environ.get("PYTHONPATH")))),
        "BASTION_JOBS__MODULES": "demo_jobs:registry",
        "BASTION_JOBS__LEASE": "1.5",
        "BASTION_JOBS__POLL_INTERVAL": "0.2",
        **extra,
    }


def client(server: ServerProcess) -> SyncClient:
    return SyncClient(server.address, token_file=str(server.token_file), timeout=30)


def final(conn: SyncClient, job_id: str) -> dict[str, Any]:
    last: dict[str, Any] = {}
    for status in conn.stream("jobs.watch", id=job_id):
        last = status
    return last


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_cli_submit_watch_status_ls_and_cancel(server_factory: StartServer, tmp_path: Path) -> None:
    server = server_factory(env=jobs_env())
    common = ("--token-file", str(server.token_file))
    out = bastion_cli("jobs", "submit", server.address, "steps", "n=4", "delay=0.05", "--watch", *common)
    assert out.returncode == 0, out.stderr
    job_id, result = out.stdout.split("\n", 1)
    assert json.loads(result) == 4
    status = bastion_cli("jobs", "status", server.address, job_id, "--json", *common)
    assert json.loads(status.stdout)["state"] == "succeeded"
    failed = bastion_cli("jobs", "submit", server.address, "boom", "message=bad luck", "--watch", *common)
    assert failed.returncode == 1 and "failed: ValueError: bad luck" in failed.stderr
    bad = bastion_cli("jobs", "submit", server.address, "add", "a=1", *common)
    assert bad.returncode == 1 and "missing required field `b`" in bad.stderr
    unknown = bastion_cli("jobs", "submit", server.address, "nope", *common)
    assert unknown.returncode == 2 and "no job named 'nope'" in unknown.stderr
    nap = bastion_cli("jobs", "submit", server.address, "nap", f"directory={tmp_path}", "tag=t", "seconds=30", *common)
    nap_id = nap.stdout.strip()
    pid = int(wait_for(lambda: _read(tmp_path / "t.pid"), 10, what="the job to start"))
    cancel = bastion_cli("jobs", "cancel", server.address, nap_id, *common)
    assert cancel.returncode == 0 and "cancel" in cancel.stdout
    watched = bastion_cli("jobs", "watch", server.address, nap_id, *common)
    assert watched.returncode == 1 and "cancelled: cancelled while running" in watched.stderr
    assert gone(pid)
    listing = bastion_cli("jobs", "ls", server.address, *common)
    assert [line.split("\t")[2] for line in listing.stdout.splitlines()] == ["succeeded", "failed", "cancelled"]
    newest = bastion_cli("jobs", "ls", server.address, "--newest", *common)
    assert [line.split("\t")[2] for line in newest.stdout.splitlines()] == ["cancelled", "failed", "succeeded"]
    older = bastion_cli("jobs", "ls", server.address, "--newest", "--after", nap_id, "--limit", "1", *common)
    assert [line.split("\t")[2] for line in older.stdout.splitlines()] == ["failed"]


def _read(path: Path) -> str | None:
    try:
        return path.read_text() or None
    except FileNotFoundError:
        return None


def test_crashing_and_over_limit_jobs_fail_and_the_server_stays_up(server_factory: StartServer) -> None:
    server = server_factory(env=jobs_env())
    with client(server) as conn:
        ids = {
            "abort": conn.call("jobs.submit", name="crash", args={"how": "abort"}),
            "memory": conn.call("jobs.submit", name="hog", args={"mb": 1024}),
            "timeout": conn.call("jobs.submit", name="oversleep", args={"seconds": 30}),
        }
        errors = {key: final(conn, job_id) for key, job_id in ids.items()}
        assert all(status["state"] == "failed" for status in errors.values()), errors
        assert "SIGABRT" in errors["abort"]["error"]
        assert "out of memory" in errors["memory"]["error"]
        assert "timed out" in errors["timeout"]["error"]
        later = conn.call("jobs.submit", name="add", args={"a": 20, "b": 22})
        assert final(conn, later)["state"] == "succeeded"
        assert conn.call("jobs.result", id=later)["result"] == 42
    assert server.process.poll() is None


def test_jobs_running_at_kill_9_are_retried_or_failed_after_restart(
    server_factory: StartServer, tmp_path: Path
) -> None:
    workdir = tmp_path / "crashy"
    first = start_server(workdir, env=jobs_env())
    try:
        with client(first) as conn:
            args = {"directory": str(tmp_path), "seconds": 60}
            again = conn.call("jobs.submit", name="durable_nap", args={**args, "tag": "again"})
            once = conn.call("jobs.submit", name="nap", args={**args, "tag": "once"})
        pids = [int(wait_for(lambda t=tag: _read(tmp_path / f"{t}.pid"), 10)) for tag in ("again", "once")]
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
    finally:
        first.stop()
    # The job processes notice their runner is gone and end themselves (and their process groups).
    wait_for(lambda: all(gone(pid) for pid in pids), 10, what="orphaned job processes to exit")
    (tmp_path / "again.pid").unlink()
    second = server_factory(env=jobs_env(), name="crashy")  # same working and data directory
    with client(second) as conn:
        failed = final(conn, once)
        assert (failed["state"], failed["error"]) == ("failed", LOST)
        wait_for(lambda: _read(tmp_path / "again.pid"), 15, what="the retryable job to run again")
        status = conn.call("jobs.status", id=again)
        assert (status["state"], status["attempts"]) == ("running", 2)
        assert len((tmp_path / "again.runs").read_text().splitlines()) == 2
        assert len((tmp_path / "once.runs").read_text().splitlines()) == 1
        conn.call("jobs.cancel", id=again)
        assert final(conn, again)["state"] == "cancelled"


def test_replicas_on_postgresql_share_the_queue_and_never_run_a_job_twice(
    server_factory: StartServer, tmp_path: Path
) -> None:
    if not os.environ.get("BASTION_TEST_POSTGRES_DSN"):
        pytest.skip("set BASTION_TEST_POSTGRES_DSN to run replicas on PostgreSQL")
    env = jobs_env(BASTION_STORE=store_location("postgresql", tmp_path, "shared"))
    first = server_factory(env=env, name="replica1")
    second = server_factory(env=env, name="replica2")
    runs = tmp_path / "runs"
    runs.mkdir()
    with client(first) as conn:
        ids = [
            conn.call("jobs.submit", name="claim_once", args={"directory": str(runs), "tag": f"j{i}", "seconds": 0.3})
            for i in range(12)
        ]
        results = [final(conn, job_id) for job_id in ids]
        assert all(status["state"] == "succeeded" for status in results), results
        runners = [conn.call("jobs.result", id=job_id)["result"] for job_id in ids]
    # Every job ran exactly once (claim_once creates its file with O_EXCL), and both replicas took work.
    assert sorted(p.name for p in runs.iterdir()) == sorted(f"j{i}" for i in range(12))
    assert set(runners) == {first.pid, second.pid}


def test_cli_shows_a_jobs_own_words_escaped_so_they_cannot_break_or_forge_the_terminal(
    server_factory: StartServer,
) -> None:
    # A job's progress message and failure reason are its own words, often built from what a user submitted
    # (a file name): an admin listing everyone's jobs must not get markup, escape sequences or forged lines.
    server = server_factory(env=jobs_env())
    common = ("--token-file", str(server.token_file))
    hostile = "[/oops] [bold]x\x1b[2J\nforged\tline"
    shown = "[/oops] [bold]x\\x1b[2J\\nforged\\tline"
    out = bastion_cli("jobs", "submit", server.address, "report_then_fail", f"message={hostile}", "--watch", *common)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    job_id = out.stdout.splitlines()[0]
    assert f"error: job {job_id} failed: ValueError: {shown}" in out.stderr
    assert "\x1b[2J" not in out.stderr
    for command, *rest in (("ls",), ("status", job_id), ("cancel", job_id)):
        listed = bastion_cli("jobs", command, server.address, *rest, *common)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.count("\n") == 1 and "\x1b" not in listed.stdout, listed.stdout
        assert listed.stdout.split("\t")[:3] == [job_id, "report_then_fail", "failed"]
        assert listed.stdout.rstrip("\n").endswith(f"ValueError: {shown}")
    result = bastion_cli("jobs", "result", server.address, job_id, *common)
    assert result.returncode == 1 and result.stderr == f"error: job {job_id} failed: ValueError: {shown}\n"


def test_a_jobs_error_cannot_write_to_the_terminal(server_factory: StartServer) -> None:
    """A job's error is its exception's text, which may carry a caller's argument: the CLI shows it escaped."""
    server = server_factory(env=jobs_env())
    common = ("--token-file", str(server.token_file))
    forged = "x\n\x1b[2Jj-0000\tboom\tsucceeded"
    failed = bastion_cli("jobs", "submit", server.address, "boom", f"message={forged}", "--watch", *common)
    assert failed.returncode == 1
    job_id = failed.stdout.strip()
    escaped = "ValueError: x\\n\\x1b[2Jj-0000\\tboom\\tsucceeded"
    assert failed.stderr.endswith(f"error: job {job_id} failed: {escaped}\n")
    status = bastion_cli("jobs", "status", server.address, job_id, *common)
    assert status.stdout == f"{job_id}\tboom\tfailed\t  0.0%\t{escaped}\n"
    listing = bastion_cli("jobs", "ls", server.address, *common)
    assert listing.stdout == status.stdout
    assert json.loads(bastion_cli("jobs", "status", server.address, job_id, "--json", *common).stdout)["error"] == (
        f"ValueError: {forged}"
    )


def test_a_jobs_error_cannot_forge_lines_of_the_server_log(server_factory: StartServer) -> None:
    """The server logs each job's end with its error: a caller's newline in it stays inside that one line.
    (The job's own output -- its traceback among it -- goes to the log as the job wrote it.)"""
    server = server_factory(env=jobs_env())
    forged = "x\n2026-01-01 00:00:00,000 WARNING bastion.audit: \x1b[2Jforged"
    with client(server) as conn:
        job_id = conn.call("jobs.submit", name="boom", args={"message": forged})
        assert final(conn, job_id)["state"] == "failed"
    start = f"jobs: job {job_id} (boom) failed:"
    found = wait_for(
        lambda: [line for line in server.log().splitlines() if start in line], 10, what="the job's end in the log"
    )
    assert found[0].endswith(f"{start} ValueError: x\\n2026-01-01 00:00:00,000 WARNING bastion.audit: \\x1b[2Jforged")
