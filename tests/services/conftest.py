"""Run the built-in services' tests on every store backend.

A test module opts in with ``pytestmark = pytest.mark.usefixtures("service_backend")``
and opens its store with ``open_store(service_store(tmp_path))``: each of its
tests then runs once on SQLite and once on PostgreSQL (skipped, with the
reason, when ``BASTION_TEST_POSTGRES_DSN`` is unset). The PostgreSQL schema
is fresh per test and dropped after it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.stores import service_backends, store_location


@pytest.fixture(params=["sqlite", "postgresql"])
def service_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    backend = str(request.param)
    store_location(backend, tmp_path, "service")  # skips here, before the test, if PostgreSQL is not configured
    service_backends[tmp_path] = backend
    yield backend
    service_backends.pop(tmp_path, None)
