"""A real ``bastion serve`` with its HTTP gateway, and a headless Chromium to drive it.

``console_world`` (one per module) runs ``bastion serve --http-port 0`` as a
separate process (tests/support/server.py), with TLS from the test session's
CA, the built-in services, and the demo jobs (``tests/support/demo_jobs.py``
as ``demo_jobs:registry``, with short lease and poll intervals). The
bootstrap ``admin`` gets a password through the native protocol, so the
browser can log in. Tests talk to it as outside clients do: the browser over
HTTPS/WSS, bastion's ``SyncClient`` natively (verifying the certificate).

``browser`` launches Debian's Chromium (``/usr/bin/chromium``, installed by
.ci/run; never a Playwright browser download) headless. The page context
uses ``ignore_https_errors=True``: Chromium keeps its own trust store (NSS),
which the test does not modify, so it does not trust the test CA; the
native client in the same tests does verify the certificate against it.

``open_page`` gives a test its own page in a fresh browser context (no
cookies: logged out) and, as it closes, fails the test if the page logged an
error (a CSP violation, a script error) or loaded anything from outside the
gateway; ``log_in`` logs a page in through the login form. Each test builds
what it needs from these, so any test runs alone or in any order.

Screenshots go to ``test-artifacts/screenshots/`` at the repository root
(git-ignored), kept for a human to look at after the run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import bastion
from bastion.client.sync import SyncClient
from tests.support.server import ServerProcess, start_server

CHROMIUM = Path("/usr/bin/chromium")
PASSWORD = "correct horse battery"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
SUPPORT = Path(__file__).resolve().parents[1] / "support"
TIMEOUT_MS = 15_000  # a page's default wait


class ConsoleWorld:
    """The running server: ``url`` (the gateway), ``native`` (host:port), ``token`` (admin's API token)."""

    def __init__(self, server: ServerProcess) -> None:
        assert server.gateway_url is not None
        self.server = server
        self.url: str = server.gateway_url
        self.native = server.address
        self.token = server.token


@pytest.fixture(scope="module")
def console_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleWorld]:
    env = {
        # The demo jobs, and the bastion under test first (not whatever bastion the interpreter has installed).
        "PYTHONPATH": os.pathsep.join([str(SUPPORT), str(Path(bastion.__file__).resolve().parents[1])]),
        "BASTION_JOBS__MODULES": "demo_jobs:registry",
        "BASTION_JOBS__LEASE": "1.5",
        "BASTION_JOBS__POLL_INTERVAL": "0.2",
        "BASTION_LIMITS__GRACE_PERIOD": "2",
    }
    server = start_server(tmp_path_factory.mktemp("console"), env=env, http=True)
    try:
        world = ConsoleWorld(server)
        with SyncClient(world.native, token=world.token, timeout=30) as admin:
            admin.call("auth.set_password", name="admin", password=PASSWORD)
        yield world
    finally:
        code = server.stop()
    assert code == 0, f"bastion serve exited with {code}:\n{server.log()}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


class PageLog:
    """Console errors, page errors and requests that left the gateway's origin."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.errors: list[str] = []
        self.foreign: list[str] = []

    def attach(self, page: Any) -> None:
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on(
            "request",
            lambda r: None if r.url.startswith((self.origin, "blob:", "data:")) else self.foreign.append(r.url),
        )

    def check(self) -> None:
        """Fail on any error the page logged, and on any request that left the gateway's origin.

        Expected refusals (a wrong password, a stale version) are answered 4xx, which Chromium logs as
        "Failed to load resource"; anything else -- a CSP violation, a script error -- fails.
        """
        unexpected = [e for e in self.errors if "Failed to load resource" not in e]
        assert unexpected == [], f"the page logged errors: {unexpected}"
        assert self.foreign == [], f"the page loaded from elsewhere: {self.foreign}"


@contextmanager
def open_page(browser: Any, origin: str, **options: Any) -> Iterator[Any]:
    """A page in a fresh browser context (logged out), checked by a PageLog when it closes."""
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900}, **options)
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        log = PageLog(origin)
        log.attach(page)
        yield page
    finally:
        context.close()
    log.check()


def log_in(page: Any, url: str, user: str, password: str, tab: str = "dashboard") -> None:
    """Log ``page`` in as ``user`` through the console's login form; return once ``tab`` shows."""
    page.goto(f"{url}/#{tab}")
    page.fill("#login-user", user)
    page.fill("#login-password", password)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector(f"#nav a[data-tab={tab}].active")


def wait_js(page: Any, expression: str, timeout: float = TIMEOUT_MS / 1000) -> None:
    """Poll a JavaScript expression until it is truthy.

    Not ``page.wait_for_function``: that evaluates its predicate with ``eval``
    inside the page, which the console's CSP (rightly) forbids.
    """
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true in {timeout} s: {expression}")
        page.wait_for_timeout(50)


def screenshot(page: Any, name: str) -> Path:
    """Save a full-page screenshot as test-artifacts/screenshots/<name>.png; its path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
