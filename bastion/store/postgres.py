"""The shared store: PostgreSQL through asyncpg, for several server replicas.

Theory of operation
-------------------

``open()`` creates an ``asyncpg`` pool (``min_size``..``max_size``
connections) and migrates the schema; every method then borrows one pooled
connection for one statement (or one short transaction) and gives it back.
PostgreSQL does the rest: each statement outside an explicit transaction
commits on its own, and with ``synchronous_commit``, ``fsync`` and
``full_page_writes`` on (the server defaults, checked at open) a commit has
reached the write-ahead log on disk before the call returns -- an
acknowledged write is durable. There is no group commit
of our own: the server already commits concurrent transactions with shared
WAL flushes.

Schema: ``POSTGRES_MIGRATIONS`` (bastion/store/postgres_migrations.py) carries the same versions and descriptions
as SQLite's list (bastion/store/migrations.py), version 1 here and the
domain schemas (``kv``/``files``/``jobs`` ``.POSTGRES_SCHEMA``) from their
modules. They are applied in one transaction that first takes a
transaction-scoped advisory lock (``pg_advisory_xact_lock``) keyed on the
current schema, so replicas starting at once migrate it exactly once: the
first applies, the others wait, then find nothing left to do. A database at
a newer version than this bastion knows is opened (with a warning) when its
``schema_compat`` row says code of this version may use it -- a rolling
upgrade -- and refused with ``UsageError`` otherwise (see
bastion/store/migrations.py).

Where the tables live: the first schema of the connection's ``search_path``.
Unknown query parameters of the DSN are server settings, so
``postgresql://host/db?search_path=tenant_a`` keeps one deployment in schema
``tenant_a`` (which must exist; it is not created for you). Migrating needs
CREATE on that schema and the ownership of the tables it alters; with
nothing to migrate, opening creates nothing, so a role that may only read
and write the tables can run the server (docs/operations.md).

Errors: the store never lets a driver exception out. ``_call`` (what the
domain mixins use) turns connection loss, server shutdown, timeouts and
serialization failures into ``Unavailable`` (try again), values PostgreSQL
rejects (e.g. a NUL character in text) into ``InvalidArgument``, and
anything else into ``InternalError``; bastion's own errors pass through
(bastion/store/postgres_errors.py).

Secrets: the password comes from the ``password`` argument (a file or the
environment, chosen by the caller), from libpq's ``PGPASSWORD`` /
``~/.pgpass``, or from the DSN itself; ``repr`` and every message show the
DSN with the password replaced by ``***`` (``redact_dsn``,
bastion/store/postgres_dsn.py).

Connections are shared, so a mixin leaves no session state behind: no
``SET`` (use ``SET LOCAL`` inside a transaction), no session advisory locks
(use ``pg_advisory_xact_lock``), no ``LISTEN`` on a pooled connection, no
cursors ``WITH HOLD``. That lets the pool hand a connection back without the
``RESET ALL`` round trip asyncpg would otherwise make on every release
(an unfinished transaction is still rolled back).

Closing waits for the calls already running (or waiting for a connection)
to finish, then closes the pool; calls made after ``close`` began raise
``UsageError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple, TypeVar

import asyncpg

from bastion.exceptions import BastionError, Unavailable, UsageError
from bastion.store import observe
from bastion.store.base import Store
from bastion.store.credentials_postgres import PostgresCredentials
from bastion.store.files_postgres import PostgresFiles
from bastion.store.idempotency import PostgresIdempotency
from bastion.store.jobs_postgres import PostgresJobs
from bastion.store.kv_postgres import PostgresKV
from bastion.store.mail_postgres import PostgresMail
from bastion.store.migrations import Migration, check_newer_schema, compatible_from
from bastion.store.postgres_dsn import _LIBPQ_PARAMETERS, _pgoptions_escape, redact_dsn
from bastion.store.postgres_errors import _describe, _describe_dsn_error, _is_closed, _translate, _unsent
from bastion.store.postgres_migrations import LATEST, POSTGRES_MIGRATIONS
from bastion.store.topics_postgres import PostgresTopics

log = logging.getLogger("bastion.store")

__all__ = ["LATEST", "POSTGRES_MIGRATIONS", "PostgresStore", "Probe", "redact_dsn"]

T = TypeVar("T")
Connection = Any  # asyncpg.Connection (asyncpg ships no type information)


#: First key of the two-key advisory lock taken while migrating (the second is the schema's hash).
MIGRATION_LOCK_CLASS = 0x0BA5_7104

_CREATE_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at  DOUBLE PRECISION NOT NULL
)"""

