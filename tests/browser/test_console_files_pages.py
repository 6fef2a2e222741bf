"""The console's Files list a page at a time: Next and Previous follow files.list's cursor.

The list used to be one ``files.list`` call of ``limit: 1000``: a user with
more files never saw the rest. Headless Debian Chromium against a real
``bastion serve`` (its own, so the files here are the only ones); the files
are made and removed through the native protocol.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bastion.client.sync import SyncClient
from tests.browser.conftest import PASSWORD, ConsoleWorld, log_in, open_page, wait_js
from tests.browser.test_console_files import put_file

PAGE = 100  # FILES_PAGE in app.js
COUNT = 2 * PAGE + 5


@pytest.fixture(scope="module")
def native(console_world: ConsoleWorld) -> Iterator[SyncClient]:
    with SyncClient(console_world.native, token=console_world.token, timeout=30) as client:
        for i in range(COUNT):
            put_file(client, f"f{i:03d}", b"%d" % i)
        yield client


def _names(page: Any) -> list[str]:
    return list(page.eval_on_selector_all("#files-table tbody tr", "rows => rows.map(r => r.dataset.name)"))


def _shows(page: Any, first: int, count: int) -> None:
    """Wait until the table shows files f<first> .. f<first+count-1>, then check the pager says so."""
    expected = f"files {first + 1}\u2013{first + count}"  # an en dash
    wait_js(page, f"document.querySelector('#files-range').textContent === {expected!r}")
    assert _names(page) == [f"f{i:03d}" for i in range(first, first + count)]


def test_the_files_list_pages_forward_and_back(browser: Any, console_world: ConsoleWorld, native: SyncClient) -> None:
    with open_page(browser, console_world.url) as page:
        log_in(page, console_world.url, "admin", PASSWORD, tab="files")
        _shows(page, 0, PAGE)
        assert page.is_disabled("#files-prev") and page.is_enabled("#files-next")
        page.dblclick("#files-next")  # a double click turns one page
        _shows(page, PAGE, PAGE)
        page.wait_for_timeout(300)
        _shows(page, PAGE, PAGE)
        assert page.is_enabled("#files-prev")
        page.click("#files-next")
        _shows(page, 2 * PAGE, COUNT - 2 * PAGE)
        wait_js(page, "document.querySelector('#files-next').disabled")  # a short page is the last
        page.click("#files-prev")
        _shows(page, PAGE, PAGE)
        page.click("#files-prev")
        _shows(page, 0, PAGE)
        assert page.is_disabled("#files-prev")


def test_a_full_last_page_turns_off_next_once_the_empty_page_is_found(
    browser: Any, console_world: ConsoleWorld, native: SyncClient
) -> None:
    """files.list gives a ``next`` with every full page; past a full last page there is nothing, and the
    console goes back to the last page, Next off, instead of showing an empty one."""
    for i in range(2 * PAGE, COUNT):
        native.call("files.delete", name=f"f{i:03d}")
    try:
        with open_page(browser, console_world.url) as page:
            log_in(page, console_world.url, "admin", PASSWORD, tab="files")
            _shows(page, 0, PAGE)
            page.click("#files-next")
            _shows(page, PAGE, PAGE)
            page.click("#files-next")
            # Both buttons are off while a page loads: wait for the settled state, Next off and Previous on.
            wait_js(
                page,
                "document.querySelector('#files-next').disabled && !document.querySelector('#files-prev').disabled",
            )
            _shows(page, PAGE, PAGE)
            assert page.is_enabled("#files-prev")
    finally:
        for i in range(2 * PAGE, COUNT):
            put_file(native, f"f{i:03d}", b"%d" % i)
