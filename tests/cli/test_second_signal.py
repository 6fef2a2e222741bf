"""A second SIGTERM/SIGINT during a drain cancels what still runs instead of waiting out the grace period;
a terminal's Ctrl-C, which reaches every process of the group, still drains workers gracefully."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from bastion import SyncClient
from tests.conftest import StartServer
from tests.support.server import ServerProcess, wait_for

LONG_GRACE = {"BASTION_LIMITS__GRACE_PERIOD": "60"}


def _call_in_background(server: ServerProcess, tag: str, seconds: float) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def run() -> None:
        with SyncClient(server.address, token=server.token, insecure=True, timeout=120, retry=None) as client:
            try:
                outcome.append(client.demo.watched(tag=tag, seconds=seconds))
            except Exception as exc:  # the cancelled call's error
                outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    server.wait_for_marker(f"started-{tag}", timeout=10)
    return thread, outcome


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_cancels_the_drain(server_factory: StartServer, sig: signal.Signals) -> None:
    server = server_factory(env=LONG_GRACE, insecure=True)
    thread, outcome = _call_in_background(server, "slow", 50.0)
    server.signal(sig)
    wait_for(lambda: "draining" in server.log(), 10, what="the drain to begin")
    assert thread.is_alive()  # the first signal waits for the call
    started = time.monotonic()
    server.signal(sig)
    thread.join(15)
    assert not thread.is_alive() and isinstance(outcome[0], Exception), outcome
    assert server.process.wait(15) == 0
    assert time.monotonic() - started < 15  # not the 60 s grace period
    assert server.marker("cancelled-slow").exists()
    assert "again: cancelling the calls still running" in server.log()


def test_ctrl_c_reaching_every_worker_still_drains_gracefully(server_factory: StartServer) -> None:
    server = server_factory(env=LONG_GRACE, insecure=True, args=("--workers", "2"))
    thread, outcome = _call_in_background(server, "short", 2.0)
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text()
    workers = [int(pid) for pid in children.split()]
    assert len(workers) == 2
    for pid in [server.pid, *workers]:  # what a terminal's Ctrl-C does: SIGINT to the whole group
        os.kill(pid, signal.SIGINT)
    thread.join(20)
    assert outcome == ["short"]  # one Ctrl-C: the call finished, nothing cancelled
    assert server.process.wait(20) == 0
    assert not server.marker("cancelled-short").exists()
