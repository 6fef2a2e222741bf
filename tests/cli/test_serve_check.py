"""``bastion serve --check``: the configuration validated as ``serve`` would load it, nothing started or written.

Real subprocess runs of the CLI over real stores (SQLite; PostgreSQL with
``BASTION_TEST_POSTGRES_DSN``), real TLS files and a real Redis (with
``BASTION_TEST_REDIS_URL``). Every run that should write nothing is checked
by listing the working directory, sizes and modification times included,
before and after.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import urllib.parse
from pathlib import Path

import asyncpg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bastion.exceptions import UsageError
from bastion.store.migrations import LATEST, MIGRATIONS
from bastion.store.postgres import PostgresStore
from bastion.store.postgres_migrations import POSTGRES_MIGRATIONS
from bastion.store.sqlite import SQLiteStore
from tests.support.server import SERVICE_FILE, bastion_cli, seed_tls, start_server
from tests.support.stores import limited_role, postgres_dsn, store_location

PASSWORD = "pw-Zq81xvK3"


def _listing(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root``: (mode, size, mtime_ns) -- a file written, created, chmod-ed or removed shows."""
    found = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        found[str(path.relative_to(root))] = (st.st_mode, st.st_size if path.is_file() else 0, st.st_mtime_ns)
    return found


def _check(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return bastion_cli("serve", "--check", *args, cwd=cwd, env=env, timeout=60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _old_store(location: str, version: int) -> None:
    """A store migrated only up to ``version`` (as an older bastion left it)."""

    async def main() -> None:
        store: SQLiteStore | PostgresStore
        if location.startswith("postgresql://"):
            store = PostgresStore(location, migrations=POSTGRES_MIGRATIONS[:version])
        else:
            store = SQLiteStore(location, migrations=MIGRATIONS[:version])
        await store.open()
        await store.close()

    asyncio.run(main())


def _workdir(tmp_path: Path) -> Path:
    cwd = tmp_path / "work"
    cwd.mkdir()
    shutil.copy(SERVICE_FILE, cwd / SERVICE_FILE.name)
    return cwd


def test_a_good_configuration_passes_and_nothing_is_written(tmp_path: Path) -> None:
    """A data directory as a running server leaves it (CA, certificate, store at the latest schema): exit 0, a report
    of each part, and not one file created, changed or chmod-ed -- the store is read, never migrated."""
    cwd = _workdir(tmp_path)
    data = cwd / "bastion-data"
    seed_tls(data)
    assert bastion_cli("cert", "create", cwd=cwd).returncode == 0
    _old_store(str(data / "bastion.db"), LATEST)
    (cwd / "backups").mkdir(mode=0o700)
    config = cwd / "bastion.toml"
    config.write_text(f'port = {_free_port()}\n[backup]\ndirectory = "{cwd / "backups"}"\n')
    before = _listing(cwd)
    result = _check(cwd, "--config", str(config), "--service", "demo_service:service", "--no-http")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"schema version {LATEST}" in out
    assert "demo" in out  # the --service module was imported
    assert "bindable" in out
    assert "backups" in out
    assert out.rstrip().endswith("configuration OK")
    assert _listing(cwd) == before


def test_a_first_start_is_reported_not_performed(tmp_path: Path) -> None:
    """No data directory yet: what serve would create (the directory, the development CA and certificate, the
    store) is reported, and none of it is created."""
    cwd = _workdir(tmp_path)
    before = _listing(cwd)
    result = _check(cwd, "--port", "0", "--http-port", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "would be created" in result.stdout
    assert "would create the development CA" in result.stdout
    assert f"would migrate from schema version 0 to {LATEST}" in result.stdout
    assert "skip  port: 0: a free port is picked at start" in result.stdout
    # it read "no file, environment and flags": as if neither environment nor flags had been read
    assert "ok    configuration: defaults, environment and flags (no configuration file)" in result.stdout
    assert _listing(cwd) == before
    assert not (cwd / "bastion-data").exists()


def test_an_unknown_configuration_key_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    cwd = _workdir(tmp_path)
    config = cwd / "bastion.toml"
    config.write_text("[limits]\nmax_frames = 10\n")
    before = _listing(cwd)
    result = _check(cwd, "--config", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "max_frames" in result.stdout + result.stderr
    result = _check(cwd, env={"BASTION_LIMITS__MAX_FRAMES": "10"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "BASTION_LIMITS__MAX_FRAMES" in result.stdout + result.stderr
    assert _listing(cwd) == before


def test_a_service_that_cannot_be_imported_is_a_usage_error(tmp_path: Path) -> None:
    cwd = _workdir(tmp_path)
    result = _check(cwd, "--service", "no_such_module:service", "--port", "0", "--no-http")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no_such_module" in result.stdout


def test_a_certificate_with_another_key_is_a_usage_error(tmp_path: Path) -> None:
    cwd = _workdir(tmp_path)
    for name in ("a", "b"):
        assert bastion_cli("cert", "create", "--data-dir", name, cwd=cwd).returncode == 0
    before = _listing(cwd)
    result = _check(cwd, "--cert", "a/tls/server.pem", "--key", "b/tls/server.key", "--port", "0", "--no-http")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "a/tls/server.pem" in result.stdout
    assert "configuration OK" not in result.stdout
    result = _check(cwd, "--cert", "a/tls/server.pem", "--key", "a/tls/missing.key", "--port", "0", "--no-http")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "missing.key" in result.stdout
    assert _listing(cwd) == before


def test_an_unreachable_postgresql_exits_1_without_showing_the_password(tmp_path: Path) -> None:
    cwd = _workdir(tmp_path)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        store = f"postgresql://bastion:{PASSWORD}@127.0.0.1:{port}/bastion"
        result = _check(cwd, "--port", "0", "--no-http", env={"BASTION_STORE": store})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "postgresql://bastion:***@127.0.0.1" in result.stdout
    assert PASSWORD not in result.stdout + result.stderr
    assert not (cwd / "bastion-data").exists()


def test_an_unreachable_redis_exits_1_without_showing_the_password(tmp_path: Path) -> None:
    cwd = _workdir(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"redis://:{PASSWORD}@127.0.0.1:{sock.getsockname()[1]}/0"
        result = _check(cwd, "--port", "0", "--no-http", env={"BASTION_RATE_LIMITS__REDIS_URL": url})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "redis" in result.stdout.lower()
    assert PASSWORD not in result.stdout + result.stderr


def test_a_reachable_redis_passes(tmp_path: Path) -> None:
    url = os.environ.get("BASTION_TEST_REDIS_URL")
    if not url:
        pytest.skip("set BASTION_TEST_REDIS_URL to run against Redis")
    cwd = _workdir(tmp_path)
    result = _check(cwd, "--port", "0", "--no-http", env={"BASTION_RATE_LIMITS__REDIS_URL": url})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Redis" in result.stdout


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_store_at_an_older_schema_version_is_reported_and_left_unmigrated(tmp_path: Path, backend: str) -> None:
    cwd = _workdir(tmp_path)
    location = store_location(backend, tmp_path)
    _old_store(location, 5)
    before = _listing(tmp_path)
    result = _check(cwd, "--port", "0", "--no-http", env={"BASTION_STORE": location})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"would migrate from schema version 5 to {LATEST}" in result.stdout
    assert _listing(tmp_path) == before

    async def version() -> int:
        store: SQLiteStore | PostgresStore
        if backend == "postgresql":
            store = PostgresStore(location, migrations=POSTGRES_MIGRATIONS[:5])
        else:
            store = SQLiteStore(location, migrations=MIGRATIONS[:5])
        await store.open()  # migrations[:5]: opens without migrating further
        try:
            return store.schema_version
        finally:
            await store.close()

    assert asyncio.run(version()) == 5


def test_checking_beside_the_running_server_passes_and_leaves_its_store_alone(tmp_path: Path) -> None:
    """Before a restart the server still runs: its port in use is a warning, its live SQLite store (with -wal and
    -shm) is read, and the check passes; the server keeps serving."""
    server = start_server(tmp_path / "srv")
    try:
        port = server.address.rpartition(":")[2]
        before = (server.data_dir / "bastion.db").stat().st_mtime_ns
        result = _check(server.workdir, "--data-dir", str(server.data_dir), "--port", port, "--no-http")
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"schema version {LATEST} (current)" in result.stdout
        assert "is in use" in result.stdout
        assert (server.data_dir / "bastion.db").stat().st_mtime_ns == before
        assert server.process.poll() is None
    finally:
        server.stop()


def test_what_serve_would_refuse_at_start_is_refused_here_too(tmp_path: Path) -> None:
    """A metrics token file that cannot be read, and a files directory that cannot be made, stop serve
    at start (exit 2): --check says so too, rather than "configuration OK"."""
    cwd = _workdir(tmp_path)
    missing = tmp_path / "no-such-metrics.token"
    result = _check(cwd, "--port", "0", "--http-port", "0", env={"BASTION_GATEWAY__METRICS_TOKEN_FILE": str(missing)})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "metrics token file" in result.stdout and "configuration OK" not in result.stdout
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    files = str(blocker / "files")
    result = _check(cwd, "--port", "0", "--no-http", env={"BASTION_FILES__DIRECTORY": files})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "files directory" in result.stdout and "configuration OK" not in result.stdout


def test_a_development_ca_key_serve_cannot_use_is_an_error(tmp_path: Path) -> None:
    """An RSA key where the development CA's EC key should be: serve refuses to start on it (tls_files.read_key), so
    --check says so too, without tightening its mode (it writes nothing)."""
    cwd = _workdir(tmp_path)
    assert bastion_cli("cert", "create", cwd=cwd).returncode == 0
    ca_key = cwd / "bastion-data" / "tls" / "ca.key"
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ca_key.write_bytes(pem)
    ca_key.chmod(0o644)
    before = _listing(cwd)
    result = _check(cwd, "--port", "0", "--no-http")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "ERROR TLS" in result.stdout and "must be an EC key" in result.stdout
    assert _listing(cwd) == before


def test_client_certificates_without_a_client_ca_report_the_development_ca(tmp_path: Path) -> None:
    """tls.client_auth on and no tls.client_ca: serve makes (or reuses) the development CA for client certificates.
    --check says which it would do, writes nothing, and refuses a CA certificate left without its key."""
    cwd = _workdir(tmp_path)
    assert bastion_cli("cert", "create", "--data-dir", "certs", cwd=cwd).returncode == 0
    args = ("--cert", "certs/tls/server.pem", "--key", "certs/tls/server.key", "--port", "0", "--no-http")
    env = {"BASTION_TLS__CLIENT_AUTH": "required"}
    dev_ca = (cwd / "bastion-data" / "tls" / "ca.pem").resolve()
    before = _listing(cwd)
    result = _check(cwd, *args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"note  client certificates: tls.client_ca is not set: would create the development CA {dev_ca}" in (
        result.stdout
    )
    assert _listing(cwd) == before
    assert not (cwd / "bastion-data").exists()

    assert bastion_cli("cert", "create", cwd=cwd).returncode == 0
    result = _check(cwd, *args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"the development CA {dev_ca} is trusted for client certificates" in result.stdout
    assert f"ok    client CA file: {dev_ca}" in result.stdout

    (cwd / "bastion-data" / "tls" / "ca.key").unlink()  # serve: "exists but its key ... does not"
    result = _check(cwd, *args, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "ERROR client certificates" in result.stdout and "ca.key does not" in result.stdout


def test_a_postgresql_role_that_cannot_migrate_a_schema_behind_is_an_error(tmp_path: Path) -> None:
    """A schema at version 5 whose role may read and write its tables but not migrate them: serve would fail at
    start ("permission denied"). --check names what the role lacks -- CREATE on the schema, then the ownership of
    the tables the migrations alter -- and, once the schema's owner has migrated it, passes."""
    cwd = _workdir(tmp_path)
    location = store_location("postgresql", tmp_path)
    _old_store(location, 5)
    with limited_role(location) as dsn:
        parts = urllib.parse.urlsplit(dsn)
        role, schema = parts.username, dict(urllib.parse.parse_qsl(parts.query))["search_path"]
        env = {"BASTION_STORE": dsn}
        result = _check(cwd, "--port", "0", "--no-http", env=env)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"role {role} cannot migrate it from schema version 5 to {LATEST}" in result.stdout
        assert f'lacks CREATE on schema {schema} (GRANT CREATE ON SCHEMA "{schema}" TO "{role}")' in result.stdout
        assert "the owner's rights over the table(s) " in result.stdout  # its tables are the schema owner's too
        assert str(parts.password) not in result.stdout + result.stderr

        async def grant(what: str) -> None:
            conn = await asyncpg.connect(postgres_dsn())
            try:
                await conn.execute(f'GRANT {what} TO "{role}"')
            finally:
                await conn.close()

        asyncio.run(grant(f'CREATE ON SCHEMA "{schema}"'))
        result = _check(cwd, "--port", "0", "--no-http", env=env)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "CREATE on schema" not in result.stdout
        altered = "file_shares, file_uploads, files, jobs, lockouts, users"  # altered or indexed by migrations 6 on
        assert (
            f"lacks the owner's rights over the table(s) {altered}; and REFERENCES on the table(s) users; and "
            "TRIGGER on the table(s) files, jobs, kv_keys, users (grant them" in result.stdout
        )

        async def serve_would() -> None:
            async with PostgresStore(dsn):
                pass

        with pytest.raises(UsageError, match=r"migrating failed: .*permission denied"):  # serve's at start
            asyncio.run(serve_would())

        _old_store(location, LATEST)  # the schema's owner migrates it, and lets the role use the new tables
        asyncio.run(grant(f'SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}"'))
        result = _check(cwd, "--port", "0", "--no-http", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"at schema version {LATEST} (current)" in result.stdout
