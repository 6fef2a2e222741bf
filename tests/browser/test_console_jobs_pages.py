"""The console's Jobs list pages on: ``jobs.list`` stops a page early to fit one answer, and a short page
is not the last one.

The list was one ``jobs.list`` call of ``limit: 1000``: jobs with long failure reasons (up to 2000
characters each) fill the 512 KiB a page may hold after about 240 of them, and the console never showed
the rest -- the newest, those just submitted. Headless Debian Chromium against a real ``bastion serve``
(its own, so the jobs here are the only ones); the failed jobs are written into its SQLite store through
bastion's store API, as a runner would leave them, since running 300 failing jobs would take minutes.

It then paged forward from the oldest job until it held 1000: a user with more (10,000 are kept by default) saw
their oldest 1000 and never what they had just submitted. It now asks ``jobs.list`` newest first.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from bastion.client.sync import SyncClient
from bastion.services.jobs_methods import new_job_id
from bastion.store import open_store
from bastion.store.jobs import JobRecord
from tests.browser.conftest import PASSWORD, ConsoleWorld, log_in, open_page, wait_js

COUNT = 300
SHOWN = 1000  # the most jobs the console lists (JOBS_SHOWN in app.js)
REASON = "x" * 2000  # the longest failure reason a job keeps


async def _write_failed_jobs(world: ConsoleWorld, count: int) -> list[str]:
    now = time.time()
    ids = [new_job_id() for _ in range(count)]
    async with open_store(world.server.data_dir / "bastion.db") as store:
        for job_id in ids:
            job = JobRecord(
                id=job_id, owner="admin", name="boom", args=b"\x80", state="failed", attempts=1,
                created_at=now, started_at=now, finished_at=now, error=REASON,
            )  # fmt: skip
            await store.jobs_submit(job)
    return ids


def _write(world: ConsoleWorld, count: int) -> list[str]:
    ids: list[str] = []
    # On a thread of its own: Playwright's sync API already runs an event loop on this one.
    writer = threading.Thread(target=lambda: ids.extend(asyncio.run(_write_failed_jobs(world, count))))
    writer.start()
    writer.join(120)
    assert len(ids) == count
    return ids


def _rows(page: Any) -> list[str]:
    return list(page.eval_on_selector_all("#jobs-table tbody tr", "rows => rows.map(r => r.dataset.job)"))


def test_the_jobs_list_shows_jobs_past_a_page_cut_short(browser: Any, console_world: ConsoleWorld) -> None:
    ids: list[str] = []
    # On a thread of its own: Playwright's sync API already runs an event loop on this one.
    writer = threading.Thread(target=lambda: ids.extend(asyncio.run(_write_failed_jobs(console_world, COUNT))))
    writer.start()
    writer.join(60)
    assert len(ids) == COUNT
    with SyncClient(console_world.native, token=console_world.token, timeout=30) as native:
        first = native.call("jobs.list", limit=1000)
        assert 0 < len(first) < COUNT  # the premise: one page does not hold them all
    with open_page(browser, console_world.url) as page:
        log_in(page, console_world.url, "admin", PASSWORD, tab="jobs")
        wait_js(page, f"document.querySelectorAll('#jobs-table tbody tr').length >= {COUNT}")
        assert _rows(page) == ids[::-1]  # every one of them, newest first
        assert page.is_visible(f"#job-{ids[-1]}")  # the newest, which the first page never reached


def test_the_jobs_list_shows_the_newest_of_more_jobs_than_it_lists(browser: Any, console_world: ConsoleWorld) -> None:
    ids = _write(console_world, SHOWN + 100)  # the newest jobs on this server, whatever ran before
    with SyncClient(console_world.native, token=console_world.token, timeout=30) as native:
        first = native.call("jobs.list", limit=1000, newest_first=True)
        assert 0 < len(first) < SHOWN  # more than a page: the console pages on, back from the newest
    with open_page(browser, console_world.url) as page:
        log_in(page, console_world.url, "admin", PASSWORD, tab="jobs")
        wait_js(page, f"document.querySelectorAll('#jobs-table tbody tr').length >= {SHOWN}")
        assert _rows(page) == ids[::-1][:SHOWN]  # the newest 1000, newest first; the oldest 100 left out
        assert page.is_visible(f"#job-{ids[-1]}")
        assert not page.is_visible(f"#job-{ids[0]}")
