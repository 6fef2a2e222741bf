"""Backups of a store and its files, and restoring them: SQLite and PostgreSQL.

Taking a backup gathers a consistent copy of the database and the blobs it
refers to, and writes them as one ``.bbk`` archive (``bastion.store.archive``:
the format, its framing, encryption and checks); restoring reads an archive
back, checks it completely, and only then swaps it in.

Theory of operation
-------------------

An archive holds:

* ``db/bastion.db`` -- a SQLite store, copied with SQLite's online backup
  API from a connection of our own (never the store's writer), so the
  server keeps writing while it runs; the copy is one consistent snapshot
  and must pass ``PRAGMA integrity_check`` before it is archived; or
  ``db/postgres.dump`` -- ``pg_dump --format=custom --no-owner`` of the
  store's schema, taken in a snapshot exported by a repeatable-read
  transaction that also lists the blobs;
* ``files/blobs/<sha[:2]>/<sha>`` -- the file contents the snapshot refers
  to (the ``sha256`` column of its ``files`` table; every blob when the
  snapshot has no such column).

Restore never trusts the archive before it has read all of it: members
are extracted into a staging directory beside the target and every byte is
checked (``archive.read_archive``), the SQLite copy passes
``integrity_check``; only then is the old data renamed aside
(``<name>.pre-restore-<ts>``) and the staged data renamed into place.

PostgreSQL: ``pg_dump`` and ``pg_restore`` reach the database through
their environment (``PGHOST``, ``PGUSER``, ``PGDATABASE``, ``PGPASSWORD``,
``PGOPTIONS`` … from ``PostgresStore.libpq_connection()``), never their
command line. Restoring verifies the archive as above and reads the dump
back (``pg_restore --list``); a non-empty target schema is refused unless
``force``, which renames it ``<schema>_pre_restore_<ts>``; then ``pg_restore
--single-transaction --exit-on-error`` recreates the schema under its
archived name (a dump names its schema in every statement), renamed to the
target afterwards if that differs -- which needs the archived name free in
the target database. Then the blobs are swapped in as for SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from bastion.exceptions import BastionError, DataLoss, FailedPrecondition, InvalidArgument, Unavailable, UsageError
from bastion.store.archive import (
    BLOB_PATH,
    DEFAULT_SCRYPT_LOG_N,
    FILE_MODE,
    POSTGRES_MEMBER,
    SQLITE_MEMBER,
    ArchiveInfo,
    Manifest,
    fsync_dir,
    read_archive,
    staging_dir,
    write_archive,
)
from bastion.store.migrations import current_version
from bastion.store.postgres import PostgresStore, redact_dsn

__all__ = [
    "RestoreResult",
    "backup_postgres",
    "backup_sqlite",
    "check_not_in_use",
    "restore_postgres",
    "restore_sqlite",
    "snapshot_sqlite",
    "verify_archive",
]

log = logging.getLogger("bastion.backup")


class RestoreResult(msgspec.Struct, frozen=True):
    manifest: Manifest
    restored: list[str]  # what was put in place
    kept: list[str]  # where the old data went (renamed aside, not deleted)


# -- taking a backup -----------------------------------------------------------------------------------


def snapshot_sqlite(db_path: Path, dest: Path) -> int:
    """Copy the SQLite store at ``db_path`` to ``dest`` (a new file, 0600) in one consistent step.

    Uses SQLite's online backup API from a connection of its own, so a server
    may keep writing meanwhile (WAL: readers do not block the writer). The
    copy is made self-contained (rollback journal) and must pass
    ``integrity_check``. Returns the copy's schema version.
    """
    if not db_path.is_file():
        raise FailedPrecondition(f"no SQLite store at {db_path}")
    os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    src = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None, timeout=30)
    try:
        dst = sqlite3.connect(dest, isolation_level=None)
        try:
            src.backup(dst)  # pages=-1: every page in one step, under one read transaction
            dst.execute("PRAGMA journal_mode=DELETE")
            _check_integrity(dst, "the snapshot")
            return current_version(dst)
        finally:
            dst.close()
    except sqlite3.Error as exc:
        raise Unavailable(f"cannot copy the SQLite store {db_path}: {exc}") from exc
    finally:
        src.close()


def _check_integrity(conn: sqlite3.Connection, what: str) -> None:
    rows = conn.execute("PRAGMA integrity_check").fetchall()
    if [tuple(r) for r in rows] != [("ok",)]:
        problems = "; ".join(str(r[0]) for r in rows[:5])
        raise DataLoss(f"{what} fails SQLite's integrity check: {problems}")


def referenced_blobs_sqlite(db_copy: Path) -> list[str] | None:
    """The blob hashes the snapshot's ``files`` table names (None: it has no such column)."""
    conn = sqlite3.connect(f"file:{db_copy}?mode=ro", uri=True)
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(files)")}
        if "sha256" not in columns:
            return None
        rows = conn.execute("SELECT DISTINCT sha256 FROM files WHERE sha256 IS NOT NULL ORDER BY 1").fetchall()
        return [str(row[0]) for row in rows]
    finally:
        conn.close()


