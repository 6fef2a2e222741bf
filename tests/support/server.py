"""Start and stop real ``bastion serve`` processes on free loopback ports.

``start_server`` copies ``demo_service.py`` into a working directory, runs
``python -m bastion serve --port 0 --service demo_service:service`` there,
and waits (with a deadline, never a fixed sleep) for the "listening on" line
on stdout. ``ServerProcess.stop`` sends SIGTERM and falls back to SIGKILL.

TLS. Test servers run with TLS, as real ones do. Every server's data
directory is seeded with one development CA shared by the test session
(``shared_ca``), so the server issues its own certificate from that CA and
every client trusts it through ``BASTION_CA``: ``clean_env`` puts it in the
environment of CLI subprocesses, and tests/conftest.py in the test
process's own. ``start_server(..., insecure=True)`` runs a plaintext
``--insecure`` server instead (for raw-socket tests).

HTTP gateway. Test servers run with ``--no-http`` (most tests speak the
native protocol, and a server starts faster without the gateway) unless
``start_server(..., http=True)``: then the gateway listens on a free port
(``--http-port 0``) and ``ServerProcess.gateway_url`` is its base URL, read
from the banner's second line ("gateway listening on URL").
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import queue
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "SERVICE_FILE",
    "LineReader",
    "ServerProcess",
    "bastion_cli",
    "clean_env",
    "read_rss_kib",
    "shared_ca",
    "start_server",
    "wait_for",
]

SERVICE_FILE = Path(__file__).with_name("demo_service.py")
SERVICE_SPEC = "demo_service:service"
STARTUP_TIMEOUT = 20.0
_LISTENING = re.compile(r"^bastion \S+ listening on (?P<host>\S+):(?P<port>\d+) \(services: (?P<services>.*)\)$")
_GATEWAY = re.compile(r"^gateway listening on (?P<url>\S+)$")


@functools.cache
def shared_ca() -> Path:
    """The test session's development CA certificate (its key lies beside it), made on first use."""
    from bastion.security.tls import ensure_dev_ca

    directory = Path(tempfile.mkdtemp(prefix="bastion-test-ca-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    ca_path, _ = ensure_dev_ca(directory)
    return ca_path


_SYSTEMD_VARIABLES = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"})


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without any BASTION_* setting, plus
    ``BASTION_CA`` (the shared test CA) and ``extra``."""
    # Nor systemd's notify variables: a server under test must not speak to whatever manager runs the tests.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_") and k not in _SYSTEMD_VARIABLES}
    env["NO_COLOR"] = "1"
    env["BASTION_CA"] = str(shared_ca())
    env.update(extra or {})
    return env


def seed_tls(data_dir: Path) -> None:
    """Give ``data_dir`` the shared test CA, so the server's certificate is issued from it."""
    tls_dir = data_dir / "tls"
    if (tls_dir / "ca.pem").exists():
        return
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tls_dir.mkdir(mode=0o700, exist_ok=True)
    source = shared_ca()
    shutil.copy(source, tls_dir / "ca.pem")
    key = tls_dir / "ca.key"
    shutil.copy(source.with_name("ca.key"), key)
    key.chmod(0o600)


def bastion_cli(
    *args: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 20.0,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bastion ARGS`` to completion and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "bastion", *args],
        cwd=cwd,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        input=stdin if stdin is not None else "",
    )


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def read_rss_kib(pid: int) -> int:
    """The resident set size of ``pid`` in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


class ServerProcess:
    """A running ``bastion serve``; unpacks as ``(address, token_file, process)``."""

    def __init__(
        self,
        process: subprocess.Popen[str],
        address: str,
        workdir: Path,
        data_dir: Path,
        marker_dir: Path,
        log_path: Path,
        reader: LineReader,
        banner: str,
        insecure: bool = False,
    ) -> None:
        self.process = process
        self.insecure = insecure
        #: The CA the server's certificate chains to (None for an --insecure server).
        self.ca_file: Path | None = None if insecure else data_dir / "tls" / "ca.pem"
        self.address = address
        self.workdir = workdir
        self.data_dir = data_dir
        self.token_file = data_dir / "admin.token"
        self.marker_dir = marker_dir
        self.log_path = log_path
        self.banner = banner
        self.reader = reader
        host, _, port = address.rpartition(":")
        self.host, self.port = host, int(port)
        #: The HTTP gateway's base URL, e.g. "https://127.0.0.1:41234" (None: started without it).
        self.gateway_url: str | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.address, self.token_file, self.process))

    def __repr__(self) -> str:
        return f"<bastion serve pid={self.process.pid} at {self.address}>"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def scrape(self, timeout: float = 10.0) -> str:
        """``GET /metrics`` of its gateway, as its admin (the gateway serves it to no anonymous caller)."""
        assert self.gateway_url is not None, "started without the gateway (http=True)"
        context = None if self.ca_file is None else ssl.create_default_context(cafile=str(self.ca_file))
        bearer = {"Authorization": f"Bearer {self.token}"}
        request = urllib.request.Request(self.gateway_url + "/metrics", headers=bearer)
        with urllib.request.urlopen(request, context=context, timeout=timeout) as response:
            text: str = response.read().decode()
        return text

    def log(self) -> str:
        """What the server has written to stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stdout_lines(self) -> list[str]:
        """Lines printed on stdout since the banner (without waiting)."""
        return self.reader.drain()

    def marker(self, name: str) -> Path:
        return self.marker_dir / name

    def wait_for_marker(self, name: str, timeout: float = 5.0) -> Path:
        path = self.marker(name)
        wait_for(path.exists, timeout, what=f"marker file {name} (server log:\n{self.log()})")
        return path

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; return the exit code."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


class LineReader:
    """Reads a process's stdout lines in a thread, so waits can have deadlines."""

    def __init__(self, stream: Any) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.eof = False
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: Any) -> None:
        try:
            for line in stream:
                self.lines.put(line.rstrip("\n"))
        except (OSError, ValueError):
            pass
        finally:
            self.lines.put(None)

    def next_line(self, timeout: float) -> str | None:
        """The next line; None at end of file; AssertionError after ``timeout`` seconds."""
        if self.eof:
            return None
        try:
            line = self.lines.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            raise AssertionError(f"no output line within {timeout:.1f}s") from None
        if line is None:
            self.eof = True
        return line

    def drain(self) -> list[str]:
        """Every line already read, without waiting."""
        out = []
        while not self.eof:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self.eof = True
            else:
                out.append(line)
        return out


