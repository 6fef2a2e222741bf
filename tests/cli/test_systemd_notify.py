"""``bastion serve`` under systemd's ``Type=notify``: the sd_notify messages a real manager would read.

Each test plays the manager: it binds the ``$NOTIFY_SOCKET`` datagram socket,
with ``SO_PASSCRED`` so every message arrives with its sender's pid, starts a
real server pointed at it, and reads what arrives (with a deadline) on a
thread, as promptly as systemd would.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.server.notify import SystemdNotifier
from tests.conftest import StartServer

DEADLINE = 15.0
_UCRED = struct.Struct("3i")  # pid, uid, gid


class Manager:
    """The service manager's end of ``$NOTIFY_SOCKET``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.messages: queue.Queue[tuple[dict[str, str], int]] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except OSError:  # closed
                return
            if not data:  # shut down (a real message is never empty)
                return
            creds = [d for _, kind, d in ancillary if kind == socket.SCM_CREDENTIALS]
            pid = _UCRED.unpack(creds[0][: _UCRED.size])[0]
            self.messages.put((dict(line.split("=", 1) for line in data.decode().splitlines()), pid))

    def receive(self, timeout: float = DEADLINE) -> tuple[dict[str, str], int]:
        """The next message's fields and its sender's pid."""
        return self.messages.get(timeout=timeout)

    def wait_for(self, key: str, timeout: float = DEADLINE) -> tuple[dict[str, str], list[tuple[dict[str, str], int]]]:
        """Read until a message has ``key``: that message, and every message read on the way (it included)."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            fields, pid = self.receive(max(0.01, deadline - time.monotonic()))
            seen.append((fields, pid))
            if key in fields:
                return fields, seen


@pytest.fixture
def manager() -> Iterator[Manager]:
    directory = Path(tempfile.mkdtemp(prefix="bn-"))  # short: a Unix socket path has at most 107 bytes
    mgr = Manager(directory / "notify")
    yield mgr
    mgr.sock.shutdown(socket.SHUT_RDWR)
    mgr.sock.close()
    mgr.reader.join(5)
    (directory / "notify").unlink()
    directory.rmdir()


def test_ready_once_listening_then_watchdog_reload_and_stop(server_factory: StartServer, manager: Manager) -> None:
    server = server_factory(env={"NOTIFY_SOCKET": str(manager.path), "WATCHDOG_USEC": "200000"}, insecure=True)

    ready, before = manager.wait_for("READY")
    assert [fields for fields, _ in before[:-1] if "WATCHDOG" not in fields] == []  # nothing said before READY
    assert ready["READY"] == "1" and ready["MAINPID"] == str(server.pid)
    assert ready["STATUS"] == f"serving on {server.address}"
    with socket.create_connection(tuple(server.address.rsplit(":", 1)), timeout=5):  # ready means accepting
        pass

    pings = [manager.wait_for("WATCHDOG")[0] for _ in range(3)]  # every 0.1 s: half of WATCHDOG_USEC
    assert all(p == {"WATCHDOG": "1"} for p in pings)

    before_reload = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    server.signal(signal.SIGHUP)
    reloading, _ = manager.wait_for("RELOADING")
    assert int(reloading["MONOTONIC_USEC"]) >= before_reload  # what Type=notify-reload checks
    assert manager.wait_for("READY")[0]["STATUS"] == f"serving on {server.address}"

    server.signal(signal.SIGTERM)
    stopping, _ = manager.wait_for("STOPPING")
    assert stopping == {"STOPPING": "1", "STATUS": "draining"}
    assert server.stop() == 0


def test_workers_never_speak_for_the_supervisor(server_factory: StartServer, manager: Manager) -> None:
    server = server_factory(
        env={"NOTIFY_SOCKET": str(manager.path), "WATCHDOG_USEC": "200000"}, insecure=True, args=("--workers", "2")
    )

    ready, seen = manager.wait_for("READY")
    assert ready["MAINPID"] == str(server.pid) and ready["STATUS"] == "serving: 2 workers"
    seen += [manager.wait_for("WATCHDOG")[1][-1] for _ in range(3)]
    server.signal(signal.SIGTERM)
    stopping, tail = manager.wait_for("STOPPING")
    assert stopping["STOPPING"] == "1"
    seen += tail
    assert server.stop() == 0
    assert {pid for _, pid in seen} == {server.pid}  # the workers took no NOTIFY_SOCKET with them
    assert sum("READY" in fields for fields, _ in seen) == 1


def test_the_environment_decides_and_is_cleared() -> None:
    env = {"NOTIFY_SOCKET": "/run/x/notify", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = SystemdNotifier.from_environ(env)
    assert notifier is not None and notifier.watchdog == 15.0 and env == {}
    notifier.close()

    for env, reason in [
        ({}, "no socket"),
        ({"NOTIFY_SOCKET": "relative/notify"}, "neither a path nor an abstract name"),
    ]:
        assert SystemdNotifier.from_environ(env) is None, reason

    other = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@bastion", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert other is not None and other.watchdog is None  # the watchdog is another process's
    assert other.address == "\0bastion"
    other.close()


def test_a_gone_manager_costs_one_warning(manager: Manager, caplog: pytest.LogCaptureFixture) -> None:
    notifier = SystemdNotifier(str(manager.path.with_name("gone")))
    with caplog.at_level(logging.WARNING, logger="bastion.server"):
        notifier.ready("serving")  # ENOENT: logged, not raised
        notifier.alive()
        notifier.stopping()
    notifier.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot notify systemd at {notifier.address}: [Errno 2] No such file or directory"
    ]
