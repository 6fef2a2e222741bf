"""Who may send to ``role:NAME``, and what a send shows of the role's members (both backends).

Only admins -- who may list the users anyway -- may address any role; a role
in ``messages.open_roles`` anyone may address, without learning who holds it:
not from the answer, an error, or an attachment's shares.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import bastion
from bastion.config import MessagesConfig
from bastion.exceptions import UsageError
from bastion.security.credentials import User
from tests.services.test_mail import World, run

pytestmark = pytest.mark.usefixtures("service_backend")

OPEN_OPS = MessagesConfig(send_rate=0, open_roles=["ops"])


def test_only_admins_may_send_to_a_role_by_default(tmp_path: Path) -> None:
    # Any user could send to role:NAME, and the answer's "recipients" listed every member (auth.list_users
    # is admin-only), while "no user holds role" told an empty role from one with members.
    async def test(w: World) -> None:
        refusals = []
        for sender, role in ((w.ada, "ops"), (w.bob, "ops"), (w.eve, "nobody")):
            with pytest.raises(bastion.PermissionDenied) as denied:
                await sender.messages.send(to=["bob", f"role:{role}"], subject="all hands")
            refusals.append(denied.value.message.replace(role, "ROLE"))
        assert len(set(refusals)) == 1  # the same words whether the role has members, none, or holds the sender
        assert "messages.open_roles" in refusals[0]
        assert [(await c.messages.unread())["total"] for c in (w.bob, w.cy)] == [0, 0]
        sent = await w.root.messages.send(to=["role:ops"], subject="all hands")
        assert sent["recipients"] == ["bob", "cy"]  # an admin may list the users anyway

    run(test, tmp_path)


def test_an_open_role_is_open_to_everyone_without_showing_its_members(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        sent = await w.eve.messages.send(to=["role:ops"], subject="hello ops", client_id="c-1")
        assert (sent["recipients"], sent["duplicate"]) == ([], False)
        again = await w.eve.messages.send(to=["role:ops"], subject="hello ops", client_id="c-1")
        assert (again["recipients"], again["duplicate"]) == ([], True)  # a retry shows no more
        assert (await w.cy.messages.read(id=1))["to"] == ["role:ops"]
        sent = await w.eve.messages.send(to=["role:ops", "bob", "ada"], subject="and you")
        assert sent["recipients"] == ["ada", "bob"]  # only the users named
        assert [(await c.messages.unread())["total"] for c in (w.ada, w.bob, w.cy)] == [1, 2, 2]
        with pytest.raises(bastion.PermissionDenied, match=r"messages\.open_roles"):
            await w.eve.messages.send(to=["role:admin"])
        assert (await w.root.messages.send(to=["role:ops"]))["recipients"] == ["bob", "cy"]

    run(test, tmp_path, OPEN_OPS)


def test_a_full_members_mailbox_is_not_named_to_a_sender_who_cannot_list_users(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        await w.root.messages.send(to=["cy"])
        await w.root.messages.send(to=["cy"])
        with pytest.raises(bastion.ResourceExhausted) as full:
            await w.eve.messages.send(to=["role:ops"])
        assert "cy" not in full.value.message and "role:ops" in full.value.message
        assert "messages.mailbox_messages" in full.value.message
        assert full.value.details == {"limit": "messages"}
        with pytest.raises(bastion.ResourceExhausted, match="the mailbox of 'cy' is full") as named:
            await w.eve.messages.send(to=["role:ops", "cy"])  # named by the sender: said as before
        assert named.value.details == {"mailbox": "cy", "limit": "messages"}
        with pytest.raises(bastion.ResourceExhausted, match="the mailbox of 'cy' is full"):
            await w.root.messages.send(to=["role:ops"])
        assert (await w.bob.messages.unread())["total"] == 0

    config = MessagesConfig(send_rate=0, open_roles=["ops"], mailbox_messages=2, mailbox_sender_share=1)
    run(test, tmp_path, config)


def test_attachments_on_a_role_send_need_an_admin(tmp_path: Path) -> None:
    # Each recipient gets a share of the file, and its owner may list the shares: the members' names.
    async def test(w: World) -> None:
        data = b"minutes"
        digest = hashlib.sha256(data).hexdigest()
        for sender in (w.eve, w.root):
            info = await sender.files.begin_upload(name="m.txt", size=len(data), sha256=digest)
            await sender.upload("files.upload", [data], upload_id=info["upload_id"])
        with pytest.raises(bastion.PermissionDenied, match="attachments"):
            await w.eve.messages.send(to=["role:ops"], attachments=["m.txt"])
        assert (await w.bob.messages.unread())["total"] == 0
        await w.eve.messages.send(to=["bob"], attachments=["m.txt"])  # to users named: as before
        await w.root.messages.send(to=["role:ops"], attachments=["m.txt"])
        (attachment,) = (await w.cy.messages.read(id=1))["attachments"]
        assert (await w.cy.files.stat(file_id=attachment["file_id"]))["access"] == "read"

    run(test, tmp_path, OPEN_OPS)


def test_a_role_too_large_for_one_send_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    # A role send read every user of the store, and only then counted the role's members.
    async def test(w: World) -> None:
        for i in range(12):
            await w.store.create_user(User(f"crowd{i:02}", frozenset({"crowd"})))
        for sender in (w.root, w.eve):
            with pytest.raises(
                bastion.InvalidArgument,
                match=r"role:crowd has more than 10 users, over messages\.max_recipients \(10\)",
            ):
                await sender.messages.send(to=["role:crowd"])
        assert (await w.store.mail_stats("crowd00")).count == 0
        with pytest.raises(bastion.InvalidArgument, match=r"11 recipients, over messages\.max_recipients \(10\)"):
            await w.root.messages.send(to=["role:ops", *(f"crowd{i:02}" for i in range(9))])
        assert (await w.root.messages.send(to=["role:ops", *(f"crowd{i:02}" for i in range(8))]))["recipients"][:2] == [
            "bob", "crowd00",
        ]  # fmt: skip

    run(test, tmp_path, MessagesConfig(send_rate=0, max_recipients=10, open_roles=["crowd"]))


def test_open_roles_are_checked() -> None:
    with pytest.raises(UsageError, match=r"messages\.open_roles: 'Ops Team' is not a role name"):
        MessagesConfig(open_roles=["Ops Team"])
    assert MessagesConfig().open_roles == []
