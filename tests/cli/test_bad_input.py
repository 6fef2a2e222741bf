"""Bad input to the ``bastion`` command: a coded one-line error and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.support.server import ServerProcess, bastion_cli


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_a_timeout_that_is_not_seconds_above_0_exits_2(server: ServerProcess, value: str) -> None:
    result = bastion_cli(
        "call", server.address, "admin.health", "--timeout", value, "--token-file", str(server.token_file)
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"Invalid value for --timeout: {float(value)} is not a number of seconds above 0" in result.stderr


def test_a_data_directory_that_cannot_be_made_exits_2(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    serve = bastion_cli("serve", "--port", "0", "--no-http", "--data-dir", str(blocker / "data"))
    assert serve.returncode == 2, serve.stderr
    assert serve.stdout == ""
    assert serve.stderr.splitlines() == [f"error: cannot create the data directory {blocker / 'data'}: Not a directory"]
    create = bastion_cli("cert", "create", "--data-dir", str(blocker / "data"))
    assert create.returncode == 2, create.stderr
    assert create.stderr.splitlines() == [f"error: {blocker / 'data' / 'tls'}: Not a directory"]


def test_serve_refuses_an_infinite_ping_interval_instead_of_failing_every_handshake(tmp_path: Path) -> None:
    # It used to start, print its banner, and then fail every handshake (OverflowError building
    # the Welcome): a server that looks up but serves no one.
    env = {"BASTION_LIMITS__PING_INTERVAL": "inf"}
    serve = bastion_cli("serve", "--port", "0", "--no-http", "--data-dir", str(tmp_path / "data"), env=env, timeout=15)
    assert serve.returncode == 2, serve.stderr
    assert "listening on" not in serve.stdout
    assert "Traceback" not in serve.stderr
    assert "error: limits.ping_interval must be a finite number, got inf" in serve.stderr


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        ("BASTION_STORE_PASSWORD_FILE", "store_password_file {path} is not UTF-8 text"),
        ("BASTION_BACKUP__PASSPHRASE_FILE", "backup.passphrase_file is not UTF-8 text"),
        ("BASTION_CONFIG", "config file {path} is not UTF-8 text"),
    ],
)
def test_a_secret_or_config_file_that_is_not_utf8_exits_2_without_showing_it(
    tmp_path: Path, variable: str, message: str
) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"s3cr\xe9t-value\n")
    path.chmod(0o600)
    env = {variable: str(path)}
    serve = bastion_cli("serve", "--port", "0", "--no-http", "--data-dir", str(tmp_path / "data"), env=env)
    assert serve.returncode == 2, serve.stderr
    assert "Traceback" not in serve.stderr and "s3cr" not in serve.stderr
    assert serve.stderr.splitlines()[-1] == "error: " + message.format(path=path)


def test_a_backup_passphrase_file_that_is_not_utf8_exits_2_without_showing_it(tmp_path: Path) -> None:
    path = tmp_path / "passphrase"
    path.write_bytes(b"s3cr\xe9t-value\n")
    result = bastion_cli("backup", "--data-dir", str(tmp_path / "data"), "--passphrase-file", str(path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "s3cr" not in result.stderr
    assert result.stderr.splitlines()[-1] == f"error: --passphrase-file {path} is not UTF-8 text"


def test_a_download_to_a_directory_that_cannot_hold_it_exits_2(server: ServerProcess, tmp_path: Path) -> None:
    auth = ("--token-file", str(server.token_file))
    source = tmp_path / "hello.txt"
    source.write_text("hello")
    assert bastion_cli("files", "put", server.address, str(source), *auth).returncode == 0
    for dest, reason in [
        (tmp_path / "missing" / "out", "No such file or directory"),
        (source / "out", "Not a directory"),
    ]:
        result = bastion_cli("files", "get", server.address, "hello.txt", str(dest), *auth)
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines() == [f"error: cannot write {dest}: {reason}"]


def test_a_token_with_nowhere_to_go_is_never_made(server: ServerProcess, tmp_path: Path) -> None:
    auth = ("--token-file", str(server.token_file))

    before = _token_ids(server)
    result = bastion_cli("token", "create", server.address, "--out", str(tmp_path), *auth)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"error: cannot write {tmp_path}: Is a directory"]
    assert _token_ids(server) == before  # no live token whose secret nobody saw

    # A refused call leaves no file behind, and an old file as it was.
    out = tmp_path / "new.token"
    refused = bastion_cli("token", "create", server.address, "--out", str(out), "--token-file", "/dev/null")
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    assert not out.exists()
    old = tmp_path / "old.token"
    old.write_text("old\n")
    refused = bastion_cli("token", "create", server.address, "--out", str(old), "--token-file", "/dev/null")
    assert refused.returncode == 1 and old.read_text() == "old\n"
    login = bastion_cli("login", server.address, "-u", "admin", "--password-stdin", "--save", str(tmp_path), stdin="x")
    assert login.returncode == 2 and login.stderr.splitlines() == [f"error: cannot write {tmp_path}: Is a directory"]


def test_a_ttl_of_nan_is_refused_not_taken_as_no_expiry(server: ServerProcess) -> None:
    auth = ("--token-file", str(server.token_file))
    for value in ("nan", "inf", "0"):
        token = bastion_cli("token", "create", server.address, "--show", "--ttl", value, *auth)
        assert token.returncode == 2, token.stdout + token.stderr
        assert f"Invalid value for --ttl: {float(value)} is not a number of seconds above 0" in token.stderr
        assert token.stdout == ""
        put = bastion_cli("kv", "put", server.address, "k", "v", "--ttl", value, *auth)
        assert put.returncode == 2 and "Invalid value for --ttl" in put.stderr
    listing = bastion_cli("token", "ls", server.address, "--json", *auth)
    assert [t["label"] for t in json.loads(listing.stdout)] == ["bootstrap"]  # no token that never expires


def test_a_missing_client_certificate_or_key_is_named(server: ServerProcess, tmp_path: Path) -> None:
    assert server.ca_file is not None
    present = server.ca_file  # a file that exists, standing in for the other half of the pair
    for cert, key in [(tmp_path / "no.pem", present), (present, tmp_path / "no.key")]:
        result = bastion_cli("call", server.address, "admin.health", "--cert", str(cert), "--key", str(key))
        assert result.returncode == 2, result.stderr
        missing = cert if cert != present else key
        assert result.stderr.splitlines() == [
            f"error: cannot read TLS certificate or key: {missing}: No such file or directory"
        ]


@pytest.mark.parametrize("command", [["kv", "ls"], ["messages", "inbox"], ["jobs", "ls"]])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_limit_below_1_exits_2_instead_of_printing_nothing(
    server: ServerProcess, command: list[str], value: str
) -> None:
    # It used to exit 0 with nothing printed, as if there were nothing to list.
    result = bastion_cli(*command, server.address, "--limit", value, "--token-file", str(server.token_file))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "Invalid value for '--limit'" in result.stderr


@pytest.mark.parametrize("how", ["--token-file", "BASTION_TOKEN_FILE"])
def test_a_token_file_that_is_not_utf8_exits_2_without_showing_it(tmp_path: Path, how: str) -> None:
    path = tmp_path / "token"
    path.write_bytes(b"s3cr\xe9t-token\n")
    path.chmod(0o600)
    flags = ("--token-file", str(path)) if how == "--token-file" else ()
    env = {"BASTION_TOKEN_FILE": str(path)} if how != "--token-file" else {}
    result = bastion_cli("methods", "127.0.0.1:1", "--insecure", *flags, env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "s3cr" not in result.stderr and "0xe9" not in result.stderr
    assert result.stderr.splitlines() == [f"error: token file {path} is not UTF-8 text"]


def test_a_secret_is_never_written_through_a_symlink_or_into_another_users_file(
    server: ServerProcess, tmp_path: Path
) -> None:
    """``--out`` and ``--save`` may name a shared directory (/tmp): a name planted there beforehand -- a symlink
    to a file its planter can read, or a file of their own -- must not receive the secret."""
    auth = ("--token-file", str(server.token_file))

    before = _token_ids(server)
    target = tmp_path / "planted"
    target.write_text("planted\n")
    target.chmod(0o644)
    link = tmp_path / "token.link"
    link.symlink_to(target)
    planted = [(link, "it is a symbolic link")]
    if os.geteuid() == 0:  # only root can give a file away
        theirs = tmp_path / "theirs.token"
        theirs.write_text("planted\n")
        os.chown(theirs, 65534, 65534)
        planted.append((theirs, "it belongs to another user (uid 65534)"))
    for path, reason in planted:
        result = bastion_cli("token", "create", server.address, "--out", str(path), *auth)
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines() == [f"error: cannot write {path}: {reason}"]
        login = bastion_cli(
            "login", server.address, "-u", "admin", "--password-stdin", "--save", str(path), stdin="x\n"
        )
        assert login.returncode == 2 and login.stderr.splitlines() == [f"error: cannot write {path}: {reason}"]
        assert path.read_text() == "planted\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert _token_ids(server) == before  # refused before the call: no live token whose secret nobody saw


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://ada:Zq9k/Wv7m@127.0.0.1:1/db",  # a password's / not percent-encoded
        "postgresql://ada:Zq9k?Wv7m@127.0.0.1:1/db",
        "postgresql://ada:Zq9kWv7m@[127.0.0.1/db",
        "postgresql://ada@127.0.0.1:1/db?sslpassword=Zq9kWv7m&sslmode=bogus",
    ],
)
def test_a_store_dsn_that_does_not_work_is_a_coded_error_that_never_shows_its_password(
    tmp_path: Path, dsn: str
) -> None:
    env = {"BASTION_STORE": dsn}
    serve = bastion_cli("serve", "--port", "0", "--no-http", "--data-dir", str(tmp_path / "data"), env=env)
    assert serve.returncode == 2, serve.stderr
    assert "Traceback" not in serve.stderr and "listening on" not in serve.stdout
    assert "Zq9k" not in serve.stderr and "Wv7m" not in serve.stderr, serve.stderr
    assert serve.stderr.splitlines()[-1].startswith("error: cannot open PostgreSQL store postgresql://ada")


@pytest.mark.parametrize(
    ("store", "refusal"),
    [
        ("postgresql://ada:Zq9k/Wv7m@127.0.0.1:1/db", "must not contain a password"),  # its / not percent-encoded
        ("postgresql://ada@127.0.0.1:1/db?sslpassword=Zq9kWv7m", "must not contain a password"),
        ("postgresql://ada@[127.0.0.1/db", "is not a valid URL"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "backup"])
def test_a_store_flag_with_a_password_or_not_a_url_exits_2(
    tmp_path: Path, store: str, refusal: str, command: str
) -> None:
    result = bastion_cli(command, "--data-dir", str(tmp_path / "data"), "--store", store)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "listening on" not in result.stdout
    assert "Zq9k" not in result.stderr  # a refusal for a password quotes no URL
    assert refusal in " ".join(result.stderr.replace("│", " ").split())  # as one line, out of its box


@pytest.mark.parametrize(
    "url",
    [
        "redis://:Zq9k@127.0.0.1:notaport/0",
        "redis://:Zq9k/Wv7m@127.0.0.1:6379/0",  # a password's / not percent-encoded: the port reads "Zq9k"
        "redis://:Zq9kWv7m@[127.0.0.1/0",
        "redis://:Zq9kWv7m@127.0.0.1:6379/0?socket_timeout=soon",
        # a password's @ and / not percent-encoded: it parsed, as host "Wv7m" and password "Zq9k", and the
        # server (its --check, its warnings) showed the URL read by its last @, as 127.0.0.1:6379
        "redis://:Zq9k@Wv7m/x@127.0.0.1:6379/0",
    ],
)
def test_a_redis_url_that_does_not_parse_exits_2_without_showing_it(tmp_path: Path, url: str) -> None:
    env = {"BASTION_RATE_LIMITS__REDIS_URL": url}
    serve = bastion_cli("serve", "--port", "0", "--no-http", "--insecure", "--data-dir", str(tmp_path), env=env)
    assert serve.returncode == 2, serve.stderr
    assert "Traceback" not in serve.stderr and "listening on" not in serve.stdout
    assert "Zq9k" not in serve.stderr and "Wv7m" not in serve.stderr, serve.stderr
    assert serve.stderr.splitlines()[-1].startswith(
        ("error: rate_limits.redis_url is not", "error: rate_limits.redis_url:")
    )


def test_a_secret_replaces_a_file_others_may_hold_open_or_reach_by_another_name(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A token file that others could read (mode 0644) may be held open by them, and one with a second
    name (a hard link) may be read through it: the secret goes into a new file, not into that one."""
    auth = ("--token-file", str(server.token_file))
    loose = tmp_path / "loose.token"
    loose.write_text("old\n")
    loose.chmod(0o644)
    linked = tmp_path / "linked.token"
    linked.write_text("old\n")
    linked.chmod(0o600)
    other_name = tmp_path / "other-name"
    os.link(linked, other_name)
    for path, seen_by in ((loose, loose), (linked, other_name)):
        with open(seen_by) as held:  # opened while it could be
            result = bastion_cli("token", "create", server.address, "--out", str(path), *auth)
            assert result.returncode == 0, result.stderr
            held.seek(0)
            assert held.read() == "old\n"
        assert path.read_text().startswith("bst_") and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.stat().st_nlink == 1
    assert other_name.read_text() == "old\n"