def blob_members(files_dir: Path, hashes: list[str] | None) -> tuple[list[tuple[str, Path]], str]:
    """(archive path, file) of each blob to archive, and the manifest's ``blobs`` value."""
    blobs = files_dir / "blobs"
    if hashes is None:
        found = sorted(blobs.glob("??/*")) if blobs.is_dir() else []
        return [(f"files/blobs/{p.parent.name}/{p.name}", p) for p in found if _is_blob(p)], "all"
    out = []
    for digest in hashes:
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise DataLoss(f"the snapshot names a malformed blob hash {digest[:80]!r}")
        out.append((f"files/blobs/{digest[:2]}/{digest}", blobs / digest[:2] / digest))
    return out, "referenced"


def _is_blob(path: Path) -> bool:
    return path.is_file() and BLOB_PATH.fullmatch(f"files/blobs/{path.parent.name}/{path.name}") is not None


def backup_sqlite(
    db_path: Path,
    files_dir: Path,
    out_path: Path,
    passphrase: bytes | None,
    *,
    now: float | None = None,
    scrypt_log_n: int = DEFAULT_SCRYPT_LOG_N,
) -> ArchiveInfo:
    """Take a backup of the SQLite store at ``db_path`` and its blobs in ``files_dir`` into ``out_path``.

    Blocking (run it in a thread); safe while a server runs on the store.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with staging_dir(out_path.parent) as staging:
        copy = staging / "bastion.db"
        created_at = time.time() if now is None else now
        version = snapshot_sqlite(db_path, copy)
        blobs = blob_members(files_dir, referenced_blobs_sqlite(copy))
        return write_archive(
            out_path, backend="sqlite", schema_version=version, created_at=created_at,
            db_member=(SQLITE_MEMBER, copy), blobs=blobs, passphrase=passphrase, scrypt_log_n=scrypt_log_n,
        )  # fmt: skip


# -- verifying ----------------------------------------------------------------------------------------


def verify_archive(archive: Path, passphrase: bytes | None, *, scratch: Path | None = None) -> Manifest:
    """Check every byte of ``archive`` and the database it holds (extracting into a temporary directory,
    then removing it)."""
    with staging_dir(scratch or archive.parent) as staging:
        return _read_checked(archive, staging, passphrase)


def _read_checked(archive: Path, staging: Path, passphrase: bytes | None) -> Manifest:
    """``read_archive`` (every byte checked, members extracted under ``staging``), then the database
    member's own check: a SQLite copy must pass ``integrity_check``."""
    manifest = read_archive(archive, staging, passphrase)
    if manifest.backend == "sqlite":
        conn = sqlite3.connect(f"file:{staging / SQLITE_MEMBER}?mode=ro", uri=True)
        try:
            _check_integrity(conn, "the archived database")
        except sqlite3.DatabaseError as exc:
            raise DataLoss(f"the archived database is unreadable: {exc}") from exc
        finally:
            conn.close()
    return manifest


