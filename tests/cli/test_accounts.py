"""``bastion login``, ``bastion user …`` and ``bastion token …`` against a real server."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import bastion
from bastion import SyncClient
from tests.support.hostile_server import RESULT, HostileServer, Peer
from tests.support.server import ServerProcess, bastion_cli

PASSWORD = "a long enough password"


def test_user_login_and_tokens_from_the_shell(server: ServerProcess, tmp_path: Path) -> None:
    address, admin_token, _ = server
    auth = ("--token-file", str(admin_token))

    added = bastion_cli("user", "add", address, "ada", "-r", "user", "--password-stdin", *auth, stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["roles"] == ["user"]
    listing = bastion_cli("user", "ls", address, "--json", *auth)
    assert {u["name"] for u in json.loads(listing.stdout)} == {"admin", "ada"}

    session = tmp_path / "session.token"
    login = bastion_cli("login", address, "-u", "ada", "--password-stdin", "--save", str(session), stdin=PASSWORD)
    assert login.returncode == 0, login.stderr
    assert stat.S_IMODE(os.stat(session).st_mode) == 0o600
    assert PASSWORD not in login.stdout + login.stderr
    whoami = bastion_cli("call", address, "auth.whoami", "--token-file", str(session))
    assert json.loads(whoami.stdout)["name"] == "ada"

    wrong = bastion_cli("login", address, "-u", "ada", "--password-stdin", "--save", str(session), stdin="nope")
    assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr

    token_file = tmp_path / "api.token"
    created = bastion_cli("token", "create", address, "-u", "ada", "--label", "ci", "--out", str(token_file), *auth)
    assert created.returncode == 0, created.stderr
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    assert token_file.read_text().strip() not in created.stdout + created.stderr
    tokens = json.loads(bastion_cli("token", "ls", address, "-u", "ada", "--json", *auth).stdout)
    api = [t for t in tokens if t["label"] == "ci"]
    assert len(api) == 1 and api[0]["revoked_at"] is None
    revoked = bastion_cli("token", "revoke", address, api[0]["id"], *auth)
    assert revoked.returncode == 0, revoked.stderr
    refused = bastion_cli("call", address, "auth.whoami", "--token-file", str(token_file))
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr

    undecided = bastion_cli("user", "rm", address, "ada", *auth)
    assert undecided.returncode == 2 and "choose what happens to the user's data" in undecided.stderr
    removed = bastion_cli("user", "rm", address, "ada", "--delete-data", *auth)
    assert removed.returncode == 0, removed.stderr
    assert "deleted ada; 1 token(s) revoked" in removed.stderr
    with SyncClient(address, token_file=str(admin_token), timeout=5) as root:
        assert [u["name"] for u in root.auth.list_users()] == ["admin"]


def test_token_create_needs_a_destination(server: ServerProcess) -> None:
    address, admin_token, _ = server
    result = bastion_cli("token", "create", address, "--token-file", str(admin_token))
    assert result.returncode == 2 and "exactly one of --out FILE or --show" in result.stderr


def test_non_admins_cannot_manage_users(server: ServerProcess, tmp_path: Path) -> None:
    address, admin_token, _ = server
    with SyncClient(address, token_file=str(admin_token), timeout=5) as root:
        root.auth.create_user(name="bob", roles=["user"])
        (tmp_path / "bob.token").write_text(root.auth.create_token(user="bob")["token"])
    result = bastion_cli("user", "ls", address, "--token-file", str(tmp_path / "bob.token"))
    assert result.returncode == 1 and "PERMISSION_DENIED" in result.stderr


def test_a_password_on_stdin_ends_at_its_line_ending_crlf_too(server: ServerProcess, tmp_path: Path) -> None:
    """A password file written on Windows ends in CRLF: the CR is the line ending, not the password's last
    character (as ``docker login --password-stdin`` reads it), so ``user add`` and ``login`` agree on it."""
    address, admin_token, _ = server
    auth = ("--token-file", str(admin_token))
    added = bastion_cli("user", "add", address, "bo", "--password-stdin", *auth, stdin=PASSWORD + "\r\n")
    assert added.returncode == 0, added.stderr
    with SyncClient(address, timeout=5) as anonymous:
        assert anonymous.auth.login(username="bo", password=PASSWORD)["user"] == "bo"
    session = tmp_path / "session.token"
    login = bastion_cli(
        "login", address, "-u", "bo", "--password-stdin", "--save", str(session), stdin=PASSWORD + "\r\n"
    )
    assert login.returncode == 0, login.stderr


def test_the_saved_session_goes_only_to_the_server_it_was_made_by(server: ServerProcess, tmp_path: Path) -> None:
    """``bastion login`` keeps its session for the commands that follow; a command naming another server must
    not send it there: that server's operator could use it on the first, as the user, until it expires."""
    auth = ("--token-file", str(server.token_file))
    added = bastion_cli("user", "add", server.address, "ada", "--password-stdin", *auth, stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    login = bastion_cli("login", server.address, "-u", "ada", "--password-stdin", stdin=PASSWORD, env=env)
    assert login.returncode == 0, login.stderr
    session = (tmp_path / "config" / "bastion" / "session.token").read_text().strip()
    whoami = bastion_cli("call", server.address, "auth.whoami", env=env)
    assert whoami.returncode == 0 and json.loads(whoami.stdout)["name"] == "ada", whoami.stderr

    async def other_server(peer: Peer) -> None:
        await peer.handshake()
        while True:
            call = await peer.read_call()
            peer.send(RESULT, call[1], [])

    with HostileServer(other_server) as other:
        listing = bastion_cli("methods", other.address, "--insecure", env=env)
        assert listing.returncode == 0, listing.stderr
        (hello, *_) = other.peers[0].received
    assert session not in str(hello)
    assert hello[3] is None  # no token at all
    assert listing.stderr.splitlines() == [
        f"note: the saved session (of {server.address}) is not sent to {other.address}: "
        "log in there, or give --token-file"
    ]


def test_user_unlock_lifts_a_lockout_from_the_shell(server: ServerProcess, tmp_path: Path) -> None:
    """``bastion user unlock NAME``: a user locked out by wrong passwords logs in again at once; ``--json``
    answers the count on stdout; an unknown user is NOT_FOUND (exit 1); a non-admin is PERMISSION_DENIED."""
    address, admin_token, _ = server
    auth = ("--token-file", str(admin_token))
    with SyncClient(address, token_file=str(admin_token), timeout=5) as root:
        root.auth.create_user(name="ada", password=PASSWORD, roles=["user"])
    with SyncClient(address, timeout=5) as guesser:
        for _ in range(5):  # auth.max_failures_per_user_source, by default
            with pytest.raises(bastion.Unauthenticated):
                guesser.auth.login(username="ada", password="a wrong guess")
        with pytest.raises(bastion.ResourceExhausted, match="too many failed attempts"):
            guesser.auth.login(username="ada", password=PASSWORD)

        unlocked = bastion_cli("user", "unlock", address, "ada", *auth)
        assert unlocked.returncode == 0, unlocked.stderr
        assert unlocked.stdout == "" and "unlocked ada; 1 lockout(s) lifted" in unlocked.stderr
        assert guesser.auth.login(username="ada", password=PASSWORD)["user"] == "ada"
        again = bastion_cli("user", "unlock", address, "ada", "--json", *auth)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout) == {"name": "ada", "lifted": 0}

        (tmp_path / "ada.token").write_text(guesser.auth.login(username="ada", password=PASSWORD)["token"])
    unknown = bastion_cli("user", "unlock", address, "nobody", *auth)
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    denied = bastion_cli("user", "unlock", address, "ada", "--token-file", str(tmp_path / "ada.token"))
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