def _token_ids(server: ServerProcess) -> list[str]:
    """The ids of the tokens the server holds, listed by the CLI with the test's admin token."""
    listing = bastion_cli("token", "ls", server.address, "--json", "--token-file", str(server.token_file))
    assert listing.returncode == 0, listing.stderr
    return [t["id"] for t in json.loads(listing.stdout)]


def test_a_restore_of_an_archive_that_is_not_a_readable_file_is_a_usage_error(tmp_path: Path) -> None:
    """A missing ARCHIVE (a typo) or a directory is the caller's mistake, exit 2 before anything is read;
    a corrupt archive stays exit 1 (docs/services.md)."""
    for archive, reason in [(tmp_path / "nope.tar", "does not exist"), (tmp_path, "is a directory")]:
        result = bastion_cli("restore", str(archive), "--data-dir", str(tmp_path / "data"))
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert reason in " ".join(result.stderr.replace("│", " ").split()), result.stderr  # rich wraps it in a box
    assert not (tmp_path / "data").exists()
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not an archive" * 8)
    result = bastion_cli("restore", str(junk), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 1, result.stderr
    # the phase line first (progress on stderr, not a terminal), then the error alone
    assert result.stderr.splitlines() == [
        "verifying the archive (112 B)…",
        "error: DATA_LOSS: not a bastion backup archive (bad header)",
    ]
