"""The supervisor of ``--workers N`` when a worker cannot even be started (real processes).

A supervisor runs in a child process (it takes over signals, which only the
main thread may) with a tiny worker program: read the hello, report ready,
wait. Its command is a script that runs the interpreter, so a test can
make starting a worker fail (ENOENT) by removing it, as a full process
table (EAGAIN) or file table (EMFILE) would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import bastion
from tests.support.server import wait_for

WORKER = """
import os, sys
from bastion.server.supervisor import WorkerChannel

channel = WorkerChannel.open(int(sys.argv[-1]))
channel.ready({"pid": os.getpid()})
channel._sock.settimeout(None)
channel._sock.recv(1)  # until the supervisor goes away (SIGTERM ends it sooner)
"""

SUPERVISOR = """
import logging, os, sys
from bastion.server.supervisor import Supervisor, bind_listeners

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
link, worker, ready_file = sys.argv[1:4]

def on_ready(reports):
    with open(ready_file, "w") as f:
        f.write(str(reports[0]["pid"]))

supervisor = Supervisor(
    [link, worker], bind_listeners("127.0.0.1", 0, 1), None,
    on_ready=on_ready, grace=1.0, restart_limit=2, stable_after=0.2, env=dict(os.environ),
)
sys.exit(supervisor.run())
"""


class Run:
    """A supervisor process of one worker; ``link`` is the script its command names."""

    def __init__(self, tmp_path: Path, *, link_exists: bool = True) -> None:
        (tmp_path / "worker.py").write_text(WORKER)
        (tmp_path / "supervisor.py").write_text(SUPERVISOR)
        self.link, self.ready = tmp_path / "python", tmp_path / "ready"
        if link_exists:
            self.link.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
            self.link.chmod(0o755)
        env = {**os.environ, "PYTHONPATH": str(Path(bastion.__file__).parents[1])}
        script = [str(tmp_path / "supervisor.py"), str(self.link), str(tmp_path / "worker.py"), str(self.ready)]
        self.process = subprocess.Popen([sys.executable, *script], env=env, stderr=subprocess.PIPE, text=True)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(5)
        assert self.process.stderr is not None
        self.process.stderr.close()


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    started: list[Run] = []
    yield started
    for run in started:
        run.close()


def _exit_code(process: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait(5)
        assert process.stderr is not None
        tail = process.stderr.read()[-2000:]
        raise AssertionError(f"the supervisor was still retrying after {timeout}s:\n{tail}") from None
    assert process.stderr is not None
    return code, process.stderr.read()


def test_a_worker_that_cannot_be_started_at_all_is_a_start_up_failure(tmp_path: Path, runs: list[Run]) -> None:
    # It was retried every 0.1 s for ever: the failure counting measured from a start that never was.
    run = Run(tmp_path, link_exists=False)
    runs.append(run)
    code, log = _exit_code(run.process, timeout=15)
    assert code == 1
    assert "cannot start worker 0" in log
    assert not run.ready.exists()


def test_a_worker_that_cannot_be_restarted_is_given_up_on_with_backoff(tmp_path: Path, runs: list[Run]) -> None:
    # Its failed restarts were counted from its last real start, long past stable_after, so the
    # count went back to one each time: retried every 0.1 s for ever, never given up on.
    run = Run(tmp_path)
    runs.append(run)
    pid = int(wait_for(lambda: run.ready.exists() and run.ready.read_text(), timeout=20, what="the worker"))
    run.link.unlink()
    os.kill(pid, signal.SIGKILL)
    code, log = _exit_code(run.process, timeout=15)
    assert code == 1
    assert log.count("cannot start worker 0") == 2, log  # restart_limit=2: the kill and two failed restarts
    assert "restarting worker 0 in 0.5 s" in log  # the delay grew
    assert "failed 3 times in a row" in log and "giving up" in log
