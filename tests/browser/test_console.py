"""The web console in a real browser: headless Debian Chromium driven by Playwright.

Each test opens its own page (a fresh browser context), logged in as the
admin by a fixture unless logging in is what it tests, and goes through one
part of the console the way an operator would: the dashboard's numbers move
while a native client makes calls; a key is created, edited and watched; a
file is uploaded (in several requests, hashed in the browser) and
downloaded; one job runs to the end and another is cancelled; the method
explorer calls a method from its generated form; an admin creates a user and
a token and revokes it. Every step is checked against the server through the
native protocol, and screenshots are kept in test-artifacts/screenshots/.
Every page must log no error (a CSP violation would show up) and load nothing
from outside the gateway: ``open_page`` checks that as the page closes.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bastion.client.sync import SyncClient
from bastion.exceptions import CallError, NotFound
from tests.browser.conftest import PASSWORD, ConsoleWorld, log_in, open_page, screenshot, wait_js


@pytest.fixture(scope="module")
def native(console_world: ConsoleWorld) -> Iterator[SyncClient]:
    """A native client (TLS verified against the test CA) holding the admin's API token."""
    with SyncClient(console_world.native, token=console_world.token, timeout=30) as client:
        yield client


@pytest.fixture
def fresh_page(browser: Any, console_world: ConsoleWorld) -> Iterator[Any]:
    """A page of its own, not logged in."""
    with open_page(browser, console_world.url, accept_downloads=True) as page:
        yield page


@pytest.fixture
def page(fresh_page: Any, console_world: ConsoleWorld) -> Any:
    """A page of its own, logged in as the admin (on the dashboard)."""
    log_in(fresh_page, console_world.url, "admin", PASSWORD)
    return fresh_page


def number(text: str) -> float:
    """A dashboard tile's number ("1.2k" -> 1200); fails on a dash (no value yet)."""
    match = re.fullmatch(r"([0-9.]+)([kM]?)", text.strip())
    assert match, f"not a number: {text!r}"
    return float(match.group(1)) * {"": 1, "k": 1e3, "M": 1e6}[match.group(2)]


def test_login_refused_then_accepted(fresh_page: Any, console_world: ConsoleWorld) -> None:
    page = fresh_page
    page.goto(console_world.url + "/")
    page.fill("#login-user", "admin")
    page.fill("#login-password", "wrong password")
    page.click("#login-form button[type=submit]")
    wait_js(page, "document.querySelector('#login-error').textContent.length > 0")
    assert page.is_visible("#login-view")
    page.fill("#login-password", PASSWORD)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#nav a[data-tab=dashboard].active")
    assert page.inner_text("#who").startswith("admin")
    cookies = {c["name"]: c for c in page.context.cookies()}
    # Over HTTPS: __Host- names (Secure, Path=/, no Domain), which no other host of the site can plant.
    assert set(cookies) == {"__Host-bastion_session", "__Host-bastion_csrf"}
    session = cookies["__Host-bastion_session"]
    assert session["httpOnly"] and session["secure"] and session["path"] == "/"
    assert session["sameSite"] == "Strict"
    assert not cookies["__Host-bastion_csrf"]["httpOnly"]
    # The session cookie is not readable by the page's scripts.
    assert "bastion_session" not in page.evaluate("document.cookie")


def test_a_planted_plain_session_cookie_does_not_log_the_console_in(
    fresh_page: Any, console_world: ConsoleWorld
) -> None:
    """A same-site page (a sibling subdomain, a plaintext page of the host) planted a plain-named session and
    CSRF pair holding the attacker's own token: the console must not come up as the attacker's session."""
    page = fresh_page
    planted = [("bastion_session", console_world.token), ("bastion_csrf", "known")]
    page.context.add_cookies([{"name": n, "value": v, "url": console_world.url} for n, v in planted])
    page.goto(console_world.url + "/")
    page.wait_for_selector("#login-view", state="visible")
    assert page.is_hidden("#nav") and page.inner_text("#who") == ""
    log_in(page, console_world.url, "admin", PASSWORD)  # the user's own login works beside the planted pair
    assert page.inner_text("#who").startswith("admin")


RATE_ABOVE_20 = (
    "(() => { const t = document.querySelector('#stat-rate').textContent;"
    " return /^[0-9]/.test(t) && parseFloat(t) * (t.endsWith('k') ? 1000 : 1) > 20; })()"
)


