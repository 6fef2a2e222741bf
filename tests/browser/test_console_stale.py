"""An older answer never overwrites a newer one in the console.

A view reloads whenever something may have changed (a tab opened again, an
upload ended, new mail arrived), so two loads of the same thing can be on
their way at once, and the network may answer them in either order. Here
the first answer is held back with Playwright's routing: the request goes
to the server at once (``route.fetch``, so the answer is the state of that
moment) but reaches the page only after a newer load's answer has been
shown. The page must keep showing the newer one. Headless Debian Chromium
against a real ``bastion serve``; the server is changed through the native
protocol.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bastion.client.sync import SyncClient
from tests.browser.conftest import PASSWORD, TIMEOUT_MS, ConsoleWorld, log_in, open_page, wait_js


@pytest.fixture(scope="module")
def native(console_world: ConsoleWorld) -> Iterator[SyncClient]:
    with SyncClient(console_world.native, token=console_world.token, timeout=30) as client:
        yield client


@pytest.fixture
def page(browser: Any, console_world: ConsoleWorld) -> Iterator[Any]:
    """A page of its own, logged in as the admin."""
    with open_page(browser, console_world.url) as page:
        log_in(page, console_world.url, "admin", PASSWORD)
        yield page


class Held:
    """The first answer to ``POST /v1/<path>`` from now on, fetched from the server when asked for but
    handed to the page only on ``release()``; later requests to it go through."""

    def __init__(self, page: Any, path: str) -> None:
        self.page = page
        self.path = path
        self.held: list[tuple[Any, Any]] = []
        # Count the page's answers to it that have been read (Response.json resolved): once that count has
        # moved and a task has run after it, the page has done whatever it does with the answer.
        page.evaluate(
            """path => {
              window.answered = window.answered || {};
              window.answered[path] = 0;
              if (window.answeredHook) return;
              window.answeredHook = true;
              const json = Response.prototype.json;
              Response.prototype.json = function () {
                const url = new URL(this.url).pathname, read = json.call(this);
                read.finally(() => { if (url in window.answered) window.answered[url]++; });
                return read;
              };
            }""",
            f"/v1/{path}",
        )
        page.route(f"**/v1/{path}", self._route)

    def _route(self, route: Any) -> None:
        if self.held:
            route.continue_()
        else:
            self.held.append((route, route.fetch()))

    def wait(self, timeout: float = TIMEOUT_MS / 1000) -> None:
        """Until a request has been held."""
        deadline = time.monotonic() + timeout
        while not self.held:
            assert time.monotonic() < deadline, f"no request to /v1/{self.path}"
            self.page.wait_for_timeout(20)

    def release(self) -> None:
        """Hand the held answer to the page, and return once the page has dealt with it."""
        before = self.page.evaluate(f"window.answered['/v1/{self.path}']")
        route, response = self.held[0]
        route.fulfill(response=response)
        wait_js(self.page, f"window.answered['/v1/{self.path}'] > {before}")
        self.page.evaluate("new Promise(resolve => setTimeout(resolve, 0))")  # after the answer's microtasks


def test_an_older_files_list_does_not_overwrite_a_newer_one(page: Any, native: SyncClient) -> None:
    page.click("#nav a[data-tab=files]")
    held = Held(page, "files/list")
    page.click("#nav a[data-tab=files]")  # the Files tab again: a load, held back
    held.wait()
    data = b"arrived between the two loads"
    info = native.call("files.begin_upload", name="late.bin", size=len(data), sha256=hashlib.sha256(data).hexdigest())
    assert native.upload("files.upload", [data], upload_id=info["upload_id"])["complete"]
    page.click("#nav a[data-tab=files]")  # a newer load: answered at once
    page.wait_for_selector("#files-table tr[data-name='late.bin']")
    held.release()
    assert page.is_visible("#files-table tr[data-name='late.bin']")


def test_an_answer_for_the_method_shown_before_is_not_shown(page: Any, native: SyncClient) -> None:
    native.call("kv.put", key="stale/key", value=b"the old method's answer")
    page.click("#nav a[data-tab=explorer]")
    page.click("#methods-list a[data-method='kv.get']")
    held = Held(page, "kv/get")
    page.fill("#method-args [data-arg=key]", "stale/key")
    page.click("#method-call")
    held.wait()
    page.click("#methods-list a[data-method='admin.health']")
    page.click("#method-call")
    wait_js(page, "document.querySelector('#method-result').textContent.includes('\"status\"')")
    shown = page.inner_text("#method-result")
    held.release()
    assert page.inner_text("#method-result") == shown
    assert "stale/key" not in shown


def test_an_older_unread_count_does_not_overwrite_a_newer_one(page: Any, native: SyncClient) -> None:
    page.wait_for_selector("#inbox-live[data-live=yes]", state="attached")  # messages.watch is open
    before = native.call("messages.unread")["unread"]
    wait_js(page, f"document.querySelector('#nav-unread').textContent === '{before}'")
    held = Held(page, "messages/unread")
    native.call("messages.send", to=["admin"], subject="first", body=b"1")
    held.wait()  # the count after the first mail, held back
    native.call("messages.send", to=["admin"], subject="second", body=b"2")
    wait_js(page, f"document.querySelector('#nav-unread').textContent === '{before + 2}'")
    held.release()
    assert page.inner_text("#nav-unread") == str(before + 2)


class SlowCancels:
    """The page's WebSocket, through Playwright: messages pass both ways, except that the page's
    ``stream.cancel`` requests are held back (a slow network, a busy server); ``seen`` holds what the
    server sent."""

    def __init__(self, page: Any) -> None:
        self.seen: list[str] = []
        page.route_web_socket("**/ws", self._connect)

    def _connect(self, ws: Any) -> None:
        server = ws.connect_to_server()

        def from_page(message: str | bytes) -> None:
            if '"stream.cancel"' not in str(message):
                server.send(message)

        def from_server(message: str | bytes) -> None:
            self.seen.append(str(message))
            ws.send(message)

        ws.on_message(from_page)
        server.on_message(from_server)


def test_a_replaced_watch_shows_nothing_more(browser: Any, console_world: ConsoleWorld, native: SyncClient) -> None:
    with open_page(browser, console_world.url) as page:
        sockets = SlowCancels(page)
        log_in(page, console_world.url, "admin", PASSWORD, tab="kv")
        page.fill("#kv-prefix", "watched/old/")
        page.check("#kv-watch")
        page.wait_for_selector("#kv-events li:has-text('watching from version')")
        # List another prefix while watching: the watch moves to it. The old watch's cancel is on its way
        # (held back here), so the server still sends the old prefix's changes.
        page.fill("#kv-prefix", "watched/new/")
        page.click("#kv-filter button[type=submit]")
        page.wait_for_selector("#kv-events li:nth-child(2):has-text('watching from version')")
        native.call("kv.put", key="watched/old/a", value=b"for the old watch")
        native.call("kv.put", key="watched/new/b", value=b"for the new one")
        page.wait_for_selector("#kv-events li[data-key='watched/new/b']")
        until(page, lambda: any("watched/old/a" in m for m in sockets.seen))
        page.evaluate("new Promise(resolve => setTimeout(resolve, 0))")  # the page has handled it
        assert page.query_selector("#kv-events li[data-key='watched/old/a']") is None
        assert page.is_checked("#kv-watch")


def test_a_stopped_subscription_shows_nothing_more(
    browser: Any, console_world: ConsoleWorld, native: SyncClient
) -> None:
    with open_page(browser, console_world.url) as page:
        sockets = SlowCancels(page)
        log_in(page, console_world.url, "admin", PASSWORD, tab="topics")
        page.fill("#sub-pattern", "user.admin.tail")
        page.click("#sub-start")
        page.wait_for_selector("#sub-status[data-state=live]")
        native.call("messages.publish", topic="user.admin.tail", payload="before the stop")
        page.wait_for_selector("#tail-table tr[data-topic='user.admin.tail']")
        page.click("#sub-stop")  # its cancel is held back: the server goes on sending
        page.wait_for_selector("#sub-status[data-state=ended]")
        assert "stopped (1 message received)" in page.inner_text("#sub-status")
        native.call("messages.publish", topic="user.admin.tail", payload="after the stop")
        until(page, lambda: any("after the stop" in m for m in sockets.seen))
        page.evaluate("new Promise(resolve => setTimeout(resolve, 0))")  # the page has handled it
        assert page.eval_on_selector_all("#tail-table tbody tr", "rows => rows.length") == 1
        assert "stopped (1 message received)" in page.inner_text("#sub-status")
        assert page.is_enabled("#sub-start")


def until(page: Any, predicate: Any, timeout: float = TIMEOUT_MS / 1000) -> None:
    """Let the page run until ``predicate()`` is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not true in time"
        page.wait_for_timeout(20)


def test_the_dashboard_waits_for_a_slow_sample(page: Any) -> None:
    """The dashboard samples admin.stats every second; while an answer is late, no second sample
    overlaps it (its answer could land first and the rates be computed from samples out of order)."""
    held: list[Any] = []
    page.route("**/v1/admin/stats", lambda route: held.append(route))
    until(page, lambda: held)
    # Three ticks of the dashboard's clock with that answer outstanding.
    page.evaluate("new Promise(resolve => setTimeout(resolve, 3000))")
    assert len(held) == 1
    held[0].continue_()
    page.unroute("**/v1/admin/stats")
    before = page.evaluate("document.querySelector('#dash-note').textContent")
    wait_js(page, f"document.querySelector('#dash-note').textContent !== {before!r}")  # sampling goes on
