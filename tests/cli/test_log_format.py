"""``log_format = "json"``: the server's log as one JSON object per line, whatever a caller put in it."""

from __future__ import annotations

import json
import logging
import signal
import sys

import pytest

from bastion.exceptions import CallError
from bastion.observability.logs import JSONFormatter, OneLineFormatter
from bastion.status import Status
from tests.conftest import StartServer
from tests.integration.test_jobs_e2e import client, final, jobs_env
from tests.support.server import bastion_cli, wait_for


def _records(log: str) -> list[dict[str, object]]:
    """Every line of ``log`` as JSON (it fails on a line that is not)."""
    return [json.loads(line) for line in log.splitlines() if line]


def test_every_line_is_one_record_and_a_callers_newline_stays_inside_it(server_factory: StartServer) -> None:
    server = server_factory(env=jobs_env(BASTION_LOG_FORMAT="json"))
    forged = 'x\n{"level": "warning", "logger": "bastion.audit", "message": "forged"}'
    with client(server) as conn:
        job_id = conn.call("jobs.submit", name="boom", args={"message": forged})
        assert final(conn, job_id)["state"] == "failed"

    def ended() -> list[dict[str, object]]:
        return [r for r in _records(server.log()) if f"job {job_id} (boom) failed" in str(r["message"])]

    (record,) = wait_for(ended, 10, what="the job's end in the log")
    assert record["message"] == f"jobs: job {job_id} (boom) failed: ValueError: {forged}"
    assert record["level"] == "info" and record["logger"] == "bastion.jobs"
    assert set(record) >= {"timestamp", "level", "logger", "message"}
    assert str(record["timestamp"]).endswith("Z")
    assert not [r for r in _records(server.log()) if r["message"] == "forged"]


def test_workers_say_which_they_are(server_factory: StartServer) -> None:
    server = server_factory(env={"BASTION_LOG_FORMAT": "json"}, args=("--workers", "2"), insecure=True)
    server.signal(signal.SIGHUP)  # forwarded: each worker logs that it has no certificate to reload

    def reloads() -> list[dict[str, object]]:
        found = [r for r in _records(server.log()) if "no TLS certificate to reload" in str(r["message"])]
        return found if len(found) == 2 else []

    assert sorted(r.get("worker", -1) for r in wait_for(reloads, 10, what="both workers' records")) == [0, 1]
    (forwarded,) = [r for r in _records(server.log()) if "forwarding it to the workers" in str(r["message"])]
    assert "worker" not in forwarded and forwarded["logger"] == "bastion.supervisor"


def test_an_unknown_format_is_refused(tmp_path: pytest.TempPathFactory) -> None:
    result = bastion_cli("serve", "--log-format", "xml", "--data-dir", str(tmp_path), "--insecure", "--port", "0")
    assert result.returncode == 2
    assert "error: log_format must be text or json, got 'xml'" in result.stderr


def test_a_traceback_is_one_field() -> None:
    formatter = JSONFormatter(worker=3)
    try:
        raise ValueError("boom\nline")
    except ValueError:
        record = logging.LogRecord("bastion.x", logging.ERROR, __file__, 1, "failed: %s", ("a\tb",), sys.exc_info())
    line = formatter.format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "failed: a\tb" and entry["level"] == "error" and entry["worker"] == 3
    assert str(entry["exception"]).startswith("Traceback") and "ValueError: boom\nline" in str(entry["exception"])


def test_a_handlers_exception_cannot_forge_lines_of_the_text_log(server_factory: StartServer) -> None:
    """A handler's exception often carries a caller's words; its traceback follows the record's line, and no line
    of it may read as a record of its own (a timestamp at its start) or carry a terminal's escape sequence."""
    server = server_factory()
    forged = "x\n2026-01-01 00:00:00,000 WARNING bastion.audit: \x1b[2Jforged\rline"
    with client(server) as conn, pytest.raises(CallError) as caught:
        conn.call("demo.fail", message=forged)
    assert caught.value.status is Status.INTERNAL

    def traceback_end() -> list[str]:
        lines = server.log().splitlines()
        return lines if any("ValueError: x" in line for line in lines) else []

    lines = wait_for(traceback_end, 10, what="the handler's traceback in the log")
    assert not [line for line in lines if line.startswith("2026-01-01")], lines
    assert not [line for line in lines if "\x1b" in line or "\r" in line], lines
    (failed,) = [i for i, line in enumerate(lines) if "handler demo.fail failed" in line]
    assert lines[failed + 1].lstrip().startswith("Traceback (most recent call last):")
    assert any(line.endswith("2026-01-01 00:00:00,000 WARNING bastion.audit: \\x1b[2Jforged\\rline") for line in lines)


def test_a_traceback_in_text_keeps_its_shape_and_every_line_indented() -> None:
    formatter = OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        raise ValueError("boom\n2026-01-01 00:00:00,000 INFO x: forged")
    except ValueError:
        record = logging.LogRecord("bastion.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    first, *rest = formatter.format(record).split("\n")
    assert first.endswith("ERROR bastion.x: failed")
    assert rest[0] == "  Traceback (most recent call last):"
    assert rest[-2:] == ["  ValueError: boom", "  2026-01-01 00:00:00,000 INFO x: forged"]
    assert all(line.startswith("  ") for line in rest)