def test_dashboard_numbers_move_while_a_client_calls(page: Any, native: SyncClient) -> None:
    page.click("#nav a[data-tab=dashboard]")
    wait_js(page, "/^[0-9]/.test(document.querySelector('#stat-calls').textContent)")
    first = number(page.inner_text("#stat-calls"))
    stop = threading.Event()
    made = [0]

    def calls() -> None:
        while not stop.is_set():
            native.call("admin.health")
            made[0] += 1
            stop.wait(0.005)  # about 150 calls/s: well within the default per-principal rate limit

    worker = threading.Thread(target=calls, daemon=True)
    worker.start()
    try:
        # calls/s climbs above what the dashboard's own polling makes (about 1/s).
        wait_js(page, RATE_ABOVE_20)
        later = number(page.inner_text("#stat-calls"))
        assert later > first + 20
        assert number(page.inner_text("#stat-connections")) >= 1  # the native client's connection
        # Some history on the charts for the screenshot: eight samples of calls/s under load.
        wait_js(page, "Number(document.querySelector('#chart-rate').dataset.samples) >= 8")
        # Still (or again) above 20 with those samples: the tile changes every second and the native
        # client's pace varies on a busy machine, so it is awaited, not read at one instant.
        wait_js(page, RATE_ABOVE_20)
        assert "/" in page.inner_text("#stat-latency")  # p50 / p99 of the calls, from /metrics
        screenshot(page, "01-dashboard")
    finally:
        stop.set()
        worker.join(10)
    assert made[0] > 20
    # The charts were drawn: the calls/s canvas is no longer blank.
    assert page.evaluate(
        "(() => { const c = document.querySelector('#chart-rate');"
        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " for (let i = 3; i < d.length; i += 4) if (d[i]) return true; return false; })()"
    )


def test_edit_a_key_and_watch_changes(page: Any, native: SyncClient) -> None:
    page.click("#nav a[data-tab=kv]")
    page.fill("#kv-prefix", "console/")
    page.check("#kv-watch")
    page.wait_for_selector("#kv-events li:has-text('watching from version')")
    page.fill("#kv-key", "console/greeting")
    page.fill("#kv-value", "hello from the browser")
    page.click("#kv-put")
    page.wait_for_selector("#kv-table tr[data-key='console/greeting']")
    assert native.call("kv.get", key="console/greeting")["value"] == b"hello from the browser"
    # Edit it: the row's Edit button loads key, value and version (so the put is a compare-and-swap).
    page.click("#kv-table tr[data-key='console/greeting'] button")
    assert page.input_value("#kv-value") == "hello from the browser"
    page.fill("#kv-value", "edited ✓")
    page.click("#kv-put")
    page.wait_for_selector("#kv-table tr[data-key='console/greeting'] td:has-text('edited ✓')")
    item = native.call("kv.get", key="console/greeting")
    assert item["value"] == "edited ✓".encode() and item["version"] == int(page.input_value("#kv-version"))
    # A change made elsewhere reaches the page through kv.watch.
    native.call("kv.put", key="console/other", value=b"from a native client")
    page.wait_for_selector("#kv-events li[data-key='console/other'][data-type='put']")
    page.wait_for_selector("#kv-table tr[data-key='console/other']")
    screenshot(page, "02-kv")
    # A stale expected version is refused with the server's ABORTED, and nothing changes.
    page.fill("#kv-version", "1")
    page.click("#kv-put")
    page.wait_for_selector("#toast.bad")
    assert "ABORTED" in page.inner_text("#toast")
    assert native.call("kv.get", key="console/greeting")["value"] == "edited ✓".encode()
    page.fill("#kv-key", "console/other")
    page.fill("#kv-version", "")
    page.click("#kv-delete")
    page.wait_for_selector("#kv-events li[data-key='console/other'][data-type='delete']")
    with pytest.raises(NotFound):
        native.call("kv.get", key="console/other")
    page.uncheck("#kv-watch")


def test_upload_and_download_a_file(page: Any, native: SyncClient, tmp_path: Path) -> None:
    data = os.urandom(1_300_000)  # three upload requests of at most 512 KiB
    source = tmp_path / "sample.bin"
    source.write_bytes(data)
    page.click("#nav a[data-tab=files]")
    page.set_input_files("#upload-input", str(source))
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector("#upload-status[data-done='sample.bin']")
    assert page.evaluate("document.querySelector('#upload-bar').style.width") == "100%"
    info = native.call("files.stat", name="sample.bin")
    assert info["size"] == len(data) and info["sha256"] == hashlib.sha256(data).hexdigest()
    page.wait_for_selector("#files-table tr[data-name='sample.bin']")
    screenshot(page, "03-files")
    with page.expect_download() as download_info:
        page.click("#files-table tr[data-name='sample.bin'] button:has-text('Download')")
    target = tmp_path / "downloaded.bin"
    download_info.value.save_as(str(target))
    assert target.read_bytes() == data
    assert "downloaded sample.bin" in page.inner_text("#download-status")


def submit_job(page: Any, n: int, delay: float) -> str:
    """Submit the ``steps`` job from the Jobs form; its id, as the page's toast names it."""
    page.select_option("#job-name", "steps")
    page.fill("#job-args [data-arg=n]", str(n))
    page.fill("#job-args [data-arg=delay]", str(delay))
    page.evaluate("document.querySelector('#toast').textContent = ''")
    page.click("#job-form button[type=submit]")
    wait_js(page, "/^job \\S+ submitted$/.test(document.querySelector('#toast').textContent)")
    return str(page.inner_text("#toast").split()[1])


