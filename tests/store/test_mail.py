"""The mail domain of every backend: atomic sends, per-mailbox ids, retries, quotas, rate, listing, deletion."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from bastion.exceptions import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from bastion.security.credentials import User
from bastion.store import Store
from bastion.store.mail import MailAttachment, MailDraft, MailLimits, MailStats
from tests.store.conftest import MakeStore

NOW = 1_000_000.0
ROOMY = MailLimits(max_messages=1000, max_bytes=1_000_000)


def draft(sender: str, recipients: list[str], subject: str = "hi", body: bytes = b"body", **kw: object) -> MailDraft:
    fields: dict[str, object] = {
        "sender": sender, "recipients": recipients, "to": recipients, "subject": subject, "body": body,
        "body_kind": "bytes", "headers": {}, "attachments": [], "size": len(body) + len(subject), "at": NOW,
    }  # fmt: skip
    fields.update(kw)
    return msgspec.convert(fields, MailDraft)


async def users(store: Store, *names: str) -> None:
    for name in names:
        assert await store.create_user(User(name))


async def test_a_send_delivers_a_copy_to_each_mailbox_with_its_own_ids(store: Store) -> None:
    await users(store, "ada", "bob", "cy")
    first = await store.mail_send(draft("ada", ["bob", "cy"], "one"), ROOMY)
    assert (sorted(first.recipients), first.duplicate) == (["bob", "cy"], False)
    await store.mail_send(draft("cy", ["bob"], "two"), ROOMY)
    attachment = MailAttachment("f-" + "0" * 32, "a.txt", "ada", 3, "ab" * 32)
    third = await store.mail_send(
        draft("ada", ["bob"], "three", headers={"x-k": "v"}, attachments=[attachment], to=["role:x", "bob"]), ROOMY
    )
    assert third.id > first.id
    inbox = await store.mail_list("bob", None, 10, unread_only=False, newest_first=False, bodies=True)
    assert [(m.id, m.subject, m.sender) for m in inbox] == [(1, "one", "ada"), (2, "two", "cy"), (3, "three", "ada")]
    assert (inbox[0].send_id, inbox[2].send_id) == (first.id, third.id)
    assert (inbox[2].headers, inbox[2].attachments, inbox[2].to) == ({"x-k": "v"}, [attachment], ["role:x", "bob"])
    assert (inbox[0].body, inbox[0].body_kind, inbox[0].read, inbox[0].sent_at) == (b"body", "bytes", False, NOW)
    (cy,) = await store.mail_list("cy", None, 10, unread_only=False, newest_first=True, bodies=True)
    assert (cy.id, cy.send_id, cy.owner) == (1, first.id, "cy")  # cy's own id space
    assert await store.mail_stats("bob") == MailStats(last_id=3, count=3, unread=3, bytes=3 * 4 + 3 + 3 + 5)
    assert await store.mail_stats("nobody") == MailStats()
    assert await store.mail_heads(["bob", "cy", "ada", "nobody"]) == {"bob": 3, "cy": 1}
    assert await store.mail_heads([]) == {}


async def test_listing_pages_both_ways_filters_unread_and_can_leave_bodies_out(store: Store) -> None:
    await users(store, "ada", "bob")
    for i in range(5):
        await store.mail_send(draft("ada", ["bob"], f"m{i}"), ROOMY)

    async def ids(after: int | None, limit: int, **kw: bool) -> list[int]:
        args = {"unread_only": False, "newest_first": True, "bodies": False, **kw}
        return [m.id for m in await store.mail_list("bob", after, limit, **args)]

    assert await ids(None, 2) == [5, 4]
    assert await ids(4, 2) == [3, 2]
    assert await ids(None, 3, newest_first=False) == [1, 2, 3]
    assert await ids(3, 10, newest_first=False) == [4, 5]
    assert await store.mail_mark("bob", [2, 4], True) == 2
    assert await ids(None, 10, unread_only=True) == [5, 3, 1]
    assert await ids(3, 10, unread_only=True, newest_first=False) == [5]
    (bare,) = await store.mail_list("bob", None, 1, unread_only=False, newest_first=True, bodies=False)
    assert (bare.body, bare.subject, bare.size) == (b"", "m4", 6)
    assert await store.mail_list("ada", None, 10, unread_only=False, newest_first=True, bodies=True) == []


async def test_read_mark_and_delete_keep_the_counters_and_never_reuse_an_id(store: Store) -> None:
    await users(store, "ada", "bob")
    for i in range(3):
        await store.mail_send(draft("ada", ["bob"], f"m{i}", body=b"x" * 10), ROOMY)
    got = await store.mail_get("bob", 2)
    assert got is not None and not got.read
    read = await store.mail_get("bob", 2, mark_read=True)
    assert read is not None and read.read and read.subject == "m1"
    assert (await store.mail_get("bob", 2, mark_read=True)) == read  # again: no change
    assert await store.mail_get("bob", 9, mark_read=True) is None
    assert (await store.mail_stats("bob")).unread == 2
    assert await store.mail_mark("bob", [1, 2, 2], True) == 1
    assert await store.mail_mark("bob", [2], False) == 1
    assert (await store.mail_stats("bob")).unread == 2
    with pytest.raises(NotFound, match="no message 7 in your mailbox"):
        await store.mail_mark("bob", [1, 7], True)
    with pytest.raises(NotFound, match="no message 7 in your mailbox"):
        await store.mail_delete("bob", [3, 7])  # all or nothing: 3 stays
    assert await store.mail_get("bob", 3) is not None
    assert await store.mail_delete("bob", [2, 3]) == 2
    assert await store.mail_stats("bob") == MailStats(last_id=3, count=1, unread=0, bytes=12)
    assert await store.mail_delete("bob", []) == 0 and await store.mail_mark("bob", [], True) == 0
    with pytest.raises(NotFound):
        await store.mail_delete("bob", [3])
    await store.mail_send(draft("ada", ["bob"], "later"), ROOMY)
    listed = await store.mail_list("bob", None, 9, unread_only=False, newest_first=True, bodies=False)
    assert [m.id for m in listed] == [4, 1]


async def test_an_id_past_64_bits_is_invalid_argument_in_reads_and_writes(store: Store) -> None:
    await users(store, "ada", "bob")
    await store.mail_send(draft("ada", ["bob"]), ROOMY)
    for mark_read in (False, True):  # a read, and a write of the group commit
        with pytest.raises(InvalidArgument, match="value rejected"):
            await store.mail_get("bob", 2**63, mark_read=mark_read)
    item = await store.mail_get("bob", 1, mark_read=True)
    assert item is not None and item.read and (await store.mail_stats("bob")).unread == 0


async def test_a_client_id_is_stored_once_and_must_not_change_its_message(store: Store) -> None:
    await users(store, "ada", "bob", "cy")
    sent = await store.mail_send(draft("ada", ["bob", "cy"], client_id="c-1", digest="d1"), ROOMY)
    again = await store.mail_send(draft("ada", ["bob", "cy"], client_id="c-1", digest="d1", at=NOW + 5), ROOMY)
    assert again == msgspec.structs.replace(sent, duplicate=True)
    with pytest.raises(AlreadyExists, match="'c-1' was already used for a different message"):
        await store.mail_send(draft("ada", ["bob"], client_id="c-1", digest="other"), ROOMY)
    other = await store.mail_send(draft("cy", ["bob"], client_id="c-1", digest="d1"), ROOMY)  # per sender
    assert other.id != sent.id and not other.duplicate
    assert (await store.mail_stats("bob")).count == 2
    assert await store.mail_forget_sends(NOW) == 0
    assert await store.mail_forget_sends(NOW + 1) == 2
    fresh = await store.mail_send(draft("ada", ["bob"], client_id="c-1", digest="d1"), ROOMY)  # forgotten: new
    assert fresh.id > other.id and not fresh.duplicate


async def test_a_full_mailbox_refuses_the_whole_send(store: Store) -> None:
    await users(store, "ada", "bob", "cy")
    limits = MailLimits(max_messages=2, max_bytes=100)
    await store.mail_send(draft("ada", ["bob", "cy"]), limits)
    await store.mail_send(draft("ada", ["cy"]), limits)
    with pytest.raises(ResourceExhausted, match="the mailbox of 'cy' is full \\(it holds at most 2 messages\\)") as e:
        await store.mail_send(draft("ada", ["bob", "cy"]), limits)
    assert e.value.details == {"mailbox": "cy", "limit": "messages"}
    assert (await store.mail_stats("bob")).count == 1  # bob did not get it either
    with pytest.raises(ResourceExhausted, match="at most 100 bytes") as e:
        await store.mail_send(draft("ada", ["bob"], body=b"x" * 95), limits)
    assert e.value.details["limit"] == "bytes"
    await store.mail_delete("cy", [1])
    await store.mail_send(draft("ada", ["cy"]), limits)  # room again
    assert await store.mail_stats("cy") == MailStats(last_id=3, count=2, unread=2, bytes=12)


async def test_one_sender_fills_only_its_share_of_anothers_mailbox(store: Store) -> None:
    await users(store, "ada", "bob", "cy")
    limits = MailLimits(max_messages=10, max_bytes=1000, sender_messages=2, sender_bytes=50)
    await store.mail_send(draft("ada", ["bob"]), limits)
    await store.mail_send(draft("ada", ["bob", "cy"]), limits)
    with pytest.raises(ResourceExhausted, match="the mailbox of 'bob' holds as much from you as one sender may") as e:
        await store.mail_send(draft("ada", ["bob", "cy"]), limits)
    assert e.value.details == {"mailbox": "bob", "limit": "sender_messages"}
    assert (await store.mail_stats("cy")).count == 1  # all or none: cy did not get it either
    await store.mail_send(draft("cy", ["bob"]), limits)  # another sender still gets through
    with pytest.raises(ResourceExhausted, match="at most 50 bytes") as e:
        await store.mail_send(draft("ada", ["cy"], body=b"x" * 45), limits)
    assert e.value.details == {"mailbox": "cy", "limit": "sender_bytes"}
    for _ in range(5):  # one's own mailbox counts only against its own quotas
        await store.mail_send(draft("ada", ["ada"], body=b"x" * 45), limits)
    await store.mail_delete("bob", [1])
    await store.mail_send(draft("ada", ["bob"]), limits)  # room again
    assert (await store.mail_stats("bob")).count == 3


async def test_concurrent_sends_cannot_pass_the_sender_share_together(store: Store) -> None:
    await users(store, "ada", "bob")
    limits = MailLimits(max_messages=100, max_bytes=100_000, sender_messages=3, sender_bytes=100_000)

    async def send() -> bool:
        try:
            await store.mail_send(draft("ada", ["bob"]), limits)
        except ResourceExhausted:
            return False
        return True

    assert sorted(await asyncio.gather(*(send() for _ in range(12)))) == [False] * 9 + [True] * 3
    assert (await store.mail_stats("bob")).count == 3


async def test_the_sender_bucket_charges_per_recipient_and_refills(store: Store) -> None:
    await users(store, "ada", "bob", "cy")
    limits = MailLimits(max_messages=100, max_bytes=10_000, rate=60.0, burst=3.0)  # one a second
    await store.mail_send(draft("ada", ["bob", "cy"]), limits)
    with pytest.raises(ResourceExhausted, match="sending too fast") as e:
        await store.mail_send(draft("ada", ["bob", "cy"]), limits)
    assert e.value.retry_after == pytest.approx(1.0)
    await store.mail_send(draft("cy", ["bob", "ada"]), limits)  # another sender has its own bucket
    await store.mail_send(draft("ada", ["bob"]), limits)  # the last token
    with pytest.raises(ResourceExhausted):
        await store.mail_send(draft("ada", ["bob"]), limits)
    await store.mail_send(draft("ada", ["bob", "cy"], at=NOW + 2.5), limits)
    assert (await store.mail_stats("bob")).count == 4
    await store.mail_send(draft("ada", ["bob"], client_id="k", digest="d", at=NOW + 10), limits)
    await store.mail_send(draft("ada", ["bob"], client_id="k", digest="d", at=NOW + 10), limits)  # a retry is free


async def test_a_clock_behind_does_not_refill_the_sender_bucket_twice(store: Store) -> None:
    """Replicas whose clocks differ share one bucket: a send timed earlier than the bucket must not move it back.

    Before the fix, a send through a replica 60 s behind set the bucket's
    time 60 s back, so the next send through the other replica was refilled
    for those 60 s again: a sender alternating replicas got a fresh burst each time.
    """
    await users(store, "ada", "bob")
    limits = MailLimits(max_messages=1000, max_bytes=100_000, rate=60.0, burst=3.0)  # one a second
    ahead, behind = NOW, NOW - 60
    sent = 0
    for turn in range(12):  # no time passes: the burst, 3, is all there is
        try:
            await store.mail_send(draft("ada", ["bob"], at=behind if turn % 3 == 2 else ahead), limits)
            sent += 1
        except ResourceExhausted:
            pass
    assert sent == 3


async def test_an_unknown_recipient_fails_the_send_and_deleting_a_user_deletes_their_mailbox(store: Store) -> None:
    await users(store, "ada", "bob")
    with pytest.raises(NotFound, match="not a user"):
        await store.mail_send(draft("ada", ["bob", "zed"], client_id="k", digest="d"), ROOMY)
    assert await store.mail_stats("bob") == MailStats()
    sent = await store.mail_send(draft("ada", ["bob"], client_id="k", digest="d"), ROOMY)  # nothing was kept
    assert not sent.duplicate
    await store.mail_send(draft("bob", ["ada"]), ROOMY)
    assert await store.delete_user("bob")
    assert await store.mail_stats("bob") == MailStats()
    assert await store.mail_list("bob", None, 10, unread_only=False, newest_first=True, bodies=True) == []
    assert (await store.mail_stats("ada")).count == 1  # mail bob sent stays with its recipients
    await store.create_user(User("bob"))  # a recreated name starts with an empty mailbox
    await store.mail_send(draft("ada", ["bob"]), ROOMY)
    assert (await store.mail_stats("bob")).last_id == 1


async def test_concurrent_sends_to_one_mailbox_get_consecutive_ids(store: Store) -> None:
    await users(store, "ada", "bob", "cy")
    sends = [store.mail_send(draft(s, ["bob", "cy"], f"{s}{i}"), ROOMY) for i in range(20) for s in ("ada", "cy")]
    await asyncio.gather(*sends)
    for owner in ("bob", "cy"):
        items = await store.mail_list(owner, None, 100, unread_only=False, newest_first=False, bodies=False)
        assert [m.id for m in items] == list(range(1, 41))
        assert sorted(m.subject for m in items) == sorted(f"{s}{i}" for i in range(20) for s in ("ada", "cy"))


async def test_mail_survives_reopening(make_store: MakeStore) -> None:
    async with make_store() as store:
        await users(store, "ada", "bob")
        await store.mail_send(draft("ada", ["bob"], client_id="k", digest="d"), ROOMY)
    async with make_store() as store:
        assert (await store.mail_stats("bob")).count == 1
        assert (await store.mail_send(draft("ada", ["bob"], client_id="k", digest="d"), ROOMY)).duplicate
