"""Big transfers through the real CLI against a real ``bastion serve`` over TLS.

The acceptance check (issue 5): upload then download a file through
``bastion files put``/``get``: the SHA-256 matches, the server's RSS grows by
less than 64 MB, and the progress bar shows. CI runs it at 128 MiB; the full
1 GiB variant is marked ``slow``::

    .venv/bin/pytest -m slow tests/integration/test_files_transfer.py -k 1gib -s

Also: an upload killed mid-way resumes from the server's offset; a wrong
SHA-256 is refused; a quota is enforced with a clear error; a read-only
grantee can download but not delete, and a stranger is told the file does
not exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bastion.client.sync import SyncClient
from tests.conftest import StartServer
from tests.support.server import ServerProcess, bastion_cli, clean_env, read_rss_kib, wait_for

MiB = 1024 * 1024
#: A finished rich progress line: "100% 128.0/128.0 MiB 57.3 MB/s".
PROGRESS_DONE = re.compile(r"100% [\d.]+/[\d.]+ [KMG]iB [\d.]+ [kMG]?B/s")


def make_file(path: Path, size: int) -> str:
    """Write ``size`` pseudo-random bytes (incompressible, not all distinct blocks); their SHA-256."""
    hasher = hashlib.sha256()
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(0, size, MiB):
            piece = (block[i % 251 :] + block[: i % 251])[: min(MiB, size - i)]
            f.write(piece)
            hasher.update(piece)
    return hasher.hexdigest()


def file_sha(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            hasher.update(block)
    return hasher.hexdigest()


def cli_env(tmp_path: Path, token_file: Path) -> dict[str, str]:
    return {"BASTION_TOKEN_FILE": str(token_file), "XDG_CONFIG_HOME": str(tmp_path / "config")}


class RssSampler:
    """Samples a process's RSS in a thread until stopped; ``peak`` in KiB."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = read_rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, read_rss_kib(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def round_trip(server: ServerProcess, tmp_path: Path, size: int) -> dict[str, float]:
    source = tmp_path / "big.bin"
    digest = make_file(source, size)
    env = cli_env(tmp_path, server.token_file)
    # Warm the server up (TLS, first calls) so the baseline is its steady state.
    assert bastion_cli("files", "ls", server.address, env=env).returncode == 0
    baseline = read_rss_kib(server.pid)
    sampler = RssSampler(server.pid)
    started = time.monotonic()
    put = bastion_cli("files", "put", server.address, str(source), "big.bin", "--progress", env=env, timeout=900)
    uploaded = time.monotonic()
    assert put.returncode == 0, put.stderr
    assert digest in put.stdout
    target = tmp_path / "back.bin"
    get = bastion_cli("files", "get", server.address, "big.bin", str(target), "--progress", env=env, timeout=900)
    done = time.monotonic()
    peak = sampler.stop()
    assert get.returncode == 0, get.stderr
    assert "(verified)" in get.stderr
    assert file_sha(target) == digest
    # The progress bars rendered (forced without a terminal by --progress): bytes and rate.
    for verb, output in (("put", put.stderr), ("get", get.stderr)):
        assert PROGRESS_DONE.search(output), f"no finished {verb} progress bar in: {output[-2000:]!r}"
    growth_mb = (peak - baseline) * 1024 / 1e6
    assert growth_mb < 64, f"server RSS grew by {growth_mb:.1f} MB (baseline {baseline} KiB, peak {peak} KiB)"
    return {"put_s": uploaded - started, "get_s": done - uploaded, "rss_growth_mb": growth_mb}


def test_128mib_round_trip_through_the_cli(server: ServerProcess, tmp_path: Path) -> None:
    figures = round_trip(server, tmp_path, 128 * MiB)
    print(f"128 MiB: {figures}")


@pytest.mark.slow
def test_1gib_round_trip_through_the_cli(server: ServerProcess, tmp_path: Path) -> None:
    figures = round_trip(server, tmp_path, 1024 * MiB)
    print(f"1 GiB: {figures}")