def test_run_a_job_and_cancel_another(page: Any, native: SyncClient) -> None:
    page.click("#nav a[data-tab=jobs]")
    page.wait_for_selector("#job-name option[value=steps]", state="attached")
    done = submit_job(page, 4, 0.1)
    page.wait_for_selector(f"#job-{done}[data-state=succeeded]", timeout=20_000)
    assert native.call("jobs.result", id=done)["result"] == 4
    # A long one: watch it make progress, then cancel it from the page.
    job_id = submit_job(page, 200, 0.1)
    page.wait_for_selector(f"#job-{job_id}[data-state=running]", timeout=20_000)
    wait_js(
        page,
        f"(() => {{ const r = document.getElementById('job-{job_id}');"
        " return r && /[1-9][0-9]*%/.test(r.cells[3].textContent); })()",
    )
    screenshot(page, "04-jobs-running")
    page.click(f"#job-{job_id} button:has-text('Cancel')")
    page.wait_for_selector(f"#job-{job_id}[data-state=cancelled]", timeout=20_000)
    assert native.call("jobs.status", id=job_id)["state"] == "cancelled"
    screenshot(page, "05-jobs-cancelled")


def finished_job(native: SyncClient, timeout: float = 30) -> str:
    """The id of a job submitted now and polled (with a deadline) until it has succeeded."""
    job = native.call("jobs.submit", name="steps", args={"n": 1, "delay": 0.0})
    deadline = time.monotonic() + timeout
    while (state := native.call("jobs.status", id=job)["state"]) != "succeeded":
        assert state in ("queued", "running") and time.monotonic() < deadline, f"job {job}: {state}"
        time.sleep(0.05)
    return job


def test_method_explorer_calls_from_a_generated_form(page: Any, native: SyncClient) -> None:
    job = finished_job(native)
    native.call("kv.put", key="explorer/key", value=b"seen by the explorer")
    page.click("#nav a[data-tab=explorer]")
    page.wait_for_selector("#methods-list a[data-method='kv.get']")
    services = page.eval_on_selector_all("#methods-list li.service", "els => els.map(e => e.textContent)")
    assert {"admin", "auth", "kv", "files", "jobs"} <= set(services)
    page.click("#methods-list a[data-method='kv.get']")
    assert "key" in page.inner_text("#method-args")
    page.fill("#method-args [data-arg=key]", "explorer/key")
    page.click("#method-call")
    wait_js(page, "document.querySelector('#method-result').textContent.includes('\"version\"')")
    assert '"key": "explorer/key"' in page.inner_text("#method-result")
    screenshot(page, "06-explorer")
    # A server stream from the explorer: jobs.watch of a finished job gives its status and ends.
    page.click("#methods-list a[data-method='jobs.watch']")
    page.fill("#method-args [data-arg=id]", job)
    page.click("#method-call")
    wait_js(page, "document.querySelector('#method-result').textContent.includes('-- end')")
    assert '"state":"succeeded"' in page.inner_text("#method-result")


def test_users_roles_and_tokens(page: Any, native: SyncClient, console_world: ConsoleWorld) -> None:
    page.click("#nav a[data-tab=users]")
    page.fill("#user-name", "webuser")
    page.fill("#user-password", "a long enough password")
    page.fill("#user-roles", "ops")
    page.click("#user-form button[type=submit]")
    row = "#users-table tr[data-user=webuser]"
    page.wait_for_selector(row)
    page.fill(f"{row} input", "ops, reports")
    page.click(f"{row} button:has-text('Set roles')")
    wait_js(page, "document.querySelector('#toast').textContent.includes('roles of webuser')")
    users = {u["name"]: u for u in native.call("auth.list_users")}
    assert sorted(users["webuser"]["roles"]) == ["ops", "reports"]
    page.fill("#token-user", "webuser")
    page.fill("#token-label", "from the console")
    page.click("#token-form button[type=submit]")
    page.wait_for_selector("#token-new:not([hidden])")
    token = page.inner_text("#token-new").rsplit(" ", 1)[1]
    with SyncClient(console_world.native, token=token, timeout=10) as as_webuser:
        assert as_webuser.call("auth.whoami")["name"] == "webuser"
    made = [t for t in native.call("auth.list_tokens", user="webuser") if t["label"] == "from the console"]
    assert len(made) == 1
    screenshot(page, "07-users")
    page.click(f"#tokens-table tr[data-token='{made[0]['id']}'] button:has-text('Revoke')")
    wait_js(page, f"!document.querySelector(\"#tokens-table tr[data-token='{made[0]['id']}'] button\")")
    with pytest.raises(CallError), SyncClient(console_world.native, token=token, timeout=10) as revoked:
        revoked.call("auth.whoami")
