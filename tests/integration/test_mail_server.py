"""Mailboxes on a running ``bastion serve``: the CLI, isolation between users, deleting a user, replicas."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bastion
from bastion import SyncClient
from bastion.client.aio import Client
from tests.conftest import StartServer
from tests.support.server import ServerProcess, bastion_cli, clean_env
from tests.support.stores import store_location


def _user(server: ServerProcess, name: str, tmp_path: Path, roles: tuple[str, ...] = ()) -> Path:
    """Create ``name``; a file holding their token."""
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as root:
        root.auth.create_user(name=name, roles=list(roles))
        token = root.auth.create_token(user=name)["token"]
    path = tmp_path / f"{name}.token"
    path.write_text(token)
    path.chmod(0o600)
    return path


def test_cli_send_inbox_read_watch(server: ServerProcess, tmp_path: Path) -> None:
    addr = server.address
    # ada is an admin: only admins may send to a role not in messages.open_roles
    ada, bob = _user(server, "ada", tmp_path, ("admin",)), _user(server, "bob", tmp_path, ("ops",))
    as_ada, as_bob = ["--token-file", str(ada)], ["--token-file", str(bob)]
    out = bastion_cli("messages", "send", addr, "--to", "bob", "--subject", "hello", "--body", "hi bob", *as_ada)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "sent 1 to bob"
    (tmp_path / "report.bin").write_bytes(bytes(range(256)))
    report = ["--to", "role:ops", "--subject", "report", "--body-file", str(tmp_path / "report.bin")]
    report += ["--header", "x-kind=monthly", "--client-id", "r-1"]
    out = bastion_cli("messages", "send", addr, *report, "--json", *as_ada)
    assert json.loads(out.stdout)["recipients"] == ["bob"]
    again = bastion_cli("messages", "send", addr, *report, *as_ada)
    assert "(already sent with this client id)" in again.stdout
    data = bastion_cli("messages", "send", addr, "--to", "bob", "--data", '{"n": [1, 2]}', *as_ada)
    assert data.returncode == 0, data.stderr
    lines = bastion_cli("messages", "inbox", addr, *as_bob).stdout.splitlines()
    assert [line.split("\t")[0:2] + line.split("\t")[3:] for line in lines] == [
        ["3", "*", "ada", ""], ["2", "*", "ada", "report"], ["1", "*", "ada", "hello"],
    ]  # fmt: skip
    body = subprocess.run(
        [sys.executable, "-m", "bastion", "messages", "read", addr, "2", *as_bob],
        env=clean_env(), capture_output=True, timeout=20, check=True,
    )  # fmt: skip
    assert body.stdout == bytes(range(256))
    assert "From: ada" in body.stderr.decode() and "x-kind: monthly" in body.stderr.decode()
    assert bastion_cli("messages", "read", addr, "3", *as_bob).stdout.strip() == '{"n":[1,2]}'
    unread = bastion_cli("messages", "inbox", addr, "--unread", "--oldest-first", *as_bob).stdout.splitlines()
    assert [line.split("\t")[0] for line in unread] == ["1"]
    denied = bastion_cli("messages", "read", addr, "1", *as_ada)  # ada's mailbox has no message 1
    assert denied.returncode == 1 and "NOT_FOUND: no message 1 in your mailbox" in denied.stderr
    watch = subprocess.Popen(
        [sys.executable, "-m", "bastion", "messages", "watch", addr, "--from-id", "3", *as_bob],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert watch.stdout is not None
        first = watch.stdout.readline().rstrip("\n")
        bastion_cli("messages", "send", addr, "--to", "bob", "--subject", "live one", *as_ada)
        second = watch.stdout.readline().rstrip("\n")
    finally:
        watch.kill()
        watch.wait(10)
    assert (first, second) == ("3\tada\t", "4\tada\tlive one")


def test_a_cli_watch_ended_by_a_drain_says_which_id_to_resume_from(server_factory: StartServer, tmp_path: Path) -> None:
    """A drain ends messages.watch UNAVAILABLE; the command said only to "watch again with from_id", not
    which: it now names the --from-id that misses nothing."""
    server = server_factory()
    as_admin = ["--token-file", str(server.token_file)]
    sent = bastion_cli("messages", "send", server.address, "--to", "admin", "--subject", "one", *as_admin)
    assert sent.returncode == 0, sent.stderr
    watch = subprocess.Popen(
        [sys.executable, "-m", "bastion", "messages", "watch", server.address, "--from-id", "1", *as_admin],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert watch.stdout is not None
        assert watch.stdout.readline().rstrip("\n") == "1\tadmin\tone"
        assert server.stop() == 0
        _, stderr = watch.communicate(timeout=20)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(10)
    assert watch.returncode == 1 and "UNAVAILABLE" in stderr
    assert "--from-id 2" in stderr, stderr


def test_users_cannot_touch_each_others_mail_and_a_deleted_user_loses_theirs(
    server: ServerProcess, tmp_path: Path
) -> None:
    _user(server, "ada", tmp_path)
    _user(server, "eve", tmp_path)
    tokens = {name: (tmp_path / f"{name}.token").read_text() for name in ("ada", "eve")}

    async def main() -> None:
        async with (
            Client(server.address, token=tokens["ada"]) as ada,
            Client(server.address, token=tokens["eve"]) as eve,
        ):
            for i in range(3):
                await ada.messages.send(to=["ada"], subject=f"private {i}")
            await eve.messages.send(to=["eve"], subject="eve's own", headers={"from": "ada"})
            refusals = []
            for id_ in (2, 3, 42):  # 2 and 3 exist in ada's mailbox only; 42 nowhere
                for call in (eve.messages.read(id=id_), eve.messages.delete(ids=[id_])):
                    with pytest.raises(bastion.NotFound) as info:
                        await call
                    e = info.value
                    refusals.append((e.status, e.message.replace(str(id_), "N"), repr(e.details), e.retry_after))
            assert len(set(refusals)) == 1, refusals
            assert (await ada.messages.unread())["total"] == 3
            own = await eve.messages.read(id=1)
            assert (own["sender"], own["headers"]) == ("eve", {"from": "ada"})  # a forged "from" changes nothing

    asyncio.run(main())
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as root:
        deleted = root.auth.delete_user(name="eve")
        assert deleted["name"] == "eve"
        root.auth.create_user(name="eve")  # the name again: an empty mailbox
        token = root.auth.create_token(user="eve")["token"]
    with SyncClient(server.address, token=token, timeout=10) as eve:
        assert eve.messages.unread()["total"] == 0
        with pytest.raises(bastion.NotFound):
            eve.messages.read(id=1)


def test_mail_sent_through_one_replica_reaches_a_watch_on_another_within_a_second(
    server_factory: StartServer, tmp_path: Path
) -> None:
    location = store_location("postgresql", tmp_path, "shared")
    a = server_factory(env={"BASTION_STORE": location}, name="a")
    b = server_factory(env={"BASTION_STORE": location}, name="b")
    token = (a if a.token_file.exists() else b).token

    async def main() -> list[float]:
        async with Client(a.address, token=token, timeout=10) as on_a, Client(b.address, token=token) as on_b:
            stream = on_a.stream("messages.watch")
            events = stream.__aiter__()
            assert (await anext(events))["type"] == "start"
            delays = []
            for i in range(5):
                sent = time.monotonic()
                await on_b.messages.send(to=["admin"], subject=f"across {i}")
                async with asyncio.timeout(1.0):
                    event = await anext(events)
                delays.append(time.monotonic() - sent)
                assert (event["type"], event["message"]["subject"]) == ("mail", f"across {i}")
            await stream.aclose()
            return delays

    delays = asyncio.run(main())
    assert max(delays) < 1.0, delays


def test_the_cli_shows_control_characters_escaped_so_a_sender_cannot_forge_lines(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A subject or header is any text: printed raw, its newlines, tabs and escapes forged other lines."""
    addr = server.address
    ada, bob = _user(server, "ada", tmp_path), _user(server, "bob", tmp_path)
    forged_line = "\n9\t*\t2026-01-01 00:00:00\tadmin\treset your password"
    with SyncClient(addr, token=ada.read_text(), timeout=10) as client:
        client.messages.send(to=["bob"], subject="hi" + forged_line, headers={"x-note": "a\nFrom: admin\x1b[2K"})
    as_bob = ["--token-file", str(bob)]
    lines = bastion_cli("messages", "inbox", addr, *as_bob).stdout.splitlines()
    assert len(lines) == 1 and lines[0].split("\t")[3] == "ada", lines
    assert lines[0].endswith("hi\\n9\\t*\\t2026-01-01 00:00:00\\tadmin\\treset your password")
    shown = bastion_cli("messages", "read", addr, "1", *as_bob).stderr.splitlines()
    assert [line for line in shown if line.startswith("From:")] == ["From: ada"], shown
    assert "x-note: a\\nFrom: admin\\x1b[2K" in shown
    assert "\x1b" not in "\n".join(shown)
