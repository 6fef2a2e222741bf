"""Every command that connects to a server takes ``--cert``/``--key`` (or ``BASTION_CERT``/``BASTION_KEY``), so a
server that requires client certificates (``tls.client_auth = "required"``) can be used with all of them, not only
``call`` and ``methods``.

One real ``bastion serve --client-auth required`` for the module; the client certificate is issued from its
development CA (the shared test CA) for ``admin``, the user the server was bootstrapped with, and is the only
credential the commands present.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bastion.security.tls import issue_client_cert
from tests.support.server import ServerProcess, bastion_cli, start_server

UNREACHABLE = 3  # docs/operations.md, Exit status: a TLS or handshake failure


class MTLSServer:
    def __init__(self, server: ServerProcess, cert: Path, key: Path, home: Path) -> None:
        self.server, self.cert, self.key = server, cert, key
        self.env = {"XDG_CONFIG_HOME": str(home)}  # no saved session of the user running the tests

    def cli(self, *args: str, certificate: bool = True, stdin: str | None = None) -> tuple[int, str, str]:
        flags = ("--cert", str(self.cert), "--key", str(self.key)) if certificate else ()
        done = bastion_cli(*args, *flags, env=self.env, stdin=stdin)
        return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def mtls() -> Iterator[MTLSServer]:
    with tempfile.TemporaryDirectory(prefix="bastion-mtls-cli-") as name:
        directory = Path(name)
        server = start_server(directory / "server", args=("--client-auth", "required"))
        try:
            # Issued after the server made its admin user: a certificate older than its user is refused.
            cert, key = issue_client_cert(server.data_dir, "admin", directory)
            home = directory / "home"
            home.mkdir()
            yield MTLSServer(server, cert, key, home)
        finally:
            assert server.stop() == 0


#: One command of each group that connects to a server (each reads only, or makes what no other test needs).
COMMANDS = {
    "kv": ("kv", "usage", "{addr}", "--json"),
    "messages": ("messages", "inbox", "{addr}", "--json"),
    "topics": ("topics", "pub", "{addr}", "news", "hello"),
    "jobs": ("jobs", "ls", "{addr}", "--json"),
    "files": ("files", "usage", "{addr}"),
    "user": ("user", "ls", "{addr}", "--json"),
    "token": ("token", "ls", "{addr}", "--json"),
    "methods": ("methods", "{addr}", "--json"),
    "call": ("call", "{addr}", "admin.health"),
}


@pytest.mark.parametrize("group", list(COMMANDS))
def test_each_command_group_connects_with_a_client_certificate(mtls: MTLSServer, group: str) -> None:
    args = [arg.format(addr=mtls.server.address) for arg in COMMANDS[group]]
    code, out, err = mtls.cli(*args)
    assert code == 0, err
    if "--json" in args or group == "call":
        json.loads(out)
    code, out, err = mtls.cli(*args, certificate=False)
    assert code == UNREACHABLE, (code, err)
    assert err.startswith("error: ") and "may require a client certificate" in err and "--cert and --key" in err
    assert out == ""


def test_login_and_backup_present_the_certificate(mtls: MTLSServer) -> None:
    addr = mtls.server.address
    password = "correct horse battery\n"
    code, _, err = mtls.cli("user", "add", addr, "carol", "--password-stdin", stdin=password)
    assert code == 0, err
    session = mtls.env["XDG_CONFIG_HOME"] + "/carol.session"
    login = ("login", addr, "-u", "carol", "--password-stdin", "--save", session)
    code, _, err = mtls.cli(*login, stdin=password)
    assert code == 0, err
    code, _, err = mtls.cli(*login, certificate=False, stdin=password)
    assert code == UNREACHABLE and "may require a client certificate" in err, err

    code, out, err = mtls.cli("backup", "--address", addr)
    assert code == 0, err
    assert json.loads(out)
    code, _, err = mtls.cli("backup", "--address", addr, certificate=False)
    assert code == UNREACHABLE and "may require a client certificate" in err, err


def test_the_certificate_can_come_from_the_environment(mtls: MTLSServer) -> None:
    """``BASTION_CERT``/``BASTION_KEY``, like ``BASTION_CA``: flags win; --insecure ignores them."""
    env = {**mtls.env, "BASTION_CERT": str(mtls.cert), "BASTION_KEY": str(mtls.key)}
    done = bastion_cli("kv", "usage", mtls.server.address, env=env)
    assert done.returncode == 0, done.stderr
    stranger = mtls.cert.with_name("missing.pem")
    done = bastion_cli("kv", "usage", mtls.server.address, "--cert", str(stranger), env=env)
    assert done.returncode == 2 and "missing.pem" in done.stderr, done.stderr  # the flag, not the environment
    done = bastion_cli("kv", "usage", mtls.server.address, "--insecure", env=env)
    assert done.returncode == UNREACHABLE, done.stderr  # plaintext to a TLS server: not "do not also give cert="


def test_every_command_that_connects_takes_the_client_certificate() -> None:
    """A command that takes --token-file connects to a server: it takes --cert and --key too (one forgetting them
    could not be used where client certificates are required)."""
    import typer.main

    from bastion.cli.app import app

    def commands(command: Any, path: str) -> Iterator[tuple[str, set[str]]]:
        for name, sub in getattr(command, "commands", {}).items():
            yield from commands(sub, f"{path} {name}")
        if not hasattr(command, "commands"):
            yield path, {opt for param in command.params for opt in param.opts}

    connecting = [
        (path, opts) for path, opts in commands(typer.main.get_command(app), "bastion") if "--token-file" in opts
    ]
    assert len(connecting) > 30
    assert [path for path, opts in connecting if not {"--cert", "--key"} <= opts] == []
