"""``replace_file``'s temporaries: a writer killed between making its temporary and renaming it leaves a
0600 file beside the target holding the secret; the next ``replace_file`` of that target removes it.

The writers are real processes, stopped between the two steps (their temporary made, locked and written
through ``durable``'s own ``_new_temporary``, as ``replace_file`` does), then SIGKILLed or left alive."""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SECRET = b"bst_a-token-a-crash-left-behind"

_WRITER = """
import os, sys
from pathlib import Path
from bastion.durable import _new_temporary
fd, name = _new_temporary(Path(sys.argv[1]))
os.write(fd, sys.argv[2].encode())
print(name.name, flush=True)
sys.stdin.read()  # held here, between the write and the rename, until killed or told to end
"""


def half_written(target: Path) -> tuple[subprocess.Popen[str], str]:
    """A writer process stopped between making ``target``'s temporary and renaming it; its temporary's name."""
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(target), SECRET.decode()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert writer.stdout is not None
    if not select.select([writer.stdout], [], [], 30)[0]:
        writer.kill()
        raise AssertionError("the writer printed nothing within 30 s")
    name = writer.stdout.readline().strip()  # it prints once its temporary is made (or exits: "")
    assert name, "the writer made no temporary"
    return writer, name


def test_a_killed_writers_temporary_is_removed_by_the_next_write_and_nothing_else(tmp_path: Path) -> None:
    from bastion.durable import replace_file

    target = tmp_path / "token"
    target.write_bytes(b"old")
    killed, stale = half_written(target)
    live, kept = half_written(target)
    try:
        assert (tmp_path / stale).read_bytes() == SECRET and (tmp_path / stale).stat().st_mode & 0o777 == 0o600
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        # Neighbours that are not this target's temporaries: another target's (stale or not), an older
        # version's mkstemp name, a file of a similar name.
        others = {
            ".token.txt.0123456789abcdef.tmp": b"another target's",
            ".tokens.0123456789abcdef.tmp": b"another target's",
            ".token.abc123_x": b"an older version's",
            ".token.0123456789abcdef.tmp.keep": b"similar",
            "token.0123456789abcdef.tmp": b"similar",
            "other": b"other",
        }
        for name, data in others.items():
            (tmp_path / name).write_bytes(data)
        before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name != stale}

        replace_file(target, b"new", 0o600)

        assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o600
        assert not (tmp_path / stale).exists()  # the killed writer's, with its secret
        assert (tmp_path / kept).read_bytes() == SECRET  # a live writer's is left alone
        after = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
        assert after == {**before, "token": after["token"]}
        assert {name: (tmp_path / name).read_bytes() for name in others} == others
    finally:
        for writer in (killed, live):
            writer.kill()
            writer.communicate(timeout=30)
    # Once the live writer is gone too, the next write removes its temporary as well.
    replace_file(target, b"newer", 0o600)
    assert not (tmp_path / kept).exists() and target.read_bytes() == b"newer"


def _flock_failing(error: BaseException) -> object:
    """``fcntl.flock`` as a filesystem without locks (or an interrupt) makes it: the writer's lock raises
    ``error``; a remover's (non-blocking) try fails as it does there too. No such filesystem is at hand."""

    def flock(fd: int, operation: int) -> None:
        raise error

    return flock


def test_a_temporary_whose_lock_fails_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bastion import durable

    target = tmp_path / "token"
    for error in (OSError(errno.EIO, "lock failed"), KeyboardInterrupt()):
        monkeypatch.setattr(durable.fcntl, "flock", _flock_failing(error))
        with pytest.raises(type(error)):
            durable.replace_file(target, SECRET, 0o600)
        assert os.listdir(tmp_path) == []  # no empty temporary left behind


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_replace_file_works_where_files_cannot_be_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    from bastion import durable

    target = tmp_path / "token"
    monkeypatch.setattr(durable.fcntl, "flock", _flock_failing(OSError(code, os.strerror(code))))
    durable.replace_file(target, SECRET, 0o600)
    durable.replace_file(target, SECRET + b"2", 0o600)
    assert target.read_bytes() == SECRET + b"2" and os.listdir(tmp_path) == ["token"]
    assert target.stat().st_mode & 0o777 == 0o600
