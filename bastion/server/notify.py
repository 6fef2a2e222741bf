"""systemd's service notifications (``sd_notify(3)``): ready, reloading, stopping, alive.

Under a unit with ``Type=notify`` (or ``Type=notify-reload``) systemd starts
the server with ``$NOTIFY_SOCKET`` set: a Unix datagram socket to which the
service sends newline-separated ``KEY=VALUE`` lines. bastion sends:

- ``READY=1`` (with ``MAINPID`` and a ``STATUS`` line) once every listener
  accepts connections -- after all workers reported ready, with ``--workers``;
- ``RELOADING=1`` with ``MONOTONIC_USEC``, then ``READY=1``, around a SIGHUP's
  reload (the certificate and the revocation list);
- ``STOPPING=1`` when a drain begins;
- ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` while its loop runs
  (``WatchdogSec=``), so a server whose loop is stuck gets restarted.

``SystemdNotifier.from_environ`` takes the variables out of the environment,
as ``sd_notify``'s ``unset_environment`` does: the workers and jobs a server
starts must not speak for it. Sending never raises: a manager that has gone
away costs one warning in the log, not the server. A state change waits up to
``SEND_TIMEOUT`` for room in a full socket (a lost ``READY`` fails the start);
a watchdog ping never waits (the next one follows).
Nothing is sent when the variables are absent, which is every start outside
systemd.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bastion.server.server import Server

__all__ = ["SystemdNotifier"]

log = logging.getLogger("bastion.server")

#: Seconds a state change (ready, reloading, stopping) may wait for room in the manager's socket.
SEND_TIMEOUT = 1.0


class SystemdNotifier:
    """Sends ``sd_notify`` messages to ``address`` (a path, or ``@name`` for the abstract namespace).

    ``watchdog``: seconds between keep-alive pings (half the manager's
    ``WATCHDOG_USEC``), or None when the unit has no watchdog.
    """

    def __init__(self, address: str, *, watchdog: float | None = None) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog = watchdog
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.settimeout(SEND_TIMEOUT)
        self._warned = False
        self._pinging: asyncio.Task[None] | None = None

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> SystemdNotifier | None:
        """The notifier ``$NOTIFY_SOCKET`` asks for, or None; removes the variables from ``environ``."""
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", "")
        usec = env.pop("WATCHDOG_USEC", "")
        watchdog_pid = env.pop("WATCHDOG_PID", "")
        if not address:
            return None
        if not (address.startswith("/") or address.startswith("@")):
            log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket: not notifying systemd", address)
            return None
        watchdog: float | None = None
        if usec and (not watchdog_pid or watchdog_pid == str(os.getpid())):
            try:
                watchdog = int(usec) / 2e6
            except ValueError:
                log.warning("WATCHDOG_USEC=%r is not a number of microseconds: no watchdog pings", usec)
            else:
                watchdog = watchdog if watchdog > 0 else None
        return cls(address, watchdog=watchdog)

    def send(self, flags: int = 0, **fields: str | int) -> None:
        """Send one message of ``KEY=VALUE`` lines; never raises."""
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self._socket.sendto(message, flags, self.address)
        except OSError as exc:  # the manager is gone or busy: the server goes on
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"), exc)

    def ready(self, status: str) -> None:
        self.send(READY=1, MAINPID=os.getpid(), STATUS=status)

    def reloaded(self, status: str) -> None:
        """A reload happened just now: ``RELOADING=1`` then ``READY=1`` (``Type=notify-reload``)."""
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        self.send(READY=1, STATUS=status)

    def stopping(self, status: str = "draining") -> None:
        self.send(STOPPING=1, STATUS=status)

    def alive(self) -> None:
        self.send(socket.MSG_DONTWAIT, WATCHDOG=1)

    async def keep_alive(self) -> None:
        """Ping the watchdog from the running loop until cancelled (nothing to do without one)."""
        if self.watchdog is None:
            return
        while True:
            self.alive()
            await asyncio.sleep(self.watchdog)

    def serving(self, server: Server, status: str) -> asyncio.Task[None]:
        """``server`` is ready: say so, follow its reloads and its drain, and ping the watchdog until the
        loop ends (the drain and the close after it included: the process is alive); the pinging task."""
        server.hangup_hooks.append(lambda: self.reloaded(status))
        server.drain_hooks.append(self.stopping)
        self.ready(status)
        self._pinging = asyncio.get_running_loop().create_task(self.keep_alive())  # held: tasks are weakly held
        return self._pinging

    def close(self) -> None:
        self._socket.close()