#: Whether schema $1 has the schema_version table: CREATE TABLE IF NOT EXISTS needs CREATE on the schema even when
#: it has, which an application role that only reads and writes the tables need not hold.
_HAS_VERSION_TABLE = "SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = $1 AND tablename = 'schema_version'"

#: Whether schema $1 has the schema_compat table (migration 6); not ``to_regclass``, which searches the whole path.
_HAS_COMPAT_TABLE = "SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = $1 AND tablename = 'schema_compat'"

#: The connected role's rights in schema $1 that migrating may need and it lacks: CREATE on the schema; per table,
#: the owner's (to alter or index it), REFERENCES (a new foreign key to it) and TRIGGER; the owner's per function.
_MIGRATION_RIGHTS = """SELECT current_user, has_schema_privilege($1, 'CREATE'),
    array(SELECT c.relname::text || ' ' || r.priv FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          CROSS JOIN (VALUES ('OWNER'), ('REFERENCES'), ('TRIGGER')) AS r (priv)
          WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT CASE r.priv
              WHEN 'OWNER' THEN pg_has_role(c.relowner, 'USAGE') ELSE has_table_privilege(c.oid, r.priv) END),
    array(SELECT p.proname::text FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
          WHERE n.nspname = $1 AND NOT pg_has_role(p.proowner, 'USAGE'))"""

#: Records ``compatible_from`` (see bastion/store/migrations.py) in the one-row schema_compat table.
_RECORD_COMPAT = (
    "INSERT INTO schema_compat (id, min_version, updated_at) VALUES (1, $1, $2) "
    "ON CONFLICT (id) DO UPDATE SET min_version = excluded.min_version, updated_at = excluded.updated_at"
)


#: The server settings an acknowledged write's durability rests on (see ``refuse_unsafe_settings``).
_DURABILITY_SETTINGS = (
    "SELECT current_setting('synchronous_commit') AS synchronous_commit,"
    " current_setting('fsync') AS fsync, current_setting('full_page_writes') AS full_page_writes"
)


def refuse_unsafe_settings(settings: Mapping[str, str], label: str) -> None:
    """``UsageError`` if ``settings`` (as ``_DURABILITY_SETTINGS`` reads them) would lose acknowledged writes.

    ``synchronous_commit=off`` acknowledges a commit before its WAL is on disk
    (it can be set per role or database); ``fsync=off`` never waits for the
    disk at all (server-wide, the kind of setting left behind by a bulk load
    or a benchmark): a crash can then lose or corrupt committed data. Both are
    refused. ``full_page_writes=off`` is only logged: it lets a page torn by a
    power cut go unrepaired, but is safe, and recommended, on file systems
    that never tear a page (ZFS), which bastion cannot tell from here.
    """
    if settings.get("synchronous_commit") == "off":
        raise UsageError(
            f"{label}: synchronous_commit is off, so acknowledged writes could be lost "
            "in a crash; turn it on for bastion's role or database"
        )
    if settings.get("fsync") == "off":
        raise UsageError(
            f"{label}: the server runs with fsync=off, so a crash or power cut could lose or corrupt "
            "acknowledged writes; turn fsync on in the server's configuration (postgresql.conf) and reload it"
        )
    if settings.get("full_page_writes") == "off":
        log.warning(
            "%s: the server runs with full_page_writes=off: unless its file system never tears a page (e.g. ZFS), "
            "a power cut can corrupt acknowledged writes",
            label,
        )


