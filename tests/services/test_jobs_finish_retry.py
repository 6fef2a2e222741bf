"""A job's finish whose write committed on PostgreSQL but whose answer never came back (the connection
dropped after COMMIT): the runner tries again, and that retry must recognise the outcome it recorded,
logging it, not "no longer held it: not recorded".

The runner's store reaches PostgreSQL through a loopback relay that, once, forwards the finish
transaction's COMMIT to the server and then closes the connection instead of forwarding the answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bastion.config import JobsConfig
from bastion.security.principal import Principal
from bastion.services.jobs import Jobs
from bastion.store import open_store
from bastion.testing import MemoryServer
from tests.support.demo_jobs import registry
from tests.support.stores import store_location

ADA = Principal("ada", frozenset({"user"}))
FINISH = b"finished_at = $2, result = $3"  # the text of the finish's UPDATE, sent when first prepared


class CommitCut:
    """Relays connections to PostgreSQL; the first connection that sends the finish's UPDATE and then a
    COMMIT has the COMMIT forwarded and its answer dropped with the connection."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.cut = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[CommitCut]:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        try:
            yield self
        finally:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self.target)
        state = {"finishing": False, "committed": False}

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if not self.cut.is_set():
                    state["finishing"] = state["finishing"] or FINISH in data
                    if state["finishing"] and b"COMMIT" in data:
                        state["committed"] = True
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if state["committed"] and not self.cut.is_set():
                    self.cut.set()  # the server has answered the COMMIT: it committed; the answer is lost
                    break
                client_w.write(data)
                await client_w.drain()

        pumps = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._tasks.difference_update(pumps)
            for writer in (client_w, server_w):
                writer.transport.abort()


def through(dsn: str, port: int) -> str:
    """``dsn`` reaching its server at 127.0.0.1:``port``, without TLS (the relay reads the messages)."""
    parts = urllib.parse.urlsplit(dsn)
    netloc = parts.netloc.rpartition("@")
    query = [*urllib.parse.parse_qsl(parts.query), ("sslmode", "disable")]
    host = f"{netloc[0]}@127.0.0.1:{port}" if netloc[1] else f"127.0.0.1:{port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=host, query=urllib.parse.urlencode(query)))


def test_a_finish_committed_but_unanswered_is_recorded_once_and_logged_as_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = store_location("postgresql", tmp_path)
    parts = urllib.parse.urlsplit(dsn)
    caplog.set_level(logging.INFO, logger="bastion.jobs")

    async def main() -> None:
        async with open_store(dsn) as direct:  # migrated, and how the outcome is read back
            relay = CommitCut(parts.hostname or "127.0.0.1", parts.port or 5432)
            async with relay.running(), open_store(through(dsn, relay.port)) as store:
                jobs = Jobs(store, [registry], JobsConfig(concurrency=1, lease=30.0, poll_interval=0.2))
                await jobs.start()
                try:
                    async with MemoryServer([jobs.service]) as server:
                        ada = server.client(principal=ADA)
                        job_id = await ada.jobs.submit(name="add", args={"a": 1, "b": 2})
                        await asyncio.wait_for(relay.cut.wait(), 20)
                        last: dict[str, object] = {}
                        async for status in ada.stream("jobs.watch", id=job_id):
                            last = status  # to its end
                        assert last["state"] == "succeeded", last
                finally:
                    await jobs.aclose()  # its runner's task, and its logging, done
            job = await direct.jobs_get(job_id)
        assert job is not None and (job.state, job.attempts) == ("succeeded", 1)
        messages = [r.getMessage() for r in caplog.records]
        assert any("trying again" in m for m in messages), messages  # the finish did fail once
        assert not any("not recorded" in m for m in messages), messages
        assert any(m == f"jobs: job {job_id} (add) succeeded" for m in messages), messages

    asyncio.run(asyncio.wait_for(main(), 60))