# -- restoring --------------------------------------------------------------------------------------------


def check_not_in_use(db_path: Path) -> None:
    """Refuse (``FailedPrecondition``) if any process has the SQLite store at ``db_path`` open.

    A running server keeps its connections open; in WAL mode each holds a
    shared lock, so an exclusive lock is refused while any is open.
    """
    if not db_path.exists():
        return
    try:
        conn = sqlite3.connect(db_path, isolation_level=None, timeout=0)
    except sqlite3.Error as exc:
        raise FailedPrecondition(f"cannot open {db_path}: {exc}") from None
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("ROLLBACK")
    except sqlite3.OperationalError:
        raise FailedPrecondition(
            f"{db_path} is in use (is a server running on this data directory?): stop it before restoring"
        ) from None
    except sqlite3.DatabaseError:
        pass  # not a database we can read: it is not in use by a server either; it will be kept aside
    finally:
        conn.close()


def restore_sqlite(
    archive: Path, db_path: Path, files_dir: Path, passphrase: bytes | None, *, now: float | None = None
) -> RestoreResult:
    """Verify ``archive`` completely, then put its database at ``db_path`` and its blobs in ``files_dir``.

    The old database (with its ``-wal``/``-shm``) and files directory are
    renamed to ``<name>.pre-restore-<ts>``; nothing is deleted. Nothing is
    changed at all unless the whole archive checks out.
    """
    check_not_in_use(db_path)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now or time.time()))
    with staging_dir(db_path.parent) as staging:
        manifest = _read_checked(archive, staging, passphrase)
        if manifest.backend != "sqlite":
            raise InvalidArgument(f"this archive holds a {manifest.backend} store: restore it with --store URL")
        check_not_in_use(db_path)
        kept: list[str] = []
        for suffix in ("", "-wal", "-shm", "-journal"):
            old = db_path.with_name(db_path.name + suffix)
            if old.exists():
                aside = _free(db_path.with_name(f"{db_path.name}.pre-restore-{stamp}{suffix}"))
                os.rename(old, aside)
                kept.append(str(aside))
        os.rename(staging / SQLITE_MEMBER, db_path)
        restored = [str(db_path)]
        kept += _swap_files(staging / "files", files_dir, stamp)
        restored.append(str(files_dir))
        fsync_dir(db_path.parent)
    return RestoreResult(manifest, restored, kept)


def _swap_files(staged: Path, files_dir: Path, stamp: str) -> list[str]:
    kept = []
    if files_dir.exists():
        aside = _free(files_dir.with_name(f"{files_dir.name}.pre-restore-{stamp}"))
        os.rename(files_dir, aside)
        kept.append(str(aside))
    files_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not staged.exists():
        staged.mkdir(mode=0o700)
    try:
        os.rename(staged, files_dir)
    except OSError:  # another file system: copy (the staged copy was verified already)
        shutil.copytree(staged, files_dir)
    return kept


