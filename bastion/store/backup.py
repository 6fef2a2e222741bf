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
checked (``archive_read.read_archive``), the SQLite copy passes
``integrity_check`` and is at the manifest's schema version; only then is the old data renamed aside
(``<name>.pre-restore-<ts>``) and the staged data renamed into place.
Either backend's restore carries the replaced store's kv revision counter
over, so versions never go back (bastion/store/restore_kv.py), and its
durable topics' offsets, so offsets never go back (restore_topics.py).

PostgreSQL: ``pg_dump`` and ``pg_restore`` reach the database through
their environment (``PGHOST``, ``PGUSER``, ``PGDATABASE``, ``PGPASSWORD``,
``PGOPTIONS`` … from ``PostgresStore.libpq_connection()``), never their
command line. Restoring verifies the archive as above, reads the dump
back (``pg_restore --list``) and checks its ``schema_version`` rows
against the manifest, before it changes anything; a non-empty target
schema is refused unless ``force``, which renames it
``<schema>_pre_restore_<ts>``; the dump's SQL (``pg_restore --file=-``)
recreates the schema under its archived name (a dump names its schema in
every statement), renamed to the target afterwards if that differs --
which needs the archived name free in the target database. That rename
aside, the dump's SQL, the rename to the target and a check of the restored
version run in one transaction through ``psql``, committed only once
``pg_restore`` has ended cleanly: killed or failing at any point, the
restore leaves the old schema in place. The blobs are swapped in as for
SQLite, before that transaction: renames, which its failure can undo; until
it commits, the old blobs are linked in beside the restored ones, so a
crash leaves either database with every blob it names. The
pieces of this (the tools' environment, the snapshot, the target schema)
are in bastion/store/backup_pg.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sqlite3
import time
import urllib.parse
from pathlib import Path
from typing import Any

import msgspec

from bastion.durable import fsync_dir
from bastion.exceptions import DataLoss, FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from bastion.store.archive import (
    BLOB_PATH,
    DEFAULT_SCRYPT_LOG_N,
    FILE_MODE,
    POSTGRES_MEMBER,
    SQLITE_MEMBER,
    ArchiveInfo,
    Manifest,
    refuse_existing,
    write_archive,
)
from bastion.store.archive_read import read_archive, staging_dir
from bastion.store.backup_blobs import hold_blobs
from bastion.store.backup_pg import (
    VERSION_MISMATCH,
    _aside_name,
    _check_target,
    _connect,
    _dump_version,
    _quote,
    _schema_objects,
    _Snapshot,
    _snapshot_and_dump,
    _target_schema,
    _toc,
    _tool,
    _without_schema_entries,
    link_old_blobs,
    pg_environment,
    restore_in_one_transaction,
    unlink_blobs,
)
from bastion.store.backup_progress import Meter, Progress, watch_file
from bastion.store.leftovers import private_temporary
from bastion.store.migrations import current_version
from bastion.store.postgres import PostgresStore
from bastion.store.restore_checks import check_not_in_use, refuse_files_dir_over
from bastion.store.restore_journal import Journal, refuse_if_interrupted, undo_interrupted
from bastion.store.restore_kv import carry_revisions_sqlite, postgres_carry_sql
from bastion.store.restore_swap import _free, _Moves, _not_put_in_place, _swap_files
from bastion.store.restore_topics import carry_offsets_sqlite, postgres_topics_carry_sql

__all__ = [
    "RestoreResult",
    "backup_postgres",
    "backup_sqlite",
    "check_not_in_use",
    "refuse_files_dir_over",
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


def snapshot_sqlite(db_path: Path, dest: Path, progress: Progress | None = None) -> int:
    """Copy the SQLite store at ``db_path`` to ``dest`` (a new file, 0600) in one consistent step.

    Uses SQLite's online backup API from a connection of its own, so a server
    may keep writing meanwhile (WAL: readers do not block the writer). The
    copy is made self-contained (rollback journal) and must pass
    ``integrity_check``. Returns the copy's schema version. ``progress`` hears the ``snapshot`` phase
    (bastion/store/backup_progress.py): the copy's size as it grows, up to the store's.
    """
    if not db_path.is_file():
        raise FailedPrecondition(f"no SQLite store at {db_path}")
    os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    src = sqlite3.connect(_read_only(db_path), uri=True, isolation_level=None, timeout=30)
    try:
        dst = sqlite3.connect(dest, isolation_level=None)
        try:
            size = _size(src) if progress is not None else None
            with watch_file(dest, Meter(progress, "snapshot", size)):
                src.backup(dst)  # pages=-1: every page in one step, under one read transaction
                dst.execute("PRAGMA journal_mode=DELETE")
                _check_integrity(dst, "the snapshot")
            return current_version(dst)
        finally:
            dst.close()
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:  # the copy's disk, not the store
            raise ResourceExhausted(
                f"no space left to copy the SQLite store in {dest.parent.parent} ({exc}); nothing was kept"
            ) from exc
        raise Unavailable(f"cannot copy the SQLite store {db_path}: {exc}") from exc
    finally:
        src.close()


def _size(conn: sqlite3.Connection) -> int:
    """The bytes of the database ``conn`` has open (its WAL's pages included)."""
    return int(conn.execute("PRAGMA page_count").fetchone()[0]) * int(conn.execute("PRAGMA page_size").fetchone()[0])


def _read_only(path: Path) -> str:
    """A ``file:`` URI opening ``path`` read-only. The path is percent-encoded: pasted in, a ``?`` or ``#``
    in it (``data#1/``) ended the path there and dropped ``mode=ro`` -- SQLite then created an empty
    database at the cut-off path, and the backup archived that."""
    return f"file:{urllib.parse.quote(str(path.absolute()), safe='/')}?mode=ro"


def _check_integrity(conn: sqlite3.Connection, what: str) -> None:
    rows = conn.execute("PRAGMA integrity_check").fetchall()
    if [tuple(r) for r in rows] != [("ok",)]:
        problems = "; ".join(str(r[0]) for r in rows[:5])
        raise DataLoss(f"{what} fails SQLite's integrity check: {problems}")


def referenced_blobs_sqlite(db_copy: Path) -> list[str] | None:
    """The blob hashes the snapshot's ``files`` table names (None: it has no such column)."""
    conn = sqlite3.connect(_read_only(db_copy), uri=True)
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
    progress: Progress | None = None,
) -> ArchiveInfo:
    """Take a backup of the SQLite store at ``db_path`` and its blobs in ``files_dir`` into ``out_path``.

    Blocking (run it in a thread); safe while a server runs on the store. ``progress`` hears the phases
    ``snapshot``, ``blobs`` and ``archive`` (bastion/store/backup_progress.py).
    """
    refuse_existing(out_path)  # before the work, not only after it
    refuse_if_interrupted(db_path)  # a half-restored data directory: a mix of two points in time
    out_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The unencrypted copy goes beside the database, never into the backup directory (a share, off-site).
    with staging_dir(db_path.parent) as staging:
        copy = staging / "bastion.db"
        created_at = time.time() if now is None else now
        version = snapshot_sqlite(db_path, copy, progress)
        members, kind = blob_members(files_dir, referenced_blobs_sqlite(copy))
        blobs = (hold_blobs(members, staging, progress), kind)  # backup_blobs.py: safe from the sweep from now on
        return write_archive(
            out_path, backend="sqlite", schema_version=version, created_at=created_at,
            db_member=(SQLITE_MEMBER, copy), blobs=blobs, passphrase=passphrase, scrypt_log_n=scrypt_log_n,
            progress=progress,
        )  # fmt: skip


# -- verifying ----------------------------------------------------------------------------------------


def verify_archive(
    archive: Path, passphrase: bytes | None, *, scratch: Path | None = None, progress: Progress | None = None
) -> Manifest:
    """Check every byte of ``archive`` and the database it holds, extracted (decrypted) into a new private
    directory under ``scratch``, else in the system's temporary directory -- never beside the archive: a
    backup directory holds archives only -- and removed afterwards. ``progress`` hears ``verify``."""
    with staging_dir(scratch) if scratch else private_temporary() as staging:
        return _read_checked(archive, staging, passphrase, blobs=False, progress=progress)  # only the database


def _read_checked(
    archive: Path, staging: Path, passphrase: bytes | None, *, blobs: bool = True, progress: Progress | None = None
) -> Manifest:
    """``read_archive`` (every byte checked, members extracted under ``staging``), then the database
    member's own checks: a SQLite copy must pass ``integrity_check`` and be at the manifest's schema
    version (as ``restore_postgres`` checks the dump's)."""
    manifest = read_archive(archive, staging, passphrase, blobs=blobs, progress=progress)
    if manifest.backend == "sqlite":
        conn = sqlite3.connect(_read_only(staging / SQLITE_MEMBER), uri=True)
        try:
            _check_integrity(conn, "the archived database")
            version = current_version(conn)
        except sqlite3.DatabaseError as exc:
            raise DataLoss(f"the archived database is unreadable: {exc}") from exc
        finally:
            conn.close()
        if version != manifest.schema_version:
            raise DataLoss(
                f"the archived database is at schema version {version}, its manifest says "
                f"{manifest.schema_version}: the archive is inconsistent; nothing was changed"
            )
    return manifest


# -- restoring --------------------------------------------------------------------------------------------


def restore_sqlite(
    archive: Path,
    db_path: Path,
    files_dir: Path,
    passphrase: bytes | None,
    *,
    now: float | None = None,
    progress: Progress | None = None,
) -> RestoreResult:
    """Verify ``archive`` completely, then put its database at ``db_path`` and its blobs in ``files_dir``.

    The old database (with its ``-wal``/``-shm``) and files directory are
    renamed to ``<name>.pre-restore-<ts>``; nothing is deleted. Nothing is
    changed at all unless the whole archive checks out, and a failure while
    putting it in place (e.g. a files directory that cannot be renamed: a
    mount point) moves everything back. Each rename is journalled first
    (bastion/store/restore_journal.py): a restore killed half way is undone
    by the next one, and until then the store refuses to open. ``progress`` hears ``verify``, then
    ``restore`` (bastion/store/backup_progress.py).
    """
    refuse_files_dir_over(files_dir, db_path.parent, db_path)
    check_not_in_use(db_path)
    undo_interrupted(db_path, files_dir)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now or time.time()))
    with staging_dir(db_path.parent) as staging:
        manifest = _read_checked(archive, staging, passphrase, progress=progress)
        if manifest.backend != "sqlite":
            raise InvalidArgument(f"this archive holds a {manifest.backend} store: restore it with --store URL")
        meter = Meter(progress, "restore", sum(m.size for m in manifest.members))
        check_not_in_use(db_path)
        _carry_over(db_path, staging / SQLITE_MEMBER)
        kept: list[str] = []
        journal = Journal(db_path, staging)
        moves = _Moves(journal)
        try:
            for suffix in ("", "-wal", "-shm", "-journal"):
                old = db_path.with_name(db_path.name + suffix)
                if old.exists():
                    aside = _free(db_path.with_name(f"{db_path.name}.pre-restore-{stamp}{suffix}"))
                    moves.rename(old, aside)
                    kept.append(str(aside))
            moves.rename(staging / SQLITE_MEMBER, db_path)
            kept += _swap_files(staging / "files", files_dir, stamp, moves)
            for directory in {db_path.parent, files_dir.parent}:
                fsync_dir(directory)
            journal.finish()
            meter.finish()
        except BaseException as exc:
            if moves.undo():
                journal.finish()  # else kept: the store refuses to open until a restore undoes the rest
            if isinstance(exc, OSError):
                raise _not_put_in_place(exc) from exc
            raise
    return RestoreResult(manifest, [str(db_path), str(files_dir)], kept)


