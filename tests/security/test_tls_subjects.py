"""Whom a client certificate speaks as: only a user the store keeps, created before the certificate was issued.

Real TLS on loopback with the in-process ``Server`` and the store authenticator (bastion/security/authn.py):
a verified certificate whose subject names no user is refused in the handshake (UNAUTHENTICATED, audited)
unless ``tls.client_subjects = "any"``; a certificate issued (notBefore) before its user was created -- an
old certificate of a deleted user whose name was given again -- is refused too; and a user deleted, or
deleted and created again, while a certificate's connection is open ends it at revalidation. On each store
backend (PostgreSQL with BASTION_TEST_POSTGRES_DSN).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import bastion
from bastion import Client, Unauthenticated
from bastion.config import TLSConfig
from bastion.exceptions import UsageError
from bastion.security import tls, tls_files
from bastion.security.audit import AuditLog
from bastion.security.authn import StoreAuthenticator
from bastion.security.credentials import User
from bastion.security.throttle import LoginThrottle
from bastion.store import Store, open_store
from tests.security.test_tls import MTLS, mtls_server, run

whoami = bastion.Service("who")


@whoami.method()
async def me(ctx: bastion.Context) -> list[Any]:
    return [ctx.principal.name, sorted(ctx.principal.roles), ctx.principal.mechanism]


class World:
    def __init__(self, m: MTLS, store: Store, audit: Path) -> None:
        self.m, self.store, self.audit_path = m, store, audit

    def client(self, cert: Path, key: Path) -> Client:
        return Client(self.m.address, ca=self.m.ca, cert=cert, key=key, timeout=5, retry=None)

    def audit(self, event: str) -> list[dict[str, Any]]:
        lines = self.audit_path.read_text().splitlines() if self.audit_path.exists() else []
        return [record for record in map(json.loads, lines) if record.get("event") == event]


@contextlib.asynccontextmanager
async def _scene(tmp_path: Path, store_url: str, **authn: Any) -> AsyncIterator[World]:
    """An mTLS server (client certificates required) on ``store_url`` with the store authenticator."""
    async with open_store(store_url) as store:
        audit = AuditLog(tmp_path / "audit.log")
        authenticator = StoreAuthenticator(store, LoginThrottle(store), audit, cache_seconds=0, **authn)
        kwargs: dict[str, Any] = {"authenticator": authenticator, "revalidate_interval": 0.1, "audit": audit}
        try:
            async with mtls_server(tmp_path, TLSConfig(client_auth="required"), [whoami], **kwargs) as m:
                yield World(m, store, tmp_path / "audit.log")
        finally:
            audit.close()


async def _ended(client: Client) -> None:
    """Wait (deadline 5 s) until ``client``'s connection no longer serves ``who.me``."""
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        try:
            await client.call("who.me")
        except (Unauthenticated, bastion.ConnectError, bastion.Unavailable, bastion.PermissionDenied):
            return
        assert asyncio.get_running_loop().time() < deadline, "the connection is still served"
        await asyncio.sleep(0.05)


def test_a_certificate_naming_no_user_is_refused_with_a_coded_error_and_an_audit_record(
    tmp_path: Path, store_url: str
) -> None:
    async def main() -> None:
        async with _scene(tmp_path, store_url) as w:
            await w.store.create_user(User("alice", frozenset({"ops"}), None, time.time() - 60))
            ghost, ghost_key, ghost_serial = w.m.client_cert("ghost")
            with pytest.raises(Unauthenticated, match="'ghost' names no user") as refused:
                async with w.client(ghost, ghost_key) as client:
                    await client.call("who.me")
            assert refused.value.status is bastion.Status.UNAUTHENTICATED
            (record,) = w.audit("auth.failure")
            assert record["mechanism"] == "mtls" and record["subject"] == "ghost"
            assert record["serial"] == f"0x{ghost_serial:x}" and record["reason"] == "no such user"
            assert "BEGIN" not in w.audit_path.read_text()  # no certificate or key material
            # The server goes on serving everyone else: a certificate of a user speaks as that user.
            cert, key, _ = w.m.client_cert("alice")
            async with w.client(cert, key) as client:
                assert await client.call("who.me") == ["alice", ["ops"], "mtls"]

    run(main())


def test_client_subjects_any_admits_certificates_of_services_without_users(tmp_path: Path, store_url: str) -> None:
    async def main() -> None:
        async with _scene(tmp_path, store_url, client_subjects="any") as w:
            cert, key, _ = w.m.client_cert("sensor-7")
            async with w.client(cert, key) as client:
                assert await client.call("who.me") == ["sensor-7", [], "mtls"]
            assert w.audit("auth.failure") == []

    run(main())


