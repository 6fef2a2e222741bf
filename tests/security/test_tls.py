"""TLS: the dev CA, the contexts, and real servers refusing what they must (bastion/security/tls*.py).

Process tests run ``bastion serve`` over real TLS on loopback; the mutual-TLS
tests use the in-process ``Server`` API so they can look at the server's
side of a connection (``link.tls_identity``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import signal
import socket
import ssl
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

import bastion
from bastion import Client, ConnectError, Server, SyncClient, Unauthenticated
from bastion.cli.cert import INSECURE_WARNING, prepare_tls
from bastion.config import Config, TLSConfig
from bastion.security import tls, tls_devca, tls_files
from bastion.security.audit import AuditLog
from bastion.security.authn import StoreAuthenticator
from bastion.security.credentials import User
from bastion.security.throttle import LoginThrottle
from bastion.services.admin import service as admin_service
from bastion.store import open_store
from tests.support.server import ServerProcess, bastion_cli, start_server, wait_for

# -- the development CA and certificates -------------------------------------------------------


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _sans(cert: x509.Certificate) -> list[str]:
    return [str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]


def test_dev_tls_is_created_once_with_private_keys_0600(tmp_path: Path) -> None:
    paths = tls.ensure_dev_tls(tmp_path, ["node1.example"])
    directory = tmp_path / "tls"
    assert paths == (directory / "server.pem", directory / "server.key", directory / "ca.pem")
    assert _mode(directory) == 0o700
    assert _mode(directory / "ca.key") == 0o600
    assert _mode(paths.key) == 0o600
    ca, leaf = _cert(paths.ca), _cert(paths.cert)
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey) and ca_key.curve.name == "secp256r1"
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3650
    assert 365 <= (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days <= 366
    assert _sans(leaf) == ["localhost", "127.0.0.1", "::1", "node1.example"]
    leaf.verify_directly_issued_by(ca)

    again = tls.ensure_dev_tls(tmp_path, ["node1.example"])
    assert again == paths
    assert _cert(again.cert).serial_number == leaf.serial_number  # reused, not re-issued
    assert _cert(again.ca).serial_number == ca.serial_number


def test_server_certificate_is_renewed_near_expiry_or_for_a_new_host(tmp_path: Path) -> None:
    paths = tls.ensure_dev_tls(tmp_path)
    ca = _cert(paths.ca)
    first = _cert(paths.cert).serial_number

    moved = tls.ensure_dev_tls(tmp_path, ["10.1.2.3"])  # the configured host changed
    assert _cert(moved.cert).serial_number != first
    assert "10.1.2.3" in _sans(_cert(moved.cert))

    # A certificate 10 days from expiry is replaced; the CA stays (clients keep trusting it).
    expiring, key = tls_devca.issue_certificate(
        ca,
        tls_files.read_key(tmp_path / "tls" / "ca.key"),
        "old",
        ExtendedKeyUsageOID.SERVER_AUTH,
        tls_devca.san_entries([]),
        days=10,
    )
    tls_files.write_key(paths.key, key)
    tls_files.write_cert(paths.cert, expiring)
    renewed = _cert(tls.ensure_dev_tls(tmp_path).cert)
    assert renewed.serial_number != expiring.serial_number
    assert renewed.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > datetime.timedelta(days=300)
    assert _cert(paths.ca).serial_number == ca.serial_number
    assert _mode(paths.key) == 0o600

    # A key that does not belong to the certificate (a crash between the two writes, say) is replaced too.
    tls_files.write_key(paths.key, ec.generate_private_key(ec.SECP256R1()))
    repaired = tls.ensure_dev_tls(tmp_path)
    assert _cert(repaired.cert).serial_number != renewed.serial_number
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(repaired.cert, repaired.key)


def test_contexts_are_tls13_by_default_and_aead_only_with_12(tmp_path: Path) -> None:
    paths = tls.ensure_dev_tls(tmp_path)
    default = tls.server_context(TLSConfig(), paths.cert, paths.key)
    assert default.minimum_version is ssl.TLSVersion.TLSv1_3
    assert default.options & ssl.OP_NO_COMPRESSION
    assert default.options & ssl.OP_NO_RENEGOTIATION
    assert default.verify_mode is ssl.CERT_NONE

    relaxed = tls.server_context(TLSConfig(min_version="1.2"), paths.cert, paths.key)
    assert relaxed.minimum_version is ssl.TLSVersion.TLSv1_2
    for suite in relaxed.get_ciphers():
        if suite["protocol"] == "TLSv1.2":
            assert suite["aead"] and suite["kea"] == "kx-ecdhe", suite["name"]

    required = tls.server_context(TLSConfig(client_auth="required"), paths.cert, paths.key, paths.ca)
    assert required.verify_mode is ssl.CERT_REQUIRED
    optional = tls.server_context(TLSConfig(client_auth="optional"), paths.cert, paths.key, paths.ca)
    assert optional.verify_mode is ssl.CERT_OPTIONAL

    client = tls.client_context(paths.ca)
    assert client.check_hostname and client.verify_mode is ssl.CERT_REQUIRED
    assert client.minimum_version is ssl.TLSVersion.TLSv1_2

    with pytest.raises(bastion.UsageError, match="does not exist"):
        tls.client_context(tmp_path / "missing.pem")
    with pytest.raises(bastion.UsageError, match="cannot load TLS certificate"):
        tls.server_context(TLSConfig(), paths.cert, tmp_path / "tls" / "ca.key")  # key of another cert


def test_serials_parse_as_decimal_or_hex() -> None:
    assert tls.parse_serial("1234") == 1234
    assert tls.parse_serial("0x1f") == 31
    assert tls.parse_serial("1F:2a") == 0x1F2A
    assert tls.parse_serial("abc") == 0xABC
    with pytest.raises(bastion.UsageError):
        tls.parse_serial("0xzz")


def test_insecure_is_refused_off_loopback_unless_forced(tmp_path: Path) -> None:
    warnings: list[str] = []
    off_loopback = Config(host="0.0.0.0", data_dir=str(tmp_path), tls=TLSConfig(insecure=True))
    with pytest.raises(bastion.UsageError, match="--force-insecure"):
        prepare_tls(off_loopback, warnings.append)
    forced = Config(host="0.0.0.0", data_dir=str(tmp_path), tls=TLSConfig(insecure=True, force_insecure=True))
    assert prepare_tls(forced, warnings.append).context is None
    assert prepare_tls(Config(host="::1", tls=TLSConfig(insecure=True)), warnings.append).context is None
    assert warnings == [INSECURE_WARNING, INSECURE_WARNING]
    assert not (tmp_path / "tls").exists()


def test_a_server_key_others_can_read_is_warned_about(tmp_path: Path) -> None:
    leaf = trustme.CA().issue_cert("server.example")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    config = Config(data_dir=str(tmp_path), tls=TLSConfig(cert=str(cert), key=str(key)))
    for mode, warned in ((0o644, True), (0o640, True), (0o600, False), (0o400, False)):
        os.chmod(key, mode)
        warnings: list[str] = []
        assert prepare_tls(config, warnings.append).context is not None
        assert [w for w in warnings if "chmod 600" in w and str(key) in w] == (
            [f"WARNING: TLS key {key} has mode {mode:04o}: others can read it; chmod 600 it"] if warned else []
        )


# -- real servers ---------------------------------------------------------------------------------


def test_first_serve_creates_the_dev_ca_and_prints_its_path(tmp_path: Path) -> None:
    server = start_server(tmp_path / "fresh", seed_ca=False)
    try:
        ca_file = (server.data_dir / "tls" / "ca.pem").resolve()
        assert server.reader.next_line(5).startswith("admin token")  # type: ignore[union-attr]
        assert server.reader.next_line(5) == f"TLS on; CA certificate: {ca_file}"
        for key in ("ca.key", "server.key"):
            assert _mode(server.data_dir / "tls" / key) == 0o600, key
        with SyncClient(server.address, ca=ca_file, timeout=5) as client:
            assert client.call("admin.health")["status"] == "ok"
        # The test session's CA (BASTION_CA) did not sign this server's certificate.
        with pytest.raises(ConnectError, match="certificate verify failed"):
            SyncClient(server.address, timeout=5).connect()
    finally:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("other-ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def _connect_sync(address: str, **kwargs: Any) -> None:
    with SyncClient(address, timeout=5, **kwargs) as client:
        client.call("admin.health")


def _connect_async(address: str, **kwargs: Any) -> None:
    async def main() -> None:
        async with Client(address, timeout=5, **kwargs) as client:
            await client.call("admin.health")

    asyncio.run(main())


@pytest.mark.parametrize("connect", [_connect_sync, _connect_async], ids=["sync", "async"])
def test_handshake_failures_say_why_and_nothing_is_dispatched(
    server: ServerProcess, other_ca: Path, connect: Callable[..., None]
) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"insecure": True}, "TLS"),
        ({"ca": other_ca}, "certificate verify failed"),
        ({"server_hostname": "wrong.example"}, "hostname mismatch"),
    ]
    for kwargs, reason in cases:
        with pytest.raises(ConnectError, match=reason) as info:
            connect(server.address, token_file=str(server.token_file), **kwargs)
        assert server.address in str(info.value)
    connect(server.address.replace("127.0.0.1", "localhost"), token_file=str(server.token_file))
    with SyncClient(server.address, token_file=str(server.token_file), timeout=5) as good:
        stats = good.call("admin.stats")
    assert stats["calls_total"] == 2  # the localhost health call and this one: no failed client got a call in


def test_cli_reports_tls_failures(server: ServerProcess, other_ca: Path) -> None:
    plaintext = bastion_cli("call", server.address, "admin.health", "--insecure")
    assert plaintext.returncode == 3
    assert "may require TLS" in plaintext.stderr
    untrusted = bastion_cli("call", server.address, "admin.health", "--ca", str(other_ca))
    assert untrusted.returncode == 3
    assert "certificate verify failed" in untrusted.stderr
    good = bastion_cli("methods", server.address, "--ca", str(server.ca_file), "--json")
    assert good.returncode == 0, good.stderr


def test_cli_finds_the_local_dev_ca(tmp_path: Path) -> None:
    # `bastion call` run where `bastion serve` keeps its data trusts ./bastion-data/tls/ca.pem.
    server = start_server(tmp_path, seed_ca=False, data_dir=tmp_path / "bastion-data")
    try:
        found = bastion_cli("call", server.address, "admin.health", cwd=tmp_path, env={"BASTION_CA": ""})
        assert found.returncode == 0, found.stderr
        elsewhere = bastion_cli(
            "call", server.address, "admin.health", cwd=tmp_path / "markers", env={"BASTION_CA": ""}
        )
        assert elsewhere.returncode == 3
        assert "certificate verify failed" in elsewhere.stderr
        # and says what to do: it was "unable to get local issuer certificate" alone
        assert "--ca or BASTION_CA" in elsewhere.stderr and "<data-dir>/tls/ca.pem" in elsewhere.stderr
    finally:
        assert server.stop() == 0


def test_tls_client_against_a_plaintext_server(server_factory: Callable[..., ServerProcess]) -> None:
    plain = server_factory(insecure=True)
    assert INSECURE_WARNING in plain.log()
    with pytest.raises(ConnectError, match="server does not speak TLS"):
        _connect_sync(plain.address)
    with pytest.raises(ConnectError, match="server does not speak TLS"):
        _connect_async(plain.address)
    _connect_sync(plain.address, insecure=True)


def test_insecure_on_a_public_address_exits_2(tmp_path: Path) -> None:
    result = bastion_cli("serve", "--insecure", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "--force-insecure" in result.stderr


def test_sighup_reloads_the_certificate_without_dropping_connections(server: ServerProcess) -> None:
    assert server.ca_file is not None
    before = _server_serial(server)
    with SyncClient(server.address, token_file=str(server.token_file), timeout=5) as client:
        assert client.call("demo.echo", value=1) == 1
        link = client._link

        renewed = bastion_cli("cert", "renew", "--data-dir", str(server.data_dir))
        assert renewed.returncode == 0, renewed.stderr
        new_serial = int(renewed.stdout.split("serial ")[1].split(",")[0], 16)
        assert new_serial != before
        server.signal(signal.SIGHUP)
        wait_for(lambda: "reloaded TLS certificate" in server.log(), 5, what="the reload log line")

        assert client.call("demo.echo", value=2) == 2
        assert client._link is link  # the same connection, still up
        assert _server_serial(server) == new_serial
        with SyncClient(server.address, timeout=5) as fresh:
            assert fresh.call("admin.health")["status"] == "ok"

        # A broken pair is refused and the server keeps serving the last good one.
        (server.data_dir / "tls" / "server.pem").write_text("not a certificate\n")
        server.signal(signal.SIGHUP)
        wait_for(lambda: "TLS reload failed" in server.log(), 5, what="the failed reload log line")
        assert _server_serial(server) == new_serial
        assert client.call("demo.echo", value=3) == 3


def _server_serial(server: ServerProcess) -> int:
    """The serial of the certificate a new connection is shown."""
    context = tls.client_context(server.ca_file)
    with (
        socket.create_connection((server.host, server.port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname=server.host) as tls_sock,
    ):
        der = tls_sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_cert_commands_create_show_renew_and_issue(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    created = bastion_cli("cert", "create", "--data-dir", data, "--host", "node7.example")
    assert created.returncode == 0, created.stderr
    ca_file = (tmp_path / "data" / "tls" / "ca.pem").resolve()
    assert f"CA certificate: {ca_file}" in created.stdout

    shown = bastion_cli("cert", "show", "--data-dir", data)
    assert shown.returncode == 0, shown.stderr
    leaf = _cert(tmp_path / "data" / "tls" / "server.pem")
    for text in (
        "subject:",
        "SANs:        localhost, 127.0.0.1, ::1, node7.example",
        f"0x{leaf.serial_number:x}",
        "expires:",
        "SHA-256:",
    ):
        assert text in shown.stdout, text

    renewed = bastion_cli("cert", "renew", "--data-dir", data)
    assert renewed.returncode == 0, renewed.stderr
    new_leaf = _cert(tmp_path / "data" / "tls" / "server.pem")
    assert new_leaf.serial_number != leaf.serial_number
    assert "node7.example" in _sans(new_leaf)  # the names it had are kept

    issued = bastion_cli("cert", "client", "alice", "--data-dir", data)
    assert issued.returncode == 0, issued.stderr
    assert _mode(tmp_path / "data" / "tls" / "clients" / "alice.key") == 0o600

    missing = bastion_cli("cert", "show", "--data-dir", str(tmp_path / "none"))
    assert missing.returncode == 2
    assert "bastion cert create" in missing.stderr


# -- mutual TLS (in-process server) ------------------------------------------------------------------


class MTLS:
    """A TLS server in this process with client certificates, and certificates to present."""

    def __init__(self, directory: Path, server: Server) -> None:
        self.directory = directory
        self.server = server
        self.ca = directory / "tls" / "ca.pem"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def client_cert(self, name: str) -> tuple[Path, Path, int]:
        cert, key = tls.issue_client_cert(self.directory, name)
        return cert, key, _cert(cert).serial_number

    def identities(self) -> list[tuple[str, int] | None]:
        return [s.link.peer_cert_identity for s in self.server.sessions if s.link is not None]


@contextlib.asynccontextmanager
async def mtls_server(
    directory: Path, config: TLSConfig, services: Sequence[bastion.Service] = (), **kwargs: Any
) -> AsyncIterator[MTLS]:
    paths = tls.ensure_dev_tls(directory)
    context = tls.server_context(config, paths.cert, paths.key, paths.ca)
    server = Server([admin_service, *services], ssl_context=context, **kwargs)
    await server.start("127.0.0.1", 0)
    try:
        yield MTLS(directory, server)
    finally:
        await server.shutdown(grace=1)


def run(coro: Any) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(20):
            return await coro

    return asyncio.run(guarded())


def test_required_client_certificates(tmp_path: Path) -> None:
    async def main() -> None:
        async with mtls_server(tmp_path, TLSConfig(client_auth="required")) as m:
            with pytest.raises(ConnectError, match="may require a client certificate"):
                async with Client(m.address, ca=m.ca, timeout=5) as client:
                    await client.call("admin.health")
            with pytest.raises(ConnectError, match="may require a client certificate"):
                await asyncio.to_thread(_connect_sync, m.address, ca=m.ca)
            # A certificate from another CA is refused too.
            stranger = trustme.CA().issue_cert("mallory")
            stranger.cert_chain_pems[0].write_to_path(str(tmp_path / "m.pem"))
            stranger.private_key_pem.write_to_path(str(tmp_path / "m.key"))
            with pytest.raises(ConnectError, match="refused the client certificate"):
                async with Client(m.address, ca=m.ca, cert=tmp_path / "m.pem", key=tmp_path / "m.key") as client:
                    await client.call("admin.health")
            assert m.server.counters["calls"] == 0

            cert, key, serial = m.client_cert("alice")
            async with Client(m.address, ca=m.ca, cert=cert, key=key, timeout=5) as client:
                assert (await client.call("admin.health"))["status"] == "ok"
                assert m.identities() == [("alice", serial)]
                (session,) = m.server.sessions
                assert session.link is not None and session.link.tls_identity == "alice"

    run(main())


def test_optional_client_certificates(tmp_path: Path) -> None:
    async def main() -> None:
        async with mtls_server(tmp_path, TLSConfig(client_auth="optional")) as m:
            async with Client(m.address, ca=m.ca, timeout=5) as anonymous:
                await anonymous.call("admin.health")
                assert m.identities() == [None]
            cert, key, serial = m.client_cert("bob")
            async with Client(m.address, ca=m.ca, cert=cert, key=key, timeout=5) as bob:
                await bob.call("admin.health")
                assert m.identities() == [("bob", serial)]

    run(main())


def test_revoked_client_certificates_are_refused(tmp_path: Path) -> None:
    async def main() -> None:
        alice_cert, alice_key = tls.issue_client_cert(tmp_path, "alice")
        revoked_cert, revoked_key = tls.issue_client_cert(tmp_path, "eve")
        revoked = _cert(revoked_cert).serial_number
        crl_revoked, crl_revoked_key = tls.issue_client_cert(tmp_path, "trent")
        crl = tls.create_crl(tmp_path, [_cert(crl_revoked).serial_number], tmp_path / "revoked.crl")
        config = TLSConfig(client_auth="required", crl=str(crl))
        async with mtls_server(tmp_path, config, revoked_serials=[f"0x{revoked:x}"]) as m:
            # By serial (config): the TLS handshake succeeds, the bastion handshake is refused.
            with pytest.raises(Unauthenticated, match="revoked"):
                async with Client(m.address, ca=m.ca, cert=revoked_cert, key=revoked_key, timeout=5) as client:
                    await client.call("admin.health")
            # By CRL: the TLS handshake itself fails.
            with pytest.raises(ConnectError, match="refused the client certificate"):
                async with Client(m.address, ca=m.ca, cert=crl_revoked, key=crl_revoked_key, timeout=5) as client:
                    await client.call("admin.health")
            assert m.server.counters["calls"] == 0
            async with Client(m.address, ca=m.ca, cert=alice_cert, key=alice_key, timeout=5) as client:
                assert (await client.call("admin.health"))["status"] == "ok"

    run(main())


def test_a_client_certificate_users_disabling_and_role_changes_reach_open_connections(tmp_path: Path) -> None:
    """As for tokens (docs/security.md 3): mTLS connections are revalidated too."""
    ops = bastion.Service("ops")

    @ops.method(roles=["ops"])
    async def work() -> str:
        return "done"

    async def refused(client: Client) -> bool:
        try:
            await client.call("ops.work")
        except (bastion.PermissionDenied, Unauthenticated, bastion.ConnectError, bastion.Unavailable):
            return True
        return False

    async def main() -> None:
        async with open_store(tmp_path / "s.db") as store:
            audit = AuditLog(tmp_path / "audit.log")
            authenticator = StoreAuthenticator(store, LoginThrottle(store), audit, cache_seconds=0)
            await store.create_user(User("alice", frozenset({"ops"})))
            await store.create_user(User("bob", frozenset({"ops"})))
            kwargs: dict[str, Any] = {"authenticator": authenticator, "revalidate_interval": 0.1}
            async with mtls_server(tmp_path, TLSConfig(client_auth="required"), services=[ops], **kwargs) as m:
                for name, change in (("alice", {"roles": frozenset()}), ("bob", {"disabled": True})):
                    cert, key, _ = m.client_cert(name)
                    async with Client(m.address, ca=m.ca, cert=cert, key=key, timeout=5, retry=None) as client:
                        assert await client.call("ops.work") == "done"
                        user = await store.get_user(name)
                        assert user is not None
                        await store.update_user(msgspec.structs.replace(user, **change))
                        deadline = asyncio.get_running_loop().time() + 5
                        while not await refused(client):
                            assert asyncio.get_running_loop().time() < deadline, f"{name} still served after {change}"
                            await asyncio.sleep(0.05)
            audit.close()

    run(main())


def test_a_connection_ends_when_its_client_certificate_expires(tmp_path: Path) -> None:
    """TLS checks a certificate's dates once, in the handshake; the server ends the connection at its expiry."""

    async def main() -> None:
        async with open_store(tmp_path / "s.db") as store:
            audit = AuditLog(tmp_path / "audit.log")
            authenticator = StoreAuthenticator(store, LoginThrottle(store), audit)
            await store.create_user(User("carol"))  # a certificate must name a user (test_tls_subjects.py)
            kwargs: dict[str, Any] = {"authenticator": authenticator, "revalidate_interval": 0.1}
            async with mtls_server(tmp_path, TLSConfig(client_auth="required"), **kwargs) as m:
                ca_cert, ca_key = _cert(m.ca), tls_files.read_key(tmp_path / "tls" / "ca.key")
                usage = ExtendedKeyUsageOID.CLIENT_AUTH
                leaf, key = tls_devca.issue_certificate(ca_cert, ca_key, "carol", usage, days=4 / 86400)
                cert_path, key_path = tmp_path / "carol.pem", tmp_path / "carol.key"
                tls_files.write_cert(cert_path, leaf)
                tls_files.write_key(key_path, key)
                async with Client(m.address, ca=m.ca, cert=cert_path, key=key_path, timeout=5, retry=None) as client:
                    assert (await client.call("admin.health"))["status"] == "ok"
                    deadline = leaf.not_valid_after_utc.timestamp() + 5
                    while True:
                        try:
                            await client.call("admin.health")
                        except (Unauthenticated, ConnectError, bastion.Unavailable):
                            break
                        assert datetime.datetime.now().timestamp() < deadline, "served past the certificate's expiry"
                        await asyncio.sleep(0.1)
                    assert datetime.datetime.now().timestamp() >= leaf.not_valid_after_utc.timestamp()
            audit.close()

    run(main())


