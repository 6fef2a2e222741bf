"""``bastion backup`` and ``bastion restore``.

The passphrase that encrypts (or decrypts) an archive comes from
``BASTION_BACKUP_PASSPHRASE`` or a file named with ``--passphrase-file`` (or
``backup.passphrase_file`` of the configuration) -- never from a flag
holding the secret itself.

Where the store is comes from the same configuration ``bastion serve``
reads (``--config`` file < ``BASTION_*`` environment < ``--data-dir`` /
``--store`` flags), so a PostgreSQL DSN holding a password can live in
``BASTION_STORE`` and its password in ``store_password_file``; ``--store``
refuses one with a password.

Both show their progress on standard error (the store reports it:
bastion/store/backup_progress.py): a rich progress bar on a terminal; else,
for logs, a line as each phase starts and at most one more every
``LINE_EVERY`` seconds; nothing with ``--no-progress``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer

from bastion.cli.common import (
    CA,
    EXIT_UNAVAILABLE,
    ClientCert,
    ClientKey,
    Insecure,
    TokenFile,
    connect,
    print_json,
    run_guarded,
    store_flag,
)
from bastion.exceptions import InvalidArgument, UsageError

if TYPE_CHECKING:  # loaded by the commands that run, not by every ``bastion`` command
    from bastion.config import Config
    from bastion.store.archive import ArchiveInfo
    from bastion.store.backup_progress import Progress

__all__ = ["backup", "restore"]

PASSPHRASE_ENV = "BASTION_BACKUP_PASSPHRASE"

DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="The server's data directory (default ./bastion-data).")
]
FilesDir = Annotated[
    Path | None, typer.Option("--files-dir", help="Where file contents live (default <data-dir>/files).")
]
PassphraseFile = Annotated[
    Path | None,
    typer.Option(
        "--passphrase-file",
        help=f"File holding the archive passphrase (or set {PASSPHRASE_ENV}); without one, archives are "
        "written unencrypted.",
        show_default=False,
    ),
]


StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="The store: a SQLite path or sqlite:///path (default <data-dir>/bastion.db), or "
        "postgresql://user@host/db?search_path=SCHEMA (no password here: use BASTION_STORE, PGPASSWORD, "
        "~/.pgpass or store_password_file).",
        show_default=False,
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="The server's TOML configuration (store, data_dir, files and backup sections)."),
]

ShowProgress = Annotated[
    bool | None,
    typer.Option(
        "--progress/--no-progress",
        help="Progress on stderr: a bar on a terminal, else a line per phase and at most one more every "
        "10 s (default); --progress: the bar even when not a terminal; --no-progress: nothing.",
        show_default=False,
    ),
]

_POSTGRES = ("postgresql://", "postgres://", "postgresql+asyncpg://")
LINE_EVERY = 10.0  # seconds: the most often a progress line is printed when stderr is not a terminal
_LABELS = {
    "snapshot": "copying the database",
    "pg_dump": "dumping the database (pg_dump)",
    "blobs": "gathering the files' contents",
    "archive": "writing the archive",
    "verify": "verifying the archive",
    "restore": "putting the restored data in place",
}


def _amount(n: int) -> str:
    """``n`` bytes, for people: 512 B, 1.5 KiB, 3.2 MiB, 1.1 GiB …"""
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


class ProgressLines:
    """Progress as plain lines, for a log: one as each phase starts, then at most one every ``every`` seconds
    (the store reports every few MiB; printing each would flood the log)."""

    def __init__(self, out: TextIO, *, every: float = LINE_EVERY, clock: Callable[[], float] = time.monotonic) -> None:
        self._out = out
        self._every = every
        self._clock = clock
        self._phase: str | None = None
        self._next = 0.0
        self._lock = threading.Lock()  # reports may come from a worker thread

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        label = _LABELS.get(phase, phase)
        with self._lock:
            now = self._clock()
            if phase != self._phase:
                self._phase, self._next = phase, now + self._every
                self._print(f"{label}" + (f" ({_amount(total)})" if total else "") + "…")
            elif now >= self._next and (total is None or done < total):
                self._next = now + self._every
                of = f" of {_amount(total)} ({done * 100 // total}%)" if total else " so far"
                self._print(f"{label}: {_amount(done)}{of}")

    def _print(self, line: str) -> None:
        print(line, file=self._out, flush=True)


@contextlib.contextmanager
def _progress(show: bool | None) -> Iterator[Progress | None]:
    """The callback showing a backup's or restore's progress on stderr (None: ``--no-progress``)."""
    if show is False:
        yield None
        return
    from rich.console import Console

    console = Console(stderr=True, force_terminal=True if show else None)
    if not console.is_terminal:
        yield ProgressLines(sys.stderr)
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TaskID,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )
    from rich.progress import Progress as Bar

    columns = (
        TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), DownloadColumn(binary_units=True),
        TransferSpeedColumn(), TimeElapsedColumn(),
    )  # fmt: skip
    tasks: dict[str, TaskID] = {}
    with Bar(*columns, console=console, refresh_per_second=5) as bar:

        def report(phase: str, done: int, total: int | None) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(_LABELS.get(phase, phase), total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield report


DEFAULT_WAIT = 300.0
_POLL = 0.1  # seconds between tries of the lock while waiting


class _Busy(Exception):
    """Another backup kept the directory's lock for longer than --wait."""