def _carry_over(db_path: Path, staged: Path) -> None:
    """The replaced store's kv counter (restore_kv.py) and topic offsets (restore_topics.py), into ``staged``;
    a disk too full for that (the carried messages take room) is ``ResourceExhausted``, nothing changed."""
    try:
        carry_revisions_sqlite(db_path, staged)
        carry_offsets_sqlite(db_path, staged)
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
            raise
        raise ResourceExhausted(
            f"no space left in {db_path.parent} to carry the replaced store's kv versions and topic offsets over "
            f"({exc}); nothing was changed"
        ) from exc


def _around_restore(target: str, archived: str, aside: str | None, version: int | None) -> tuple[str, str]:
    """The SQL run before and after the dump's in the restore's one transaction (see restore_postgres)."""
    before = f"ALTER SCHEMA {_quote(target)} RENAME TO {_quote(aside)};" if aside is not None else ""
    after = []
    if archived != target:  # the dump recreates its own name; an empty target of the other is dropped
        after += [
            f"DROP SCHEMA IF EXISTS {_quote(target)} RESTRICT;",
            f"ALTER SCHEMA {_quote(archived)} RENAME TO {_quote(target)};",
        ]
    if aside is not None:  # the replaced store's kv counter and topic offsets carry over (restore_kv.py,
        # restore_topics.py)
        after += [postgres_carry_sql(target, aside), postgres_topics_carry_sql(target, aside)]
    expected = "NULL" if version is None else str(int(version))
    after.append(
        "DO $check$ DECLARE restored integer; BEGIN"
        f" SELECT max(version) INTO restored FROM {_quote(target)}.schema_version;"
        f" IF restored IS DISTINCT FROM {expected} THEN RAISE EXCEPTION"
        f" '{VERSION_MISMATCH} %, the archive said {expected}', restored; END IF; END $check$;"
    )
    return before, "\n".join(after)


