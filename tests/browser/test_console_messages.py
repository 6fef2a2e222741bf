"""The console's Inbox and Topics views in a real browser (headless Debian Chromium, Playwright).

A user without the admin role logs in to the console of a real
``bastion serve`` -- each test its own user (``ada1``, ``ada2``, ...: an
empty mailbox), with the mail it needs sent natively first, and its own
page, so any test runs alone or in any order. Mail an admin sends her natively arrives in her inbox
live (``messages.watch`` over /ws), unread; she opens it (its body shown as
text, never as HTML; a body that is not UTF-8 as a hex summary), marks it
unread, deletes one, pages through a longer inbox and answers from the
compose form. On the Topics view she tails a pattern while a native client
publishes to a durable and a live topic, publishes from the form herself,
stops the tail, and sees the "lagged" signal when the server ends a
subscription that fell behind (a payload larger than the server's
``subscriber_buffer_bytes``), then resumes from the offset it names. Every
step is checked through the native protocol as ``ada`` or the admin;
screenshots go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from bastion.client.sync import SyncClient
from tests.browser.conftest import ConsoleWorld, log_in, open_page, screenshot, wait_js
from tests.support.server import start_server

PASSWORD = "ada's long passphrase"
CONFIG = """\
[messages.topics]
subscriber_buffer_bytes = 4096

[[messages.topics.durable]]
pattern = "orders.>"

[[messages.topics.rules]]
pattern = "orders.>"
publish = ["*"]
subscribe = ["*"]

[[messages.topics.rules]]
pattern = "chat.>"
publish = ["*"]
subscribe = ["*"]
"""


class World:
    """The server, and a native client as the admin (TLS verified against the test CA)."""

    def __init__(self, console: ConsoleWorld, admin: SyncClient) -> None:
        self.console, self.admin = console, admin
        self.users = itertools.count(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("console-messages")
    config = workdir / "bastion.toml"
    config.write_text(CONFIG)
    server = start_server(workdir, env={"BASTION_CONFIG": str(config)}, http=True)
    try:
        console = ConsoleWorld(server)
        with SyncClient(console.native, token=console.token, timeout=30) as admin:
            yield World(console, admin)
    finally:
        code = server.stop()
    assert code == 0, f"bastion serve exited with {code}:\n{server.log()}"


class Ada:
    """This test's user: ``name``, and ``native``, a native client as her."""

    def __init__(self, name: str, native: SyncClient) -> None:
        self.name, self.native = name, native


@pytest.fixture
def ada(world: World) -> Iterator[Ada]:
    """A user of her own for this test (no admin role, an empty mailbox)."""
    name = f"ada{next(world.users)}"
    world.admin.call("auth.create_user", name=name, password=PASSWORD)
    token = world.admin.call("auth.create_token", user=name, label="native")["token"]
    with SyncClient(world.console.native, token=token, timeout=30) as native:
        yield Ada(name, native)


@pytest.fixture
def page(browser: Any, world: World, ada: Ada) -> Iterator[Any]:
    """A page of its own, not logged in (each test logs in once its mail is there)."""
    with open_page(browser, world.console.url) as page:
        yield page


def open_inbox(page: Any, world: World, ada: Ada) -> None:
    """Log in as ``ada`` onto the Inbox, and wait for its live watch."""
    log_in(page, world.console.url, ada.name, PASSWORD, tab="inbox")
    page.wait_for_selector("#inbox-live[data-live=yes]")  # messages.watch is open


def ada_inbox(ada: Ada) -> dict[int, dict[str, Any]]:
    """Her mailbox as the server has it, by id."""
    return {m["id"]: m for m in ada.native.call("messages.inbox")["messages"]}


QUARTERLY = "Hello Ada,\n<script>document.title = 'pwned'</script><b>not bold</b>\n— admin"


def send_quarterly(world: World, ada: Ada) -> None:
    """Message 1: a report whose subject and body look like markup (they must stay text)."""
    world.admin.call(
        "messages.send", to=[ada.name], subject="<i>Quarterly</i> report", body=QUARTERLY.encode(),
        headers={"x-ticket": "42"},
    )  # fmt: skip


def test_log_in_to_the_inbox(page: Any, world: World, ada: Ada) -> None:
    open_inbox(page, world, ada)
    assert "No messages." in page.inner_text("#inbox-table")
    assert page.is_hidden("#nav-unread")


