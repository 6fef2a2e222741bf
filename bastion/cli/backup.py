"""``bastion backup`` and ``bastion restore``.

The passphrase that encrypts (or decrypts) an archive comes from
``BASTION_BACKUP_PASSPHRASE`` or a file named with ``--passphrase-file`` --
never from a flag holding the secret itself.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from bastion.cli.common import CA, Insecure, TokenFile, connect, print_json, run_guarded
from bastion.exceptions import InvalidArgument, UsageError
from bastion.store import backup as archive

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


def passphrase(path: Path | None) -> bytes | None:
    """The passphrase from ``path`` or the environment (None: no encryption)."""
    if path is not None:
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise UsageError(f"cannot read --passphrase-file {path}: {exc.strerror}") from None
        if not text:
            raise UsageError(f"--passphrase-file {path} is empty")
        return text.encode()
    env = os.environ.get(PASSPHRASE_ENV)
    return env.encode() if env else None


def backup(
    data_dir: DataDir = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Archive to write (default <data-dir>/backups/bastion-backup-<time>.bbk)."),
    ] = None,
    files_dir: FilesDir = None,
    passphrase_file: PassphraseFile = None,
    address: Annotated[
        str | None,
        typer.Option("--address", help="Ask the server at HOST:PORT to take the backup (admin.backup) instead."),
    ] = None,
    token_file: TokenFile = None,
    ca: CA = None,
    insecure: Insecure = False,
) -> None:
    """Take a verified backup archive of a data directory: its store and file contents.

    Safe while a server runs on the data directory (SQLite's online backup API
    copies a consistent snapshot). With --address, the server takes the
    backup itself into its backup directory (and encrypts it with its own
    passphrase, if it has one).
    """
    if address is not None:

        def remote() -> Any:
            with connect(address, token_file, ca, insecure, timeout=None) as client:
                return client.call("admin.backup")

        print_json(run_guarded(remote))
        return

    def local() -> archive.ArchiveInfo:
        directory = data_dir or Path("bastion-data")
        db_path = directory / "bastion.db"
        if not db_path.is_file():
            raise UsageError(f"no SQLite store at {db_path}: is --data-dir right?")
        target = out or directory / "backups" / archive.archive_name(time.time())
        secret = passphrase(passphrase_file)
        return archive.backup_sqlite(db_path, files_dir or directory / "files", target, secret)

    info = run_guarded(local)
    print_json(info)
    print(f"backup written to {out or info.name} ({info.size} bytes)", file=sys.stderr)


def restore(
    archive_path: Annotated[Path, typer.Argument(metavar="ARCHIVE", help="The archive to restore.")],
    data_dir: DataDir = None,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            help="Restore a PostgreSQL archive into this postgresql:// URL (no password here: use PGPASSWORD "
            "or ~/.pgpass).",
        ),
    ] = None,
    files_dir: FilesDir = None,
    passphrase_file: PassphraseFile = None,
    force: Annotated[
        bool, typer.Option("--force", help="PostgreSQL: restore even if the target schema holds tables.")
    ] = False,
    check: Annotated[bool, typer.Option("--check", help="Only verify the archive; change nothing.")] = False,
) -> None:
    """Verify a backup archive completely, then restore it into a data directory.

    Nothing is changed unless every byte of the archive checks out; the old
    database and files are kept as <name>.pre-restore-<time>. Refuses to run
    while a server uses the data directory.
    """
    directory = data_dir or Path("bastion-data")

    def run() -> Any:
        secret = passphrase(passphrase_file)
        if check:
            return archive.verify_archive(archive_path, secret, scratch=directory if directory.is_dir() else None)
        files = files_dir or directory / "files"
        if store is not None and store.startswith(("postgresql://", "postgres://")):
            restore_postgres = getattr(archive, "restore_postgres", None)
            if restore_postgres is None:
                raise UsageError("restoring into PostgreSQL is not supported yet")
            return asyncio.run(restore_postgres(archive_path, store, files, secret, force=force))
        if store is not None and not store.startswith("sqlite:///"):
            raise InvalidArgument(f"--store {store!r}: give a postgresql:// or sqlite:/// URL")
        db_path = Path(store[len("sqlite:///") :]) if store else directory / "bastion.db"
        db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return archive.restore_sqlite(archive_path, db_path, files, secret)

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
            "schema_version": summary.schema_version,
            "created_at": summary.created_at,
            "members": len(summary.members),
        }
    )
    for path in result.kept:
        print(f"kept the previous data as {path}", file=sys.stderr)
    print("restore complete", file=sys.stderr)