@pytest.mark.parametrize("client_subjects", ["users", "any"])
def test_a_certificate_login_is_audited_once_per_handshake_as_a_token_login_is(
    tmp_path: Path, store_url: str, client_subjects: str
) -> None:
    async def main() -> None:
        async with _scene(tmp_path, store_url, client_subjects=client_subjects) as w:
            await w.store.create_user(User("alice", frozenset({"ops"}), None, time.time() - 60))
            cert, key, serial = w.m.client_cert("alice")
            peers = []
            for _ in range(2):
                async with w.client(cert, key) as client:
                    for _ in range(5):  # calls, and revalidations meanwhile, write nothing
                        assert await client.call("who.me") == ["alice", ["ops"], "mtls"]
                        await asyncio.sleep(0.05)
                    (session,) = w.m.server.sessions
                    assert session.link is not None
                    peers.append(session.link.peer)
            records = w.audit("auth.success")
            assert len(records) == 2, records
            for record, peer in zip(records, peers, strict=True):
                assert record["mechanism"] == "mtls" and record["principal"] == record["subject"] == "alice"
                assert record["serial"] == f"0x{serial:x}" and record["peer"] == peer
                assert set(record) == {"time", "event", "mechanism", "principal", "subject", "serial", "peer"}
            assert "BEGIN" not in w.audit_path.read_text()

    run(main())


def test_the_client_subjects_setting_is_checked() -> None:
    assert TLSConfig().client_subjects == "users"
    assert TLSConfig(client_subjects="any").client_subjects == "any"
    with pytest.raises(UsageError, match=r'tls\.client_subjects must be "users" or "any"'):
        TLSConfig(client_subjects="services")


def test_a_user_deleted_while_connected_by_certificate_loses_the_connection(tmp_path: Path, store_url: str) -> None:
    async def main() -> None:
        async with _scene(tmp_path, store_url) as w:
            await w.store.create_user(User("bob", frozenset({"ops"}), None, time.time() - 60))
            cert, key, _ = w.m.client_cert("bob")
            async with w.client(cert, key) as client:
                assert await client.call("who.me") == ["bob", ["ops"], "mtls"]
                assert await w.store.delete_user("bob")
                await _ended(client)
            with pytest.raises(Unauthenticated, match="names no user"):
                async with w.client(cert, key) as again:
                    await again.call("who.me")

    run(main())


def test_a_certificate_issued_before_its_user_was_created_does_not_speak_as_them(
    tmp_path: Path, store_url: str
) -> None:
    """Name reuse: carol's old certificate outlives carol; a new carol created later is not its subject."""

    async def main() -> None:
        async with _scene(tmp_path, store_url) as w:
            old, old_key, old_serial = w.m.client_cert("carol")
            issued = x509.load_pem_x509_certificate(old.read_bytes()).not_valid_before_utc.timestamp()
            await w.store.create_user(User("carol", frozenset({"ops"}), None, issued + 2))
            with pytest.raises(Unauthenticated, match="issued before user 'carol' was created"):
                async with w.client(old, old_key) as client:
                    await client.call("who.me")
            (record,) = w.audit("auth.failure")
            assert record["reason"] == "certificate predates the user" and record["serial"] == f"0x{old_serial:x}"

            # Deleted and created again while the old certificate's connection is open: the connection ends.
            await w.store.create_user(User("dave", frozenset({"ops"}), None, time.time() - 60))
            cert, key, _ = w.m.client_cert("dave")
            async with w.client(cert, key) as client:
                assert await client.call("who.me") == ["dave", ["ops"], "mtls"]
                assert await w.store.delete_user("dave")
                await w.store.create_user(User("dave", frozenset({"ops"}), None, time.time() + 2))
                await _ended(client)

    run(main())


def test_a_reused_name_is_refused_even_when_unknown_subjects_are_admitted(tmp_path: Path, store_url: str) -> None:
    async def main() -> None:
        async with _scene(tmp_path, store_url, client_subjects="any") as w:
            old, old_key, _ = w.m.client_cert("erin")
            issued = x509.load_pem_x509_certificate(old.read_bytes()).not_valid_before_utc.timestamp()
            await w.store.create_user(User("erin", frozenset({"ops"}), None, issued + 2))
            with pytest.raises(Unauthenticated, match="issued before user 'erin' was created"):
                async with w.client(old, old_key) as client:
                    await client.call("who.me")

    run(main())


