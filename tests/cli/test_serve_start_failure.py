"""A ``bastion serve`` start that fails before its store opens leaves no data directory it created behind.

Real subprocess runs of the CLI: the store is a PostgreSQL DSN to a port
nothing listens on, so the start fails UNAVAILABLE after the data directory
(and, without ``--cert``, the development CA in it) would have been made.
An operator fixing the DSN and starting again must find the working
directory as it was -- as ``serve --check`` leaves it -- not a half-made
data directory holding a CA no client was ever given.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.support.server import bastion_cli, clean_env, wait_for


def _closed_port_dsn() -> tuple[str, socket.socket]:
    sock = socket.socket()  # bound, never listening: connections to it are refused
    sock.bind(("127.0.0.1", 0))
    return f"postgresql://bastion@127.0.0.1:{sock.getsockname()[1]}/bastion", sock


def test_an_unreachable_store_leaves_no_data_directory_behind(tmp_path: Path) -> None:
    dsn, sock = _closed_port_dsn()
    with sock:
        result = bastion_cli("serve", "--store", dsn, "--port", "0", "--no-http", cwd=tmp_path, timeout=60)
        nested = bastion_cli(
            "serve", "--store", dsn, "--port", "0", "--no-http", "--data-dir", "a/b/data", cwd=tmp_path, timeout=60
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "UNAVAILABLE" in result.stderr and "Traceback" not in result.stderr
    assert nested.returncode == 1, nested.stdout + nested.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither bastion-data nor the parents a/b


def test_a_data_directory_that_was_there_is_kept(tmp_path: Path) -> None:
    data = tmp_path / "bastion-data"
    data.mkdir(mode=0o700)
    (data / "keep").write_text("operator's file")
    dsn, sock = _closed_port_dsn()
    with sock:
        result = bastion_cli("serve", "--store", dsn, "--port", "0", "--no-http", cwd=tmp_path, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert (data / "keep").read_text() == "operator's file"


def test_a_start_that_fails_once_the_store_has_opened_keeps_the_data_directory(tmp_path: Path) -> None:
    """Past the store's opening the data directory may hold the admin token the store now knows: it stays."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = bastion_cli("serve", "--port", str(port), "--no-http", cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert (tmp_path / "bastion-data" / "admin.token").exists()
    assert (tmp_path / "bastion-data" / "bastion.db").exists()


def test_a_parent_another_process_wrote_into_meanwhile_is_kept(tmp_path: Path) -> None:
    """Two servers whose data directories share a parent the first one made (``/var/lib/bastion/{a,b}`` at
    boot, the store not up yet): the first one's failed start removed the parent whole, and with it the
    second one's live database. Only what this start made, and only while empty, goes."""
    with socket.socket() as silent:  # accepts (into its backlog), never answers: the start waits on its store
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        dsn = f"postgresql://bastion@127.0.0.1:{silent.getsockname()[1]}/bastion"
        start = subprocess.Popen(
            [sys.executable, "-m", "bastion", "serve", "--store", dsn, "--port", "0", "--no-http"],
            cwd=tmp_path,
            env=clean_env({"BASTION_DATA_DIR": "srv/a"}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: (tmp_path / "srv" / "a").is_dir(), 30, what="the start to make its data directory")
            (tmp_path / "srv" / "b").mkdir()
            (tmp_path / "srv" / "b" / "bastion.db").write_text("another server's store")
        finally:
            silent.close()  # the connection in its backlog is reset: the start fails UNAVAILABLE
            out, err = start.communicate(timeout=60)
    assert start.returncode == 1, out + err
    assert not (tmp_path / "srv" / "a").exists()
    assert (tmp_path / "srv" / "b" / "bastion.db").read_text() == "another server's store"