async def _committed(conn: Any, target: str, aside: str | None) -> bool:
    """Whether a restore's transaction committed, its psql having failed: its old schema is aside (forced),
    or else the target, which held nothing before, holds the restored store."""
    if aside is not None:
        return await _schema_objects(conn, aside) is not None
    return bool(await _schema_objects(conn, target))


# -- PostgreSQL ---------------------------------------------------------------------------------------


async def backup_postgres(
    source: PostgresStore | str,
    files_dir: Path,
    out_path: Path,
    passphrase: bytes | None,
    *,
    password: str | None = None,
    scrypt_log_n: int = DEFAULT_SCRYPT_LOG_N,
    progress: Progress | None = None,
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
    --list``, then archived as ``db/postgres.dump``. ``progress`` hears the phases ``blobs``, ``pg_dump``
    (the dump's size as it grows) and ``archive`` (bastion/store/backup_progress.py).
    """
    store = source if isinstance(source, PostgresStore) else PostgresStore(source, password=password)
    pg_dump, pg_restore = _tool("pg_dump"), _tool("pg_restore")
    env = pg_environment(store)
    refuse_existing(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The unencrypted dump goes beside the files (the data directory), never into the backup directory.
    with staging_dir(files_dir.parent) as staging:
        dump = staging / "postgres.dump"
        held: list[tuple[list[tuple[str, Path]], str]] = []
        dumping = contextlib.ExitStack()  # pg_dump's progress: its file watched from when it starts

        async def hold(hashes: list[str] | None) -> None:  # named in the snapshot, before pg_dump's long run
            members, kind = blob_members(files_dir, hashes)
            held.append((await asyncio.to_thread(hold_blobs, members, staging, progress), kind))
            dumping.enter_context(watch_file(dump, Meter(progress, "pg_dump")))

        async def run(conn: Any) -> _Snapshot:
            return await _snapshot_and_dump(conn, pg_dump, env, dump, hold)

        with dumping:
            if isinstance(source, PostgresStore):
                snap = await source._call(run)  # a pooled connection; errors translated by the store
            else:
                async with _connect(source, password) as conn:
                    snap = await run(conn)
        await asyncio.to_thread(_toc, pg_restore, dump)
        blobs = held[-1]
        return await asyncio.to_thread(
            lambda: write_archive(
                out_path, backend="postgresql", schema_version=snap.version, created_at=snap.created_at,
                db_member=(POSTGRES_MEMBER, dump), blobs=blobs, passphrase=passphrase, schema=snap.schema,
                scrypt_log_n=scrypt_log_n, progress=progress,
            )
        )  # fmt: skip


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
    data_dir: Path | None = None,
    progress: Progress | None = None,
) -> RestoreResult:
    """Verify ``archive`` completely, then restore its PostgreSQL dump into ``dsn`` and its blobs into ``files_dir``.

    The target schema is ``schema``, else the one a store opened with
    ``dsn`` would use (the first of its ``search_path``; ``public``
    without one). A target holding anything is refused unless ``force``:
    then it is renamed ``<schema>_pre_restore_<time>`` (kept, not dropped).

    The dump's SQL (``pg_restore --file=-``) recreates the schema under the
    name it had when archived (the dump names it in every statement); a
    different target name is reached by renaming it afterwards, which needs
    the archived name to be free in the target database. Renaming the old
    schema aside, the dump's SQL, renaming the restored schema to the target
    and checking its version are one transaction (``psql``,
    ``restore_in_one_transaction``): a restore that fails or is killed at any
    point leaves the old schema where it was, a finished one the new. Stop
    the servers using the target first: a server connected meanwhile would
    see the schema replaced under it. ``data_dir``: the servers' data
    directory, which ``files_dir`` may not be or hold (``refuse_files_dir_over``;
    without it, one is recognised by its files in ``files_dir`` or a
    directory directly in it). ``progress`` hears ``verify``, then ``restore``.
    """
    refuse_files_dir_over(files_dir, data_dir)
    target_store = PostgresStore(dsn, password=password)  # never opened: how to reach the database
    pg_restore, psql = _tool("pg_restore"), _tool("psql")
    env = pg_environment(target_store)
    stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime(now or time.time()))
    async with _connect(dsn, password) as conn:
        target = schema or await _target_schema(conn)
        await _check_target(conn, target, force)  # fail fast, before reading a large archive
        with staging_dir(files_dir.parent) as staging:
            manifest = await asyncio.to_thread(lambda: _read_checked(archive, staging, passphrase, progress=progress))
            if manifest.backend != "postgresql":
                raise InvalidArgument(
                    f"this archive holds a {manifest.backend} store: restore it with --data-dir, not into PostgreSQL"
                )
            archived = manifest.schema or "public"
            dump = staging / POSTGRES_MEMBER
            toc = await asyncio.to_thread(_toc, pg_restore, dump)
            dumped = await asyncio.to_thread(_dump_version, pg_restore, dump, archived)
            if dumped != manifest.schema_version:
                raise DataLoss(
                    f"the archive's dump is at schema version {dumped}, its manifest says "
                    f"{manifest.schema_version}: the archive is inconsistent; nothing was changed"
                )
            objects = await _check_target(conn, target, force)
            if archived != target and await _schema_objects(conn, archived) is not None:
                raise FailedPrecondition(
                    f"the archive holds schema {archived!r}, which exists in the target database: pg_restore can "
                    f"only recreate that name (then renamed to {target!r}); restore into another database, or "
                    f"rename {archived!r} first"
                )
            kept: list[str] = []
            aside = await _aside_name(conn, target, stamp) if objects else None  # objects: forced
            listing = None
            if archived == target and objects == 0:  # an empty target of the archived name: kept as it is
                listing = staging / "toc.list"
                listing.write_text("\n".join(_without_schema_entries(toc)) + "\n")
            moves = _Moves()
            meter = Meter(progress, "restore", sum(m.size for m in manifest.members))
            interrupted: BaseException | None = None
            try:
                # The files first: renames, which a failure of the restore's transaction can undo; the old
                # blobs beside the new until it commits, in case it never does.
                linked = await asyncio.to_thread(link_old_blobs, staging / "files", files_dir)
                kept += _swap_files(staging / "files", files_dir, stamp.replace("_", "T"), moves)
                before, after = _around_restore(target, archived, aside, manifest.schema_version)
                await restore_in_one_transaction(pg_restore, psql, env, dump, listing, before, after)
            except BaseException as exc:
                try:
                    committed = await _committed(conn, target, aside)
                except Exception:  # cannot tell: the usual case is a failure before COMMIT
                    committed = False
                if not committed:
                    moves.undo()
                    raise
                log.warning("restore: psql failed after its COMMIT reached the server: the restore is complete")
                interrupted = exc if not isinstance(exc, Exception) else None  # raised once the restore is done
            await asyncio.to_thread(unlink_blobs, files_dir, linked)
            if aside is not None:
                kept.insert(0, f"schema {aside}")
                log.warning("restore: schema %s renamed to %s", target, aside)
            if interrupted is not None:
                raise interrupted
            meter.finish()
    return RestoreResult(manifest, [f"schema {target}", str(files_dir)], kept)
