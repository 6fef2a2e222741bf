"""``bastion backup`` and ``bastion restore`` show their progress on stderr.

They printed nothing during long work (a large files directory: many
minutes of silence). Not on a terminal -- a log, as here -- each phase now
says so as it starts, a progress line follows at most every LINE_EVERY
seconds, and a summary ends it; ``--no-progress`` prints no progress at all.
"""

from __future__ import annotations

import io
from pathlib import Path

from bastion.cli.backup import ProgressLines
from tests.store.test_backup import make_data_dir
from tests.support.server import bastion_cli

BACKUP_PHASES = ["copying the database", "gathering the files' contents", "writing the archive"]
RESTORE_PHASES = ["verifying the archive", "putting the restored data in place"]


def started(stderr: str, phases: list[str]) -> list[str]:
    """The phases whose start line ``stderr`` holds, in order."""
    lines = stderr.splitlines()
    return [p for line in lines for p in phases if line.startswith(p) and line.endswith("…")]


def test_backup_and_restore_of_a_real_store_print_each_phase_and_a_summary(tmp_path: Path) -> None:
    make_data_dir(tmp_path / "src")  # users, and files with two blobs
    out = tmp_path / "a.bbk"

    taken = bastion_cli("backup", "--data-dir", str(tmp_path / "src"), "--out", str(out), timeout=60)
    assert taken.returncode == 0, taken.stderr
    assert started(taken.stderr, BACKUP_PHASES) == BACKUP_PHASES
    assert "writing the archive (" in taken.stderr  # its size, known before it starts
    assert "\x1b" not in taken.stderr  # not a terminal: plain lines, no bar
    summary = taken.stderr.splitlines()[-1]
    assert summary.startswith(f"backup written to {out} ({out.stat().st_size} bytes, 2 blobs, ")

    restored = bastion_cli("restore", str(out), "--data-dir", str(tmp_path / "fresh"), timeout=60)
    assert restored.returncode == 0, restored.stderr
    assert started(restored.stderr, RESTORE_PHASES) == RESTORE_PHASES
    assert "\x1b" not in restored.stderr
    assert restored.stderr.splitlines()[-1].startswith("restore complete (")

    checked = bastion_cli("restore", "--check", str(out), "--data-dir", str(tmp_path / "fresh"), timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert started(checked.stderr, RESTORE_PHASES) == ["verifying the archive"]


def test_no_progress_prints_no_progress(tmp_path: Path) -> None:
    make_data_dir(tmp_path / "src")
    out = tmp_path / "a.bbk"

    taken = bastion_cli("backup", "--data-dir", str(tmp_path / "src"), "--out", str(out), "--no-progress")
    assert taken.returncode == 0, taken.stderr
    assert taken.stderr.splitlines() == [line for line in taken.stderr.splitlines() if "backup written to" in line]
    assert len(taken.stderr.splitlines()) == 1

    restored = bastion_cli("restore", str(out), "--data-dir", str(tmp_path / "src"), "--no-progress")
    assert restored.returncode == 0, restored.stderr
    assert started(restored.stderr, RESTORE_PHASES) == []
    assert not any(p in restored.stderr for p in RESTORE_PHASES)


def test_progress_lines_come_at_most_once_per_interval_and_once_per_phase_start() -> None:
    """A log gets a line as a phase starts and then one per ``every`` seconds, however often the store reports
    (every 8 MiB: thousands of times in a large backup)."""
    out = io.StringIO()
    now = [0.0]
    lines = ProgressLines(out, every=10.0, clock=lambda: now[0])
    total = 50 * 1024**3
    lines("archive", 0, total)
    for i in range(1, 6400):  # 50 GiB in 8 MiB steps, over 64 s
        now[0] = i * 0.01
        lines("archive", i * 8 * 1024**2, total)
    lines("archive", total, total)
    lines("verify", 0, None)
    lines("verify", 5, None)

    printed = out.getvalue().splitlines()
    assert printed[0] == "writing the archive (50.0 GiB)…"
    progress = printed[1:-1]
    assert len(progress) == 6  # at 10, 20, … 60 s: never a flood
    assert progress[0] == "writing the archive: 7.8 GiB of 50.0 GiB (15%)"
    assert printed[-1] == "verifying the archive…"
