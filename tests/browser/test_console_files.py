"""The console's Files view when things do not go smoothly: a double click, a failed request, a slow one.

Headless Debian Chromium against a real ``bastion serve`` (see conftest.py).
Requests the page makes are held back or failed with Playwright's routing
(``page.route``) where a test needs a slow or broken network; the server is
checked through the native protocol.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bastion.client.sync import SyncClient
from tests.browser.conftest import PASSWORD, TIMEOUT_MS, ConsoleWorld, log_in, open_page, wait_js

UPLOAD_BUTTON = "#upload-form button[type=submit]"
CHUNKS = "**/v1/files/upload?*"


@pytest.fixture(scope="module")
def native(console_world: ConsoleWorld) -> Iterator[SyncClient]:
    with SyncClient(console_world.native, token=console_world.token, timeout=30) as client:
        yield client


@pytest.fixture
def page(browser: Any, console_world: ConsoleWorld) -> Iterator[Any]:
    """A page of its own, logged in as the admin, on the Files tab."""
    with open_page(browser, console_world.url, accept_downloads=True) as page:
        log_in(page, console_world.url, "admin", PASSWORD, tab="files")
        yield page


def until(page: Any, predicate: Any, timeout: float = TIMEOUT_MS / 1000) -> None:
    """Let the page run until ``predicate()`` is true (the page's events are handled meanwhile)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not true in time"
        page.wait_for_timeout(20)


def choose(page: Any, tmp_path: Path, name: str, size: int) -> bytes:
    """Put a file of ``size`` random bytes named ``name`` in the upload form; its contents."""
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    page.set_input_files("#upload-input", str(path))
    return data


def test_a_double_click_on_upload_starts_one_upload(page: Any, native: SyncClient, tmp_path: Path) -> None:
    data = choose(page, tmp_path, "twice.bin", 700_000)
    begun: list[str] = []
    page.on("request", lambda r: begun.append(r.url) if r.url.endswith("/v1/files/begin_upload") else None)
    # Two clicks before the page can answer the first (what a double click is to the page).
    page.evaluate(f"(() => {{ const b = document.querySelector('{UPLOAD_BUTTON}'); b.click(); b.click(); }})()")
    page.wait_for_selector("#upload-status[data-done='twice.bin']")
    page.wait_for_selector("#files-table tr[data-name='twice.bin']")
    assert len(begun) == 1, begun
    assert native.call("files.uploads")["uploads"] == []  # no second upload holding a quota reservation
    info = native.call("files.stat", name="twice.bin")
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert page.is_enabled(UPLOAD_BUTTON)


def test_a_failed_upload_says_so_and_can_be_sent_again(page: Any, native: SyncClient, tmp_path: Path) -> None:
    data = choose(page, tmp_path, "flaky.bin", 600_000)
    page.route(CHUNKS, lambda route: route.abort())  # the network fails under the first chunk
    page.click(UPLOAD_BUTTON)
    page.wait_for_selector("#upload-status[data-state=failed]")
    assert "upload of flaky.bin failed" in page.inner_text("#upload-status")
    assert "network error" in page.inner_text("#upload-status")
    assert page.get_attribute("#upload-status", "data-done") is None
    assert page.is_enabled(UPLOAD_BUTTON)
    page.unroute(CHUNKS)
    page.click(UPLOAD_BUTTON)
    page.wait_for_selector("#upload-status[data-state=done][data-done='flaky.bin']")
    assert native.call("files.stat", name="flaky.bin")["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_second_upload_is_not_reported_done_before_it_is(page: Any, native: SyncClient, tmp_path: Path) -> None:
    choose(page, tmp_path, "again.bin", 1000)
    page.click(UPLOAD_BUTTON)
    page.wait_for_selector("#upload-status[data-done='again.bin']")
    # The same name again, replacing it, with its bytes held back on the way to the gateway.
    data = choose(page, tmp_path, "again.bin", 2000)
    page.check("#upload-overwrite")
    held: list[Any] = []
    page.route(CHUNKS, lambda route: held.append(route))
    page.click(UPLOAD_BUTTON)
    until(page, lambda: held)
    assert page.get_attribute("#upload-status", "data-done") is None  # not the first upload's "done"
    assert page.is_disabled(UPLOAD_BUTTON)
    assert len(held) == 1
    held[0].continue_()
    page.wait_for_selector("#upload-status[data-done='again.bin']")
    assert native.call("files.stat", name="again.bin")["sha256"] == hashlib.sha256(data).hexdigest()


def put_file(native: SyncClient, name: str, data: bytes) -> None:
    info = native.call("files.begin_upload", name=name, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    assert native.upload("files.upload", [data], upload_id=info["upload_id"])["complete"]


def test_a_download_that_fails_says_so(page: Any, native: SyncClient) -> None:
    put_file(native, "gone.bin", b"deleted before it is downloaded")
    page.click("#nav a[data-tab=files]")
    page.wait_for_selector("#files-table tr[data-name='gone.bin']")
    native.call("files.delete", name="gone.bin")
    page.click("#files-table tr[data-name='gone.bin'] button:has-text('Download')")
    page.wait_for_selector("#download-status[data-state=failed]")
    text = page.inner_text("#download-status")
    assert "download of gone.bin failed" in text and "NOT_FOUND" in text


def test_a_double_click_on_download_downloads_once(
    browser: Any, console_world: ConsoleWorld, native: SyncClient, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    put_file(native, "once.bin", data)
    with open_page(browser, console_world.url, accept_downloads=True) as page:
        sent: list[str] = []

        def connect(ws: Any) -> None:  # the page's WebSocket, passed through; what the page sends is noted
            server = ws.connect_to_server()
            ws.on_message(lambda m: (sent.append(str(m)), server.send(m)))
            server.on_message(ws.send)

        page.route_web_socket("**/ws", connect)
        log_in(page, console_world.url, "admin", PASSWORD, tab="files")
        page.wait_for_selector("#files-table tr[data-name='once.bin']")
        button = "#files-table tr[data-name='once.bin'] button:nth-of-type(1)"
        with page.expect_download() as download:
            page.evaluate("s => { const b = document.querySelector(s); b.click(); b.click(); }", button)
        target = tmp_path / "once.bin"
        download.value.save_as(str(target))
        assert target.read_bytes() == data
        wait_js(page, "document.querySelector('#download-status').textContent.startsWith('downloaded once.bin')")
        assert len([m for m in sent if '"files.download"' in m]) == 1