# -- what the clients make of peers that are not bastion servers ---------------------------------------


@contextlib.contextmanager
def _one_shot_server(handle: Callable[[socket.socket], None], connections: int = 2) -> Any:
    """A loopback listener that runs ``handle`` on each of ``connections`` connections, in a thread."""
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        for _ in range(connections):
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    handle(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        thread.join(10)
        listener.close()


def test_a_plaintext_client_recognises_a_tls_alert() -> None:
    def alert(conn: socket.socket) -> None:
        conn.recv(1024)
        conn.sendall(bytes.fromhex("15030300020246"))  # a TLS protocol_version alert

    with _one_shot_server(alert) as address:
        with pytest.raises(ConnectError, match="peer speaks TLS"):
            _connect_sync(address, insecure=True)
        with pytest.raises(ConnectError, match="peer speaks TLS"):
            _connect_async(address, insecure=True)


def test_a_tls_server_without_alpn_bastion_is_refused(tmp_path: Path) -> None:
    paths = tls.ensure_dev_tls(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no ALPN
    context.load_cert_chain(paths.cert, paths.key)

    def tls_only(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as wrapped:
            wrapped.recv(1024)

    with _one_shot_server(tls_only) as address:
        with pytest.raises(ConnectError, match="did not agree to ALPN bastion/1"):
            _connect_sync(address, ca=paths.ca)
        with pytest.raises(ConnectError, match="did not agree to ALPN bastion/1"):
            _connect_async(address, ca=paths.ca)


async def test_a_server_that_leaves_out_its_intermediate_certificate_is_named_as_a_possible_cause(
    tmp_path: Path,
) -> None:
    """A server under a CA the client trusts, sending its own certificate without the intermediate one, fails
    verification as an untrusted CA does ("unable to get local issuer certificate"): the hint names both causes,
    not only "give it that CA", which the client already has (review)."""
    root = trustme.CA()
    leaf = root.create_child_ca().issue_cert("127.0.0.1")
    cert, key, ca = tmp_path / "leaf.pem", tmp_path / "leaf.key", tmp_path / "root.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))  # the leaf alone: no intermediate
    leaf.private_key_pem.write_to_path(str(key))
    root.cert_pem.write_to_path(str(ca))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=context)
    port = listener.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ConnectError) as failed:
            await Client(f"127.0.0.1:{port}", ca=ca, timeout=5).connect()
        message = str(failed.value)
        assert "certificate verify failed" in message
        assert "does not send the intermediate certificate(s)" in message and "--ca or BASTION_CA" in message
    finally:
        listener.close()
        await listener.wait_closed()