def _free(path: Path) -> Path:
    """``path``, or ``path.1``, ``path.2`` … whichever does not exist yet (never overwrite kept data)."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


# -- PostgreSQL ---------------------------------------------------------------------------------------

#: libpq connection parameters and the environment variables that carry them to pg_dump/pg_restore.
#: (keepalives*, tcp_user_timeout, fallback_application_name and sslpassword have none: not passed.)
_LIBPQ_ENV = {
    "host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT", "dbname": "PGDATABASE", "user": "PGUSER",
    "passfile": "PGPASSFILE", "channel_binding": "PGCHANNELBINDING", "connect_timeout": "PGCONNECT_TIMEOUT",
    "client_encoding": "PGCLIENTENCODING", "options": "PGOPTIONS", "application_name": "PGAPPNAME",
    "sslmode": "PGSSLMODE", "sslcompression": "PGSSLCOMPRESSION", "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY",
    "sslrootcert": "PGSSLROOTCERT", "sslcrl": "PGSSLCRL", "sslcrldir": "PGSSLCRLDIR", "sslsni": "PGSSLSNI",
    "requirepeer": "PGREQUIREPEER", "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION", "gssencmode": "PGGSSENCMODE",
    "krbsrvname": "PGKRBSRVNAME", "gsslib": "PGGSSLIB", "service": "PGSERVICE",
    "target_session_attrs": "PGTARGETSESSIONATTRS", "load_balance_hosts": "PGLOADBALANCEHOSTS",
}  # fmt: skip

#: How long pg_dump waits for a table lock (an ALTER TABLE running elsewhere) before giving up.
PG_LOCK_WAIT_TIMEOUT = "60s"
_PG_DUMP_MAGIC = b"PGDMP"
_IDENTIFIER_MAX = 63  # PostgreSQL truncates longer names


def pg_environment(store: PostgresStore) -> dict[str, str]:
    """The environment for ``pg_dump``/``pg_restore`` to reach ``store``'s database.

    Everything -- host, port, user, database, password, server settings such
    as ``search_path`` -- goes in ``PG*`` variables on top of this process's
    own environment (so ``PGPASSWORD`` or ``~/.pgpass`` work as for the
    store), never on the command line where other users could read it.
    """
    uri, extra = store.libpq_connection()
    parts = urllib.parse.urlsplit(uri)
    env: dict[str, str] = {}
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    if at and userinfo:
        env["PGUSER"] = urllib.parse.unquote(userinfo.partition(":")[0])
    hosts, ports = [], []
    for item in hostlist.split(",") if hostlist else []:
        if item.startswith("["):  # [IPv6]:port
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port = item.partition(":")
        hosts.append(urllib.parse.unquote(host))
        ports.append(port)
    if any(hosts):
        env["PGHOST"] = ",".join(hosts)
    if any(ports):
        env["PGPORT"] = ",".join(ports)
    dbname = urllib.parse.unquote(parts.path.lstrip("/"))
    if dbname:
        env["PGDATABASE"] = dbname
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        name = _LIBPQ_ENV.get(key)
        if name is not None:
            env[name] = value
    if "PGOPTIONS" in env and "PGOPTIONS" in extra:  # libpq's options= and the DSN's server settings
        extra = {**extra, "PGOPTIONS": f"{env['PGOPTIONS']} {extra['PGOPTIONS']}"}
    env.update(extra)  # PGPASSWORD, PGOPTIONS (server settings)
    # bastion's own settings (BASTION_STORE may hold a password, BASTION_BACKUP_PASSPHRASE does) stay here.
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("BASTION_")}
    return {**inherited, **env}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FailedPrecondition(f"{name} is not installed (or not on PATH): install the PostgreSQL client tools")
    return path


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _check_tool(name: str, returncode: int | None, stderr: bytes) -> None:
    """Raise if a pg tool failed; log its warnings otherwise."""
    text = stderr.decode("utf-8", "replace").strip()
    if returncode != 0 or re.search(r"^\S+: error: ", text, re.MULTILINE):
        tail = text[-2000:] or "no message"
        raise Unavailable(f"{name} failed (exit status {returncode}): {tail}")
    if text:
        log.warning("%s: %s", name, text[-2000:])


async def _run_tool(args: list[str], env: Mapping[str, str], stdout: int) -> None:
    """Run a pg tool to completion (killed if the caller is cancelled); raise if it failed."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, env=dict(env)
    )
    try:
        _, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    _check_tool(Path(args[0]).name, proc.returncode, err)


def _toc(pg_restore: str, dump: Path) -> list[str]:
    """The table of contents of a custom-format dump (``pg_restore --list``); checks that it reads back."""
    with open(dump, "rb") as f:
        if f.read(len(_PG_DUMP_MAGIC)) != _PG_DUMP_MAGIC:
            raise DataLoss(f"{dump.name} is not a pg_dump custom-format archive")
    done = subprocess.run([pg_restore, "--list", str(dump)], capture_output=True, check=False)
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip()[-2000:]
        raise DataLoss(f"the database dump does not read back (pg_restore --list): {message}")
    return done.stdout.decode("utf-8", "replace").splitlines()