class Probe(NamedTuple):
    """What ``PostgresStore.probe`` reads, read-only: where the store stands and what its role may do there."""

    schema: str
    version: int
    recorded: int | None  # schema_compat's min_version, if the schema has one
    role: str  # current_user
    may_create: bool  # CREATE on the schema: migrations create tables, indexes and functions in it
    tables_lacking: frozenset[tuple[str, str]]  # (table, "OWNER" | "REFERENCES" | "TRIGGER"): rights it lacks
    functions_not_owned: frozenset[str]  # the functions it has not the owner's rights over (to replace them)


#: Set on every connection, whatever the database's or role's defaults (a DSN's own settings are kept beside it):
#: the store's transactions are written for READ COMMITTED -- each statement sees what committed before it, as
#: the owner check after its advisory lock (kv_postgres.py) relies on; under REPEATABLE READ that check would
#: read the snapshot taken before the lock was waited for.
SESSION_SETTINGS = {"default_transaction_isolation": "read committed"}


class PostgresStore(
    PostgresCredentials,
    PostgresKV,
    PostgresFiles,
    PostgresJobs,
    PostgresIdempotency,
    PostgresMail,
    PostgresTopics,
    Store,
):
    """The PostgreSQL backend.

    ``dsn``: a libpq-style ``postgresql://`` URL; ``password``: used instead of
    one in the DSN (kept out of URLs, logs and ``repr``); ``min_size`` /
    ``max_size``: pooled connections; ``connect_timeout``: seconds to wait
    for a connection; ``command_timeout``: seconds one statement may run
    (None: no limit).
    """

    def __init__(
        self,
        dsn: str,
        *,
        password: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 10.0,
        command_timeout: float | None = 60.0,
        migrations: tuple[Migration, ...] = POSTGRES_MIGRATIONS,
    ) -> None:
        if not 0 <= min_size <= max_size or max_size < 1 or connect_timeout <= 0:
            raise UsageError("PostgresStore needs 0 <= min_size <= max_size, max_size >= 1 and connect_timeout > 0")
        if command_timeout is not None and command_timeout <= 0:
            raise UsageError("PostgresStore needs command_timeout > 0 (or None)")
        self._dsn = dsn
        self._password = password
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._migrations = migrations
        self._state = "new"  # new -> open -> closing -> closed (-> open again)
        self._version = 0
        self._stats = {"calls": 0, "failed_calls": 0, "reconnects": 0}
        self._running = 0
        self._idle: asyncio.Event | None = None
        self._pool_or_none: Any = None
        self._schema: str | None = None
        self._listeners: set[asyncio.Task[None]] = set()

    @property
    def dsn(self) -> str:
        """The DSN with its password, if any, replaced by ``***``."""
        return redact_dsn(self._dsn)

    def __repr__(self) -> str:
        return f"PostgresStore({self.dsn!r}, {self._state})"

    @property
    def schema(self) -> str | None:
        """The schema the tables live in (the first existing one of ``search_path``); None before ``open``."""
        return self._schema

    def libpq_connection(self) -> tuple[str, dict[str, str]]:
        """How to reach this store from ``psql``/``pg_dump``/``pg_restore`` run as subprocesses.

        Returns a libpq connection URI without the password and without the
        server settings libpq does not accept in a URI, plus the environment
        to add for the subprocess: ``PGPASSWORD`` when a password was given
        (never a command-line argument) and ``PGOPTIONS`` carrying those
        server settings (e.g. ``search_path``).
        """
        parts = urllib.parse.urlsplit(self._dsn)
        scheme = "postgresql" if parts.scheme.startswith("postgres") else parts.scheme
        env: dict[str, str] = {}
        netloc = parts.netloc
        userinfo, at, hosts = netloc.rpartition("@")
        if at and ":" in userinfo:
            user, _, secret = userinfo.partition(":")
            env["PGPASSWORD"] = urllib.parse.unquote(secret)
            netloc = f"{user}@{hosts}"
        keep: list[tuple[str, str]] = []
        options: list[str] = []
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            if key == "password":
                env["PGPASSWORD"] = value
            elif key in _LIBPQ_PARAMETERS:
                keep.append((key, value))
            else:
                options.append(f"-c {key}={_pgoptions_escape(value)}")
        if self._password is not None:
            env["PGPASSWORD"] = self._password
        if options:
            env["PGOPTIONS"] = " ".join(options)
        uri = urllib.parse.urlunsplit((scheme, netloc, parts.path, urllib.parse.urlencode(keep), ""))
        return uri, env

    @property
    def schema_version(self) -> int:
        return self._version

    @property
    def stats(self) -> Mapping[str, int]:
        counters = dict(self._stats)
        pool = self._pool_or_none
        counters["pool_size"] = pool.get_size() if pool is not None else 0
        counters["pool_idle"] = pool.get_idle_size() if pool is not None else 0
        return counters

    @property
    def _pool(self) -> Any:  # asyncpg.Pool; see bastion/store/_access.py
        if self._state != "open" or self._pool_or_none is None:
            raise UsageError(f"{self!r} is not open")
        return self._pool_or_none

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        if self._state in ("open", "closing"):
            raise UsageError(f"{self!r} is already open")
        pool = await self._create_pool()
        try:
            async with pool.acquire() as conn:
                await self._check_durability(conn)
                self._version = await self._migrate(conn)
                self._schema = str(await conn.fetchval("SELECT current_schema()"))
        except BaseException:
            pool.terminate()
            raise
        self._pool_or_none = pool
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._state = "open"

    async def close(self) -> None:
        if self._state != "open":
            return
        self._state = "closing"
        assert self._idle is not None
        pool = self._pool_or_none
        for task in list(self._listeners):
            task.cancel()
        for task in list(self._listeners):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self._idle.wait()  # every call accepted before close finishes
            await pool.close()
        except BaseException:
            pool.terminate()  # close() was cancelled or failed: drop the connections
            raise
        finally:
            self._pool_or_none = None
            self._state = "closed"

    async def _create_pool(self) -> Any:
        dsn = self._dsn
        if dsn.startswith("postgresql+asyncpg://"):  # SQLAlchemy's spelling
            dsn = "postgresql://" + dsn[len("postgresql+asyncpg://") :]
        kwargs: dict[str, Any] = {}
        if self._password is not None:
            kwargs["password"] = self._password
        try:
            return await asyncpg.create_pool(
                dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                reset=_keep_session,
                server_settings=SESSION_SETTINGS,
                **kwargs,
            )
        except Exception as exc:
            raise self._open_error(exc) from None

    def _open_error(self, exc: Exception) -> Exception:
        """What a failure to connect means: ``Unavailable`` (unreachable) or ``UsageError`` (configuration)."""
        if isinstance(exc, OSError | TimeoutError | asyncpg.CannotConnectNowError | asyncpg.TooManyConnectionsError):
            return Unavailable(f"cannot reach PostgreSQL at {self.dsn}: {_describe(exc)}")
        if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError | ValueError):
            # Bad password, unknown database or role, malformed DSN: configuration, not availability.
            return UsageError(f"cannot open PostgreSQL store {self.dsn}: {_describe_dsn_error(exc, self._dsn)}")
        return exc

    async def probe(self) -> Probe:
        """The schema, its version, recorded ``compatible_from`` and the role's rights to migrate it, read over one
        connection in a read-only transaction: nothing created, migrated or locked (``bastion serve --check``).
        Refuses unsafe durability settings as ``open`` does; errors are ``open``'s (``Unavailable``, ``UsageError``)."""
        try:
            conn = await self._connect_one()
        except Exception as exc:
            raise self._open_error(exc) from None
        try:
            async with conn.transaction(readonly=True):
                await self._check_durability(conn)
                schema = await conn.fetchval("SELECT current_schema()")
                if schema is None:
                    path = await conn.fetchval("SELECT current_setting('search_path')")
                    raise UsageError(
                        f"PostgreSQL store {self.dsn}: no schema of search_path ({path}) exists; create it first"
                    )
                version = 0
                if await conn.fetchval(_HAS_VERSION_TABLE, schema):
                    version = int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))
                recorded = None
                if await conn.fetchval(_HAS_COMPAT_TABLE, schema):
                    recorded = await conn.fetchval("SELECT min_version FROM schema_compat WHERE id = 1")
                role, may_create, tables, functions = await conn.fetchrow(_MIGRATION_RIGHTS, schema)
        except BastionError:
            raise
        except (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise Unavailable(f"PostgreSQL store {self.dsn}: lost the connection: {_describe(exc)}") from None
        except asyncpg.PostgresError as exc:
            raise UsageError(f"cannot read store {self.dsn}: {_describe(exc)}") from None
        finally:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)
        compat = None if recorded is None else int(recorded)
        lacking = frozenset((table, right) for table, _, right in (item.rpartition(" ") for item in tables))
        return Probe(str(schema), version, compat, str(role), bool(may_create), lacking, frozenset(functions))

    # -- notifications between replicas (LISTEN/NOTIFY) ----------------------------------

    async def listen(self, channel: str, callback: Callable[[], None]) -> Callable[[], Awaitable[None]] | None:
        """``Store.listen`` on PostgreSQL: ``LISTEN bastion_<channel>`` on a connection of its own.

        Notifications carry the schema they come from as their payload, so
        deployments in other schemas of the same database are not heard. The
        connection is outside the pool (pooled connections keep no session
        state) and is re-opened with backoff when it drops; ``callback`` runs
        after each (re)connect, since notifications sent meanwhile are lost.
        """
        if self._state != "open":
            raise UsageError(f"{self!r} is not open")
        task = asyncio.get_running_loop().create_task(
            self._listen_forever(f"bastion_{channel}", callback), name=f"bastion-store-listen {channel}"
        )
        self._listeners.add(task)
        task.add_done_callback(self._listeners.discard)

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        return stop

    async def _listen_forever(self, channel: str, callback: Callable[[], None]) -> None:
        schema = self._schema

        def heard(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            if payload == schema:
                callback()

        delay = 0.1
        while True:
            lost = asyncio.Event()
            conn: Any = None
            try:
                conn = await self._connect_one()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(channel, heard)
                delay = 0.1
                callback()  # whatever was notified while we were not listening
                await lost.wait()
                log.warning("store %s: lost the notification connection; reconnecting", self.dsn)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("store %s: cannot listen for notifications (%s); retrying", self.dsn, _describe(exc))
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=2))
            self._stats["reconnects"] += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _connect_one(self) -> Any:
        """One connection outside the pool, with the pool's settings."""
        dsn = self._dsn
        if dsn.startswith("postgresql+asyncpg://"):
            dsn = "postgresql://" + dsn[len("postgresql+asyncpg://") :]
        kwargs: dict[str, Any] = {} if self._password is None else {"password": self._password}
        return await asyncpg.connect(dsn, timeout=self._connect_timeout, server_settings=SESSION_SETTINGS, **kwargs)

    async def _check_durability(self, conn: Connection) -> None:
        row = await conn.fetchrow(_DURABILITY_SETTINGS)
        refuse_unsafe_settings(dict(row.items()), f"PostgreSQL store {self.dsn}")

    async def _migrate(self, conn: Connection) -> int:
        """Bring the schema up to the last migration, under the advisory lock; the version it is at."""
        migrations = self._migrations
        versions = [m.version for m in migrations]
        if versions != list(range(1, len(versions) + 1)):
            raise UsageError(f"migrations must be numbered 1, 2, 3 … in order, got {versions}")
        latest = versions[-1] if versions else 0
        try:
            async with conn.transaction():
                schema = await conn.fetchval("SELECT current_schema()")
                if schema is None:
                    path = await conn.fetchval("SELECT current_setting('search_path')")
                    raise UsageError(
                        f"PostgreSQL store {self.dsn}: no schema of search_path ({path}) exists; create it first"
                    )
                await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", MIGRATION_LOCK_CLASS, schema)
                if not await conn.fetchval(_HAS_VERSION_TABLE, schema):
                    await conn.execute(_CREATE_VERSION_TABLE)
                version = int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))
                has_compat = bool(await conn.fetchval(_HAS_COMPAT_TABLE, schema))
                if version > latest:
                    recorded = await conn.fetchval("SELECT min_version FROM schema_compat") if has_compat else None
                    label = f"PostgreSQL store {self.dsn} (schema {schema})"
                    check_newer_schema(version, None if recorded is None else int(recorded), latest, label=label)
                applied = False
                for migration in migrations:
                    if migration.version <= version:
                        continue
                    for statement in migration.statements:
                        await conn.execute(statement)
                    await conn.execute(
                        "INSERT INTO schema_version (version, description, applied_at) VALUES ($1, $2, $3)",
                        migration.version,
                        migration.description,
                        time.time(),
                    )
                    version = migration.version
                    applied = True
                if applied and await conn.fetchval(_HAS_COMPAT_TABLE, schema):
                    await conn.execute(_RECORD_COMPAT, compatible_from(migrations, version), time.time())
        except BastionError:
            raise
        except (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise Unavailable(f"PostgreSQL store {self.dsn}: lost the connection while migrating: {exc}") from None
        except asyncpg.PostgresError as exc:
            raise UsageError(f"cannot open store {self.dsn}: migrating failed: {_describe(exc)}") from None
        return version

    # -- the one way to the database: _call ----------------------------------------------

    async def _call(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        """Run ``fn(conn)`` on a pooled connection; database errors become bastion's.

        A pooled connection the server dropped while it sat idle (restart,
        ``pg_terminate_backend``, a proxy's idle timeout) is found dead only
        when used, before any statement reaches the server: the call is then
        run once more on a fresh connection. ``fn`` should therefore do
        several writes inside ``conn.transaction()``, which it needs for
        atomicity anyway.
        """
        if self._state != "open":
            raise UsageError(f"{self!r} is not open")
        assert self._idle is not None
        self._running += 1
        self._idle.clear()
        self._stats["calls"] += 1
        started = time.perf_counter()
        try:
            for attempt in (1, 2):
                lost = True  # until a connection is acquired
                try:
                    async with self._pool_or_none.acquire() as conn:
                        try:
                            return await fn(conn)
                        except Exception:
                            lost = _is_closed(conn)
                            raise
                except Exception as exc:
                    if attempt == 1 and lost and _unsent(exc):
                        self._stats["reconnects"] += 1
                        continue
                    self._stats["failed_calls"] += 1
                    error = _translate(exc, connection_lost=lost)
                    if error is exc:
                        raise
                    raise error from exc
            raise AssertionError("unreachable")
        finally:
            observe.done("call", started)
            self._running -= 1
            if self._running == 0:
                self._idle.set()


async def _keep_session(conn: Connection) -> None:
    """The pool's reset on release: nothing beyond asyncpg's own (roll back a transaction left open).

    asyncpg's default also runs ``RESET ALL; UNLISTEN *; …`` -- one more round
    trip per call, a third of a simple call's time. bastion's SQL leaves no
    session state behind (see the module docstring), so there is nothing to reset.
    """
