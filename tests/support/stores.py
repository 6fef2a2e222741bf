"""Fresh, isolated store locations for tests, on either backend.

``store_location(backend, tmp_path, name)`` names an empty database for one
test: for ``"sqlite"`` a file under ``tmp_path``; for ``"postgresql"`` the
server of ``BASTION_TEST_POSTGRES_DSN`` with ``?search_path=<schema>``, a
schema created here, up front, for this test and ``name`` alone (the same
``name`` within one test gives the same schema, so a test can close a store
and open it again). Without the variable the test is skipped, saying why.

Schemas are dropped by ``drop_created_schemas()``, which the autouse
fixture in tests/conftest.py calls after every test. Their names carry a
random per-process prefix, so several pytest runs can share one database.

The schema is created with a short-lived asyncpg connection on a helper
thread (its own event loop), so this works from sync fixtures and from
inside ``async def`` tests alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

__all__ = [
    "POSTGRES_DSN_ENV",
    "drop_created_schemas",
    "limited_role",
    "postgres_dsn",
    "store_location",
    "with_search_path",
]

POSTGRES_DSN_ENV = "BASTION_TEST_POSTGRES_DSN"

T = TypeVar("T")

_RUN = secrets.token_hex(3)  # this process's schemas: bt_<run>_<n>
_schemas: dict[tuple[str, str], str] = {}  # (tmp_path, name) -> schema, for the running test
_lock = threading.Lock()
_counter = 0


def postgres_dsn() -> str:
    """``BASTION_TEST_POSTGRES_DSN``, or skip the test saying how to run it."""
    dsn = os.environ.get(POSTGRES_DSN_ENV, "").strip()
    if not dsn:
        pytest.skip(f"set {POSTGRES_DSN_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test) to run on PostgreSQL")
    return dsn


def with_search_path(dsn: str, schema: str) -> str:
    """``dsn`` with its ``search_path`` server setting set to ``schema`` (replacing any)."""
    parts = urllib.parse.urlsplit(dsn)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k != "search_path"]
    query.append(("search_path", schema))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def store_location(backend: str, tmp_path: Path, name: str = "main") -> str:
    """A fresh store location of ``backend`` for the running test (see the module docstring)."""
    if backend == "sqlite":
        return str(tmp_path / f"{name}.db")
    if backend == "postgresql":
        dsn = postgres_dsn()
        key = (str(tmp_path), name)
        with _lock:
            schema = _schemas.get(key)
        if schema is None:
            schema = _new_schema_name()
            run_sync(lambda: _execute(dsn, f'CREATE SCHEMA "{schema}"'))
            with _lock:
                _schemas[key] = schema
        return with_search_path(dsn, schema)
    raise AssertionError(f"unknown store backend {backend!r}")


def drop_created_schemas() -> None:
    """Drop every schema ``store_location`` created since the last call (no-op if none)."""
    with _lock:
        schemas = list(_schemas.values())
        _schemas.clear()
    if not schemas:
        return
    dsn = postgres_dsn()
    names = ", ".join(f'"{schema}"' for schema in schemas)
    # lock_timeout: a store a test forgot to close must not hang the suite here.
    run_sync(lambda: _execute(dsn, "SET lock_timeout = '10s'", f"DROP SCHEMA IF EXISTS {names} CASCADE"))


@contextlib.contextmanager
def limited_role(location: str) -> Iterator[str]:
    """``location`` (a PostgreSQL one of ``store_location``) as a new role that may read and write the tables its
    schema has now but create nothing in it: USAGE on the schema and DML on its tables, no CREATE (a least-privilege
    application role beside the schema's owner). The role is dropped afterwards; skips if roles cannot be made."""
    dsn = postgres_dsn()
    parts = urllib.parse.urlsplit(location)
    schema = dict(urllib.parse.parse_qsl(parts.query))["search_path"]
    role, password = f"{_new_schema_name()}_app", secrets.token_hex(8)
    try:
        run_sync(
            lambda: _execute(
                dsn,
                f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'",
                f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"',
                f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"',
                f'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA "{schema}" TO "{role}"',
            )
        )
    except asyncpg.InsufficientPrivilegeError:
        pytest.skip(f"{POSTGRES_DSN_ENV}'s role may not create roles")
    try:
        yield urllib.parse.urlunsplit(parts._replace(netloc=f"{role}:{password}@{parts.netloc.rpartition('@')[2]}"))
    finally:
        run_sync(lambda: _execute(dsn, f'DROP OWNED BY "{role}"', f'DROP ROLE "{role}"'))


def run_sync(fn: Callable[[], Awaitable[T]]) -> T:
    """Run the coroutine ``fn()`` to completion on a helper thread with its own event loop."""
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(_awaited(fn)))
        except BaseException as exc:  # handed to the calling thread
            error.append(exc)

    thread = threading.Thread(target=target, name="test-store-admin")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]  # type: ignore[no-any-return]


async def _awaited(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()


def _new_schema_name() -> str:
    global _counter
    with _lock:
        _counter += 1
        return f"bt_{_RUN}_{_counter}"


async def _execute(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


service_backends: dict[Path, str] = {}  # tmp_path of the running test -> backend (tests/services/conftest.py)


def service_store(tmp_path: Path) -> str:
    """The store location of the running service test: its ``service_backend``'s, else SQLite."""
    return store_location(service_backends.get(tmp_path, "sqlite"), tmp_path, "service")
