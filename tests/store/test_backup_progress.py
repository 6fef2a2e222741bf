"""Backups, verifications and restores report their progress (bastion/store/backup_progress.py).

They printed nothing during long work: an operator backing up a large files
directory saw nothing for many minutes. The store layer now reports each
phase through an optional ``progress(phase, done, total)`` callback: from 0,
never going back, at most once per ``STEP`` bytes, ending at the total.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections import defaultdict
from pathlib import Path

import pytest

from bastion.store import backup
from bastion.store.backup_progress import PHASES, STEP, Meter, watch_file
from tests.store.test_backup import FAST, make_blob, make_data_dir, pg_cleanup, pg_store_with_users, schema_of
from tests.support.server import wait_for

__all__ = ["pg_cleanup"]  # the fixture, imported to be used here

Calls = list[tuple[str, int, "int | None"]]


def by_phase(calls: Calls) -> dict[str, list[tuple[int, int | None]]]:
    """Each phase's reports, checked to come in one run each (phases do not interleave)."""
    order = [phase for i, (phase, _, _) in enumerate(calls) if i == 0 or calls[i - 1][0] != phase]
    assert len(order) == len(set(order)), order
    out: dict[str, list[tuple[int, int | None]]] = defaultdict(list)
    for phase, done, total in calls:
        out[phase].append((done, total))
    return out


def check_phase(reports: list[tuple[int, int | None]]) -> int:
    """From 0, never back, ending at a known total; at most one report per STEP bytes in between."""
    dones = [done for done, _ in reports]
    assert dones[0] == 0
    assert dones == sorted(dones)
    last, total = reports[-1]
    assert total is not None and last == total
    assert all(t is None or t == total for _, t in reports)  # a total once known stays
    assert len(reports) <= total // STEP + 2
    return total


def with_big_blob(root: Path) -> tuple[Path, Path]:
    """A data directory whose files hold one ~20 MiB blob (random: it does not compress) besides the others."""
    db, files, _ = make_data_dir(root)
    digest = make_blob(files, os.urandom(20 * 1024 * 1024))
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(
            "INSERT INTO files (id, owner, name, size, sha256, created_at, updated_at) VALUES (?,?,?,?,?,?,?)",
            ("big", "user0000", "big", 0, digest, 1.0, 1.0),
        )
    return db, files


def test_a_backup_reports_its_phases_from_zero_to_their_totals(tmp_path: Path) -> None:
    db, files = with_big_blob(tmp_path / "src")
    calls: Calls = []
    out = tmp_path / "a.bbk"
    info = backup.backup_sqlite(db, files, out, None, scrypt_log_n=FAST, progress=lambda *report: calls.append(report))

    phases = by_phase(calls)
    assert list(phases) == ["snapshot", "blobs", "archive"]
    assert set(phases) <= set(PHASES)
    totals = {phase: check_phase(reports) for phase, reports in phases.items()}
    assert totals["snapshot"] == (tmp_path / "src" / "bastion.db").stat().st_size
    assert totals["blobs"] >= 20 * 1024 * 1024
    assert totals["archive"] == info.content_bytes
    assert len(phases["archive"]) >= 3  # 20 MiB in 8 MiB steps: it moves, not only 0 then all


def test_a_restore_reports_verifying_then_restoring(tmp_path: Path) -> None:
    db, files = with_big_blob(tmp_path / "src")
    out = tmp_path / "a.bbk"
    backup.backup_sqlite(db, files, out, b"pw", scrypt_log_n=FAST)
    calls: Calls = []
    target = tmp_path / "restored"
    target.mkdir()

    result = backup.restore_sqlite(
        out, target / "bastion.db", target / "files", b"pw", progress=lambda *report: calls.append(report)
    )

    phases = by_phase(calls)
    assert list(phases) == ["verify", "restore"]
    assert check_phase(phases["verify"]) == out.stat().st_size  # every byte of the archive read
    assert check_phase(phases["restore"]) == sum(m.size for m in result.manifest.members)

    calls.clear()
    backup.verify_archive(out, b"pw", scratch=tmp_path, progress=lambda *report: calls.append(report))
    assert list(by_phase(calls)) == ["verify"]
    assert check_phase(by_phase(calls)["verify"]) == out.stat().st_size


def test_without_a_callback_nothing_is_reported_and_the_backup_is_the_same(tmp_path: Path) -> None:
    db, files, _ = make_data_dir(tmp_path / "src")
    info = backup.backup_sqlite(db, files, tmp_path / "a.bbk", None, scrypt_log_n=FAST)
    assert info.members == 3
    assert backup.verify_archive(tmp_path / "a.bbk", None, scratch=tmp_path).backend == "sqlite"


def test_a_postgres_backup_and_restore_report_their_phases(tmp_path: Path, pg_cleanup: list[str]) -> None:
    dsn, files = asyncio.run(pg_store_with_users(tmp_path, 200))
    pg_cleanup.append(schema_of(dsn) + "_")
    out = tmp_path / "a.bbk"
    calls: Calls = []
    info = asyncio.run(
        backup.backup_postgres(dsn, files, out, None, scrypt_log_n=FAST, progress=lambda *report: calls.append(report))
    )

    phases = by_phase(calls)
    assert list(phases) == ["blobs", "pg_dump", "archive"]
    totals = {phase: check_phase(reports) for phase, reports in phases.items()}
    assert totals["blobs"] == 1100  # the one referenced blob
    assert totals["pg_dump"] > 0  # the dump's size, known once pg_dump is done
    assert totals["archive"] == info.content_bytes

    calls.clear()
    target = tmp_path / "restored-files"
    result = asyncio.run(
        backup.restore_postgres(
            out, dsn, target, None, force=True, data_dir=tmp_path / "data", progress=lambda *r: calls.append(r)
        )
    )
    phases = by_phase(calls)
    assert list(phases) == ["verify", "restore"]
    assert check_phase(phases["verify"]) == out.stat().st_size
    assert check_phase(phases["restore"]) == sum(m.size for m in result.manifest.members)


def test_a_callback_raising_in_the_watcher_thread_fails_the_work(tmp_path: Path) -> None:
    """The module's promise, "an exception it raises fails the work", held only on the work's own thread:
    raised in the thread that watches a file SQLite or pg_dump writes, it killed that thread (a traceback
    on stderr) and the work went on to succeed. It now fails the block as it ends."""
    path = tmp_path / "growing"
    raised = threading.Event()

    def progress(phase: str, done: int, total: int | None) -> None:
        if done and threading.current_thread() is not threading.main_thread():  # the watcher's report only
            raised.set()
            raise RuntimeError("the operator's callback failed")

    with (
        pytest.raises(RuntimeError, match="the operator's callback failed"),
        watch_file(path, Meter(progress, "pg_dump", step=1)),
    ):
        path.write_bytes(b"x" * 100)
        wait_for(raised.is_set, 10, what="the watcher to report the file's size")
