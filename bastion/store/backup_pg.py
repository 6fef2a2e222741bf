"""PostgreSQL's side of backups: pg_dump and pg_restore, the snapshot a backup is taken in, a restore's target.

``backup_postgres`` and ``restore_postgres`` (bastion/store/backup.py, whose
module docstring tells how they work) are built from these: the environment
that hands the client tools the store's connection (``pg_environment``:
never the command line), running the tools and reading a dump's table of
contents back, a connection of its own, the repeatable-read transaction
that exports its snapshot to ``pg_dump`` and lists the blobs, the
schema a restore goes into (found from ``search_path``, checked empty, or
renamed aside), and the one transaction a restore is made in
(``restore_in_one_transaction``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from bastion.durable import fsync_dir
from bastion.exceptions import (
    BastionError,
    DataLoss,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
    UsageError,
)
from bastion.store.archive import FILE_MODE
from bastion.store.archive_read import private_dirs
from bastion.store.postgres import PostgresStore, redact_dsn
from bastion.store.postgres_errors import _describe_dsn_error

__all__ = ["PG_LOCK_WAIT_TIMEOUT", "link_old_blobs", "pg_environment", "restore_in_one_transaction", "unlink_blobs"]

log = logging.getLogger("bastion.backup")

# -- the client tools ----------------------------------------------------------------------------------

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
        if VERSION_MISMATCH in text:  # the restore's own check (backup.py): the archive, not the server
            raise DataLoss(f"{name} failed (exit status {returncode}): {tail}")
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


def _dump_version(pg_restore: str, dump: Path, schema: str) -> int:
    """The highest row of ``schema.schema_version`` in a custom-format dump (0: none), read from the dump.

    Lets a restore compare it with the manifest before it changes anything
    (a mismatch found only after ``pg_restore`` would leave the restored
    schema in place, the old one renamed aside).
    """
    args = [pg_restore, "--data-only", f"--schema={schema}", "--table=schema_version", "--file=-", str(dump)]
    done = subprocess.run(args, capture_output=True, check=False)
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip()[-2000:]
        raise DataLoss(f"the database dump does not read back (pg_restore --data-only): {message}")
    versions: list[int] = []
    copying = False
    for line in done.stdout.decode("utf-8", "replace").splitlines():
        if copying and line == "\\.":
            copying = False
        elif copying:
            try:
                versions.append(int(line.split("\t", 1)[0]))
            except ValueError:
                raise DataLoss(f"the dump's schema_version table holds a bad row: {line[:80]!r}") from None
        elif line.startswith("COPY ") and line.endswith(" FROM stdin;"):
            copying = True
    return max(versions, default=0)


# -- a backup's snapshot -------------------------------------------------------------------------------


class _Snapshot(msgspec.Struct):
    created_at: float
    schema: str
    version: int
    hashes: list[str] | None


async def _snapshot_and_dump(
    conn: Any,
    pg_dump: str,
    env: Mapping[str, str],
    dest: Path,
    hold: Callable[[list[str] | None], Awaitable[None]],
) -> _Snapshot:
    """In one repeatable-read, read-only transaction: export its snapshot, read what the archive
    needs, and run ``pg_dump`` in that same snapshot (the transaction stays open until it is done).
    ``hold`` is given the blobs the snapshot names (None: no ``files.sha256``) before ``pg_dump`` runs."""
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
        await hold(hashes)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            args = [
                pg_dump, "--format=custom", "--no-owner", "--no-password", f"--snapshot={snapshot_id}",
                f"--schema={_quote(schema)}", f"--lock-wait-timeout={PG_LOCK_WAIT_TIMEOUT}",
            ]  # fmt: skip
            try:
                await _run_tool(args, env, fd)
            except Unavailable as exc:
                if _disk_full(fd, exc.message):
                    raise ResourceExhausted(
                        f"no space left to write the database dump in {dest.parent.parent}; nothing was kept "
                        f"({exc.message})"
                    ) from exc
                raise
        finally:
            os.close(fd)
    return _Snapshot(created_at, str(schema), version, hashes)


def _disk_full(fd: int, message: str) -> bool:
    """Whether pg_dump, failing, ran out of room for its output ``fd``: it says so (in English), or the
    file system holding it has less than one of its writes left (in any language)."""
    if "No space left on device" in message or "Disk quota exceeded" in message:
        return True
    try:
        st = os.fstatvfs(fd)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


@contextlib.asynccontextmanager
async def _connect(dsn: str, password: str | None) -> AsyncIterator[Any]:
    """A connection of its own to ``dsn``'s database (no pool, no migration); errors become bastion's."""
    shown, given = redact_dsn(dsn), dsn
    if dsn.startswith("postgresql+asyncpg://"):
        dsn = "postgresql://" + dsn[len("postgresql+asyncpg://") :]
    try:
        conn = await asyncpg.connect(dsn, password=password, timeout=10)
    except (OSError, TimeoutError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError) as exc:
        raise Unavailable(f"cannot reach PostgreSQL at {shown}: {exc}") from None
    except (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
        reason = _describe_dsn_error(exc, given) if type(exc) is ValueError else str(exc)
        raise UsageError(f"cannot connect to PostgreSQL at {shown}: {reason}") from None
    try:
        yield conn
    except BastionError:
        raise
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise Unavailable(f"PostgreSQL at {shown}: {type(exc).__name__}: {exc}") from exc
    finally:
        await conn.close()


# -- a restore's target schema -------------------------------------------------------------------------


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


# -- a restore's one transaction -----------------------------------------------------------------------

_CHUNK = 1 << 16
#: Starts the message of the restore's schema version check (backup.py), which psql's failure then carries.
VERSION_MISMATCH = "bastion-restore: the restored schema is at version"
#: The most of pg_restore's output read looking for its ``\restrict`` line before giving up.
_HEAD_LIMIT = 1 << 20
_OLD_PG_RESTORE = (
    "pg_restore did not open its SQL with \\restrict, which keeps psql from obeying meta-commands a forged "
    "archive could carry (\\! runs a shell command): use PostgreSQL client tools 13.22, 14.19, 15.14, 16.10, "
    "17.6 or later; nothing was restored"
)


def _restricted(head: bytes) -> bool | None:
    r"""Whether SQL beginning with ``head`` opens (past comments and blank lines) with psql's ``\restrict``;
    None until a whole line says."""
    for line in head.split(b"\n")[:-1]:
        if line.strip() and not line.startswith(b"--"):
            return line.startswith(b"\\restrict ")
    return None


async def restore_in_one_transaction(
    pg_restore: str, psql: str, env: Mapping[str, str], dump: Path, listing: Path | None, before: str, after: str
) -> None:
    """Restore ``dump`` (only the entries of ``listing``, if given) with the SQL ``before`` and ``after`` it,
    all in one transaction: committed whole, or not at all.

    ``pg_restore --single-transaction`` cannot take in the statements around
    it (renaming the old schema aside, the restored one to the target), and
    made apart from it they left, when the process died between them, the
    target schema renamed aside and nothing in its place. So ``pg_restore``
    writes the restore's SQL (``--file=-``) and it is fed to ``psql`` between
    ``BEGIN`` + ``before`` and ``after`` + ``COMMIT``; ``COMMIT`` is sent only
    once ``pg_restore`` has ended cleanly. Should anything fail, or this
    process die, ``psql`` is stopped or reaches the end of its input with the
    transaction open, and the server rolls it back: the database is as it was.
    """
    psql_args = [
        psql,
        "-X",
        "-q",
        "--no-password",
        "-v",
        "ON_ERROR_STOP=1",
        "--dbname=application_name=bastion-restore",
    ]
    restore_args = [pg_restore, "--no-owner", "--exit-on-error", "--file=-"]
    restore_args += [f"--use-list={listing}"] if listing is not None else []
    sql = await asyncio.create_subprocess_exec(
        *psql_args, "--file=-", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(env)
    )
    assert sql.stdin is not None and sql.stderr is not None
    sql_err = asyncio.ensure_future(sql.stderr.read())
    tool: asyncio.subprocess.Process | None = None
    tool_err: asyncio.Future[bytes] | None = None
    committing = False  # COMMIT sent: psql must be left to finish it, whatever happens here
    try:
        tool = await asyncio.create_subprocess_exec(
            *restore_args, str(dump), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(env),
        )  # fmt: skip
        assert tool.stdout is not None and tool.stderr is not None
        tool_err = asyncio.ensure_future(tool.stderr.read())
        try:
            sql.stdin.write(f"BEGIN;\n{before}\n".encode())
            head: bytes | None = b""  # psql gets nothing before the \restrict line is seen
            while chunk := await tool.stdout.read(_CHUNK):
                if head is not None:
                    head += chunk
                    verdict = _restricted(head)
                    if verdict is None and len(head) < _HEAD_LIMIT:
                        continue
                    if not verdict:
                        raise FailedPrecondition(_OLD_PG_RESTORE)
                    chunk, head = head, None
                sql.stdin.write(chunk)
                await sql.stdin.drain()
            if head is not None:
                raise FailedPrecondition(_OLD_PG_RESTORE)
            await tool.wait()
            _check_tool("pg_restore", tool.returncode, await tool_err)
            # The script may end in a meta-command with no newline (\unrestrict KEY).
            sql.stdin.write(f"\n{after}\nCOMMIT;\n".encode())
            sql.stdin.close()
            committing = True
            await sql.wait()
        except (BrokenPipeError, ConnectionResetError):  # psql stopped at an error: it says which
            await sql.wait()
            _check_tool("psql", sql.returncode, await sql_err)
            raise Unavailable("psql stopped reading the restore before its end; nothing was committed") from None
        _check_tool("psql", sql.returncode, await sql_err)
    finally:
        if committing and sql.returncode is None:  # cancelled: a kill now could land after the COMMIT did
            await _wait_out(sql)
        for proc in (tool, sql):
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()  # psql killed before COMMIT: the server rolls the transaction back
                await proc.wait()
        for task in (sql_err, tool_err):
            if task is not None and not task.done():
                task.cancel()
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task


async def _wait_out(proc: asyncio.subprocess.Process) -> None:
    """Wait for ``proc`` to exit, however often this task is cancelled meanwhile; then re-raise that."""
    cancelled = False
    while proc.returncode is None:
        try:
            await asyncio.shield(proc.wait())
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


# -- the blobs either database needs, while the restore runs -------------------------------------------


def link_old_blobs(staged: Path, files_dir: Path) -> list[Path]:
    """Hard-link into ``staged`` each blob of ``files_dir`` it lacks; the links made (relative to ``staged``).

    The files directory is swapped before the restore's transaction commits:
    killed in between, the old database would be left with the restored
    blobs only. Blobs are named by their SHA-256, so the staged directory can
    hold both sets: whichever database a crash leaves finds its blobs, and
    once the new one is committed ``unlink_blobs`` removes the old ones from
    it (they stay in the old files directory, renamed aside). Where links
    cannot be made (another file system) this is skipped, with a warning.
    """
    linked: list[Path] = []
    made: set[Path] = set()
    for blob in sorted((files_dir / "blobs").glob("*/*")):
        dest = staged / "blobs" / blob.parent.name / blob.name
        if blob.is_symlink() or not blob.is_file() or os.path.lexists(dest):
            continue
        try:
            private_dirs(staged, dest.parent)
            os.link(blob, dest)
        except OSError as exc:
            log.warning("restore: cannot link the old blobs beside the restored ones (%s): until the restore "
                        "commits, a crash would leave the old database without them", exc)  # fmt: skip
            break
        linked.append(dest.relative_to(staged))
        made.add(dest.parent)
    for directory in sorted(made) + ([staged / "blobs"] if made else []):
        fsync_dir(directory)
    return linked


def unlink_blobs(files_dir: Path, linked: list[Path]) -> None:
    """Remove the old blobs ``link_old_blobs`` added, and the folders that leaves empty."""
    for name in linked:
        try:
            os.unlink(files_dir / name)
        except FileNotFoundError:
            pass
        except OSError as exc:  # only garbage left behind: the restore has committed
            log.warning("restore: could not remove the old blob %s: %s", name, exc)
    for folder in {files_dir / name.parent for name in linked}:
        with contextlib.suppress(OSError):
            folder.rmdir()  # if empty
