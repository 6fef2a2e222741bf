"""Listing a backup directory shared with another user (bastion/store/archive.py ``list_archives``), and the
retention that reads it: an archive this process may not read is skipped with a warning (once per process),
never an error.

An archive another user wrote (mode 0600, theirs) cannot be opened: EACCES. Tests run as root, which reads
any file whatever its mode, and ``nobody`` cannot run this interpreter (it lives under /root); so the listing
runs in a subprocess that has dropped root's two capabilities that bypass file modes (CAP_DAC_OVERRIDE,
CAP_DAC_READ_SEARCH, from its bounding set before exec), and the archive has mode 000: opening it fails with
EACCES in ``open`` exactly as another user's does. A directory, a dangling symlink or a FIFO named ``*.bbk``
would not do: none is a regular file, so the listing passes over them before opening anything."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

from bastion.store import archive

LISTER = """
import json, logging, sys
from pathlib import Path
from bastion.store import archive
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
directory, owner = Path(sys.argv[1]), sys.argv[2]
listed = [a.name for a in archive.list_archives(directory)]
pruned = archive.prune_scheduled(directory, keep=1, owner=owner, now=2e9)
print(json.dumps({"listed": listed, "pruned": pruned}))
"""

_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def _without_mode_overrides() -> None:
    """In the child before exec: drop what lets root read a file its mode forbids."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def list_as_another_user(directory: Path, owner: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LISTER, str(directory), owner], capture_output=True, text=True, timeout=60,
        check=False, preexec_fn=_without_mode_overrides if os.geteuid() == 0 else None,
    )  # fmt: skip


def test_an_archive_this_process_cannot_read_is_skipped_with_a_warning_and_retention_still_runs(
    tmp_path: Path,
) -> None:
    mine = "0123456789abcdef"
    unreadable = archive.archive_name(1_700_000_000)  # another user's on-demand archive
    (tmp_path / unreadable).write_bytes(b"x")
    (tmp_path / unreadable).chmod(0o000)
    ours = [archive.archive_name(1_700_000_001 + i, scheduled=True, owner=mine) for i in range(3)]
    for name in ours:
        (tmp_path / name).write_bytes(b"x")
    os.mkfifo(tmp_path / archive.archive_name(1_700_000_010))  # not a file: passed over, never blocks on

    result = list_as_another_user(tmp_path, mine)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["listed"] == ours
    assert out["pruned"] == ours[:2]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and unreadable in warnings[0], result.stderr  # once, though listed twice
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted([unreadable, ours[2]])


DIRECTORY_LISTER = """
import sys
from pathlib import Path
from bastion.exceptions import FailedPrecondition
from bastion.store import archive
try:
    archive.list_archives(Path(sys.argv[1]))
except FailedPrecondition as exc:
    print(f"{exc.status.name}: {exc}")
"""


def test_a_backup_directory_this_process_cannot_read_is_a_failed_precondition_naming_it_and_the_cause(
    tmp_path: Path,
) -> None:
    """Not one archive but the whole directory (another user's, mode 0700): no listing can be made, and the
    error says which directory and why rather than a raw PermissionError (INTERNAL to a client)."""
    directory = tmp_path / "backups"
    directory.mkdir()
    (directory / archive.archive_name(1_700_000_000)).write_bytes(b"x")
    directory.chmod(0o000)
    try:
        result = subprocess.run(
            [sys.executable, "-c", DIRECTORY_LISTER, str(directory)], capture_output=True, text=True, timeout=60,
            check=False, preexec_fn=_without_mode_overrides if os.geteuid() == 0 else None,
        )  # fmt: skip
    finally:
        directory.chmod(0o700)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("FAILED_PRECONDITION: "), result.stdout
    assert str(directory) in result.stdout and "Permission denied" in result.stdout, result.stdout
