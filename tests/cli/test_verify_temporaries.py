"""``bastion restore --check`` without a data directory verifies in a private (0700) ``bastion-locked-verify-*``
directory in TMPDIR, removed when it ends -- unless it is SIGKILLed. Then the next verify removes it: each
holds an flock on its directory while it lives, and a directory whose lock can be taken has no owner left.
A live verify's directory is left alone.

The verifies that are killed are real CLI processes, held inside their verify (temporary made, archive not
yet opened) by an archive that is a FIFO: opening it blocks until a writer comes, which never does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bastion.store import backup, leftovers
from bastion.store.archive import archive_name
from tests.store.test_backup import FAST, make_data_dir
from tests.support.server import clean_env, wait_for


def temporaries(tmpdir: Path) -> set[str]:
    return {p.name for p in tmpdir.iterdir() if p.name.startswith(leftovers.VERIFY_PREFIX)}


def verifying(fifo: Path, tmpdir: Path, nowhere: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bastion", "restore", str(fifo), "--check", "--data-dir", str(nowhere)],
        env=clean_env({"TMPDIR": str(tmpdir)}), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_the_temporary_of_a_killed_verify_is_removed_by_the_next_and_a_live_ones_is_kept(tmp_path: Path) -> None:
    tmpdir, nowhere = tmp_path / "tmp", tmp_path / "no-data-dir"
    tmpdir.mkdir()
    fifo = tmp_path / "archive.bbk"
    os.mkfifo(fifo)

    data = tmp_path / "data"
    data.mkdir()
    db, files, _ = make_data_dir(data)
    good = tmp_path / archive_name(time.time())
    backup.backup_sqlite(db, files, good, None, scrypt_log_n=FAST)

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bastion", "restore", str(good), "--check", "--data-dir", str(nowhere)],
            env=clean_env({"TMPDIR": str(tmpdir)}), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    killed = verifying(fifo, tmpdir, nowhere)
    try:
        (stale,) = wait_for(lambda: temporaries(tmpdir), timeout=30, what="the first verify's temporary")
        assert (tmpdir / stale).stat().st_mode & 0o777 == 0o700
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=30)
    assert killed.returncode == -signal.SIGKILL

    live = verifying(fifo, tmpdir, nowhere)  # removes the killed one's as it starts
    try:
        (alive,) = wait_for(lambda: (t := temporaries(tmpdir)) and stale not in t and t, timeout=30, what="sweep")
        result = check()
        assert result.returncode == 0, result.stderr
        assert "archive OK" in result.stdout
        assert temporaries(tmpdir) == {alive}, result.stderr  # the live one's kept; its own removed
    finally:
        live.send_signal(signal.SIGKILL)
        _, stderr = live.communicate(timeout=30)
    assert stale in stderr  # said what it removed

    result = check()  # one that finishes removes the now-dead one's too
    assert result.returncode == 0, result.stderr
    assert alive in result.stderr
    assert temporaries(tmpdir) == set()
