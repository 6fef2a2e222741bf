"""A restore's journal: each rename that puts restored data in place is written down before it is made.

Theory of operation
-------------------

Restoring a SQLite data directory takes several renames -- the old database
(and its side files) aside, the restored one in, the old files directory
aside, the restored one in -- and no single rename swaps them all. A restore
killed between two of them (kill -9, a power cut) left no database at all (a
server started there then created an empty one) or the new database with the
old files.

So each step is first appended to ``<database>.restore-journal`` (written to a
temporary, fsynced, renamed over the journal, the directory fsynced), then
made; once the last step is durable the journal is removed. A journal still
there means a restore was interrupted:

* ``SQLiteStore`` refuses to open a database with a journal beside it;
* ``undo_interrupted`` -- the first thing a restore does -- walks the journal
  backwards and reverses each step that was made (a rename whose destination
  exists and whose source does not; a copy whose destination exists), removes
  the interrupted restore's staging directory, then the journal. The data is
  then as it was before that restore. It can itself be interrupted and run
  again: each reversal checks what is there first.

The journal is a file in the data directory, and undoing it renames and
deletes what it names, so it is not trusted: before anything is undone each
path in it must be one a restore into that database and files directory
makes (``_check_paths``) -- the database and its side files or their
``pre-restore`` copies beside it, the files directory or its copy beside
it, something inside the restore's staging directory (itself beside the
database) -- with no ``..``. A journal naming anything else is refused and
kept, and the store still refuses to open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import msgspec

from bastion.durable import fsync_dir
from bastion.exceptions import FailedPrecondition
from bastion.store.leftovers import STAGING_PREFIX

__all__ = ["JOURNAL_SUFFIX", "Journal", "journal_path", "refuse_if_interrupted", "undo_interrupted"]

log = logging.getLogger("bastion.backup")

JOURNAL_SUFFIX = ".restore-journal"


class _Step(msgspec.Struct, array_like=True, frozen=True):
    kind: str  # "rename" or "copy"
    src: str
    dst: str


class _Record(msgspec.Struct, frozen=True):
    staging: str
    steps: list[_Step]


def journal_path(db_path: Path) -> Path:
    """Where the journal of a restore into the SQLite store ``db_path`` is kept."""
    return db_path.with_name(db_path.name + JOURNAL_SUFFIX)


def refuse_if_interrupted(db_path: Path) -> None:
    """``FailedPrecondition`` if a restore into ``db_path`` was interrupted (its journal is there)."""
    if os.path.lexists(journal_path(db_path)):
        raise FailedPrecondition(
            f"a restore into {db_path} was interrupted ({journal_path(db_path).name} is there): run the restore "
            "again (it first puts the old data back) before using this data directory"
        )


class Journal:
    """The steps of one restore into ``db_path``, staged in ``staging``, written down as they are about to be made."""

    def __init__(self, db_path: Path, staging: Path) -> None:
        self.path = journal_path(db_path)
        self.staging = staging
        self.steps: list[_Step] = []

    def record(self, kind: str, src: Path, dst: Path) -> None:
        """Write down (durably) that ``src`` is about to be renamed or copied to ``dst``."""
        self.steps.append(_Step(kind, str(src), str(dst)))
        _write(self.path, msgspec.json.encode(_Record(str(self.staging), self.steps)))

    def finish(self) -> None:
        """The restore is complete, or fully undone: remove the journal (durably)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        fsync_dir(self.path.parent, missing_ok=True)


def undo_interrupted(db_path: Path, files_dir: Path) -> bool:
    """Put back what an interrupted restore into ``db_path`` and ``files_dir`` had moved; whether there was
    one to undo.

    Raises ``FailedPrecondition`` if the journal cannot be read, names a path such a restore does not touch,
    or a step cannot be reversed (the journal is then kept, and the store still refuses to open).
    """
    path = journal_path(db_path)
    try:
        record = msgspec.json.decode(path.read_bytes(), type=_Record)
    except FileNotFoundError:
        return False
    except (OSError, msgspec.DecodeError) as exc:
        raise FailedPrecondition(f"cannot read {path} (left by an interrupted restore): {exc}") from None
    _check_paths(record, db_path, files_dir, path)
    log.warning("undoing an interrupted restore into %s (%d steps were written down)", db_path, len(record.steps))
    for step in reversed(record.steps):
        src, dst = Path(step.src), Path(step.dst)
        try:
            if step.kind == "copy":
                if os.path.lexists(dst):
                    shutil.rmtree(dst)
            elif os.path.lexists(dst) and not os.path.lexists(src):
                src.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # staging, perhaps cleared meanwhile
                os.rename(dst, src)
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot undo an interrupted restore: {step.kind} {dst} back to {src}: {exc}; {path} is kept"
            ) from None
    for parent in {Path(s.src).parent for s in record.steps}:
        fsync_dir(parent, missing_ok=True)
    shutil.rmtree(record.staging, ignore_errors=True)
    Journal(db_path, Path(record.staging)).finish()
    return True


def _check_paths(record: _Record, db_path: Path, files_dir: Path, journal: Path) -> None:
    """``FailedPrecondition`` unless every path ``record`` names is one a restore into ``db_path`` and
    ``files_dir`` makes (see the module docstring): never anything elsewhere, whatever the journal says."""
    db_dir, files_parent = _plain(str(db_path.parent), journal), _plain(str(files_dir.parent), journal)
    database, files = db_dir / db_path.name, files_parent / files_dir.name
    staging = _plain(record.staging, journal)
    if staging.parent != db_dir or not staging.name.startswith(STAGING_PREFIX):
        raise _foreign(journal, record.staging, f"not a restore's staging directory in {db_dir}")
    for step in record.steps:
        if step.kind not in ("rename", "copy"):
            raise _foreign(journal, step.kind, "not a step a restore makes")
        for text in (step.src, step.dst):
            named = _plain(text, journal)
            if named == journal or not (
                (named.parent == db_dir and named.name.startswith(database.name))
                or (named.parent == files_parent and named.name.startswith(files.name))
                or (named != staging and named.is_relative_to(staging))
            ):
                raise _foreign(journal, text, f"neither the database {database}, the files directory {files}, "
                               "a copy of one beside it, nor inside the restore's staging directory")  # fmt: skip
        if step.kind == "copy" and _plain(step.dst, journal) != files:
            raise _foreign(journal, step.dst, f"a copy is only ever made to the files directory {files}")


def _plain(text: str, journal: Path) -> Path:
    """``text`` as an absolute path, compared by its parts; refused if it has a ``..`` (or is empty)."""
    if not text or "\0" in text or ".." in Path(text).parts:
        raise _foreign(journal, text, "an empty path or one with '..'")
    return Path(os.path.abspath(text))


def _foreign(journal: Path, text: str, why: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"{journal} (left by an interrupted restore) names {text!r}: {why}. Nothing was undone and it is kept: "
        "it was not written by a restore of this data directory (or the files directory setting has changed "
        "since); check it, and the data, by hand"
    )


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent, missing_ok=True)
