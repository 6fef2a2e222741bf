"""What the ``bastion`` command does with an answer no bastion server gives: a coded error, never a traceback.

A command trusts the server it names no further than the protocol does: a server that is not bastion, or a
broken one, may answer ``auth.login`` or ``auth.create_token`` with anything. The command must then say so and
exit 1 -- not end in a traceback, which (under a typer that shows local variables) would print the password it
was about to use, nor leave the file it opened for the secret behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.hostile_server import ERROR, RESULT, HostileServer, Peer
from tests.support.server import bastion_cli

PASSWORD = "Pa55-Zq9k-Wv7m"


def answering(value: Any) -> Any:
    async def script(peer: Peer) -> None:
        await peer.handshake()
        while True:
            call = await peer.read_call()
            peer.send(RESULT, call[1], value)

    return script


@pytest.mark.parametrize("answer", [42, {"user": "ada"}, {"user": "ada", "token": 7}, None])
def test_login_with_an_answer_that_holds_no_token_exits_1(tmp_path: Path, answer: Any) -> None:
    saved = tmp_path / "session.token"
    with HostileServer(answering(answer)) as server:
        result = bastion_cli(
            "login", server.address, "-u", "ada", "--password-stdin", "--insecure", "--save", str(saved),
            stdin=PASSWORD + "\n",
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "Zq9k" not in result.stderr
    assert result.stderr.splitlines() == ["error: the server's answer to auth.login holds no token"]
    assert not saved.exists()


@pytest.mark.parametrize("answer", [42, {"id": "t1", "user": "ada"}, ["token"]])
def test_token_create_with_an_answer_that_holds_no_token_exits_1(tmp_path: Path, answer: Any) -> None:
    out = tmp_path / "api.token"
    with HostileServer(answering(answer)) as server:
        for where in (("--out", str(out)), ("--show",)):
            result = bastion_cli("token", "create", server.address, "--insecure", *where, "--token-file", "/dev/null")
            assert result.returncode == 1, result.stderr
            assert "Traceback" not in result.stderr
            assert result.stderr.splitlines() == ["error: the server's answer to auth.create_token holds no token"]
            assert result.stdout == ""
    assert not out.exists()


def test_what_a_server_says_beside_the_token_is_shown_escaped_or_left_out(tmp_path: Path) -> None:
    saved, out = tmp_path / "session.token", tmp_path / "api.token"
    with HostileServer(answering({"token": "tok-1", "user": "x\x1b[2J\nforged"})) as server:
        login = bastion_cli(
            "login", server.address, "-u", "ada", "--password-stdin", "--insecure", "--save", str(saved),
            stdin=PASSWORD + "\n",
        )  # fmt: skip
        assert login.returncode == 0, login.stderr
        assert login.stderr == f"logged in as x\\x1b[2J\\nforged; session token saved to {saved} (mode 0600)\n"
    assert saved.read_text() == "tok-1\n"
    with HostileServer(answering({"token": "tok-2"})) as server:
        created = bastion_cli("token", "create", server.address, "--insecure", "--out", str(out))
        assert created.returncode == 0, created.stderr
        assert created.stderr == f"token ? for ? written to {out} (mode 0600)\n"
    assert out.read_text() == "tok-2\n"


def test_a_servers_error_message_is_shown_escaped() -> None:
    """An error's message is the server's text -- a handler's exception, often carrying what some user chose --
    printed on the terminal of whoever ran the command: no escape sequence of it may reach the terminal, and
    no newline in it may forge a line of the command's output."""

    async def script(peer: Peer) -> None:
        await peer.handshake()
        while True:
            call = await peer.read_call()
            peer.send(ERROR, call[1], 5, "no such thing\x1b[2J\nerror: forged\u202e")

    with HostileServer(script) as server:
        result = bastion_cli("call", server.address, "demo.echo", "value=1", "--insecure")
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == ["error: NOT_FOUND: no such thing\\x1b[2J\\nerror: forged\\u202e"]