def test_new_mail_arrives_live_and_opens_as_text(page: Any, world: World, ada: Ada) -> None:
    open_inbox(page, world, ada)
    body = QUARTERLY
    send_quarterly(world, ada)
    row = "#inbox-table tr[data-id='1']"
    page.wait_for_selector(f"{row}.unread.fresh")
    assert page.inner_text("#nav-unread") == "1"
    assert "admin" in page.inner_text(row) and "<i>Quarterly</i> report" in page.inner_text(row)
    # Bytes that are not UTF-8, arriving while the page is open.
    world.admin.call("messages.send", to=[ada.name], subject="binary", body=bytes(range(250, 256)) + b"\x00\x01")
    page.wait_for_selector("#inbox-table tr[data-id='2'].unread")
    wait_js(page, "document.querySelector('#nav-unread').textContent === '2'")
    # Newest first.
    assert page.eval_on_selector_all("#inbox-table tbody tr", "rows => rows.map(r => r.dataset.id)") == ["2", "1"]

    page.click(f"{row} a")
    page.wait_for_selector("#message-body[data-id='1']")
    assert page.inner_text("#message-body") == body
    assert page.get_attribute("#message-body", "data-kind") == "text"
    view = page.inner_text("#message-view")
    assert "<i>Quarterly</i> report" in view and "x-ticket" in view and "42" in view
    # Nothing from the message became markup or ran.
    assert (
        page.evaluate("document.querySelectorAll('#message-view script, #message-view b, #inbox-table i').length") == 0
    )
    assert page.title() == "bastion console"
    page.wait_for_selector(f"{row}[data-read=yes]")
    assert ada_inbox(ada)[1]["read"] is True
    wait_js(page, "document.querySelector('#nav-unread').textContent === '1'")
    screenshot(page, "08-inbox")

    page.click("#inbox-table tr[data-id='2'] a")
    page.wait_for_selector("#message-body[data-id='2'][data-kind=binary]")
    text = page.inner_text("#message-body")
    assert "8 B, not UTF-8" in text and "fa fb fc fd fe ff 00 01" in text


def test_mark_unread_and_delete(page: Any, world: World, ada: Ada) -> None:
    send_quarterly(world, ada)
    world.admin.call("messages.send", to=[ada.name], subject="binary", body=bytes(range(250, 256)))
    ada.native.call("messages.mark", ids=[1], read=True)
    open_inbox(page, world, ada)
    page.click("#inbox-table tr[data-id='1'] a")
    page.wait_for_selector("#message-body[data-id='1']")
    page.click("#message-unread")
    page.wait_for_selector("#inbox-table tr[data-id='1'][data-read=no]")
    assert ada_inbox(ada)[1]["read"] is False
    page.check("#inbox-table tr[data-id='2'] input[type=checkbox]")
    page.click("#inbox-delete")
    page.wait_for_selector("#inbox-table tr[data-id='2']", state="detached")
    assert set(ada_inbox(ada)) == {1}
    page.check("#inbox-unread-only")
    page.wait_for_selector("#inbox-table tr[data-id='1'][data-read=no]")
    page.check("#inbox-table tr[data-id='1'] input[type=checkbox]")
    page.click("#inbox-mark-read")
    page.wait_for_selector("#inbox-table td:has-text('No messages.')")  # nothing unread is left
    assert ada_inbox(ada)[1]["read"] is True and page.is_hidden("#nav-unread")
    page.uncheck("#inbox-unread-only")
    page.wait_for_selector("#inbox-table tr[data-id='1'][data-read=yes]")


def test_pages_through_a_longer_inbox(page: Any, world: World, ada: Ada) -> None:
    send_quarterly(world, ada)
    world.admin.call("messages.send", to=[ada.name], subject="deleted", body=b"2")
    ada.native.call("messages.delete", ids=[2])
    open_inbox(page, world, ada)
    for i in range(21):
        world.admin.call("messages.send", to=[ada.name], subject=f"bulk {i}", body=b"x", client_id=f"bulk-{i}")
    page.wait_for_selector("#inbox-table tr[data-id='23']")  # ids 3..23: the newest page shows 23..4
    assert page.eval_on_selector_all("#inbox-table tbody tr", "rows => rows.length") == 20
    page.click("#inbox-older")
    page.wait_for_selector("#inbox-table tr[data-id='1']")
    assert page.eval_on_selector_all("#inbox-table tbody tr", "rows => rows.map(r => r.dataset.id)") == ["3", "1"]
    assert page.is_disabled("#inbox-older")
    page.click("#inbox-newer")
    page.wait_for_selector("#inbox-table tr[data-id='23']")
    assert page.is_disabled("#inbox-newer")
    # Tick the whole page and delete it: the older two move up.
    page.check("#inbox-all")
    page.click("#inbox-delete")
    page.wait_for_selector("#inbox-table tr[data-id='23']", state="detached")
    assert page.eval_on_selector_all("#inbox-table tbody tr", "rows => rows.map(r => r.dataset.id)") == ["3", "1"]
    assert set(ada_inbox(ada)) == {1, 3}
    assert page.is_disabled("#inbox-older")


