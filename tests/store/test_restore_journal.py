"""A restore's journal (bastion/store/restore_journal.py) read back: only paths of that restore are acted on.

Real files under ``tmp_path``: a data directory, a files directory, and a journal written the way a
restore writes it -- or forged, naming something elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from bastion.exceptions import FailedPrecondition
from bastion.store import backup
from bastion.store.leftovers import staging_name
from bastion.store.restore_journal import journal_path, undo_interrupted


def forge(db: Path, staging: str, steps: list[tuple[str, str, str]]) -> None:
    """Write ``db``'s restore journal as the module writes it: {"staging": …, "steps": [[kind, src, dst], …]}."""
    journal_path(db).write_bytes(msgspec.json.encode({"staging": staging, "steps": [list(s) for s in steps]}))


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A data directory (its database, a files directory) and a precious directory outside it."""
    root = tmp_path / "data"
    (root / "files").mkdir(parents=True)
    (root / "bastion.db").write_bytes(b"the database")
    precious = tmp_path / "elsewhere"
    precious.mkdir()
    (precious / "keep").write_bytes(b"not the data directory's")
    return root / "bastion.db", root / "files", precious


def staging_of(db: Path) -> str:
    return str(db.parent / staging_name("0123abcd"))


def forged_journals(db: Path, files: Path, precious: Path) -> dict[str, tuple[str, list[tuple[str, str, str]]]]:
    staging = staging_of(db)
    aside = f"{db}.pre-restore-20260101T000000"
    return {
        "absolute-elsewhere": (staging, [("rename", str(precious / "keep"), f"{db}.x")]),
        "dot-dot": (staging, [("rename", f"{db.parent}/../elsewhere/keep", aside)]),
        "dot-dot-in-staging": (staging, [("rename", f"{staging}/../../elsewhere/keep", str(db))]),
        "staging-elsewhere": (str(precious), [("rename", str(db), aside)]),
        "staging-not-a-staging-name": (str(db.parent / "files"), [("rename", str(db), aside)]),
        "copy-over-something-else": (staging, [("copy", f"{staging}/files", f"{db}.pre-restore-x")]),
        "relative": (staging, [("rename", "keep", str(db))]),
        "unknown-kind": (staging, [("delete", str(db), aside)]),
    }


@pytest.mark.parametrize(
    "case",
    [
        "absolute-elsewhere",
        "dot-dot",
        "dot-dot-in-staging",
        "staging-elsewhere",
        "staging-not-a-staging-name",
        "copy-over-something-else",
        "relative",
        "unknown-kind",
    ],
)
def test_a_forged_journal_naming_paths_outside_the_restore_is_refused_and_nothing_is_touched(
    data: tuple[Path, Path, Path], case: str
) -> None:
    """Undoing trusted the journal: a forged one moved a file from anywhere into the data directory (a
    "rename" back from its destination) and removed any directory named as the staging one, or as a copy's
    destination. Every path must now be the database's, the files directory's, or inside the staging
    directory, with no '..': else nothing is undone, the journal is kept, and the error says why."""
    db, files, precious = data
    staging, steps = forged_journals(db, files, precious)[case]
    if case == "copy-over-something-else":
        Path(f"{db}.pre-restore-x").mkdir()
    forge(db, staging, steps)
    before = sorted(p.name for p in db.parent.iterdir())

    with pytest.raises(FailedPrecondition, match=r"left by an interrupted restore.*Nothing was undone"):
        undo_interrupted(db, files)
    assert (precious / "keep").read_bytes() == b"not the data directory's"
    assert sorted(p.name for p in db.parent.iterdir()) == before  # the journal is kept, nothing moved
    assert db.read_bytes() == b"the database"
    with pytest.raises(FailedPrecondition, match="Nothing was undone"):  # and so does a restore
        backup.restore_sqlite(db.parent / "no-such.bbk", db, files, None)
    assert (precious / "keep").exists()


def test_a_journal_a_restore_wrote_is_still_undone(
    data: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks refuse only what a restore never writes: its own steps (database aside, the staged one in,
    files aside, the staged ones in) pass and are reversed, relative paths included."""
    db, files, _ = data
    staging = Path(staging_of(db))
    (staging / "db").mkdir(parents=True)
    aside, files_aside = Path(f"{db}.pre-restore-20260101T000000"), files.with_name("files.pre-restore-x")
    os.rename(db, aside)
    (staging / "db" / "bastion.db").write_bytes(b"the restored database")
    os.rename(staging / "db" / "bastion.db", db)
    os.rename(files, files_aside)
    monkeypatch.chdir(db.parent.parent)
    relative = Path(db.parent.name)
    steps = [
        ("rename", str(relative / "bastion.db"), str(relative / aside.name)),
        ("rename", str(staging / "db" / "bastion.db"), str(db)),
        ("rename", str(files), str(files_aside)),
    ]
    forge(db, str(staging), steps)
    assert undo_interrupted(db, files)
    assert db.read_bytes() == b"the database" and files.is_dir() and not files_aside.exists()
    assert not journal_path(db).exists() and not staging.exists()