def test_dev_client_certificates_are_issued_only_for_possible_user_names(tmp_path: Path) -> None:
    for name in ("", "a b", ".hidden", "x/y", "ada\n", "a" * 65):
        with pytest.raises(UsageError, match="bad client certificate name"):
            tls.issue_client_cert(tmp_path, name)
    tls.issue_client_cert(tmp_path, "svc.sensor-7@site")


def test_dev_client_certificates_start_when_issued(tmp_path: Path) -> None:
    """Not backdated (the server certificate is, by an hour): a user created, then a certificate issued for
    them at once, must be a certificate issued after the user."""
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    cert, _ = tls.issue_client_cert(tmp_path, "frank")
    assert x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_before_utc >= before


def _odd_cert(m: MTLS, stem: str, subject: x509.Name) -> tuple[Path, Path, int]:
    """A client certificate with any ``subject`` (odd ones too: cryptography checks a CN's length unless told
    not to), signed by the server's dev CA as ``issue_client_cert`` signs."""
    ca_path, ca_key_path = tls.ensure_dev_ca(m.directory)
    ca, ca_key = tls_files.read_cert(ca_path), tls_files.read_key(ca_key_path)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = m.directory / f"{stem}.pem", m.directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path, cert.serial_number


def _cn(value: str) -> x509.Name:
    with warnings.catch_warnings():  # "Attribute's length must be >= 1 and <= 64": the point here
        warnings.simplefilter("ignore", UserWarning)
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value, _validate=False)])


#: Subjects no user can have: (what the test calls it, the subject, the identity the server reads from it).
ODD_SUBJECTS = [
    ("empty CN", _cn(""), ""),
    ("no CN", x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme")]), "O=Acme"),
    ("control characters", _cn("ada\nbob\r\x1b[31m"), "ada\nbob\r\x1b[31m"),
    ("a wildcard", _cn(">"), ">"),
    ("a long CN", _cn("a" * 5000), "a" * 5000),
]


@pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")  # cryptography, reading those CNs
@pytest.mark.parametrize("client_subjects", ["users", "any"])
def test_a_certificate_whose_subject_is_no_possible_user_name_is_refused_and_audited(
    tmp_path: Path, store_url: str, client_subjects: str
) -> None:
    """An empty CN, no CN (the identity is then the whole subject), control characters, a wildcard, a CN of
    5000 characters: refused in the handshake, ``"any"`` or not, with a coded error and one audit record each,
    a JSON line with the subject escaped and cut short; the server goes on serving everyone else."""

    async def main() -> None:
        async with _scene(tmp_path, store_url, client_subjects=client_subjects) as w:
            serials = []
            for i, (what, subject, identity) in enumerate(ODD_SUBJECTS):
                cert, key, serial = _odd_cert(w.m, f"odd{i}", subject)
                serials.append(serial)
                with pytest.raises(Unauthenticated, match="is not a user name") as refused:
                    async with w.client(cert, key) as client:
                        await client.call("who.me")
                assert refused.value.status is bastion.Status.UNAUTHENTICATED, what
                assert repr(identity[:64]) in refused.value.message, what
                assert len(refused.value.message) < 400, what
            lines = w.audit_path.read_text().splitlines()
            assert len(lines) == len(ODD_SUBJECTS), "one line each: no line broken by a subject's newline"
            records = w.audit("auth.failure")
            assert [r["subject"] for r in records] == [identity[:256] for _, _, identity in ODD_SUBJECTS]
            assert [r["serial"] for r in records] == [f"0x{s:x}" for s in serials]
            assert {(r["mechanism"], r["reason"]) for r in records} == {("mtls", "subject is not a user name")}
            assert "\x1b" not in w.audit_path.read_text()
            # A revoked one is refused before: its tls.refused record cuts the subject short too.
            cert, key, serial = _odd_cert(w.m, "revoked", _cn("b" * 5000))
            w.m.server.revoked_serials = frozenset({serial})
            with pytest.raises(Unauthenticated, match="revoked"):
                async with w.client(cert, key) as client:
                    await client.call("who.me")
            (record,) = w.audit("tls.refused")
            assert record["subject"] == "b" * 256 and record["serial"] == f"0x{serial:x}"
            await w.store.create_user(User("sensor-7", frozenset(), None, time.time() - 60))
            cert, key, _ = w.m.client_cert("sensor-7")
            async with w.client(cert, key) as client:
                assert await client.call("who.me") == ["sensor-7", [], "mtls"]

    run(main())