class _Snapshot(msgspec.Struct):
    created_at: float
    schema: str
    version: int
    hashes: list[str] | None


async def _snapshot_and_dump(conn: Any, pg_dump: str, env: Mapping[str, str], dest: Path) -> _Snapshot:
    """In one repeatable-read, read-only transaction: export its snapshot, read what the archive
    needs, and run ``pg_dump`` in that same snapshot (the transaction stays open until it is done)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        snapshot_id = str(await conn.fetchval("SELECT pg_export_snapshot()"))
        created_at = time.time()
        schema = await conn.fetchval("SELECT current_schema()")
        if schema is None:
            path = await conn.fetchval("SELECT current_setting('search_path')")
            raise FailedPrecondition(f"no schema of the store's search_path ({path}) exists: nothing to back up")
        if await conn.fetchval("SELECT to_regclass('schema_version')") is None:
            raise FailedPrecondition(f"schema {schema!r} holds no bastion store (it has no schema_version table)")
        version = int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))
        has_files = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()"
            " AND table_name = 'files' AND column_name = 'sha256')"
        )
        hashes = None
        if has_files:
            rows = await conn.fetch("SELECT DISTINCT sha256 FROM files WHERE sha256 IS NOT NULL ORDER BY 1")
            hashes = [str(row[0]) for row in rows]
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            args = [
                pg_dump, "--format=custom", "--no-owner", "--no-password", f"--snapshot={snapshot_id}",
                f"--schema={_quote(schema)}", f"--lock-wait-timeout={PG_LOCK_WAIT_TIMEOUT}",
            ]  # fmt: skip
            await _run_tool(args, env, fd)
        finally:
            os.close(fd)
    return _Snapshot(created_at, str(schema), version, hashes)


@contextlib.asynccontextmanager
async def _connect(dsn: str, password: str | None) -> AsyncIterator[Any]:
    """A connection of its own to ``dsn``'s database (no pool, no migration); errors become bastion's."""
    shown = redact_dsn(dsn)
    if dsn.startswith("postgresql+asyncpg://"):
        dsn = "postgresql://" + dsn[len("postgresql+asyncpg://") :]
    try:
        conn = await asyncpg.connect(dsn, password=password, timeout=10)
    except (OSError, TimeoutError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError) as exc:
        raise Unavailable(f"cannot reach PostgreSQL at {shown}: {exc}") from None
    except (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
        raise UsageError(f"cannot connect to PostgreSQL at {shown}: {exc}") from None
    try:
        yield conn
    except BastionError:
        raise
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise Unavailable(f"PostgreSQL at {shown}: {type(exc).__name__}: {exc}") from exc
    finally:
        await conn.close()


async def backup_postgres(
    source: PostgresStore | str,
    files_dir: Path,
    out_path: Path,
    passphrase: bytes | None,
    *,
    password: str | None = None,
    scrypt_log_n: int = DEFAULT_SCRYPT_LOG_N,
) -> ArchiveInfo:
    """Back up a PostgreSQL store and the blobs it refers to into ``out_path``.

    ``source`` is an open ``PostgresStore`` (its pool lends the connection)
    or a ``postgresql://`` DSN (a connection of its own; the store is *not*
    migrated, so a database an older bastion wrote is archived as it is),
    with ``password`` kept out of the DSN. The schema archived is the
    store's: the first existing schema of the DSN's ``search_path``.

    One repeatable-read transaction exports its snapshot, lists the blobs
    the ``files`` table names, and stays open while ``pg_dump --snapshot``
    dumps the schema in that very snapshot: the database and the blob list
    are one point in time, while writes go on. The dump goes to a 0600
    temporary file beside ``out_path``, is read back with ``pg_restore
    --list``, then archived as ``db/postgres.dump``.
    """
    store = source if isinstance(source, PostgresStore) else PostgresStore(source, password=password)
    pg_dump, pg_restore = _tool("pg_dump"), _tool("pg_restore")
    env = pg_environment(store)
    out_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with staging_dir(out_path.parent) as staging:
        dump = staging / "postgres.dump"

        async def run(conn: Any) -> _Snapshot:
            return await _snapshot_and_dump(conn, pg_dump, env, dump)

        if isinstance(source, PostgresStore):
            snap = await source._call(run)  # a pooled connection; errors translated by the store
        else:
            async with _connect(source, password) as conn:
                snap = await run(conn)
        await asyncio.to_thread(_toc, pg_restore, dump)
        blobs = blob_members(files_dir, snap.hashes)
        return await asyncio.to_thread(
            lambda: write_archive(
                out_path, backend="postgresql", schema_version=snap.version, created_at=snap.created_at,
                db_member=(POSTGRES_MEMBER, dump), blobs=blobs, passphrase=passphrase, schema=snap.schema,
                scrypt_log_n=scrypt_log_n,
            )
        )  # fmt: skip


def _search_path(setting: str) -> list[str]:
    """The schema names of a ``search_path`` value, unquoted (unquoted names fold to lower case)."""
    names = []
    for item in re.findall(r'\s*("(?:[^"]|"")*"|[^,]+)\s*(?:,|$)', setting):
        item = item.strip()
        if item.startswith('"') and item.endswith('"') and len(item) >= 2:
            names.append(item[1:-1].replace('""', '"'))
        elif item:
            names.append(item.lower())
    return names


async def _target_schema(conn: Any) -> str:
    """The schema a store opened with this connection's settings would use, once it exists:
    the first of ``search_path`` (``$user`` only if that schema exists), else ``public``."""
    setting = str(await conn.fetchval("SELECT current_setting('search_path')"))
    for name in _search_path(setting):
        if name == "$user":
            user = str(await conn.fetchval("SELECT current_user"))
            if await _schema_objects(conn, user) is not None:
                return user
            continue
        return name
    return "public"


async def _schema_objects(conn: Any, schema: str) -> int | None:
    """How many tables, sequences, views, functions and types ``schema`` holds; None if it does not exist."""
    value = await conn.fetchval(
        """SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = n.oid)
                + (SELECT count(*) FROM pg_proc WHERE pronamespace = n.oid)
                + (SELECT count(*) FROM pg_type WHERE typnamespace = n.oid AND typtype IN ('d', 'e', 'r', 'm'))
           FROM pg_namespace n WHERE nspname = $1""",
        schema,
    )
    return None if value is None else int(value)


async def _check_target(conn: Any, schema: str, force: bool) -> int | None:
    objects = await _schema_objects(conn, schema)
    if objects and not force:
        raise FailedPrecondition(
            f"the target schema {schema!r} is not empty ({objects} tables, sequences, functions or types): "
            "restore into an empty or new schema, or pass --force to rename it aside first"
        )
    return objects


async def _aside_name(conn: Any, schema: str, stamp: str) -> str:
    suffix = f"_pre_restore_{stamp}"
    base = schema.encode()[: _IDENTIFIER_MAX - len(suffix) - 4].decode("utf-8", "ignore") + suffix
    name, n = base, 0
    while await _schema_objects(conn, name) is not None:
        n += 1
        name = f"{base}_{n}"
    return name


def _without_schema_entries(toc: list[str]) -> list[str]:
    """The dump's table of contents minus creating (and commenting on, granting on) the schema itself,
    for restoring into a schema that exists already."""
    skip = re.compile(r"^\d+; \d+ \d+ (SCHEMA - |COMMENT - SCHEMA |ACL - SCHEMA )")
    return [line for line in toc if not skip.match(line)]


async def restore_postgres(
    archive: Path,
    dsn: str,
    files_dir: Path,
    passphrase: bytes | None,
    *,
    password: str | None = None,
    schema: str | None = None,
    force: bool = False,
    now: float | None = None,
) -> RestoreResult:
    """Verify ``archive`` completely, then restore its PostgreSQL dump into ``dsn`` and its blobs into ``files_dir``.

    The target schema is ``schema``, else the one a store opened with
    ``dsn`` would use (the first of its ``search_path``; ``public``
    without one). A target holding anything is refused unless ``force``:
    then it is renamed ``<schema>_pre_restore_<time>`` (kept, not dropped).

    ``pg_restore --single-transaction --exit-on-error`` recreates the schema
    under the name it had when archived (the dump names it in every
    statement); a different target name is reached by renaming it afterwards,
    which needs the archived name to be free in the target database. Stop
    the servers using the target first: a server connected meanwhile would
    see the schema disappear and come back.
    """
    target_store = PostgresStore(dsn, password=password)  # never opened: how to reach the database
    pg_restore = _tool("pg_restore")
    env = pg_environment(target_store)
    stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime(now or time.time()))
    async with _connect(dsn, password) as conn:
        target = schema or await _target_schema(conn)
        await _check_target(conn, target, force)  # fail fast, before reading a large archive
        with staging_dir(files_dir.parent) as staging:
            manifest = await asyncio.to_thread(_read_checked, archive, staging, passphrase)
            if manifest.backend != "postgresql":
                raise InvalidArgument(
                    f"this archive holds a {manifest.backend} store: restore it with --data-dir, not into PostgreSQL"
                )
            archived = manifest.schema or "public"
            dump = staging / POSTGRES_MEMBER
            toc = await asyncio.to_thread(_toc, pg_restore, dump)
            objects = await _check_target(conn, target, force)
            if archived != target and await _schema_objects(conn, archived) is not None:
                raise FailedPrecondition(
                    f"the archive holds schema {archived!r}, which exists in the target database: pg_restore can "
                    f"only recreate that name (then renamed to {target!r}); restore into another database, or "
                    f"rename {archived!r} first"
                )
            kept: list[str] = []
            aside = None
            if objects:  # and force
                aside = await _aside_name(conn, target, stamp)
                await conn.execute(f"ALTER SCHEMA {_quote(target)} RENAME TO {_quote(aside)}")
                kept.append(f"schema {aside}")
                log.warning("restore: schema %s renamed to %s", target, aside)
            created = False
            try:
                args = [pg_restore, "--no-owner", "--single-transaction", "--exit-on-error", "--no-password"]
                if archived == target and await _schema_objects(conn, target) is not None:
                    listing = staging / "toc.list"
                    listing.write_text("\n".join(_without_schema_entries(toc)) + "\n")
                    args.append(f"--use-list={listing}")
                # Host, user, database, password: from the environment (a conninfo with "=" is not a name).
                args += ["--dbname=application_name=bastion-restore", str(dump)]
                await _run_tool(args, env, subprocess.DEVNULL)
                created = archived != target
                if archived != target:
                    async with conn.transaction():
                        if await _schema_objects(conn, target) is not None:  # empty (checked): nothing lost
                            await conn.execute(f"DROP SCHEMA {_quote(target)} RESTRICT")
                        await conn.execute(f"ALTER SCHEMA {_quote(archived)} RENAME TO {_quote(target)}")
                    created = False
                version = await conn.fetchval(f"SELECT max(version) FROM {_quote(target)}.schema_version")
                if version != manifest.schema_version:
                    raise DataLoss(
                        f"the restored schema is at version {version}, the archive said {manifest.schema_version}"
                    )
            except BaseException:
                if created:
                    await conn.execute(f"DROP SCHEMA IF EXISTS {_quote(archived)} CASCADE")
                if aside is not None and await _schema_objects(conn, target) is None:
                    await conn.execute(f"ALTER SCHEMA {_quote(aside)} RENAME TO {_quote(target)}")
                raise
            kept += _swap_files(staging / "files", files_dir, stamp.replace("_", "T"))
    return RestoreResult(manifest, [f"schema {target}", str(files_dir)], kept)