def test_killed_upload_resumes_from_the_server_offset(server: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "resume.bin"
    digest = make_file(source, 8 * MiB)
    env = cli_env(tmp_path, server.token_file)
    command = [sys.executable, "-m", "bastion", "files", "put", server.address, str(source), "--limit-rate", "2000000"]
    first = subprocess.Popen(command, env=clean_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state_dir = tmp_path / "config" / "bastion" / "uploads"
    try:
        state = wait_for(lambda: list(state_dir.glob("*.json")), 20, what="the upload state file")[0]
        assert state.stat().st_mode & 0o777 == 0o600
        upload_id = json.loads(state.read_text())["upload_id"]
        with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as client:

            def offset() -> int:
                value: int = client.call("files.upload_status", upload_id=upload_id)["offset"]
                return value

            wait_for(lambda: offset() >= 2 * MiB, 20, what="2 MiB on the server")
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            held = wait_for(lambda: offset() or None, 5, what="the offset after the kill")
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    assert 0 < held < 8 * MiB
    again = bastion_cli("files", "put", server.address, str(source), env=env, timeout=60)
    assert again.returncode == 0, again.stderr
    assert f"resuming upload {upload_id} at offset" in again.stderr
    resumed_at = int(again.stderr.split("at offset ")[1].split()[0])
    assert resumed_at >= held
    assert digest in again.stdout
    assert not list(state_dir.glob("*.json"))  # the state file goes once the upload is done
    back = tmp_path / "back.bin"
    got = bastion_cli("files", "get", server.address, "resume.bin", str(back), env=env, timeout=60)
    assert got.returncode == 0, got.stderr
    assert file_sha(back) == digest


def test_wrong_sha256_is_refused(server: ServerProcess, tmp_path: Path) -> None:
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as client:
        info = client.call("files.begin_upload", name="bad", size=4, sha256="0" * 64)
        with pytest.raises(Exception, match="SHA-256") as error:
            client.upload("files.upload", [b"data"], upload_id=info["upload_id"])
        assert type(error.value).__name__ == "InvalidArgument"
    listed = bastion_cli("files", "ls", server.address, "--json", env=cli_env(tmp_path, server.token_file))
    assert listed.returncode == 0 and '"bad"' not in listed.stdout


def test_put_if_sha256_replaces_only_the_contents_it_names(server: ServerProcess, tmp_path: Path) -> None:
    env = cli_env(tmp_path, server.token_file)
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_bytes(b"one\n")
    second.write_bytes(b"two\n")
    assert bastion_cli("files", "put", server.address, str(first), "cas.txt", env=env).returncode == 0
    stale = bastion_cli("files", "put", server.address, str(second), "cas.txt", "--if-sha256", "0" * 64, env=env)
    assert stale.returncode == 1 and "ABORTED" in stale.stderr and "other contents" in stale.stderr, stale.stderr
    swapped = bastion_cli(
        "files", "put", server.address, str(second), "cas.txt", "--if-sha256", file_sha(first), env=env
    )
    assert swapped.returncode == 0, swapped.stderr
    assert file_sha(second) in swapped.stdout


def test_quota_exceeded_is_refused_with_a_clear_error(server_factory: StartServer, tmp_path: Path) -> None:
    server = server_factory({"BASTION_FILES__QUOTA_BYTES": "1000000"})
    source = tmp_path / "two.bin"
    make_file(source, 2 * MiB)
    result = bastion_cli("files", "put", server.address, str(source), env=cli_env(tmp_path, server.token_file))
    assert result.returncode == 1
    assert "RESOURCE_EXHAUSTED: quota exceeded for 'admin'" in result.stderr
    assert "limit 1000000 bytes" in result.stderr


def test_read_only_grantee_downloads_but_cannot_delete_and_strangers_see_nothing(
    server: ServerProcess, tmp_path: Path
) -> None:
    admin_env = cli_env(tmp_path, server.token_file)
    tokens = {}
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as admin:
        for user in ("reader", "stranger"):
            admin.call("auth.create_user", name=user)
            token = admin.call("auth.create_token", user=user)["token"]
            path = tmp_path / f"{user}.token"
            path.write_text(token)
            path.chmod(0o600)
            tokens[user] = path
    source = tmp_path / "report.txt"
    source.write_bytes(b"quarterly numbers\n" * 1000)
    assert bastion_cli("files", "put", server.address, str(source), "reports/q3.txt", env=admin_env).returncode == 0
    shared = bastion_cli("files", "share", server.address, "reports/q3.txt", "--user", "reader", env=admin_env)
    assert shared.returncode == 0, shared.stderr
    reader_env = cli_env(tmp_path, tokens["reader"])
    listed = bastion_cli("files", "ls", server.address, env=reader_env)
    assert "admin" in listed.stdout and "reports/q3.txt" in listed.stdout and "read" in listed.stdout
    dest = tmp_path / "copy.txt"
    got = bastion_cli("files", "get", server.address, "reports/q3.txt", str(dest), "--owner", "admin", env=reader_env)
    assert got.returncode == 0, got.stderr
    assert dest.read_bytes() == source.read_bytes()
    denied = bastion_cli("files", "rm", server.address, "reports/q3.txt", "--owner", "admin", env=reader_env)
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
    stranger_env = cli_env(tmp_path, tokens["stranger"])
    for command in ("get", "rm"):
        hidden = bastion_cli("files", command, server.address, "reports/q3.txt", "--owner", "admin", env=stranger_env)
        assert hidden.returncode == 1 and "NOT_FOUND: no file 'admin:reports/q3.txt'" in hidden.stderr
    assert bastion_cli("files", "ls", server.address, env=stranger_env).stdout == ""


def test_get_without_a_destination_does_not_overwrite_a_local_file_the_owner_named(
    server: ServerProcess, tmp_path: Path
) -> None:
    """``files get ID`` writes to the file's base name here -- a name its owner chose. Someone sharing a file
    named ``.bashrc`` (or ``.profile``, ``authorized_keys``) replaced the reader's own when run from home."""
    home = tmp_path / "home"
    home.mkdir()
    mine = home / ".bashrc"
    mine.write_text("the reader's own\n")
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as admin:
        admin.call("auth.create_user", name="reader")
        token = tmp_path / "reader.token"
        token.write_text(admin.call("auth.create_token", user="reader")["token"])
        token.chmod(0o600)
        info = admin.call(
            "files.begin_upload", name="dotfiles/.bashrc", size=9, sha256=hashlib.sha256(b"rm -rf ~\n").hexdigest()
        )
        file = admin.upload("files.upload", [b"rm -rf ~\n"], upload_id=info["upload_id"])["file"]
        admin.call("files.share", file_id=file["id"], user="reader")
    env = cli_env(tmp_path, token)
    refused = bastion_cli("files", "get", server.address, file["id"], cwd=home, env=env)
    assert refused.returncode == 2 and "will not overwrite" in refused.stderr, refused.stderr
    assert mine.read_text() == "the reader's own\n"
    assert not list(home.glob(".bastion-part-*"))
    # Naming the destination is choosing to replace it.
    chosen = bastion_cli("files", "get", server.address, file["id"], str(mine), cwd=home, env=env)
    assert chosen.returncode == 0, chosen.stderr
    assert mine.read_bytes() == b"rm -rf ~\n"


def test_get_never_writes_through_a_temporary_name_planted_beside_the_destination(
    server: ServerProcess, tmp_path: Path
) -> None:
    """``files get`` wrote its temporary to ``.<name>.bastion-part`` beside the destination, opened with
    O_TRUNC and following symlinks: in a shared directory (/tmp) another user could plant that name as a
    symlink to the reader's own file, which then received the download (and the destination became the
    symlink). The temporary is now a new file of an unpredictable name, made with O_EXCL."""
    shared = tmp_path / "shared"
    shared.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("the reader's own\n")
    (shared / ".copy.txt.bastion-part").symlink_to(victim)
    env = cli_env(tmp_path, server.token_file)
    source = tmp_path / "report.txt"
    source.write_bytes(b"quarterly numbers\n" * 100)
    assert bastion_cli("files", "put", server.address, str(source), "report.txt", env=env).returncode == 0
    got = bastion_cli("files", "get", server.address, "report.txt", str(shared / "copy.txt"), env=env)
    assert got.returncode == 0, got.stderr
    assert victim.read_text() == "the reader's own\n"
    assert not (shared / "copy.txt").is_symlink() and (shared / "copy.txt").read_bytes() == source.read_bytes()
    assert (shared / "copy.txt").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in shared.iterdir()) == [".copy.txt.bastion-part", "copy.txt"]  # the plant stays


def test_get_writes_a_destination_whose_name_is_as_long_as_the_file_system_allows(
    server: ServerProcess, tmp_path: Path
) -> None:
    """The temporary's name was the destination's plus a prefix and suffix: a destination of 230 to 255
    bytes (legal on every common file system) could not be downloaded, "File name too long"."""
    env = cli_env(tmp_path, server.token_file)
    source = tmp_path / "report.txt"
    source.write_bytes(b"quarterly numbers\n")
    name = "r" * 251 + ".txt"
    assert bastion_cli("files", "put", server.address, str(source), name, env=env).returncode == 0
    dest = tmp_path / "out"
    dest.mkdir()
    got = bastion_cli("files", "get", server.address, name, cwd=dest, env=env)
    assert got.returncode == 0, got.stderr
    assert [p.name for p in dest.iterdir()] == [name] and (dest / name).read_bytes() == source.read_bytes()
