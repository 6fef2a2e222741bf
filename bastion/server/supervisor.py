"""Run N worker processes on one listening port; restart them; stop them together.

Theory of operation
-------------------

``bastion serve --workers N`` runs one *supervisor* process and N *worker*
processes. The supervisor has no business logic: it binds the listening
sockets, starts the workers, restarts a worker that dies, forwards signals,
and exits when they have all exited. Each worker is a whole server (its own
event loop, store connections and method table) serving its share of the
connections.

Sockets. ``bind_listeners`` binds, in the supervisor, one socket *per
worker* for each address of the host, all with ``SO_REUSEPORT`` on the same
port (port 0: the first one picks it, the others join it), and puts each in
the listening state at once. The kernel spreads incoming connections over
the sockets of a reuseport group evenly (a hash of the 4-tuple), so each
worker accepts from its own queue: no thundering herd, no worker that
accepts everything because it happened to be idle when a burst came in.
Binding in the supervisor rather than in each worker (1) makes port 0 work,
(2) keeps the port held while a worker restarts, and (3) keeps the sockets
open across the restart: connections that arrive for a dead worker wait in
its socket's queue and are served by the replacement, instead of being
refused (a shared single socket would spread connections by whichever
worker is idle, but the kernel would wake every worker for each one, and
one worker tends to take a burst all to itself). ``http_listeners`` are a
second set bound the same way (the HTTP gateway's port): each worker gets
its own group of those too, in the hello's ``http_listeners``.

Workers. A worker is a fresh interpreter (``command`` plus the number of
its end of a socket pair, e.g. ``python -m bastion.cli.serve 5``), never a
fork of the supervisor, so nothing of the supervisor's state (threads, an
event loop, open store connections) leaks into it. It inherits only its own
listening sockets, its end of the pair and ``extra_fds``. Over the pair the
supervisor sends one *hello* (a 4-byte big-endian length, then JSON:
``index``, ``count``, ``supervisor`` pid, ``listeners`` descriptor numbers
and the caller's ``payload``); the worker answers one JSON line once it
accepts connections (its *ready* report, handed to ``on_ready``). The pair
is also the lifeline: when the supervisor dies, however it dies, the
worker reads end-of-file and drains. Linux workers also ask for SIGTERM
when their parent dies (``PR_SET_PDEATHSIG``), which covers a worker still
starting up.

Hung workers. A worker's event loop writes an empty line to the pair every
``HEARTBEAT`` seconds once it is ready. With ``hang_timeout`` set, a ready
worker silent for that long (a stopped process, a deadlock, a handler
that never yields) is killed with SIGKILL and so restarted as any dead
worker is: otherwise its socket would keep taking its share of the new
connections, and leave every one of them hanging.

Restarts. A worker that exits while the server runs is started again, with
the same index and sockets, after a delay that doubles with each quick
failure (``RESTART_DELAYS``); a worker that ran ``stable_after`` seconds
starts the count again. After ``restart_limit`` quick failures in a row the
supervisor gives up: it logs why, stops every worker and exits 1. A worker
that exits (or cannot be started at all) before the server first became
ready is a start-up failure: the supervisor stops the others and exits 1 at
once.

Signals. SIGTERM and SIGINT start a graceful stop: the supervisor closes
its copies of the listening sockets (so once the workers close theirs the
port is free), sends SIGTERM to every worker (each drains: go-away, finish
accepted calls, exit), and exits when they all have: 0 if they all stopped
cleanly. A second SIGTERM or SIGINT is passed on as SIGUSR2: the workers
then cancel the calls still running instead of waiting out their grace
period. The workers themselves ignore SIGINT and a repeated SIGTERM: a
terminal's Ctrl-C and a group-wide SIGTERM reach them beside the
supervisor's own, and mean one graceful stop. A worker still running ``grace`` + ``KILL_MARGIN``
seconds later is killed. SIGHUP is forwarded to every worker (each reloads its TLS
certificate). The loop waits on a selector over the workers' pairs and a
signal wake-up pipe (``signal.set_wakeup_fd``); child exits arrive as
SIGCHLD, so nothing polls.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bastion.server.notify import SystemdNotifier

__all__ = [
    "RESTART_DELAYS",
    "Supervisor",
    "WorkerChannel",
    "bind_listeners",
    "resolve_workers",
]

log = logging.getLogger("bastion.supervisor")

BACKLOG = 1024
#: Seconds before restarting a worker after its 1st, 2nd... quick failure in a row.
RESTART_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)
#: Seconds past the grace period after which a worker that has not exited is killed.
KILL_MARGIN = 5.0
#: Seconds between a ready worker's heartbeats (empty lines on its pair).
HEARTBEAT = 1.0
_HELLO_LIMIT = 16 * 1024 * 1024
_PR_SET_PDEATHSIG = 1


def resolve_workers(value: int | str) -> int:
    """The number of workers ``value`` asks for: an int, or "auto" (the CPUs this process may use)."""
    if value == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    if isinstance(value, str):
        raise ValueError(f"workers must be a number or auto, got {value!r}")
    return value


def bind_listeners(host: str, port: int, count: int) -> list[list[socket.socket]]:
    """Listening sockets for ``count`` workers: element i holds worker i's, one per address of ``host``.

    The sockets of one address share its port through SO_REUSEPORT (port 0:
    the first picks a free one). Raises OSError if an address cannot be bound.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    groups: list[list[socket.socket]] = [[] for _ in range(count)]
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            bound = address
            for group in groups:
                sock = socket.socket(family, kind, proto)
                group.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(bound)
                sock.listen(BACKLOG)
                bound = (bound[0], sock.getsockname()[1], *bound[2:])
    except OSError:
        for group in groups:
            for sock in group:
                sock.close()
        raise
    return groups