def start_server(
    workdir: Path,
    *,
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    timeout: float = STARTUP_TIMEOUT,
    insecure: bool = False,
    seed_ca: bool = True,
    data_dir: Path | None = None,
    preexec_fn: Callable[[], None] | None = None,
    http: bool = False,
) -> ServerProcess:
    """Run ``bastion serve`` in ``workdir`` with the demo service; return once it listens.

    TLS with a certificate from the shared test CA (``seed_ca=False``: let the
    server make its own dev CA), or plaintext with ``insecure``. ``data_dir``
    defaults to ``<workdir>/data``. ``preexec_fn`` runs in the child before
    exec (e.g. to lower its file descriptor limit). ``http``: also serve the
    HTTP gateway on a free port (``gateway_url``); else ``--no-http`` (unless
    ``args`` say ``--http-port`` or ``--no-http`` themselves).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(SERVICE_FILE, workdir / SERVICE_FILE.name)
    data_dir = data_dir or workdir / "data"
    wants_http = http or "--http-port" in args
    if "--http-port" not in args and "--no-http" not in args:
        args = (*args, "--http-port", "0") if http else (*args, "--no-http")
    if insecure:
        args = (*args, "--insecure")
    elif seed_ca:
        seed_tls(data_dir)
    marker_dir = workdir / "markers"
    marker_dir.mkdir(exist_ok=True)
    log_path = workdir / "server.log"
    full_env = clean_env({"BASTION_TEST_MARKER_DIR": str(marker_dir), "PYTHONUNBUFFERED": "1", **(env or {})})
    command = [
        sys.executable,
        "-m",
        "bastion",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        "--service",
        SERVICE_SPEC,
        *args,
    ]
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            bufsize=1,
            preexec_fn=preexec_fn,
        )
    reader = LineReader(process.stdout)
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    try:
        while True:
            try:
                line = reader.next_line(deadline - time.monotonic())
            except AssertionError:
                raise AssertionError(
                    f"bastion serve did not start within {timeout}s; stdout: {seen}; stderr: {log_path.read_text()}"
                ) from None
            if line is None:
                process.wait(5)
                raise AssertionError(
                    f"bastion serve exited with {process.returncode} before listening; stdout: {seen}; "
                    f"stderr: {log_path.read_text()}"
                )
            seen.append(line)
            match = _LISTENING.match(line)
            if match:
                break
        banner = line
        gateway_url = None
        if wants_http and "--no-http" not in args:
            line = reader.next_line(deadline - time.monotonic())
            gateway = _GATEWAY.match(line or "")
            if gateway is None:
                raise AssertionError(f"expected the gateway line after the banner, got {line!r}")
            gateway_url = gateway["url"]
    except BaseException:
        process.kill()
        process.wait(5)
        raise
    address = f"{match['host']}:{match['port']}"
    server = ServerProcess(process, address, workdir, data_dir, marker_dir, log_path, reader, banner, insecure)
    server.gateway_url = gateway_url
    return server
