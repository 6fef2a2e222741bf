"""The job runner's edges, over a real store (SQLite and PostgreSQL) and real job processes: what a job's
process inherits, where its output goes, and job processes that misbehave (garbage on the result channel,
processes left outside the job's group)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest

from bastion.config import JobsConfig
from bastion.services.jobs import Jobs
from bastion.store import open_store
from bastion.testing import MemoryServer
from tests.services.test_jobs import CONFIG, World, finish
from tests.support import demo_jobs, runner_jobs
from tests.support.stores import service_store

pytestmark = pytest.mark.usefixtures("service_backend")


@asynccontextmanager
async def world(tmp_path: Path, config: JobsConfig) -> AsyncIterator[World]:
    async with open_store(service_store(tmp_path)) as store:
        jobs = Jobs(store, [demo_jobs.registry, runner_jobs.registry], config)
        await jobs.start()
        try:
            async with MemoryServer([jobs.service]) as server:
                yield World(server, jobs, store, tmp_path)
        finally:
            await jobs.aclose()


def run(test: Callable[[World], Awaitable[None]], tmp_path: Path, config: JobsConfig = CONFIG) -> None:
    async def main() -> None:
        async with asyncio.timeout(40), world(tmp_path, config) as w:
            await test(w)

    asyncio.run(main())


def test_a_job_gets_a_minimal_environment_never_the_servers_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BASTION_JOBS_TEST_SECRET", "hunter2-bastion")
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:hunter2-dsn@db/app")
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/ssl/passed.pem")
    monkeypatch.setenv("LC_TIME", "C")

    async def test(w: World) -> None:
        ada = w.client()
        job_id = await ada.jobs.submit(name="environment")
        assert (await finish(ada, job_id))["state"] == "succeeded"
        env = (await ada.jobs.result(id=job_id))["result"]
        # The job's process inherited the server's whole environment: every BASTION_* setting, the
        # database's DSN with its password, any token the server was started with.
        assert not any("hunter2" in value for value in env.values()), env
        assert not [name for name in env if name.startswith("BASTION_")], env
        assert "DATABASE_URL" not in env
        assert env["PATH"] == os.environ["PATH"] and env["LC_TIME"] == "C"  # what a program needs to run
        assert env["SSL_CERT_FILE"] == "/etc/ssl/passed.pem"  # passed on because the config names it
        assert env["JOB_SETTING"] == "from the config"  # set by the config

    config = msgspec.structs.replace(CONFIG, env_pass=["SSL_CERT_FILE"], env={"JOB_SETTING": "from the config"})
    run(test, tmp_path, config)