# -- the supervisor ---------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    channel: socket.socket | None = None
    inbox: bytes = b""
    started: float = 0.0
    ready: bool = False
    heard: float = 0.0  # when the worker last wrote to its pair (monotonic)
    failures: int = 0  # quick failures in a row
    restart_at: float | None = None
    report: dict[str, Any] = field(default_factory=dict)


class Supervisor:
    """Runs ``len(listeners)`` workers of ``command`` until SIGTERM/SIGINT; see the module docstring.

    ``listeners[i]`` are worker i's sockets (``bind_listeners``); ``payload``
    (JSON-serialisable) goes to every worker in its hello; ``extra_fds`` are
    inherited by every worker (e.g. shared memory); ``on_ready`` is called
    once, with the workers' ready reports in index order, when all have
    started. ``grace`` is the workers' drain period. ``hang_timeout``: kill a
    ready worker whose heartbeats stop for that many seconds (None: never).
    """

    def __init__(
        self,
        command: Sequence[str],
        listeners: Sequence[Sequence[socket.socket]],
        payload: Any,
        *,
        on_ready: Callable[[list[dict[str, Any]]], None],
        grace: float,
        extra_fds: Sequence[int] = (),
        http_listeners: Sequence[Sequence[socket.socket]] = (),
        env: Mapping[str, str] | None = None,
        restart_limit: int = len(RESTART_DELAYS),
        stable_after: float = 10.0,
        hang_timeout: float | None = None,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.command = list(command)
        self.listeners = [list(group) for group in listeners]
        self.http_listeners = [list(group) for group in http_listeners] or [[] for _ in self.listeners]
        self.payload = payload
        self.on_ready = on_ready
        self.grace = grace
        self.extra_fds = tuple(extra_fds)
        self.env = dict(env) if env is not None else None
        self.restart_limit = restart_limit
        self.stable_after = stable_after
        self.hang_timeout = hang_timeout
        self.notifier = notifier  # systemd's: told when all workers serve, on reloads and stop; watchdog pings
        self._next_ping = time.monotonic() if notifier is not None and notifier.watchdog else None
        self.workers = [_Worker(i) for i in range(len(self.listeners))]
        self.restarts = 0
        self._announced = False
        self._stopping = False
        self._hurried = False  # SIGUSR2 sent: the workers cancel what still runs
        self._exit_code = 0
        self._kill_at: float | None = None
        self._selector = selectors.DefaultSelector()

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        """Start the workers and supervise them until they have all exited; the exit code."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
        previous = {sig: signal.signal(sig, _note_signal) for sig in handled}
        previous_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self._selector.register(wake_r, selectors.EVENT_READ, None)
        try:
            for worker in self.workers:
                if not self._stopping:
                    self._spawn(worker)
            while self._stopping is False or any(w.process is not None for w in self.workers):
                for key, _ in self._selector.select(self._timeout()):
                    if key.data is None:
                        self._on_signals(os.read(wake_r, 512))
                    else:
                        self._on_message(key.data)
                self._reap()
                self._tick()
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._selector.close()
            os.close(wake_r)
            os.close(wake_w)
            self._close_listeners()
        return self._exit_code

    def _timeout(self) -> float | None:
        times = [w.restart_at for w in self.workers if w.restart_at is not None]
        if self._kill_at is not None:
            times.append(self._kill_at)
        if self._next_ping is not None:
            times.append(self._next_ping)
        if self.hang_timeout is not None and not self._stopping:
            times.extend(w.heard + self.hang_timeout for w in self.workers if w.ready and w.process is not None)
        if not times:
            return None
        return max(0.0, min(times) - time.monotonic())

    def _on_signals(self, data: bytes) -> None:
        for number in data:
            if number in (signal.SIGTERM, signal.SIGINT):
                if self._stopping:  # a second one: the workers cancel what still runs
                    log.warning("received %s again: telling the workers to stop now", signal.Signals(number).name)
                    self._hurried = True
                    self._signal_all(signal.SIGUSR2)
                else:
                    log.info("received %s: stopping the workers", signal.Signals(number).name)
                self.stop(0)
            elif number == signal.SIGHUP:
                log.info("received SIGHUP: forwarding it to the workers")
                self._signal_all(signal.SIGHUP)
                if self.notifier is not None:
                    self.notifier.reloaded(self._status())
            # SIGCHLD: _reap runs after every wake-up

    def _status(self) -> str:
        return f"serving: {len(self.workers)} workers"

    def _tick(self) -> None:
        now = time.monotonic()
        if self._next_ping is not None and now >= self._next_ping and self.notifier is not None:
            self.notifier.alive()  # the supervisor's loop runs; hung workers are its own business (hang_timeout)
            self._next_ping = now + (self.notifier.watchdog or 0.0)
        for worker in self.workers:
            if worker.restart_at is not None and worker.restart_at <= now and not self._stopping:
                worker.restart_at = None
                self._spawn(worker)
        if self.hang_timeout is not None and not self._stopping:
            self._kill_hung(now, self.hang_timeout)
        if self._kill_at is not None and now >= self._kill_at:
            self._kill_at = None
            for worker in self.workers:
                if worker.process is not None:
                    log.error("worker %d (pid %d) did not stop in time: killing it", worker.index, worker.process.pid)
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
                    self._exit_code = 1

    def _kill_hung(self, now: float, timeout: float) -> None:
        for worker in self.workers:
            if worker.ready and worker.process is not None and now - worker.heard >= timeout:
                pid = worker.process.pid
                log.error("worker %d (pid %d) has not answered for %.0f s: killing it", worker.index, pid, timeout)
                worker.ready = False  # reaped (and restarted) as any worker that died
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()

    def stop(self, code: int) -> None:
        """Stop every worker gracefully; ``run`` then returns ``code`` (or 1 if a worker failed to stop)."""
        if self._stopping:
            return
        self._stopping = True
        self._exit_code = max(self._exit_code, code)
        if self.notifier is not None:
            self.notifier.stopping()
        self._close_listeners()
        for worker in self.workers:
            worker.restart_at = None
        self._signal_all(signal.SIGTERM)
        self._kill_at = time.monotonic() + self.grace + KILL_MARGIN

    def _close_listeners(self) -> None:
        for group in [*self.listeners, *self.http_listeners]:
            for sock in group:
                sock.close()

    def _signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)

    # -- workers ---------------------------------------------------------------------------

    def _spawn(self, worker: _Worker) -> None:
        ours, theirs = socket.socketpair()
        sockets = self.listeners[worker.index]
        http_sockets = self.http_listeners[worker.index]
        hello = {
            "index": worker.index,
            "count": len(self.workers),
            "supervisor": os.getpid(),
            "listeners": [s.fileno() for s in sockets],
            "http_listeners": [s.fileno() for s in http_sockets],
            "payload": self.payload,
        }
        body = json.dumps(hello).encode()
        try:
            process = subprocess.Popen(
                [*self.command, str(theirs.fileno())],
                pass_fds=(
                    theirs.fileno(),
                    *(s.fileno() for s in sockets),
                    *(s.fileno() for s in http_sockets),
                    *self.extra_fds,
                ),
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
        except OSError as exc:  # e.g. EAGAIN (process table full), EMFILE, ENOMEM, ENOENT
            theirs.close()
            ours.close()
            log.error("cannot start worker %d: %s", worker.index, exc)
            # A failure that quick counts from this attempt, not the last start (which may be long
            # past stable_after: the count would go back to one every time and never give up).
            worker.started = time.monotonic()
            if not self._announced:  # a start-up failure, like a worker that exits while starting
                self.stop(1)
            else:
                self._failed(worker, worker.started)
            return
        theirs.close()
        worker.process, worker.channel, worker.inbox = process, ours, b""
        worker.started, worker.ready, worker.report = time.monotonic(), False, {}
        with contextlib.suppress(OSError):  # a worker that died at once is reaped as usual
            ours.sendall(struct.pack(">I", len(body)) + body)
        ours.setblocking(False)
        self._selector.register(ours, selectors.EVENT_READ, worker)
        log.debug("started worker %d (pid %d)", worker.index, process.pid)

    def _on_message(self, worker: _Worker) -> None:
        channel = worker.channel
        assert channel is not None
        try:
            data = channel.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop_channel(worker)
            return
        worker.heard = time.monotonic()
        worker.inbox += data
        while b"\n" in worker.inbox:
            line, _, worker.inbox = worker.inbox.partition(b"\n")
            if not line:  # a heartbeat
                continue
            try:
                report = json.loads(line)
            except ValueError:
                log.warning("worker %d sent an unreadable report", worker.index)
                continue
            if not worker.ready and isinstance(report, dict):
                worker.ready, worker.report = True, report
                self._on_worker_ready(worker)

    def _on_worker_ready(self, worker: _Worker) -> None:
        assert worker.process is not None
        if self._announced:
            log.info("worker %d (pid %d) is serving again", worker.index, worker.process.pid)
            return
        if all(w.ready for w in self.workers) and not self._stopping:
            self._announced = True
            self.on_ready([w.report for w in self.workers])
            if self.notifier is not None:
                self.notifier.ready(self._status())

    def _drop_channel(self, worker: _Worker) -> None:
        if worker.channel is not None:
            self._selector.unregister(worker.channel)
            worker.channel.close()
            worker.channel = None

    def _reap(self) -> None:
        for worker in self.workers:
            process = worker.process
            if process is None or process.poll() is None:
                continue
            self._drop_channel(worker)
            worker.process = None
            code = process.returncode
            if self._stopping:
                # Killed by the signals of the stop itself: a worker that had already stopped, its
                # handlers gone (the loop's removal restores the default action), before it exited.
                clean = code in (0, -signal.SIGTERM) or (self._hurried and code == -signal.SIGUSR2)
                log.log(logging.INFO if clean else logging.WARNING, "worker %d exited (%s)", worker.index, _how(code))
                if not clean:
                    self._exit_code = 1
                continue
            if not self._announced:
                log.error("worker %d exited while starting (%s): stopping", worker.index, _how(code))
                self.stop(1)
                continue
            log.warning("worker %d (pid %d) exited unexpectedly (%s)", worker.index, process.pid, _how(code))
            self._failed(worker, time.monotonic())

    def _failed(self, worker: _Worker, now: float) -> None:
        if now - worker.started >= self.stable_after:
            worker.failures = 0
        worker.failures += 1
        if worker.failures > self.restart_limit:
            log.error(
                "worker %d failed %d times in a row, each within %.0f s of starting: giving up",
                worker.index,
                worker.failures,
                self.stable_after,
            )
            self.stop(1)
            return
        delay = RESTART_DELAYS[min(worker.failures, len(RESTART_DELAYS)) - 1]
        log.warning("restarting worker %d in %.1f s", worker.index, delay)
        self.restarts += 1
        worker.restart_at = now + delay


def _note_signal(signum: int, frame: object) -> None:
    """Signals are handled by the loop, which learns of them through the wake-up pipe."""


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# -- the worker's side ----------------------------------------------------------------------------


class WorkerChannel:
    """A worker's end of the pair to its supervisor: the hello, the ready report, the lifeline."""

    def __init__(self, sock: socket.socket, hello: dict[str, Any]) -> None:
        self._sock = sock
        self.index: int = int(hello["index"])
        self.count: int = int(hello["count"])
        self.supervisor: int = int(hello["supervisor"])
        self.payload: Any = hello["payload"]
        self.listeners = [socket.socket(fileno=int(fd)) for fd in hello["listeners"]]
        #: The HTTP gateway's sockets (empty when the supervisor bound none).
        self.http_listeners = [socket.socket(fileno=int(fd)) for fd in hello.get("http_listeners", [])]
        self._beat: Any = None  # the heartbeat's asyncio.TimerHandle, once watching

    @classmethod
    def open(cls, fd: int, timeout: float = 30.0) -> WorkerChannel:
        """Read the hello from descriptor ``fd`` (blocking, up to ``timeout`` seconds)."""
        _die_with_parent()
        sock = socket.socket(fileno=fd)
        sock.settimeout(timeout)
        try:
            (size,) = struct.unpack(">I", _recv_exactly(sock, 4))
            if size > _HELLO_LIMIT:
                raise ValueError(f"hello of {size} bytes")
            hello = json.loads(_recv_exactly(sock, size))
        except (OSError, EOFError, ValueError, struct.error) as exc:
            sock.close()
            raise RuntimeError(f"no hello from the supervisor: {exc}") from None
        channel = cls(sock, hello)
        if os.getppid() != channel.supervisor:  # it died before we asked to die with it
            sock.close()
            raise RuntimeError("the supervisor has exited")
        return channel

    @property
    def leader(self) -> bool:
        """Whether this worker runs the once-per-server background work (worker 0 does)."""
        return self.index == 0

    def ready(self, report: Mapping[str, Any]) -> None:
        """Tell the supervisor this worker accepts connections."""
        self._sock.settimeout(5.0)
        with contextlib.suppress(OSError):
            self._sock.sendall(json.dumps(dict(report)).encode() + b"\n")

    def watch(self, on_orphaned: Callable[[], None]) -> None:
        """Call ``on_orphaned`` (once, in the running loop) when the supervisor goes away; send heartbeats."""
        import asyncio

        loop = asyncio.get_running_loop()
        self._sock.setblocking(False)

        def beat() -> None:
            with contextlib.suppress(OSError):  # a full pair (BlockingIOError) or a gone supervisor
                self._sock.send(b"\n", socket.MSG_DONTWAIT)
            self._beat = loop.call_later(HEARTBEAT, beat)

        self._beat = loop.call_later(HEARTBEAT, beat)

        def readable() -> None:
            try:
                data = self._sock.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(self._sock.fileno())
                on_orphaned()

        loop.add_reader(self._sock.fileno(), readable)

    def close(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
        self._sock.close()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise EOFError("end of file")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the parent process exits (a worker still starting up is covered too)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
