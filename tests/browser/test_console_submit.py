"""A form in the console does its action once however often it is clicked, and says when it cannot.

Two clicks before the page can answer the first (what a double click, or
Enter pressed twice, is to the page) must make one request: one job, one
token, one login session. A login the network fails says so on the form
(and is no uncaught error in the page). Headless Debian Chromium against a
real ``bastion serve``; the server is checked through the native protocol.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bastion.client.sync import SyncClient
from tests.browser.conftest import PASSWORD, ConsoleWorld, log_in, open_page, wait_js


@pytest.fixture(scope="module")
def native(console_world: ConsoleWorld) -> Iterator[SyncClient]:
    with SyncClient(console_world.native, token=console_world.token, timeout=30) as client:
        yield client


@pytest.fixture
def fresh_page(browser: Any, console_world: ConsoleWorld) -> Iterator[Any]:
    with open_page(browser, console_world.url) as page:
        yield page


def requests_to(page: Any, path: str) -> list[str]:
    """The URLs of the page's requests to ``path`` from now on (filled in as they are made)."""
    made: list[str] = []
    page.on("request", lambda r: made.append(r.url) if r.url.split("?")[0].endswith(path) else None)
    return made


def click_twice(page: Any, selector: str) -> None:
    page.evaluate("s => { const b = document.querySelector(s); b.click(); b.click(); }", selector)


def test_a_double_click_submits_a_job_once(fresh_page: Any, console_world: ConsoleWorld, native: SyncClient) -> None:
    page = fresh_page
    log_in(page, console_world.url, "admin", PASSWORD, tab="jobs")
    page.wait_for_selector("#job-name option[value=steps]", state="attached")
    page.select_option("#job-name", "steps")
    page.fill("#job-args [data-arg=n]", "1")
    page.fill("#job-args [data-arg=delay]", "0")
    before = len(native.call("jobs.list", limit=1000))
    submits = requests_to(page, "/v1/jobs/submit")
    click_twice(page, "#job-form button[type=submit]")
    wait_js(page, "/^job \\S+ submitted$/.test(document.querySelector('#toast').textContent)")
    page.wait_for_selector("#job-form button[type=submit]:enabled")  # the submit has ended
    assert len(submits) == 1, submits
    assert len(native.call("jobs.list", limit=1000)) == before + 1


def test_a_double_click_creates_one_token(fresh_page: Any, console_world: ConsoleWorld, native: SyncClient) -> None:
    page = fresh_page
    log_in(page, console_world.url, "admin", PASSWORD, tab="users")
    page.fill("#token-user", "admin")
    page.fill("#token-label", "clicked twice")
    creates = requests_to(page, "/v1/auth/create_token")
    click_twice(page, "#token-form button[type=submit]")
    page.wait_for_selector("#token-new:not([hidden])")
    page.wait_for_selector("#token-form button[type=submit]:enabled")
    assert len(creates) == 1, creates
    made = [t for t in native.call("auth.list_tokens", user="admin") if t["label"] == "clicked twice"]
    assert len(made) == 1  # no second token, made and never shown
    assert made[0]["id"] in page.inner_text("#tokens-table")


def test_a_double_click_on_log_in_opens_one_session(fresh_page: Any, console_world: ConsoleWorld) -> None:
    page = fresh_page
    page.goto(console_world.url + "/")
    page.fill("#login-user", "admin")
    page.fill("#login-password", PASSWORD)
    logins = requests_to(page, "/v1/auth/login")
    click_twice(page, "#login-form button[type=submit]")
    page.wait_for_selector("#nav a[data-tab=dashboard].active")
    page.wait_for_selector("#login-form button[type=submit]:enabled", state="attached")
    assert len(logins) == 1, logins  # a second would leave a session token nobody holds, live until it expires


def test_a_login_the_network_fails_says_so(fresh_page: Any, console_world: ConsoleWorld) -> None:
    page = fresh_page
    page.goto(console_world.url + "/")
    page.route("**/v1/auth/login", lambda route: route.abort())
    page.fill("#login-user", "admin")
    page.fill("#login-password", PASSWORD)
    page.click("#login-form button[type=submit]")
    wait_js(page, "document.querySelector('#login-error').textContent.startsWith('cannot reach the server')")
    assert page.is_enabled("#login-form button[type=submit]")
    page.unroute("**/v1/auth/login")
    page.click("#login-form button[type=submit]")  # and it works once the network does
    page.wait_for_selector("#nav a[data-tab=dashboard].active")