def _lock(directory: Path, wait: float) -> int:
    """Hold ``directory``'s backup lock (as a server's backups do), waiting up to ``wait`` seconds for
    another backup being taken there to finish: its file descriptor (closing it lets go)."""
    deadline = time.monotonic() + wait
    said = False
    from bastion.services.backup import hold_lock

    while (fd := hold_lock(directory)) is None:
        if time.monotonic() >= deadline:
            after = f" after waiting {wait:g} s" if wait else ""
            raise _Busy(
                f"another backup is being taken in {directory} (a server's, or another bastion backup); "
                f"gave up{after}: try again later, or give --wait SECONDS"
            )
        if not said:
            print(
                f"waiting for another backup in {directory} to finish (up to {wait:g} s)…", file=sys.stderr, flush=True
            )
            said = True
        time.sleep(_POLL)
    return fd


def passphrase(path: Path | None, config: Config | None = None) -> bytes | None:
    """The passphrase from ``path``, else ``BASTION_BACKUP_PASSPHRASE``, else ``backup.passphrase_file``
    of ``config`` (None: no encryption)."""
    if path is not None:
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise UsageError(f"cannot read --passphrase-file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"--passphrase-file {path} is not UTF-8 text") from None
        if not text:
            raise UsageError(f"--passphrase-file {path} is empty")
        return text.encode()
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env.encode()
    if config is not None and config.backup.passphrase_file:
        from bastion.cli.serve import backup_passphrase

        return backup_passphrase(config)
    return None


def _config(path: Path | None, data_dir: Path | None, store: str | None) -> Config:
    """The configuration ``bastion serve`` would use: file < environment (BASTION_*) < these flags."""
    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = str(data_dir)
    if store is not None:
        overrides["store"] = store
    from bastion.config import load_config

    return load_config(path, overrides=overrides)


def _files_dir(config: Config, flag: Path | None) -> Path:
    if flag is not None:
        return flag
    return Path(config.files.directory) if config.files.directory else Path(config.data_dir) / "files"


def _refuse_files_over(files: Path, data_dirs: list[Path], db_path: Path | None) -> None:
    """A files directory that is the data directory, holds it, or is the database file is a usage error
    (exit 2), found up front."""
    from bastion.store.backup import refuse_files_dir_over

    for data_dir in data_dirs:
        try:
            refuse_files_dir_over(files, data_dir, db_path)
        except InvalidArgument as exc:
            raise UsageError(exc.message) from None


def _sqlite_path(location: str) -> Path:
    if location.startswith("sqlite:///"):
        return Path(location[len("sqlite:///") :])
    if "://" in location:
        raise InvalidArgument(f"store {location.split('://')[0]}://…: give a postgresql:// URL or a SQLite path")
    return Path(location)


def _store_password(config: Config) -> str | None:
    from bastion.cli.serve import store_password

    return store_password(config)


def backup(
    data_dir: DataDir = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Archive to write, a new file: an existing one is never replaced "
            "(default <data-dir>/backups/bastion-backup-<time>.bbk).",
        ),
    ] = None,
    files_dir: FilesDir = None,
    store: StoreOption = None,
    config: ConfigOption = None,
    passphrase_file: PassphraseFile = None,
    address: Annotated[
        str | None,
        typer.Option("--address", help="Ask the server at HOST:PORT to take the backup (admin.backup) instead."),
    ] = None,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
    wait: Annotated[
        float,
        typer.Option(
            "--wait",
            min=0,
            help="Seconds to wait for another backup being taken in the same directory (a server's scheduled or "
            "on-demand one, or another bastion backup) to finish; 0: fail at once. Gives up with exit code 3.",
        ),
    ] = DEFAULT_WAIT,
    progress: ShowProgress = None,
) -> None:
    """Take a verified backup archive of a store and its file contents.

    Safe while a server runs on the store: SQLite's online backup API, or
    for PostgreSQL (--store postgresql://…, or BASTION_STORE) pg_dump in one
    exported snapshot, copy a consistent point in time. With --address, the
    server takes the backup itself into its backup directory (and encrypts
    it with its own passphrase, if it has one). Like the server's backups, it
    holds the directory's .backup.lock while it runs, so only one backup is
    taken there at a time.
    """
    if not math.isfinite(wait):
        print("error: --wait must be a finite number of seconds", file=sys.stderr)
        raise typer.Exit(2)
    if address is not None:

        def remote() -> Any:
            with connect(address, token_file, ca, insecure, cert=client_cert, key=client_key, timeout=None) as client:
                return client.call("admin.backup")

        print_json(run_guarded(remote))
        return
    store = store_flag(store) if store is not None else None

    def local() -> ArchiveInfo:
        from bastion.cli.serve import store_location
        from bastion.store.archive import archive_name
        from bastion.store.backup import backup_postgres, backup_sqlite

        cfg = _config(config, data_dir, store)
        # The directory the server writes its backups into, so that both take the same lock.
        backups = Path(cfg.backup.directory) if cfg.backup.directory else Path(cfg.data_dir) / "backups"
        target = out or backups / archive_name(time.time())
        secret = passphrase(passphrase_file, cfg)
        files = _files_dir(cfg, files_dir)
        location = store_location(cfg)
        postgres = location.startswith(_POSTGRES)
        db_path = None if postgres else _sqlite_path(location)
        if db_path is not None and not db_path.is_file():
            raise UsageError(f"no SQLite store at {db_path}: is --data-dir (or --store) right?")
        held = _lock(target.parent, wait)
        try:
            with _progress(progress) as report:
                if db_path is None:
                    password = _store_password(cfg)
                    return asyncio.run(
                        backup_postgres(location, files, target, secret, password=password, progress=report)
                    )
                return backup_sqlite(db_path, files, target, secret, progress=report)
        finally:
            os.close(held)  # lets go of the lock

    started = time.monotonic()
    try:
        info = run_guarded(local)
    except _Busy as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    print_json(info)
    took = time.monotonic() - started
    print(
        f"backup written to {out or info.name} ({info.size} bytes, {info.blobs} blobs, {took:.1f} s)",
        file=sys.stderr,
    )


