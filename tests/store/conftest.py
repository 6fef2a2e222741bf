"""The store suite runs unchanged against every backend.

Fixtures:

``make_store(name="main")``
    an unopened ``Store`` of the test's backend; the same ``name`` within one
    test is the same database, so a test can close it and open it again.
``store``
    ``make_store()``, already open when the test starts and closed after it.

``BACKENDS`` lists the backends every parametrized test runs on: SQLite
(a file under ``tmp_path``) and PostgreSQL (a fresh schema of the database
named by ``BASTION_TEST_POSTGRES_DSN``, dropped after the test; these tests
skip, saying so, when the variable is unset). See tests/support/stores.py.

Tests here may be ``async def``: the hook below runs each one in a fresh
event loop under a deadline, the way the rest of the suite uses
``asyncio.run`` -- no plugin needed.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bastion.store import Store, open_store
from tests.support.stores import store_location

BACKENDS = ["sqlite", "postgresql"]
TEST_DEADLINE = 10.0

MakeStore = Callable[..., Store]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(backend: str, tmp_path: Path) -> MakeStore:
    def make(name: str = "main") -> Store:
        return open_store(store_location(backend, tmp_path, name))

    return make


@pytest.fixture
def store(make_store: MakeStore) -> Store:
    return make_store()  # opened by the hook below, inside the test's event loop


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    test = pyfuncitem.obj
    if not inspect.iscoroutinefunction(test):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in inspect.signature(test).parameters}
    asyncio.run(_run(test, kwargs))
    return True


async def _run(test: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    async with asyncio.timeout(TEST_DEADLINE):
        store = kwargs.get("store")
        if isinstance(store, Store):
            async with store:
                await test(**kwargs)
        else:
            await test(**kwargs)
