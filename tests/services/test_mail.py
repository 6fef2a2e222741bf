"""The mailboxes of the messages service over a real store (both backends), through the in-memory pair."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import bastion
from bastion.config import MessagesConfig
from bastion.security.credentials import User
from bastion.security.principal import Principal
from bastion.service import Service
from bastion.services.files import Files
from bastion.services.mail import Mailboxes
from bastion.store import Store, open_store
from bastion.testing import MemoryServer
from tests.support.stores import service_store

pytestmark = pytest.mark.usefixtures("service_backend")

ADA = Principal("ada", frozenset())
BOB = Principal("bob", frozenset({"ops"}))
CY = Principal("cy", frozenset({"ops"}))
EVE = Principal("eve", frozenset())
ROOT = Principal("root", frozenset({"admin"}))  # only admins (and messages.open_roles) may send to role:NAME
DEADLINE = 20.0
UNLIMITED = MessagesConfig(send_rate=0)


class World:
    def __init__(self, server: MemoryServer, mail: Mailboxes, store: Store) -> None:
        self.server, self.mail, self.store = server, mail, store
        self.ada = server.client(principal=ADA)
        self.bob = server.client(principal=BOB)
        self.cy = server.client(principal=CY)
        self.eve = server.client(principal=EVE)
        self.root = server.client(principal=ROOT)


@asynccontextmanager
async def world(tmp_path: Path, config: MessagesConfig) -> AsyncIterator[World]:
    async with open_store(service_store(tmp_path)) as store:
        for p in (ADA, BOB, CY, EVE, ROOT):
            await store.create_user(User(p.name, p.roles))
        mail = Mailboxes(store, config)
        service = Service("messages", refuse_nul=True)  # as Messages declares it
        mail.declare(service)
        files = Files(store, tmp_path / "files")
        await mail.start()
        await files.start()
        try:
            async with MemoryServer([service, files.service]) as server:
                yield World(server, mail, store)
        finally:
            await files.aclose()
            await mail.aclose()


def run(test: Callable[[World], Awaitable[None]], tmp_path: Path, config: MessagesConfig = UNLIMITED) -> None:
    async def main() -> None:
        async with asyncio.timeout(DEADLINE), world(tmp_path, config) as w:
            await test(w)

    asyncio.run(main())


def test_send_inbox_read_mark_delete_and_counts(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        sent = await w.ada.messages.send(to=["bob", "cy"], subject="hello", body=b"hi there", headers={"x-a": "1"})
        assert (sent["recipients"], sent["duplicate"]) == (["bob", "cy"], False)
        await w.cy.messages.send(to=["bob"], subject="second")
        page = await w.bob.messages.inbox()
        assert [(m["id"], m["subject"], m["sender"], m["read"]) for m in page["messages"]] == [
            (2, "second", "cy", False),
            (1, "hello", "ada", False),
        ]  # fmt: skip — newest first
        assert page["next"] is None and page["messages"][1]["send_id"] == sent["id"]
        addresses = len("bob") + len("cy") + len("bob")  # each copy counts its "to"
        assert await w.bob.messages.unread() == {
            "unread": 2, "total": 2, "bytes": 8 + 5 + 4 + 6 + addresses, "max_messages": 10_000,
            "max_bytes": 100 * 1024**2,
        }  # fmt: skip
        message = await w.bob.messages.read(id=1)
        assert (message["body"], message["data"], message["headers"], message["read"]) == (
            b"hi there", None, {"x-a": "1"}, True,
        )  # fmt: skip
        assert (message["sender"], message["to"], message["attachments"]) == ("ada", ["bob", "cy"], [])
        assert (await w.bob.messages.inbox(unread_only=True))["messages"][0]["id"] == 2
        assert await w.bob.messages.mark(ids=[1, 2], read=True) == 1
        assert await w.bob.messages.mark(ids=[1], read=False) == 1
        assert (await w.bob.messages.unread())["unread"] == 1
        assert await w.bob.messages.delete(ids=[1, 2]) == 2
        assert (await w.bob.messages.inbox())["messages"] == []
        assert (await w.cy.messages.unread())["total"] == 1  # cy's copy is cy's own

    run(test, tmp_path)


def test_inbox_pages_both_ways(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        for i in range(7):
            await w.ada.messages.send(to=["bob"], subject=f"m{i}")

        async def walk(**kw: Any) -> list[list[int]]:
            pages, cursor = [], None
            while True:
                page = await w.bob.messages.inbox(limit=3, cursor=cursor, **kw)
                pages.append([m["id"] for m in page["messages"]])
                cursor = page["next"]
                if cursor is None:
                    return pages

        assert await walk() == [[7, 6, 5], [4, 3, 2], [1]]
        assert await walk(oldest_first=True) == [[1, 2, 3], [4, 5, 6], [7]]
        with pytest.raises(bastion.InvalidArgument, match=r"messages\.max_page"):
            await w.bob.messages.inbox(limit=0)

    run(test, tmp_path)


def test_another_users_message_is_not_found_exactly_like_a_missing_one(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        for i in range(3):
            await w.ada.messages.send(to=["bob"], subject=f"secret {i}")
        await w.ada.messages.send(to=["eve"], subject="eve's one")  # eve holds id 1 only

        async def refusal(call: Awaitable[Any]) -> tuple[Any, ...]:
            with pytest.raises(bastion.CallError) as info:
                await call
            e = info.value
            return type(e), e.status, e.message.replace(" 3 ", " N ").replace(" 99 ", " N "), e.details

        for method, args in (("read", {}), ("delete", {}), ("mark", {"read": True})):
            call = getattr(w.eve.messages, method)
            key = "id" if method == "read" else "ids"
            exists_for_bob = await refusal(call(**{key: 3 if key == "id" else [3]}, **args))
            missing = await refusal(call(**{key: 99 if key == "id" else [99]}, **args))
            assert exists_for_bob == missing
            assert exists_for_bob[0] is bastion.NotFound and exists_for_bob[2] == "no message N in your mailbox"
        assert (await w.bob.messages.unread())["total"] == 3  # nothing of bob's changed
        assert (await w.bob.messages.read(id=3))["subject"] == "secret 2"
        assert await w.eve.messages.delete(ids=[1]) == 1
        deleted = await refusal(w.eve.messages.read(id=1))
        assert deleted[0] is bastion.NotFound

    run(test, tmp_path)


def test_ids_past_what_a_mailbox_can_hold_are_not_found_and_cursors_invalid(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        await w.ada.messages.send(to=["bob"], subject="one")
        for huge in (2**63, 2**64 - 1):  # a client may send any uint64; the stores hold 64-bit signed ids
            for call in (
                w.bob.messages.read(id=huge),
                w.bob.messages.mark(ids=[huge]),
                w.bob.messages.delete(ids=[huge]),
            ):
                with pytest.raises(bastion.NotFound) as info:  # was the store refusing the value
                    await call
                assert info.value.message == f"no message {huge} in your mailbox"
            with pytest.raises(bastion.InvalidArgument, match="cursor"):
                await w.bob.messages.inbox(cursor=huge)
        with pytest.raises(bastion.InvalidArgument, match="from_id"):
            await anext(w.bob.stream("messages.watch", from_id=2**64 - 1))
        assert (await w.bob.messages.read(id=1))["subject"] == "one"

    run(test, tmp_path)


def test_the_sender_is_the_principal_and_a_forged_from_is_ignored(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        await w.eve.messages.send(to=["bob"], subject="from the boss", headers={"from": "ada", "From": "admin"})
        message = await w.bob.messages.read(id=1)
        assert message["sender"] == "eve"
        assert message["headers"] == {"from": "ada", "From": "admin"}  # kept as plain headers, nothing more
        for forged in ({"sender": "ada"}, {"from_": "ada"}, {"from": "ada"}):
            with pytest.raises(bastion.InvalidArgument):
                await w.eve.call("messages.send", to=["bob"], subject="x", **forged)
        assert (await w.bob.messages.unread())["total"] == 1

    run(test, tmp_path)


def test_roles_expand_to_their_users_at_send_time(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        sent = await w.root.messages.send(to=["role:ops", "bob", "ada"], subject="all hands")
        assert sent["recipients"] == ["ada", "bob", "cy"]
        assert (await w.cy.messages.read(id=1))["to"] == ["role:ops", "bob", "ada"]
        assert (await w.eve.messages.unread())["total"] == 0
        with pytest.raises(bastion.NotFound, match="no user holds role 'nobody'"):
            await w.root.messages.send(to=["role:nobody"])
        with pytest.raises(bastion.NotFound, match="no user 'zed'; nothing was sent"):
            await w.ada.messages.send(to=["bob", "zed"])
        assert (await w.bob.messages.unread())["total"] == 1
        for bad in ([], ["role:Bad Role"], ["not a name"]):
            with pytest.raises(bastion.InvalidArgument):
                await w.ada.messages.send(to=bad)

    run(test, tmp_path)


def test_addresses_are_bounded_stored_once_each_and_counted_against_the_quota(tmp_path: Path) -> None:
    # "to" is stored in every copy: unbounded and uncounted, one send of 100 000 "bob"s put ~800 KB
    # in bob's mailbox while its byte count grew by the subject alone.
    async def test(w: World) -> None:
        sent = await w.root.messages.send(to=["bob"] * 100_000 + ["role:ops", "bob"], subject="s")
        assert sent["recipients"] == ["bob", "cy"]
        message = await w.bob.messages.read(id=1)
        assert message["to"] == ["bob", "role:ops"]  # each address once, in the order first written
        assert message["size"] == len("s") + len("bob") + len("role:ops")
        assert (await w.cy.messages.unread())["bytes"] == message["size"]
        with pytest.raises(bastion.InvalidArgument, match=r"3 addresses, over messages\.max_recipients \(2\)"):
            await w.root.messages.send(to=["bob", "cy", "role:ops"])  # two users, but three addresses

    run(test, tmp_path, MessagesConfig(send_rate=0, max_recipients=2))


def test_a_trailing_newline_does_not_pass_for_a_valid_name(tmp_path: Path) -> None:
    # "$" also matches before a final newline: "x-kind\n" passed as a header name, "bob\n" as an address.
    async def test(w: World) -> None:
        send = w.ada.messages.send
        with pytest.raises(bastion.InvalidArgument, match="header name"):
            await send(to=["bob"], headers={"x-kind\n": "1"})
        for address in ("bob\n", "role:ops\n"):
            with pytest.raises(bastion.InvalidArgument, match="to: "):
                await send(to=[address])
        with pytest.raises(bastion.InvalidArgument, match="client_id"):
            await send(to=["bob"], client_id="c-1\n")
        assert (await w.bob.messages.unread())["total"] == 0

    run(test, tmp_path)


def test_a_retried_send_is_stored_once(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        first = await w.ada.messages.send(to=["bob"], subject="once", body=b"x", client_id="msg-1")
        again = await w.ada.messages.send(to=["bob"], subject="once", body=b"x", client_id="msg-1")
        assert again == {**first, "duplicate": True}
        assert (await w.bob.messages.unread())["total"] == 1
        with pytest.raises(bastion.AlreadyExists, match="'msg-1' was already used for a different message"):
            await w.ada.messages.send(to=["bob"], subject="changed", body=b"x", client_id="msg-1")
        await w.cy.messages.send(to=["bob"], subject="once", body=b"x", client_id="msg-1")  # cy's own id space
        assert (await w.bob.messages.unread())["total"] == 2
        with pytest.raises(bastion.InvalidArgument, match="client_id"):
            await w.ada.messages.send(to=["bob"], client_id="has space")

    run(test, tmp_path)


def test_a_structured_body_round_trips_and_is_checked(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        data = {"order": 17, "items": [{"sku": "a", "qty": 2.5}, None, True], "note": "ünïcode"}
        await w.ada.messages.send(to=["bob"], subject="order", data=data)
        message = await w.bob.messages.read(id=1)
        assert (message["data"], message["body"]) == (data, b"")
        with pytest.raises(bastion.InvalidArgument, match="not both"):
            await w.ada.messages.send(to=["bob"], body=b"x", data={"a": 1})
        with pytest.raises(bastion.InvalidArgument, match="bytes is not JSON-like"):
            await w.ada.messages.send(to=["bob"], data={"raw": b"\x00"})
        with pytest.raises(bastion.InvalidArgument, match="keys must be text"):
            await w.ada.messages.send(to=["bob"], data={1: "x"})
        deep: Any = "bottom"
        for _ in range(40):
            deep = [deep]
        with pytest.raises(bastion.InvalidArgument, match="nested more than"):
            await w.ada.messages.send(to=["bob"], data=deep)

    run(test, tmp_path)


LIMITS = MessagesConfig(
    max_recipients=2, max_body_bytes=64, max_subject_bytes=16, max_headers=2, max_header_bytes=32,
    mailbox_messages=3, mailbox_bytes=10_000, mailbox_sender_share=1, send_rate=60, send_burst=5,
)  # fmt: skip


def test_limits_refuse_with_clear_errors(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        send = w.ada.messages.send
        with pytest.raises(bastion.InvalidArgument, match=r"over messages\.max_body_bytes \(64\)"):
            await send(to=["bob"], body=b"x" * 65)
        with pytest.raises(bastion.InvalidArgument, match=r"over messages\.max_subject_bytes \(16\)"):
            await send(to=["bob"], subject="s" * 17)
        with pytest.raises(bastion.InvalidArgument, match=r"3 recipients, over messages\.max_recipients \(2\)"):
            await w.root.messages.send(to=["role:ops", "eve"])  # two addresses, three users
        with pytest.raises(bastion.InvalidArgument, match=r"messages\.max_headers"):
            await send(to=["bob"], headers={"a": "1", "b": "2", "c": "3"})
        with pytest.raises(bastion.InvalidArgument, match=r"messages\.max_header_bytes"):
            await send(to=["bob"], headers={"a": "x" * 40})
        with pytest.raises(bastion.InvalidArgument, match="header name"):
            await send(to=["bob"], headers={"bad name": "x"})
        with pytest.raises(bastion.InvalidArgument, match="NUL"):
            await send(to=["bob"], subject="a\x00b")
        for i in range(3):
            await send(to=["bob"], subject=f"m{i}")
        with pytest.raises(bastion.ResourceExhausted) as full:
            await send(to=["cy", "bob"], subject="one too many")
        assert "the mailbox of 'bob' is full (it holds at most 3 messages)" in full.value.message
        assert "messages.mailbox_messages" in full.value.message
        assert full.value.details == {"mailbox": "bob", "limit": "messages"}
        assert (await w.cy.messages.unread())["total"] == 0  # all or nothing
        await send(to=["cy", "eve"])  # 5 deliveries so far: the burst is spent
        with pytest.raises(bastion.ResourceExhausted, match=r"sending too fast.*messages\.send_rate") as fast:
            await send(to=["cy"])
        assert fast.value.retry_after is not None and 0 < fast.value.retry_after <= 1.0
        await w.bob.messages.send(to=["cy"])  # another sender is not held back

    run(test, tmp_path, LIMITS)


def test_attachments_are_the_senders_files_shared_read_only(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        data = b"quarterly numbers"
        info = await w.ada.files.begin_upload(name="q3.txt", size=len(data), sha256=hashlib.sha256(data).hexdigest())
        await w.ada.upload("files.upload", [data], upload_id=info["upload_id"])
        with pytest.raises(bastion.NotFound):
            await w.bob.files.stat(name="q3.txt", owner="ada")
        await w.ada.messages.send(to=["bob", "cy"], subject="report", attachments=["q3.txt"])
        (attachment,) = (await w.bob.messages.read(id=1))["attachments"]
        assert (attachment["name"], attachment["owner"], attachment["size"]) == ("q3.txt", "ada", len(data))
        for reader in (w.bob, w.cy):
            stat = await reader.files.stat(file_id=attachment["file_id"])
            assert stat["access"] == "read"
            with pytest.raises(bastion.PermissionDenied):
                await reader.files.delete(file_id=attachment["file_id"])
        with pytest.raises(bastion.NotFound):
            await w.eve.files.stat(file_id=attachment["file_id"])
        with pytest.raises(bastion.NotFound, match=r"you have no file 'q3\.txt'"):
            await w.bob.messages.send(to=["eve"], attachments=["q3.txt"])  # bob may read it, not pass it on
        assert (await w.eve.messages.unread())["total"] == 0

    run(test, tmp_path)


def test_attachments_of_a_deleted_users_mail_are_not_shared_after_the_hand_over(tmp_path: Path) -> None:
    """Pins documented behaviour (docs/services.md, messages: attachments): attachments are read shares, and the heir
    of a deleted user's files gets them without the shares the old owner made -- mail-made ones included
    (a share row does not say who made it). The message stays; its attachment is NOT_FOUND to recipients
    until the heir shares the file again."""

    async def test(w: World) -> None:
        data = b"quarterly numbers"
        info = await w.ada.files.begin_upload(name="q3.txt", size=len(data), sha256=hashlib.sha256(data).hexdigest())
        await w.ada.upload("files.upload", [data], upload_id=info["upload_id"])
        await w.ada.messages.send(to=["bob"], subject="report", attachments=["q3.txt"])
        (attachment,) = (await w.bob.messages.read(id=1))["attachments"]
        assert (await w.bob.files.stat(file_id=attachment["file_id"]))["access"] == "read"
        await w.store.files_reassign_owner("ada", "cy")  # auth.delete_user("ada", transfer_to="cy")'s files step
        assert (await w.bob.messages.read(id=1))["attachments"] == [attachment]  # the reference stays
        with pytest.raises(bastion.NotFound):
            await w.bob.files.stat(file_id=attachment["file_id"])
        await w.cy.files.share(file_id=attachment["file_id"], user="bob")  # the heir's choice
        assert (await w.bob.files.stat(file_id=attachment["file_id"]))["owner"] == "cy"

    run(test, tmp_path)


def test_watch_replays_from_an_id_then_streams_new_mail(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        await w.ada.messages.send(to=["bob"], subject="before 1")
        await w.ada.messages.send(to=["bob"], subject="before 2")
        live = w.bob.stream("messages.watch")
        assert await anext(live) == {"type": "start", "id": 2, "message": None}
        replay = w.bob.stream("messages.watch", from_id=2)
        assert (await anext(replay))["type"] == "start"
        assert (await anext(replay))["message"]["subject"] == "before 2"
        await w.ada.messages.send(to=["eve"], subject="not bob's")
        await w.cy.messages.send(to=["bob"], subject="new", data={"k": 1})
        for stream in (live, replay):
            event = await anext(stream)
            assert (event["type"], event["id"], event["message"]["subject"]) == ("mail", 3, "new")
            assert (event["message"]["sender"], event["message"]["data"]) == ("cy", {"k": 1})
        await live.aclose()  # type: ignore[attr-defined]
        await replay.aclose()  # type: ignore[attr-defined]
        assert (await w.bob.messages.unread())["unread"] == 3  # watching does not mark mail read

    run(test, tmp_path)


def test_watch_reads_pages_bounded_in_bytes_without_a_gap(tmp_path: Path) -> None:
    """Large and small messages, some deleted: a watch from id 1 yields every one left, in order, once."""

    async def test(w: World) -> None:
        sizes = [200_000, 10, 150_000, 300, 250_000, 5, 5, 100_000] * 10 + [1] * 70
        for i, size in enumerate(sizes):
            await w.ada.messages.send(to=["bob"], subject=str(i + 1), body=b"b" * size)
        gone = list(range(3, len(sizes), 7))
        await w.bob.messages.delete(ids=gone)
        stream = w.bob.stream("messages.watch", from_id=1)
        assert (await anext(stream))["type"] == "start"
        seen = []
        for _ in range(len(sizes) - len(gone)):
            event = await anext(stream)
            assert event["message"]["subject"] == str(event["id"])
            assert len(event["message"]["body"]) == sizes[event["id"] - 1]
            seen.append(event["id"])
        assert seen == [i for i in range(1, len(sizes) + 1) if i not in gone]
        await w.ada.messages.send(to=["bob"], subject="live")
        assert (await anext(stream))["id"] == len(sizes) + 1
        await stream.aclose()  # type: ignore[attr-defined]

    run(test, tmp_path)


def test_watch_hears_mail_committed_by_another_process(tmp_path: Path) -> None:
    """Mail written straight to the store (as another worker or replica would) reaches a watcher by the poll."""

    async def test(w: World) -> None:
        stream = w.bob.stream("messages.watch")
        await anext(stream)
        other = Mailboxes(w.store, UNLIMITED)  # a second process's component, sharing the store
        await other.send(ADA, ["bob"], "elsewhere", b"", None, {}, [], None)
        event = await anext(stream)
        assert (event["id"], event["message"]["subject"]) == (1, "elsewhere")
        await stream.aclose()  # type: ignore[attr-defined]

    run(test, tmp_path)


def test_watches_are_limited_per_user(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        first = w.bob.stream("messages.watch")
        await anext(first)
        with pytest.raises(bastion.ResourceExhausted, match=r"messages\.max_watchers_per_user"):
            await anext(w.bob.stream("messages.watch"))
        other = w.ada.stream("messages.watch")
        await anext(other)
        await first.aclose()  # type: ignore[attr-defined]
        await other.aclose()  # type: ignore[attr-defined]
        with pytest.raises(bastion.InvalidArgument):
            await anext(w.bob.stream("messages.watch", from_id=0))

    run(test, tmp_path, MessagesConfig(send_rate=0, max_watchers_per_user=1))


def test_watches_opened_at_once_cannot_all_pass_the_limits(tmp_path: Path) -> None:
    async def opened(stream: AsyncIterator[Any]) -> str:
        try:
            return str((await anext(stream))["type"])
        except bastion.ResourceExhausted as e:
            return "per user" if "max_watchers_per_user" in e.message else "server"

    async def test(w: World) -> None:
        # Each checked the limits, then read its mailbox's head before joining: all used to pass.
        mine = [w.bob.stream("messages.watch") for _ in range(6)]
        assert sorted(await asyncio.gather(*map(opened, mine))) == ["per user"] * 4 + ["start"] * 2
        others = [w.ada.stream("messages.watch") for _ in range(2)]
        assert sorted(await asyncio.gather(*map(opened, others))) == ["server", "start"]
        assert len(w.mail.hub) == 3
        for stream in mine + others:
            await stream.aclose()  # type: ignore[attr-defined]

    run(test, tmp_path, MessagesConfig(send_rate=0, max_watchers=3, max_watchers_per_user=2))


def test_deleting_a_user_deletes_their_mailbox(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        await w.ada.messages.send(to=["eve", "bob"], subject="bye")
        await w.eve.messages.send(to=["bob"], subject="from eve")
        assert await w.store.delete_user("eve")
        assert await w.store.mail_stats("eve") == type(await w.store.mail_stats("eve"))()
        assert (await w.bob.messages.unread())["total"] == 2  # what eve sent stays with bob
        with pytest.raises(bastion.NotFound, match="no user 'eve'"):
            await w.ada.messages.send(to=["eve"])

    run(test, tmp_path)


def test_stopping_the_service_ends_open_watches_with_unavailable(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        stream = w.bob.stream("messages.watch")
        await anext(stream)
        await w.mail.aclose()
        with pytest.raises(bastion.Unavailable, match="watch again with from_id"):
            await anext(stream)

    run(test, tmp_path)


def test_a_principal_without_a_user_account_cannot_send(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        ghost = w.server.client(principal=Principal("ghost", frozenset()))  # e.g. a client certificate, no user
        with pytest.raises(bastion.PermissionDenied, match="needs a user account, and 'ghost' has none"):
            await ghost.messages.send(to=["bob"])
        assert (await ghost.messages.unread())["total"] == 0
        assert (await w.bob.messages.unread())["total"] == 0

    run(test, tmp_path)