def restore(
    archive_path: Annotated[
        Path,
        typer.Argument(metavar="ARCHIVE", help="The archive to restore.", exists=True, dir_okay=False, readable=True),
    ],
    data_dir: DataDir = None,
    store: StoreOption = None,
    config: ConfigOption = None,
    files_dir: FilesDir = None,
    passphrase_file: PassphraseFile = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="PostgreSQL: restore even if the target schema is not empty, renaming it aside as "
            "<schema>_pre_restore_<time> first.",
        ),
    ] = False,
    check: Annotated[bool, typer.Option("--check", help="Only verify the archive; change nothing.")] = False,
    progress: ShowProgress = None,
) -> None:
    """Verify a backup archive completely, then restore it into a data directory or a PostgreSQL schema.

    Nothing is changed unless every byte of the archive checks out; the old
    database and files are kept as <name>.pre-restore-<time> (a PostgreSQL
    schema as <schema>_pre_restore_<time>, only with --force). Refuses to run
    while a server uses the SQLite data directory; stop the servers of a
    PostgreSQL schema first.
    """
    store = store_flag(store) if store is not None else None
    replaced = True  # a store was there to carry kv versions and topic offsets over from

    def run() -> Any:
        nonlocal replaced
        from bastion.cli.serve import store_location
        from bastion.store.backup import restore_postgres, restore_sqlite, verify_archive

        cfg = _config(config, data_dir, store)
        directory = Path(cfg.data_dir)
        secret = passphrase(passphrase_file, cfg)
        if check:
            with _progress(progress) as report:
                scratch = directory if directory.is_dir() else None
                return verify_archive(archive_path, secret, scratch=scratch, progress=report)
        files = _files_dir(cfg, files_dir)
        location = store_location(cfg)
        postgres = location.startswith(_POSTGRES)
        db_path = None if postgres else _sqlite_path(location)
        _refuse_files_over(files, [directory, *([] if db_path is None else [db_path.parent])], db_path)
        if db_path is None:
            password = _store_password(cfg)
            with _progress(progress) as report:
                restoring = restore_postgres(
                    archive_path, location, files, secret, password=password, force=force, data_dir=directory,
                    progress=report,
                )  # fmt: skip
                done = asyncio.run(restoring)
            replaced = any(kept.startswith("schema ") for kept in done.kept)  # forced over a store: renamed aside
            return done
        replaced = db_path.exists()
        db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _progress(progress) as report:
            return restore_sqlite(archive_path, db_path, files, secret, progress=report)

    started = time.monotonic()
    result = run_guarded(run)
    if check:
        print(f"archive OK: {len(result.members)} members, {result.backend}, schema {result.schema_version}")
        return
    summary = result.manifest
    print_json(
        {
            "restored": result.restored,
            "kept": result.kept,
            "backend": summary.backend,
            "schema": summary.schema,
            "schema_version": summary.schema_version,
            "created_at": summary.created_at,
            "members": len(summary.members),
        }
    )
    for path in result.kept:
        print(f"kept the previous data as {path}", file=sys.stderr)
    if not replaced:  # docs/operations.md, "Restores and kv versions"
        print(
            "warning: nothing to carry kv versions and topic offsets over from (a fresh place): they go on from "
            "the archive's, so those handed out since the backup will be handed out again -- have clients drop "
            "the kv versions they hold (watch without from_version) and resume topics with from_offset=0",
            file=sys.stderr,
        )
    print(f"restore complete ({time.monotonic() - started:.1f} s)", file=sys.stderr)
