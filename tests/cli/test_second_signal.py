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


def _workers(server: ServerProcess) -> list[int]:
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text()
    return [int(pid) for pid in children.split()]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_group_still_drains_workers_gracefully(
    server_factory: StartServer, sig: signal.Signals
) -> None:
    """A terminal's Ctrl-C, or systemd's default KillMode, signals every process of the group: each worker gets
    it beside the supervisor's own SIGTERM, and that is one stop, not two."""
    server = server_factory(env=LONG_GRACE, insecure=True, args=("--workers", "2"))
    thread, outcome = _call_in_background(server, "short", 2.0)
    workers = _workers(server)
    assert len(workers) == 2
    for pid in [server.pid, *workers]:
        os.kill(pid, sig)
    thread.join(20)
    assert outcome == ["short"]  # the call finished, nothing cancelled
    assert server.process.wait(20) == 0
    assert not server.marker("cancelled-short").exists()


def test_a_second_signal_to_the_supervisor_cancels_the_workers_drain(server_factory: StartServer) -> None:
    server = server_factory(env=LONG_GRACE, insecure=True, args=("--workers", "2"))
    thread, outcome = _call_in_background(server, "slow", 50.0)
    server.signal(signal.SIGTERM)
    wait_for(lambda: "stopping the workers" in server.log(), 10, what="the stop to begin")
    assert thread.is_alive()
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    thread.join(15)
    assert not thread.is_alive() and isinstance(outcome[0], Exception), outcome
    assert server.process.wait(15) == 0
    assert time.monotonic() - started < 15
    assert server.marker("cancelled-slow").exists()


def test_a_workers_hurry_that_arrives_before_its_stop_still_cancels_the_drain(server_factory: StartServer) -> None:
    """The supervisor sends SIGTERM, then SIGUSR2 on a second signal; pending together, the kernel delivers
    SIGUSR2 (12) first, and a worker's SIGTERM starts the drain only a loop turn later: a hurry that found no
    drain begun was ignored, and the worker drained for the whole grace period (seen once in CI, a double
    Ctrl-C lost). Sent to the workers in that order here."""
    server = server_factory(env=LONG_GRACE, insecure=True, args=("--workers", "2"))
    thread, outcome = _call_in_background(server, "slow", 50.0)
    started = time.monotonic()
    for pid in _workers(server):
        os.kill(pid, signal.SIGUSR2)
        os.kill(pid, signal.SIGTERM)
    thread.join(15)
    assert not thread.is_alive() and isinstance(outcome[0], Exception), outcome
    assert time.monotonic() - started < 15  # not the 60 s grace period
    # nothing here waited for the worker to exit: its handler writes the marker as it unwinds, which can be a
    # moment after the client saw the call end (CI found it missing once)
    server.wait_for_marker("cancelled-slow", timeout=10)
