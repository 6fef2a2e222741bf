"""What only the PostgreSQL backend promises: migrations shared by replicas,
schemas chosen by ``search_path``, secrets kept out of messages, and the
connection pool riding out a server that drops or refuses connections.

Every test runs against the real server of ``BASTION_TEST_POSTGRES_DSN``,
each in a fresh schema (tests/support/stores.py); they skip without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.client.sync import SyncClient
from bastion.exceptions import InternalError, InvalidArgument, NotFound, Unavailable, UsageError
from bastion.security.credentials import User
from bastion.store import PostgresStore, Store, open_store, postgres
from bastion.store.migrations import MIGRATIONS, Migration
from bastion.store.postgres import LATEST, POSTGRES_MIGRATIONS, redact_dsn
from tests.support.stores import limited_role, postgres_dsn, store_location

MakeStore = Callable[..., Store]  # the make_store fixture (conftest.py)


@pytest.fixture
def backend() -> str:
    """This module is about PostgreSQL only (overrides the parametrized fixture of conftest.py)."""
    return "postgresql"


def schema_of(location: str) -> str:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))["search_path"]


async def admin_fetch(sql: str, *args: Any) -> list[Any]:
    """Run ``sql`` on a connection of our own (not the store's) and return its rows."""
    conn = await asyncpg.connect(postgres_dsn())
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def recorded(schema: str) -> list[tuple[int, float]]:
    rows = await admin_fetch(f'SELECT version, applied_at FROM "{schema}".schema_version ORDER BY version')
    return [(row[0], row[1]) for row in rows]


async def tables(schema: str) -> set[str]:
    rows = await admin_fetch("SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema)
    return {row[0] for row in rows}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens once the socket is closed


# -- migrations ---------------------------------------------------------------------------------


def test_the_migration_list_matches_sqlites_version_for_version() -> None:
    def summary(migrations: tuple[Migration, ...]) -> list[tuple[int, str, bool]]:
        return [(m.version, m.description, m.compatible) for m in migrations]

    assert summary(POSTGRES_MIGRATIONS) == summary(MIGRATIONS)
    assert MIGRATIONS[-1].version == LATEST


async def test_a_new_schema_gets_every_migration_in_the_search_path_schema(tmp_path: Path) -> None:
    location = store_location("postgresql", tmp_path, "fresh")
    schema = schema_of(location)
    async with open_store(location) as store:
        assert isinstance(store, PostgresStore)
        assert store.schema_version == LATEST
        assert await store.create_user(User("ada"))
    assert [v for v, _ in await recorded(schema)] == list(range(1, LATEST + 1))
    assert {"users", "tokens", "lockouts", "schema_version"} <= await tables(schema)
    rows = await admin_fetch(f'SELECT name FROM "{schema}".users')
    assert [row[0] for row in rows] == ["ada"]


async def test_reopening_applies_nothing_again(make_store: MakeStore, tmp_path: Path) -> None:
    schema = schema_of(store_location("postgresql", tmp_path, "main"))
    async with make_store() as store:
        assert await store.create_user(User("ada"))
    first = await recorded(schema)
    for _ in range(2):
        async with make_store() as store:
            assert store.schema_version == LATEST
            assert await store.get_user("ada") == User("ada")
    assert await recorded(schema) == first  # same rows, same applied_at


async def test_replicas_opening_a_fresh_schema_at_once_migrate_it_once(make_store: MakeStore, tmp_path: Path) -> None:
    schema = schema_of(store_location("postgresql", tmp_path, "main"))
    stores = [make_store() for _ in range(6)]
    await asyncio.gather(*(store.open() for store in stores))
    try:
        assert [store.schema_version for store in stores] == [LATEST] * 6
        assert [v for v, _ in await recorded(schema)] == list(range(1, LATEST + 1))
        assert await stores[0].create_user(User("ada"))
        assert all([await store.get_user("ada") == User("ada") for store in stores])
    finally:
        await asyncio.gather(*(store.close() for store in stores))


async def test_a_new_migration_is_applied_to_an_old_schema_keeping_its_data(tmp_path: Path) -> None:
    location = store_location("postgresql", tmp_path, "main")
    async with PostgresStore(location) as store:
        assert await store.create_user(User("ada"))
    later = Migration(LATEST + 1, "notes", ("CREATE TABLE notes (id BIGINT PRIMARY KEY, body TEXT)",))
    async with PostgresStore(location, migrations=(*POSTGRES_MIGRATIONS, later)) as store:
        assert store.schema_version == LATEST + 1
        assert await store.get_user("ada") == User("ada")
    assert "notes" in await tables(schema_of(location))


async def test_a_role_that_may_not_create_in_the_schema_opens_it_when_nothing_is_to_migrate(tmp_path: Path) -> None:
    """A least-privilege application role (USAGE and DML, no CREATE) opens a schema its owner migrated and uses
    it: with nothing to migrate, opening creates nothing (its CREATE TABLE IF NOT EXISTS schema_version needed
    CREATE on the schema even with the table there, so such a role could not start a server at all)."""
    location = store_location("postgresql", tmp_path)
    async with PostgresStore(location):
        pass
    with limited_role(location) as dsn:
        async with PostgresStore(dsn) as store:
            assert store.schema_version == LATEST
            assert await store.create_user(User("ada"))
            assert await store.get_user("ada") == User("ada")


async def compat(schema: str) -> int | None:
    rows = await admin_fetch(f'SELECT min_version FROM "{schema}".schema_compat')
    return rows[0][0] if rows else None


#: A later schema: one more table (additive, so the code before it still works) ...
NOTES = Migration(LATEST + 1, "notes", ("CREATE TABLE notes (id BIGINT PRIMARY KEY, body TEXT)",), compatible=True)
#: ... and one that code before it must not use (a dropped column).
BREAKING = Migration(LATEST + 1, "tokens lose their label", ("ALTER TABLE tokens DROP COLUMN label",))


async def test_a_schema_records_the_oldest_code_that_may_use_it(tmp_path: Path) -> None:
    location = store_location("postgresql", tmp_path, "main")
    schema = schema_of(location)
    async with PostgresStore(location, migrations=POSTGRES_MIGRATIONS[:5]) as store:  # bastion before migration 6
        assert store.schema_version == 5
        assert await store.create_user(User("ada"))
    assert "schema_compat" not in await tables(schema)
    async with PostgresStore(location) as store:
        assert store.schema_version == LATEST
        assert await store.get_user("ada") == User("ada")
    assert await compat(schema) == 1
    async with PostgresStore(location, migrations=(*POSTGRES_MIGRATIONS, NOTES)):
        pass
    assert await compat(schema) == 1  # notes only adds a table


async def test_a_newer_compatible_schema_is_used_by_older_code_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    location = store_location("postgresql", tmp_path, "main")
    schema = schema_of(location)
    async with PostgresStore(location, migrations=(*POSTGRES_MIGRATIONS, NOTES)) as new:  # replica N+1 migrates
        assert await new.create_user(User("ada"))
        before = await recorded(schema)
        with caplog.at_level(logging.WARNING, logger="bastion.store"):
            async with PostgresStore(location) as old:  # replica N (re)starts beside it
                assert old.schema_version == LATEST + 1
                assert await old.get_user("ada") == User("ada")
                assert await old.create_user(User("bob"))
                assert await new.get_user("bob") == User("bob")
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"has schema version {LATEST + 1}, newer than this bastion knows ({LATEST})" in warning.getMessage()
    assert f"(schema {schema})" in warning.getMessage()
    assert await recorded(schema) == before  # the old code migrated nothing
    assert await compat(schema) == 1


async def test_a_newer_incompatible_schema_is_refused(tmp_path: Path) -> None:
    location = store_location("postgresql", tmp_path, "main")
    schema = schema_of(location)
    async with open_store(location) as store:
        assert await store.create_user(User("ada"))
    async with PostgresStore(location, migrations=(*POSTGRES_MIGRATIONS, BREAKING)) as store:
        assert store.schema_version == LATEST + 1
    assert await compat(schema) == LATEST + 1
    store = open_store(location)
    with pytest.raises(
        UsageError,
        match=rf"schema version {LATEST + 1}, newer than this bastion knows \({LATEST}\) "
        rf"and needs code of schema version {LATEST + 1} or later; upgrade bastion",
    ):
        await store.open()
    with pytest.raises(UsageError):
        await store.get_user("ada")  # it did not half-open
    assert [v for v, _ in await recorded(schema)][-1] == LATEST + 1
    assert await compat(schema) == LATEST + 1


async def test_a_schema_from_a_newer_bastion_without_a_compatibility_record_is_refused(tmp_path: Path) -> None:
    location = store_location("postgresql", tmp_path, "main")
    schema = schema_of(location)
    async with open_store(location) as store:
        assert await store.create_user(User("ada"))
    await admin_fetch(f"INSERT INTO \"{schema}\".schema_version VALUES ($1, 'from the future', 0)", LATEST + 1)
    await admin_fetch(f'DELETE FROM "{schema}".schema_compat')  # as a bastion that does not record it leaves it
    store = open_store(location)
    with pytest.raises(UsageError, match=rf"schema version {LATEST + 1}, newer than this bastion knows \({LATEST}\);"):
        await store.open()
    with pytest.raises(UsageError):
        await store.get_user("ada")  # it did not half-open
    assert [v for v, _ in await recorded(schema)][-1] == LATEST + 1


async def test_a_failing_migration_leaves_the_schema_as_it_was(tmp_path: Path) -> None:
    location = store_location("postgresql", tmp_path, "main")
    schema = schema_of(location)
    async with PostgresStore(location):
        pass
    broken = Migration(LATEST + 1, "broken", ("CREATE TABLE half (x INTEGER)", "THIS IS NOT SQL"))
    with pytest.raises(UsageError, match="migrating failed"):
        await PostgresStore(location, migrations=(*POSTGRES_MIGRATIONS, broken)).open()
    assert [v for v, _ in await recorded(schema)] == list(range(1, LATEST + 1))
    assert "half" not in await tables(schema)


async def test_a_search_path_schema_that_does_not_exist_is_a_clear_usage_error() -> None:
    store = open_store(f"{postgres_dsn()}{'&' if '?' in postgres_dsn() else '?'}search_path=bt_no_such_schema")
    with pytest.raises(UsageError, match="no schema of search_path"):
        await store.open()


async def test_synchronous_commit_off_is_refused(tmp_path: Path) -> None:
    location = store_location("postgresql", tmp_path, "main") + "&synchronous_commit=off"
    with pytest.raises(UsageError, match="synchronous_commit is off"):
        await open_store(location).open()


async def test_fsync_off_on_the_server_is_refused_and_full_page_writes_off_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only synchronous_commit was checked: a server left with fsync=off (after a bulk load, a benchmark) was
    used, and a crash there can lose or corrupt acknowledged writes; it is refused now. full_page_writes=off is
    logged instead (safe on a file system that never tears a page, as ZFS). Both are server-wide (no session or
    role can change them, so this suite cannot turn them off on its shared server): the check is run on the
    values the real server reports, which pass, and on the same values with one turned off."""
    conn = await asyncpg.connect(postgres_dsn(), timeout=10)
    try:
        read = dict((await conn.fetchrow(postgres._DURABILITY_SETTINGS)).items())
        shown = {
            name: await conn.fetchval(f"SHOW {name}") for name in ("synchronous_commit", "fsync", "full_page_writes")
        }
    finally:
        await conn.close()
    assert read == shown and read["fsync"] == "on" and read["full_page_writes"] == "on"
    with caplog.at_level(logging.WARNING, logger="bastion.store"):
        postgres.refuse_unsafe_settings(read, "store")  # the test server is configured safely
        async with open_store(store_location("postgresql", tmp_path, "main")):
            pass  # and so the store opens on it
    assert "full_page_writes" not in caplog.text
    with pytest.raises(UsageError, match=r"fsync=off.*postgresql\.conf"):
        postgres.refuse_unsafe_settings({**read, "fsync": "off"}, "store")
    with pytest.raises(UsageError, match="synchronous_commit is off"):
        postgres.refuse_unsafe_settings({**read, "synchronous_commit": "off"}, "store")
    with caplog.at_level(logging.WARNING, logger="bastion.store"):
        postgres.refuse_unsafe_settings({**read, "full_page_writes": "off"}, "store")
    assert "full_page_writes=off" in caplog.text


# -- open_store and secrets ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["postgresql://u@db/bastion", "postgres://db/x", "postgresql+asyncpg://db/x", "postgresql://db/x?sslmode=require"],
)
def test_open_store_picks_postgresql_for_its_urls(url: str) -> None:
    assert isinstance(open_store(url), PostgresStore)


def test_open_store_refuses_another_postgresql_driver() -> None:
    with pytest.raises(UsageError, match="asyncpg"):
        open_store("postgresql+psycopg://db/x")


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://ada:s3cret@db:5432/x", "postgresql://ada:***@db:5432/x"),
        ("postgresql://ada@db/x?password=s3cret&sslmode=require", "postgresql://ada@db/x?password=***&sslmode=require"),
        ("postgresql://db/x?search_path=a", "postgresql://db/x?search_path=a"),
        # Reserved characters a password should have percent-encoded still mark where it ends: at the last @.
        ("postgresql://ada:s3/cret@db/x", "postgresql://ada:***@db/x"),
        ("postgresql://ada:s3?cret@db:5432/x", "postgresql://ada:***@db:5432/x"),
        ("postgresql://ada:s3#cret@db/x", "postgresql://ada:***@db/x"),
        ("postgresql://ada:s3cret@[db/x", "postgresql://ada:***@[db/x"),
        ("postgresql://ada@db/x?sslpassword=s3cret", "postgresql://ada@db/x?sslpassword=***"),
        # In a parameter, the same characters (an @ above all) end the value only where another parameter begins.
        ("postgresql://db/x?password=s3@cret", "postgresql://db/x?password=***"),
        ("postgresql://ada@db:1/x?password=s3@cret", "postgresql://ada@db:1/x?password=***"),
        ("postgresql://ada@db/x?sslpassword=a@s3cret", "postgresql://ada@db/x?sslpassword=***"),
        ("postgresql://db/x?password=s3&cret&sslmode=require", "postgresql://db/x?password=***&sslmode=require"),
        ("postgresql://db/x?PASS%57ORD=s3cret", "postgresql://db/x?PASS%57ORD=***"),
    ],
)
def test_the_password_is_redacted_from_the_dsn(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown
    store = PostgresStore(dsn, password="other-s3cret")
    assert "s3cret" not in repr(store) and "s3cret" not in store.dsn and shown in repr(store)


async def test_the_password_never_appears_in_errors() -> None:
    port = closed_port()
    store = PostgresStore(f"postgresql://ada:s3cret@127.0.0.1:{port}/x?password=s3cret", password="s3cret")
    with pytest.raises(Unavailable) as caught:
        await store.open()
    assert "s3cret" not in str(caught.value) and "s3cret" not in repr(caught.value)
    assert f"127.0.0.1:{port}" in str(caught.value)
    with pytest.raises(UsageError) as unopened:
        await store.get_user("ada")
    assert "s3cret" not in str(unopened.value)


async def test_an_unreachable_server_is_unavailable_quickly() -> None:
    started = time.monotonic()
    with pytest.raises(Unavailable, match="cannot reach PostgreSQL"):
        await open_store(f"postgresql://postgres@127.0.0.1:{closed_port()}/test").open()
    assert time.monotonic() - started < 5


async def test_an_unknown_database_is_a_usage_error() -> None:
    parts = urllib.parse.urlsplit(postgres_dsn())
    url = urllib.parse.urlunsplit(parts._replace(path="/bastion_no_such_database", query=""))
    with pytest.raises(UsageError, match="does not exist"):
        await open_store(url).open()


def test_libpq_connection_keeps_the_password_out_of_the_uri() -> None:
    store = PostgresStore("postgresql://ada:s3cret@db:5433/x?sslmode=require&search_path=t%20a&password=other")
    uri, env = store.libpq_connection()
    assert uri == "postgresql://ada@db:5433/x?sslmode=require"
    assert env == {"PGPASSWORD": "other", "PGOPTIONS": "-c search_path=t\\ a"}
    assert PostgresStore("postgres://db/x", password="given").libpq_connection() == (
        "postgresql://db/x",
        {"PGPASSWORD": "given"},
    )


async def test_libpq_connection_reaches_the_stores_schema_with_psql(store: Store) -> None:
    assert isinstance(store, PostgresStore)
    assert store.schema is not None and store.schema.startswith("bt_")
    assert await store.create_user(User("ada"))
    uri, env = store.libpq_connection()
    proc = await asyncio.create_subprocess_exec(
        "psql", uri, "-XAtc", "SELECT current_schema(), (SELECT string_agg(name, ',') FROM users)",
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert out.decode().strip() == f"{store.schema}|ada"


# -- the pool and errors ------------------------------------------------------------------------


async def backend_pid(store: PostgresStore) -> int:
    return int(await store._call(lambda conn: conn.fetchval("SELECT pg_backend_pid()")))


async def terminate(pid: int) -> None:
    """Kill the server process behind one connection, and wait until the server says it is gone."""
    assert (await admin_fetch("SELECT pg_terminate_backend($1)", pid))[0][0] is True
    async with asyncio.timeout(5):
        while await admin_fetch("SELECT 1 FROM pg_stat_activity WHERE pid = $1", pid):  # noqa: ASYNC110 (polls the server)
            await asyncio.sleep(0.01)


async def test_a_pooled_connection_the_server_killed_is_replaced_on_the_next_call(store: Store) -> None:
    assert isinstance(store, PostgresStore)
    assert await store.create_user(User("ada"))
    for _ in range(3):
        pid = await backend_pid(store)
        await terminate(pid)  # while the connection sits idle in the pool
        assert await store.get_user("ada") == User("ada")  # not an error: a fresh connection answers
        assert await backend_pid(store) != pid
    assert store.stats["failed_calls"] == 0


async def test_a_call_racing_the_kill_fails_at_most_once_as_unavailable(store: Store) -> None:
    assert isinstance(store, PostgresStore)
    assert await store.create_user(User("ada"))
    for _ in range(5):
        await admin_fetch("SELECT pg_terminate_backend($1)", await backend_pid(store))
        # Whether the statement went out before the death was seen is a race; both outcomes are clean.
        with contextlib.suppress(Unavailable):
            assert await store.get_user("ada") == User("ada")
        assert await store.get_user("ada") == User("ada")


async def test_a_connection_killed_mid_statement_is_unavailable_and_the_store_carries_on(store: Store) -> None:
    assert isinstance(store, PostgresStore)
    started = asyncio.get_running_loop().create_future()

    async def slow(conn: Any) -> None:
        started.set_result(await conn.fetchval("SELECT pg_backend_pid()"))
        await conn.execute("SELECT pg_sleep(30)")

    call = asyncio.create_task(store._call(slow))
    await admin_fetch("SELECT pg_terminate_backend($1)", await started)
    with pytest.raises(Unavailable):
        await call
    assert await store.create_user(User("ada"))
    assert await store.get_user("ada") == User("ada")


async def test_database_errors_become_bastion_errors(store: Store) -> None:
    assert isinstance(store, PostgresStore)
    with pytest.raises(InvalidArgument, match="value rejected"):
        await store.create_user(User("nul\x00byte"))  # PostgreSQL text cannot hold NUL
    with pytest.raises(InternalError):
        await store._call(lambda conn: conn.execute("SELECT * FROM no_such_table"))

    async def raises_ours(conn: Any) -> None:
        raise NotFound("passes through")

    with pytest.raises(NotFound, match="passes through"):
        await store._call(raises_ours)
    assert await store.create_user(User("ada"))  # and the store carries on
    assert store.stats["failed_calls"] == 3


async def test_a_transaction_a_call_left_open_is_rolled_back_not_leaked(tmp_path: Path) -> None:
    async with PostgresStore(store_location("postgresql", tmp_path, "main"), max_size=1) as store:

        async def forgets_to_commit(conn: Any) -> None:
            await conn.execute("BEGIN")
            await conn.execute("INSERT INTO users (name) VALUES ('half')")

        with contextlib.suppress(Exception):  # asyncpg may report the reset; the data is what matters
            await store._call(forgets_to_commit)
        assert await store.get_user("half") is None  # same (only) connection, no transaction carried over
        assert await store.create_user(User("ada"))
    async with PostgresStore(store_location("postgresql", tmp_path, "main")) as again:
        assert [u.name for u in await again.list_users()] == ["ada"]


async def test_the_pool_is_bounded_and_calls_beyond_it_wait(make_store: MakeStore, tmp_path: Path) -> None:
    store = PostgresStore(store_location("postgresql", tmp_path, "main"), max_size=2)
    async with store:
        results = await asyncio.gather(*(store.create_user(User(f"u{i:02}")) for i in range(30)))
        assert all(results)
        assert store.stats["pool_size"] <= 2
        assert len(await store.list_users()) == 30


def test_bad_pool_settings_are_refused() -> None:
    with pytest.raises(UsageError):
        PostgresStore("postgresql://db/x", min_size=3, max_size=2)
    with pytest.raises(UsageError):
        PostgresStore("postgresql://db/x", command_timeout=0)


# -- real servers -------------------------------------------------------------------------------


def test_two_server_replicas_share_one_postgresql_store(server_factory: Any, tmp_path: Path) -> None:
    """`bastion serve` on a PostgreSQL store: the first replica bootstraps the admin, and what one
    replica writes (users, tokens) the other sees at once."""
    location = store_location("postgresql", tmp_path, "shared")
    first = server_factory(env={"BASTION_STORE": location}, name="first")
    second = server_factory(env={"BASTION_STORE": location}, name="second")
    assert first.token_file.exists() != second.token_file.exists()  # exactly one bootstrapped the admin
    token = (first if first.token_file.exists() else second).token
    with (
        SyncClient(first.address, token=token, timeout=10) as one,
        SyncClient(second.address, token=token, timeout=10) as two,
    ):
        one.call("auth.create_user", name="grace", password="correct horse battery", roles=["ops"])
        users = {user["name"] for user in two.call("auth.list_users")}
        assert {"admin", "grace"} <= users


async def test_a_roles_holders_are_read_through_an_index_not_a_scan_of_users(tmp_path: Path) -> None:
    from bastion.store.credentials_postgres import _USERS_WITH_ROLE

    location = store_location("postgresql", tmp_path, "main")
    async with PostgresStore(location):
        pass
    conn = await asyncpg.connect(postgres_dsn(), server_settings={"search_path": schema_of(location)})
    try:
        await conn.execute("SET enable_seqscan = off")  # a few rows: the planner would scan them otherwise
        plan = "\n".join(row[0] for row in await conn.fetch(f"EXPLAIN {_USERS_WITH_ROLE}", "ops", 10))
    finally:
        await conn.close()
    assert "users_by_role" in plan and "Seq Scan" not in plan, plan


_SECRET_CHARACTERS = st.characters(min_codepoint=33, max_codepoint=126)  # printable ASCII, reserved ones included


@given(
    password=st.text(_SECRET_CHARACTERS, min_size=8, max_size=24),
    form=st.sampled_from(
        [
            "postgresql://ada:{p}@db:5432/x",
            "postgresql://ada:{p}@db/x?sslmode=require",
            "postgresql://db/x?password={p}",
            "postgresql://ada@db:1/x?password={p}&sslmode=require",
            "postgresql://ada@db/x?sslmode=require&sslpassword={p}",
            "postgresql://ada:{p}@db/x?password={p}",
        ]
    ),
)
@settings(max_examples=400, deadline=None)
def test_no_password_shows_through_the_redaction(password: str, form: str) -> None:
    """Whatever characters a password holds -- those it should have percent-encoded too -- none of it
    that is not also elsewhere in the DSN shows in what ``redact_dsn`` returns. ``&`` and ``=`` end a
    parameter's value in any reading of a query, so only passwords without them are asked of there."""
    if "password=" in form and ("&" in password or "=" in password):
        password = password.replace("&", "x").replace("=", "y")
    dsn = form.format(p=password)
    shown = redact_dsn(dsn)
    # Any 6 characters of the password that the rest of the DSN does not hold must not be shown.
    rest = form.replace("{p}", "\x00")
    for start in range(len(password) - 5):
        piece = password[start : start + 6]
        if piece not in rest:
            assert piece not in shown, (dsn, shown)