def test_compose_sends_as_the_signed_in_user(page: Any, world: World, ada: Ada) -> None:
    send_quarterly(world, ada)
    open_inbox(page, world, ada)
    page.click("#inbox-table tr[data-id='1'] a")
    page.wait_for_selector("#message-body[data-id='1']")
    page.click("#message-reply")
    assert page.input_value("#compose-to") == "admin"
    assert page.input_value("#compose-subject") == "Re: <i>Quarterly</i> report"
    page.fill("#compose-body", "Thanks — read it ✓")
    page.click("#compose-form button[type=submit]")
    wait_js(page, "document.querySelector('#toast').textContent.startsWith('sent to admin')")
    mail = [m for m in world.admin.call("messages.inbox")["messages"] if m["sender"] == ada.name]
    assert [(m["sender"], m["subject"]) for m in mail] == [(ada.name, "Re: <i>Quarterly</i> report")]
    assert world.admin.call("messages.read", id=mail[0]["id"])["body"] == "Thanks — read it ✓".encode()
    assert page.input_value("#compose-to") == ""  # the form was reset


def test_topic_tail_and_publish(page: Any, world: World, ada: Ada) -> None:
    open_inbox(page, world, ada)
    page.click("#nav a[data-tab=topics]")
    assert page.input_value("#sub-pattern") == f"user.{ada.name}.>"  # her own space, by default
    page.fill("#sub-pattern", ">")
    page.click("#sub-start")
    page.wait_for_selector("#sub-status[data-state=live]")
    assert world.admin.call("messages.publish", topic="orders.eu", payload="first order") == 1
    assert (
        world.admin.call("messages.publish", topic="orders.eu", payload={"n": 2, "items": ["a"]}, headers={"k": "v"})
        == 2
    )
    assert world.admin.call("messages.publish", topic="chat.lobby", payload="<b>hi</b> all") is None
    world.admin.call("messages.publish", topic="secret.admins", payload="not for ada")  # she may not read it
    page.wait_for_selector("#tail-table tr[data-topic='chat.lobby']")
    rows = page.eval_on_selector_all(
        "#tail-table tbody tr", "rows => rows.map(r => Array.from(r.cells).slice(1).map(c => c.innerText))"
    )
    assert rows == [
        ["orders.eu", "1", "admin", "first order"],
        ["orders.eu", "2", "admin", '{"n":2,"items":["a"]}\nk=v'],
        ["chat.lobby", "live", "admin", "<b>hi</b> all"],
    ]
    assert page.evaluate("document.querySelectorAll('#tail-table b').length") == 0
    # Publish from the form: JSON to the durable topic, then text to a live one; both come back through the tail.
    page.fill("#pub-topic", "orders.web")
    page.fill("#pub-payload", '{"from": "browser"}')
    page.check("#pub-json")
    page.click("#pub-form button[type=submit]")
    page.wait_for_selector("#pub-result[data-offset='1']")
    page.wait_for_selector("#tail-table tr[data-topic='orders.web'][data-offset='1']")
    assert page.inner_text("#tail-table tr[data-topic='orders.web'] td:nth-child(4)") == ada.name
    info = ada.native.call("messages.topic_info", topic="orders.web")
    assert (info["durable"], info["last_offset"]) == (True, 1)
    screenshot(page, "09-topics")
    page.click("#sub-stop")
    page.wait_for_selector("#sub-status[data-state=ended]")
    assert "stopped" in page.inner_text("#sub-status") and "4 messages" in page.inner_text("#sub-status")


def test_lagged_subscriber_is_told_and_resumes(page: Any, world: World, ada: Ada) -> None:
    open_inbox(page, world, ada)
    page.click("#nav a[data-tab=topics]")
    page.fill("#sub-pattern", "orders.big")
    page.fill("#sub-offset", "")
    page.click("#sub-start")
    page.wait_for_selector("#sub-status[data-state=live]")
    # More than subscriber_buffer_bytes (4096) waits for this subscriber at once: the server ends it as lagged.
    assert world.admin.call("messages.publish", topic="orders.big", payload="x" * 5000) == 1
    page.wait_for_selector("#sub-lagged:not([hidden])")
    assert page.get_attribute("#sub-lagged", "data-dropped") == "1"
    assert "Lagged: 1 message dropped" in page.inner_text("#sub-lagged")
    screenshot(page, "10-topics-lagged")
    page.click("#sub-resume")
    page.wait_for_selector("#tail-table tr[data-topic='orders.big'][data-offset='1']")  # replayed from the log
    assert page.is_hidden("#sub-lagged")
    page.click("#sub-stop")
    page.wait_for_selector("#sub-status[data-state=ended]")


def test_a_double_click_turns_one_page(page: Any, world: World, ada: Ada) -> None:
    for i in range(25):  # two pages: 25..6 and 5..1
        world.admin.call("messages.send", to=[ada.name], subject=f"bulk {i}", body=b"x")
    open_inbox(page, world, ada)
    page.wait_for_selector("#inbox-table tr[data-id='25']")
    page.evaluate("() => { const b = document.querySelector('#inbox-older'); b.click(); b.click(); }")
    page.wait_for_selector("#inbox-table tr[data-id='1']")
    assert page.inner_text("#inbox-page") == "page 2"
    page.click("#inbox-newer")  # one click back to the first page
    page.wait_for_selector("#inbox-table tr[data-id='25']")
    assert page.inner_text("#inbox-page") == "page 1"
    assert page.is_disabled("#inbox-newer")
