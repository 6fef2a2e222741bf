"""``bastion kv`` as a user runs it, against a real ``bastion serve`` (put/get/ls/rm/watch are covered in
tests/integration/test_kv_durability.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import StartServer
from tests.support.server import LineReader, ServerProcess, bastion_cli, clean_env


def test_usage_shows_keys_and_bytes_against_the_quota(server_factory: StartServer, tmp_path: Path) -> None:
    server = server_factory(env={"BASTION_KV__QUOTA_KEYS": "10", "BASTION_KV__QUOTA_BYTES": "4096"})
    addr, token = server.address, ("--token-file", str(server.token_file))
    empty = bastion_cli("kv", "usage", addr, *token)
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout == "~admin\t0 of 10 keys\t0 of 4096 bytes\n"
    for key, value in (("a", "xyz"), ("bb", "12")):
        assert bastion_cli("kv", "put", addr, key, value, *token).returncode == 0
    shown = bastion_cli("kv", "usage", addr, *token)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "~admin\t2 of 10 keys\t8 of 4096 bytes\n"  # every key's name and value, in bytes
    as_json = bastion_cli("kv", "usage", addr, "--json", *token)
    assert json.loads(as_json.stdout) == {
        "namespace": "~admin", "keys": 2, "bytes": 8, "quota_keys": 10, "quota_bytes": 4096,
    }  # fmt: skip
    other = bastion_cli("kv", "usage", addr, "-n", "~nobody", *token)
    assert other.returncode == 0, other.stderr  # an admin reads any namespace
    assert other.stdout == "~nobody\t0 of 10 keys\t0 of 4096 bytes\n"
    assert bastion_cli("user", "add", addr, "bob", "--no-password", *token).returncode == 0
    bob_token = tmp_path / "bob.token"
    assert bastion_cli("token", "create", addr, "--user", "bob", "--out", str(bob_token), *token).returncode == 0
    mine = bastion_cli("kv", "usage", addr, "--token-file", str(bob_token))
    assert mine.stdout == "~bob\t0 of 10 keys\t0 of 4096 bytes\n", mine.stderr
    bad = bastion_cli("kv", "usage", addr, "-n", "~admin", "--token-file", str(bob_token))
    assert bad.returncode == 1
    assert bad.stderr == "error: PERMISSION_DENIED: no read access to namespace '~admin'\n"


def test_keys_from_the_server_cannot_write_to_the_terminal(server: ServerProcess) -> None:
    """A key is any text but NUL: one holding a newline or an escape sequence (written by anyone who may write
    the namespace) is shown escaped, so it can neither forge lines of a listing nor drive the terminal."""
    addr, token = server.address, ("--token-file", str(server.token_file))
    evil = "evil\n\x1b[2J\x1b[31mforged\t99\r\u202e"
    put = bastion_cli("kv", "put", addr, evil, "v", *token)
    assert put.returncode == 0, put.stderr
    version = put.stdout.strip()
    listing = bastion_cli("kv", "ls", addr, *token)
    assert listing.stdout == f"evil\\n\\x1b[2J\\x1b[31mforged\\t99\\r\\u202e\t{version}\n"
    watch = subprocess.Popen(
        [sys.executable, "-m", "bastion", "kv", "watch", addr, "--from-version", version, *token],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert watch.stdout is not None
        line = LineReader(watch.stdout).next_line(20)
    finally:
        watch.kill()
        watch.wait(10)
    assert line == f"{version}\tput\tevil\\n\\x1b[2J\\x1b[31mforged\\t99\\r\\u202e\tv"
    assert json.loads(bastion_cli("kv", "ls", addr, "--json", *token).stdout)[0]["key"] == evil  # --json: as it is


def test_json_output_escapes_what_a_terminal_would_act_on(server: ServerProcess) -> None:
    """JSON escapes C0 controls itself; C1 controls (U+009B is CSI to a terminal), bidi overrides and line
    separators it may carry raw. The commands' JSON escapes those too (\\u009b): the same JSON to a parser,
    inert on a terminal -- from print_json and from the one-line-per-event streams alike."""
    addr, token = server.address, ("--token-file", str(server.token_file))
    key = "k\x9b31m\u202e\u2028\U000e0041"
    put = bastion_cli("kv", "put", addr, key, "v", *token)
    assert put.returncode == 0, put.stderr
    version = put.stdout.strip()
    for command in (("kv", "ls", addr, "--json"), ("call", addr, "kv.get", f"key={key}")):
        out = bastion_cli(*command, *token).stdout
        assert out.isascii() or all(c.isprintable() for c in out.replace("\n", "")), command
        assert "\\u009b31m\\u202e\\u2028\\udb40\\udc41" in out
        found = json.loads(out)
        assert (found[0] if isinstance(found, list) else found)["key"] == key
    watch = subprocess.Popen(
        [sys.executable, "-m", "bastion", "kv", "watch", addr, "--json", "--from-version", version, *token],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert watch.stdout is not None
        reader = LineReader(watch.stdout)
        events = [json.loads(line) for line in (reader.next_line(20), reader.next_line(20)) if line is not None]
    finally:
        watch.kill()
        watch.wait(10)
    (change,) = [event for event in events if event["type"] == "put"]
    assert change["key"] == key


def test_a_watch_ended_by_a_drain_says_which_version_to_resume_from(server_factory: StartServer) -> None:
    """A drain (SIGTERM, a rolling upgrade) ends kv.watch UNAVAILABLE; the command said only "resume this
    stream on another server", not from where: it now names the --from-version that misses nothing."""
    server = server_factory()
    addr, token = server.address, ("--token-file", str(server.token_file))
    put = bastion_cli("kv", "put", addr, "a", "1", *token)
    assert put.returncode == 0, put.stderr
    watch = subprocess.Popen(
        [sys.executable, "-m", "bastion", "kv", "watch", addr, "--from-version", put.stdout.strip(), *token],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert watch.stdout is not None
        line = LineReader(watch.stdout).next_line(20)
        assert line is not None and line.startswith(f"{put.stdout.strip()}\tput\ta\t"), line
        assert server.stop() == 0
        _, stderr = watch.communicate(timeout=20)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(10)
    assert watch.returncode == 1
    assert "UNAVAILABLE" in stderr
    assert f"--from-version {int(put.stdout) + 1}" in stderr, stderr


def test_a_watch_that_watching_again_cannot_help_gives_no_resume_note(server_factory: StartServer) -> None:
    """The note is for a drain or a lost connection; a watch from a version the history no longer holds
    ends OUT_OF_RANGE, and "watch again with --from-version 1" would only fail the same way (review)."""
    server = server_factory(env={"BASTION_KV__HISTORY": "2"})
    addr, token = server.address, ("--token-file", str(server.token_file))
    for i in range(6):
        assert bastion_cli("kv", "put", addr, f"k{i}", "1", *token).returncode == 0
    watch = bastion_cli("kv", "watch", addr, "--from-version", "1", *token)
    assert watch.returncode == 1, watch.stderr
    assert "OUT_OF_RANGE" in watch.stderr
    assert "note:" not in watch.stderr, watch.stderr


def test_ls_help_describes_the_lines_it_prints() -> None:
    """The help said "key, version, size"; the lines are key<TAB>version (keys only are fetched)."""
    shown = bastion_cli("kv", "ls", "--help", env={"COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.replace("│", " ").split())
    assert "key<TAB>version" in text and "size" not in text, text


def test_a_watch_whose_reader_has_gone_ends_quietly(server: ServerProcess) -> None:
    """``bastion kv watch ... | head -1``: once ``head`` has its line and exits, the next line finds the pipe
    closed. The command caught that BrokenPipeError as a local file it could not use and printed
    "error: Broken pipe" with exit code 2 -- the usage error's -- where a closed pipe is the reader's choice:
    now it ends as the commands that print after their call do (click's way): silently, exit code 1."""
    addr, token = server.address, ("--token-file", str(server.token_file))
    put = bastion_cli("kv", "put", addr, "a", "1", *token)
    assert put.returncode == 0, put.stderr
    read_end, write_end = os.pipe()
    watch = subprocess.Popen(
        [sys.executable, "-m", "bastion", "kv", "watch", addr, "--from-version", put.stdout.strip(), *token],
        env=clean_env(), stdout=write_end, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            assert pipe.readline().startswith(f"{put.stdout.strip()}\tput\ta\t".encode())
        # the reader has gone: the next change's line finds the pipe closed
        for i in range(100):
            if watch.poll() is not None:
                break
            assert bastion_cli("kv", "put", addr, f"b{i}", "1", *token).returncode == 0
        _, stderr = watch.communicate(timeout=20)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(10)
    assert (watch.returncode, [line for line in stderr.splitlines() if not line.startswith("# ")]) == (1, []), stderr
