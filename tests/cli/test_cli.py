"""The ``bastion`` command as a user runs it: real subprocesses, real exit codes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import bastion
from bastion import SyncClient
from tests.support.server import SERVICE_FILE, LineReader, ServerProcess, bastion_cli, clean_env, start_server, wait_for

WIDE = {"COLUMNS": "200"}  # keep rich from wrapping option names in help output


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ((), ["serve", "call", "methods", "cert", "--version"]),
        (
            ("serve",),
            [
                "--host",
                "--port",
                "--data-dir",
                "--config",
                "--service",
                "--log-level",
                "--insecure",
                "--force-insecure",
                "--cert",
                "--key",
                "--client-auth",
                "--client-ca",
                "--crl",
                "--tls-min-version",
            ],
        ),
        (
            ("call",),
            ["address", "method", "arguments", "--token-file", "--timeout", "--ca", "--cert", "--key", "--insecure"],
        ),
        (("methods",), ["address", "--token-file", "--json", "--timeout", "--ca", "--insecure"]),
        (("cert",), ["create", "show", "renew", "client"]),
    ],
    ids=["root", "serve", "call", "methods", "cert"],
)
def test_help(command: tuple[str, ...], expected: list[str]) -> None:
    for flag in ("--help", "-h"):
        result = bastion_cli(*command, flag, env=WIDE)
        assert result.returncode == 0, result.stderr
        assert "Usage:" in result.stdout
        for word in expected:
            assert word in result.stdout, (flag, word)
        assert result.stderr == ""


def test_version() -> None:
    result = bastion_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"bastion {bastion.__version__}\n"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nocolon", "--service 'nocolon': expected MODULE:ATTRIBUTE"),
        ("no_such_module_xyz:service", "--service 'no_such_module_xyz:service': cannot import no_such_module_xyz"),
        ("demo_service:nothing", "--service 'demo_service:nothing': nothing is not a bastion.Service"),
        ("demo_service:_mark", "--service 'demo_service:_mark': _mark is not a bastion.Service"),
    ],
)
def test_bad_service_spec_exits_2(tmp_path: Path, spec: str, message: str) -> None:
    shutil.copy(SERVICE_FILE, tmp_path / SERVICE_FILE.name)
    result = bastion_cli("serve", "--port", "0", "--data-dir", str(tmp_path / "data"), "--service", spec, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""  # never claimed to be listening
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {message}"), lines


def test_bad_option_values_exit_2(tmp_path: Path) -> None:
    bad_port = bastion_cli("serve", "--port", "70000", "--data-dir", str(tmp_path / "data"))
    assert bad_port.returncode == 2
    assert "error: port must be 0..65535, got 70000" in bad_port.stderr

    bad_address = bastion_cli("call", "127.0.0.1:notaport", "admin.health")
    assert bad_address.returncode == 2
    assert bad_address.stderr.splitlines() == [
        "error: bad address '127.0.0.1:notaport': port 'notaport' is not a number"
    ]

    missing_token = bastion_cli("call", "127.0.0.1:1", "admin.health", "--token-file", str(tmp_path / "nope"))
    assert missing_token.returncode == 2
    assert missing_token.stderr.splitlines() == [
        f"error: cannot read token file {tmp_path / 'nope'}: No such file or directory"
    ]

    missing_argument = bastion_cli("call")
    assert missing_argument.returncode == 2


def test_call_rejects_arguments_that_are_not_key_value(tmp_path: Path) -> None:
    server = start_server(tmp_path / "srv")
    try:
        token = str(server.token_file)
        not_pair = bastion_cli("call", server.address, "demo.echo", "oops", "--token-file", token)
        assert not_pair.returncode == 2
        assert not_pair.stderr.splitlines() == ["error: argument 'oops' is not key=value"]
        unknown = bastion_cli("call", server.address, "demo.echo_int", "nope=1", "--token-file", token)
        assert unknown.returncode == 2
        assert unknown.stderr.splitlines() == ["error: unknown argument 'nope' (the method takes: value)"]
        not_int = bastion_cli("call", server.address, "demo.echo_int", "value=x7", "--token-file", token)
        assert not_int.returncode == 2
        assert "error: argument 'value'" in not_int.stderr
    finally:
        server.stop()


def _bastion_command() -> list[str]:
    script = Path(sys.executable).parent / "bastion"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bastion"]


def test_serve_port_0_prints_the_port_and_stops_on_sigterm(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    banner = re.compile(
        rf"^bastion {re.escape(bastion.__version__)} listening on 127\.0\.0\.1:(\d+) "
        r"\(services: admin, auth, files, jobs, kv, messages\)$"
    )

    def serve() -> tuple[subprocess.Popen[str], list[str]]:
        process = subprocess.Popen(
            [*_bastion_command(), "serve", "--port", "0", "--http-port", "0", "--data-dir", str(data_dir)],
            cwd=tmp_path,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        reader = LineReader(process.stdout)
        deadline = time.monotonic() + 20
        lines = [reader.next_line(deadline - time.monotonic()) or "" for _ in range(4)]
        assert re.fullmatch(r"gateway listening on https://127\.0\.0\.1:\d+", lines[1]), lines
        del lines[1]
        return process, lines

    process, lines = serve()
    try:
        match = banner.match(lines[0])
        assert match, lines
        port = int(match[1])
        assert port != 0
        token_file = (data_dir / "admin.token").resolve()
        assert lines[1] == f"admin token written to {token_file} (mode 0600)"
        ca_file = (data_dir / "tls" / "ca.pem").resolve()
        assert lines[2] == f"TLS on; CA certificate: {ca_file}"
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
        with SyncClient(f"127.0.0.1:{port}", token_file=str(token_file), timeout=5, ca=ca_file) as client:
            assert client.call("admin.health")["status"] == "ok"
            assert client.call("admin.stats")["connections"] == 1
        token = token_file.read_text()
        ca = ca_file.read_bytes()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()  # type: ignore[union-attr]

    # A second start keeps the token it already has (and picks a fresh port).
    process, lines = serve()
    try:
        assert banner.match(lines[0]), lines
        assert lines[1] == f"admin token in {token_file} (mode 0600)"
        assert lines[2] == f"TLS on; CA certificate: {ca_file}"
        assert token_file.read_text() == token
        assert ca_file.read_bytes() == ca  # the same CA: clients that trust it still connect
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()  # type: ignore[union-attr]


def test_serve_says_plainly_when_the_store_has_users_and_no_token_file(tmp_path: Path) -> None:
    """A data directory restored from an archive, or a second replica on a shared store, has no admin.token
    (it is written only when the store has no users): the banner said "admin token not in PATH (mode 0600)",
    a mode for a file that is not there, and nothing of what to do."""
    data_dir = tmp_path / "data"  # where start_server points --data-dir
    token_file = data_dir / "admin.token"
    assert start_server(tmp_path).stop() == 0
    token_file.unlink()
    server = start_server(tmp_path)
    try:
        line = server.reader.next_line(5)
        assert line == (
            f"admin token: none in {token_file.resolve()} (only a first start, on a store without users, writes "
            "one): use an admin's token, e.g. from the data directory of the server that first used this store"
        )
        assert not token_file.exists()
    finally:
        assert server.stop() == 0


def test_serve_tightens_a_loose_token_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"  # where start_server points --data-dir
    token_file = data_dir / "admin.token"
    first = start_server(tmp_path)
    assert first.stop() == 0
    token = token_file.read_text().strip()
    token_file.chmod(0o644)
    server = start_server(tmp_path)
    try:
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        assert server.reader.next_line(5) == f"admin token in {token_file.resolve()} (mode 0600)"
        with SyncClient(server.address, token=token, timeout=5) as client:
            assert client.call("admin.stats")["connections"] == 1
    finally:
        assert server.stop() == 0


def test_serve_on_a_taken_port_exits_2(tmp_path: Path) -> None:
    server = start_server(tmp_path / "first")
    try:
        start = time.monotonic()
        second = bastion_cli("serve", "--port", str(server.port), "--data-dir", str(tmp_path / "second"), timeout=15)
        assert second.returncode == 2, second.stderr
        assert f"error: cannot listen on 127.0.0.1:{server.port}" in second.stderr
        assert time.monotonic() - start < 10
        assert server.process.poll() is None
        with SyncClient(server.address, timeout=5) as client:
            assert client.call("admin.health")["status"] == "ok"
    finally:
        server.stop()


def test_sigterm_right_after_the_banner_drains_and_exits_0(tmp_path: Path) -> None:
    # Readiness (the banner) must mean SIGTERM is handled: it once killed the
    # process outright when it came before the signal handlers were installed.
    for i in range(3):
        server = start_server(tmp_path / f"s{i}")
        server.signal(signal.SIGTERM)
        assert server.process.wait(timeout=10) == 0, server.log()
        assert "received SIGTERM: draining" in server.log()


def test_sighup_to_a_plaintext_server_neither_kills_it_nor_its_calls(tmp_path: Path) -> None:
    # SIGHUP reloads the TLS certificate; a plaintext server had no handler, so SIGHUP's
    # default action ended the process at once, its calls in flight lost.
    server = start_server(tmp_path / "s", insecure=True)
    try:
        with SyncClient(server.address, token=server.token, insecure=True, timeout=10, retry=None) as client:
            result: list[object] = []
            thread = threading.Thread(target=lambda: result.append(client.demo.watched(tag="hup", seconds=1.0)))
            thread.start()
            server.wait_for_marker("started-hup")
            server.signal(signal.SIGHUP)
            thread.join(10)
            assert result == ["hup"], server.log()
            assert server.process.poll() is None
            assert client.call("admin.health")["status"] == "ok"
        assert "received SIGHUP: no TLS certificate to reload" in server.log()
        assert server.stop() == 0
    finally:
        server.stop()


BLOCKING_SERVICE = '''
import time

from bastion import Service

service = Service("blocking", doc="A synchronous handler that blocks its thread.")


@service.method
def nap(seconds: float) -> float:
    """Block a handler thread for ``seconds``."""
    time.sleep(seconds)
    return seconds
'''


def test_a_handler_thread_stuck_past_the_grace_period_does_not_keep_the_process_alive(tmp_path: Path) -> None:
    # The drain answered the call UNAVAILABLE at the end of the grace period and logged "stopped",
    # but the interpreter then joined the handler thread: the process lived as long as it blocked.
    workdir = tmp_path / "s"
    workdir.mkdir()
    (workdir / "blocking_service.py").write_text(BLOCKING_SERVICE)
    env = {"BASTION_LIMITS__GRACE_PERIOD": "1"}
    server = start_server(workdir, env=env, args=("--service", "blocking_service:service"), insecure=True)
    try:
        outcome: list[object] = []

        def call() -> None:
            with SyncClient(server.address, token=server.token, insecure=True, timeout=60, retry=None) as client:
                try:
                    outcome.append(client.blocking.nap(seconds=40.0))
                except bastion.BastionError as exc:
                    outcome.append(exc)

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        with SyncClient(server.address, token=server.token, insecure=True, timeout=10) as admin:
            wait_for(lambda: admin.call("admin.stats")["calls_in_flight"] >= 2, timeout=10, what="the call to run")
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.process.wait(timeout=15) == 0, server.log()
        assert time.monotonic() - started < 10
        thread.join(5)
        assert len(outcome) == 1 and isinstance(outcome[0], bastion.Unavailable), outcome
        assert "handler thread(s) still busy after the drain" in server.log()
    finally:
        server.stop()


def test_a_traceback_never_shows_local_variables() -> None:
    """Set on the app itself, not left to typer's default (True in releases pyproject's typer>=0.15 allows):
    a command's locals hold the password it sends and the token it writes."""
    from bastion.cli.app import app

    assert app.pretty_exceptions_show_locals is False


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give a file to another user")
def test_a_dev_ca_in_the_working_directory_is_trusted_only_when_it_is_ones_own(
    server: ServerProcess, tmp_path: Path
) -> None:
    """``./bastion-data/tls/ca.pem`` is the local server's CA, trusted by default for convenience; one
    planted by another user in a shared directory (``/tmp``) would let them pose as any server."""
    assert server.ca_file is not None
    tls = tmp_path / "bastion-data" / "tls"
    tls.mkdir(parents=True)
    shutil.copy(server.ca_file, tls / "ca.pem")
    call = ("call", server.address, "admin.health", "--token-file", str(server.token_file))
    own = bastion_cli(*call, cwd=tmp_path, env={"BASTION_CA": ""})
    assert own.returncode == 0, own.stderr
    for planted in (tmp_path / "bastion-data", tls, tls / "ca.pem"):
        os.chown(planted, 65534, 65534)  # nobody's
        refused = bastion_cli(*call, cwd=tmp_path, env={"BASTION_CA": ""})
        assert refused.returncode != 0, refused.stdout
        assert f"not trusting {Path('bastion-data') / 'tls' / 'ca.pem'}" in refused.stderr, refused.stderr
        os.chown(planted, 0, 0)
    for shared in (tmp_path / "bastion-data", tls):  # writable by others: swapped after the check
        shared.chmod(0o777)
        refused = bastion_cli(*call, cwd=tmp_path, env={"BASTION_CA": ""})
        assert refused.returncode != 0 and "not trusting" in refused.stderr, refused.stderr
        shared.chmod(0o755)
