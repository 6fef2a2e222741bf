"""Fixtures that run real ``bastion serve`` processes (see tests/support/server.py).

``server`` is a fresh server per test, unpacking as ``(address, token_file,
process)``; ``server_factory`` starts more, with extra environment (limits).
Every process is stopped in the fixture's finalizer (SIGTERM, then SIGKILL
if it will not go), and must have exited 0. Servers run TLS with
certificates from the session's shared test CA, which every client in the
test process trusts through ``BASTION_CA``; ``server_factory(insecure=True)``
starts a plaintext one. Tests marked ``slow`` are skipped unless selected
with ``-m slow``.

The suite runs on two processes (``-n 2``, pytest-xdist). A test marked
``exclusive`` -- timing assertions, or effects on the whole PostgreSQL
server -- runs with no other test beside it: every test holds a shared lock on
a file of the run while it runs, an exclusive test holds it exclusively.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import inspect
import os
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.support.server import ServerProcess, shared_ca, start_server
from tests.support.stores import drop_created_schemas, store_location

#: Short enough that stopping a server with calls still running is quick.
TEST_GRACE_PERIOD = "3"

StartServer = Callable[..., ServerProcess]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``slow`` tests (full-size checks) run only when asked for: ``pytest -m slow``."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="full-size check: run with -m slow")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


def _run_lock_path(run: str, name: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"bastion-tests-{run}.{name}")


def _run_lock(name: str) -> int | None:
    """A lock file shared by the processes of this ``pytest -n`` run (None when not run so)."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:
        return None
    return os.open(_run_lock_path(run, name), os.O_RDWR | os.O_CREAT, 0o600)


def pytest_configure(config: pytest.Config) -> None:
    """The controller of a ``pytest -n`` run names the run, so that it can remove the run's lock files."""
    if not hasattr(config, "workerinput") and getattr(config.option, "testrunuid", "") is None:
        config.option.testrunuid = uuid.uuid4().hex


def pytest_unconfigure(config: pytest.Config) -> None:
    run = getattr(config.option, "testrunuid", None)
    if not hasattr(config, "workerinput") and run:
        for name in ("turnstile", "lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_run_lock_path(run, name))


_LOCKS: list[int | None] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    """Hold the run's lock while ``item`` runs (setup to teardown): shared, or exclusive when it is marked so.

    An exclusive test first takes the turnstile, so that tests starting on the
    other processes wait behind it instead of keeping the shared lock forever.
    """
    if not _LOCKS:
        _LOCKS.extend((_run_lock("turnstile"), _run_lock("lock")))
    turnstile, lock = _LOCKS
    if turnstile is None or lock is None:
        yield
        return
    exclusive = item.get_closest_marker("exclusive") is not None
    fcntl.flock(turnstile, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    if not exclusive:
        fcntl.flock(turnstile, fcntl.LOCK_UN)
    try:
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        if exclusive:
            fcntl.flock(turnstile, fcntl.LOCK_UN)


@pytest.fixture(autouse=True, scope="session")
def _trust_the_test_ca() -> Iterator[None]:
    """Clients made in the test process trust the shared test CA (via BASTION_CA) by default."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BASTION_CA", str(shared_ca()))
        yield


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[StartServer]:
    started: list[ServerProcess] = []

    def start(
        env: dict[str, str] | None = None,
        name: str | None = None,
        *,
        insecure: bool = False,
        args: tuple[str, ...] = (),
        preexec_fn: Callable[[], None] | None = None,
    ) -> ServerProcess:
        workdir = tmp_path / (name or f"server{len(started)}")
        proc = start_server(
            workdir,
            env={"BASTION_LIMITS__GRACE_PERIOD": TEST_GRACE_PERIOD, **(env or {})},
            insecure=insecure,
            args=args,
            preexec_fn=preexec_fn,
        )
        started.append(proc)
        return proc

    yield start
    codes = {proc.pid: proc.stop() for proc in started}
    # Every server, whatever the test did to it, must still shut down cleanly.
    assert all(code == 0 for code in codes.values()), f"bastion serve exit codes: {codes}"


@pytest.fixture
def server(server_factory: StartServer) -> ServerProcess:
    """A running ``bastion serve`` with the demo service, stopped after the test."""
    return server_factory()


# -- store backends (tests/support/stores.py) -------------------------------------------------

#: Every backend a service test can run its store on; "postgresql" skips without BASTION_TEST_POSTGRES_DSN.
STORE_BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root, or CAP_SYS_ADMIN: skipped otherwise), unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(params=STORE_BACKENDS)
def store_backend(request: pytest.FixtureRequest) -> str:
    """Each store backend in turn: ``"sqlite"``, ``"postgresql"``."""
    return str(request.param)


@pytest.fixture
def store_url(store_backend: str, tmp_path: Path) -> str:
    """A fresh, empty store location of ``store_backend``: ``open_store(store_url)`` in process, or
    ``server_factory(env={"BASTION_STORE": store_url})`` for a real server. Removed after the test."""
    return store_location(store_backend, tmp_path, "service")


@pytest.fixture(autouse=True)
def _drop_test_schemas() -> Iterator[None]:
    """Drop the PostgreSQL schemas ``store_location`` made for the test (nothing to do otherwise)."""
    yield
    drop_created_schemas()


#: How long one ``async def`` test may run (the store suite keeps its own, shorter deadline).
ASYNC_TEST_DEADLINE = 60.0


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run an ``async def`` test in a fresh event loop (``asyncio.run``) under a deadline; no plugin needed."""
    test = pyfuncitem.obj
    if not inspect.iscoroutinefunction(test):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in inspect.signature(test).parameters}

    async def run() -> None:
        async with asyncio.timeout(ASYNC_TEST_DEADLINE):
            await test(**kwargs)

    asyncio.run(run())
    return True
