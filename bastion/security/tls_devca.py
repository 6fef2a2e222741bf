"""The development CA: the self-signed CA, server and client certificates and CRLs it signs, under ``<data_dir>/tls``.

Theory of operation. With no certificate configured, ``bastion serve`` calls
``ensure_dev_tls``: on first start it creates a private development CA and a
server certificate signed by it under ``<data_dir>/tls/``; later starts
reuse them, issuing a new server certificate when the old one is within 30
days of expiry (``tls.dev_renew_before``; a running server checks too, see
bastion/cli/cert.py), no longer covers the configured host, or was signed by
a different CA. A CA within 30 days of its own expiry is replaced by a new
one. With client certificates on and no ``tls.client_ca``, ``serve`` trusts
this CA for them (``ensure_dev_ca``). Keys are EC P-256, written mode 0600
and whole (bastion/security/tls_files.py).

``dev_ca_plan`` and ``dev_tls_plan`` say what ``ensure_dev_ca`` and
``ensure_dev_tls`` would do now, by the same tests, reading only: nothing
is written or chmod-ed (``bastion serve --check``).

Client certificates from the development CA (``issue_client_cert``) are not
backdated (the server's certificate is, by ``CLOCK_SKEW``): a certificate's
notBefore is when it was issued, and the server refuses one issued before
its subject's user was created (bastion/security/authn.py), so a user
created and then given a certificate at once must get one dated after the
user.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bastion.exceptions import UsageError
from bastion.security.principal import USER_NAME, USER_NAME_RULE
from bastion.security.tls_files import read_cert, read_key, write_cert, write_key, write_pem

__all__ = [
    "CA_DAYS",
    "CLOCK_SKEW",
    "DEFAULT_HOSTS",
    "LEAF_DAYS",
    "RENEW_BEFORE",
    "DevCAAction",
    "DevTLSAction",
    "DevTLSPlan",
    "TLSPaths",
    "create_crl",
    "dev_ca_plan",
    "dev_tls_plan",
    "ensure_dev_ca",
    "ensure_dev_tls",
    "issue_certificate",
    "issue_client_cert",
    "renew_dev_tls",
    "san_entries",
    "tls_dir",
]

CA_DAYS = 3650
LEAF_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=30)
CLOCK_SKEW = datetime.timedelta(hours=1)
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})

#: What ``ensure_dev_ca`` would do: make the CA, make a new one (the old expires within ``RENEW_BEFORE``; client
#: certificates it issued are then refused), or keep it.
DevCAAction = Literal["create", "renew", "keep"]
#: What ``ensure_dev_tls`` would do: make the CA and server certificate, a new CA and server certificate, a new
#: server certificate, or keep both.
DevTLSAction = Literal["create", "renew-ca", "issue", "keep"]


class TLSPaths(NamedTuple):
    """Where a server's TLS files are."""

    cert: Path
    key: Path
    ca: Path


class DevTLSPlan(NamedTuple):
    """What ``ensure_dev_tls`` would do (``dev_tls_plan``), and the files it would leave."""

    action: DevTLSAction
    paths: TLSPaths


def tls_dir(data_dir: str | os.PathLike[str]) -> Path:
    """Where the development CA and certificates of ``data_dir`` are: ``<data_dir>/tls``."""
    return Path(data_dir) / "tls"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def san_entries(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """The subject alternative names of a dev server certificate for ``hosts``: localhost, 127.0.0.1 and ::1 first,
    then each host once (an IP address or a lower-cased DNS name; wildcard listen addresses left out)."""
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in (*DEFAULT_HOSTS, *hosts):
        host = host.strip().strip("[]")
        if host in _WILDCARDS or host.lower() in seen:
            continue
        seen.add(host.lower())
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host.lower()))
    return names


def _create_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bastion"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"bastion development CA {os.urandom(4).hex()}"),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signing only: a leaf's key signs its handshakes; a CA's also certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    usage: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName] = (),
    days: float = LEAF_DAYS,
    backdate: datetime.timedelta = CLOCK_SKEW,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new leaf certificate (CN ``common_name``, extended key usage ``usage``) and its new key, signed by the CA:
    valid from ``backdate`` ago for ``days``; nothing written."""
    key = _new_key()
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _leaf_is_good(
    leaf: x509.Certificate, ca: x509.Certificate, wanted: Sequence[x509.GeneralName], renew_before: datetime.timedelta
) -> bool:
    if leaf.not_valid_after_utc - _now() < renew_before:
        return False
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    try:
        have = set(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return False
    return set(wanted) <= have


def _ca_action(directory: Path, *, fix_mode: bool) -> DevCAAction:
    ca_path, ca_key_path = directory / "ca.pem", directory / "ca.key"
    if ca_path.exists() and ca_key_path.exists():
        ca = read_cert(ca_path)
        read_key(ca_key_path, fix_mode=fix_mode)  # fail early on a bad key; tightens a loose mode if told to
        return "keep" if ca.not_valid_after_utc - _now() >= RENEW_BEFORE else "renew"
    if ca_path.exists():
        raise UsageError(f"{ca_path} exists but its key {ca_key_path} does not: cannot issue certificates")
    return "create"


def _server_cert_current(
    paths: TLSPaths, ca: x509.Certificate, wanted: Sequence[x509.GeneralName], renew_before: float, *, fix_mode: bool
) -> bool:
    """The server certificate and key in ``paths`` may stay: readable, a pair, signed by ``ca``, naming ``wanted``,
    and not expiring within ``renew_before`` seconds."""
    if not (paths.cert.exists() and paths.key.exists()):
        return False
    try:
        leaf, key = read_cert(paths.cert), read_key(paths.key, fix_mode=fix_mode)
    except UsageError:
        return False
    margin = datetime.timedelta(seconds=renew_before)
    return _leaf_is_good(leaf, ca, wanted, margin) and leaf.public_key() == key.public_key()


def dev_ca_plan(data_dir: str | os.PathLike[str]) -> DevCAAction:
    """What ``ensure_dev_ca(data_dir)`` would do now (``DevCAAction``), found by reading only: nothing is written
    or chmod-ed. Raises ``UsageError`` where it would: a CA certificate without its key, or either unreadable."""
    return _ca_action(tls_dir(data_dir), fix_mode=False)


def dev_tls_plan(
    data_dir: str | os.PathLike[str], hosts: Iterable[str] = (), *, renew_before: float = RENEW_BEFORE.total_seconds()
) -> DevTLSPlan:
    """What ``ensure_dev_tls(data_dir, hosts, renew_before=...)`` would do now, by its tests, reading only (nothing
    written or chmod-ed); raises ``UsageError`` where it would (``dev_ca_plan``)."""
    directory = tls_dir(data_dir)
    paths = TLSPaths(directory / "server.pem", directory / "server.key", directory / "ca.pem")
    ca_action = dev_ca_plan(data_dir)
    if ca_action != "keep":
        return DevTLSPlan("create" if ca_action == "create" else "renew-ca", paths)
    current = _server_cert_current(paths, read_cert(paths.ca), san_entries(hosts), renew_before, fix_mode=False)
    return DevTLSPlan("keep" if current else "issue", paths)


def ensure_dev_ca(data_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The development CA's (certificate, key) paths under ``<data_dir>/tls``, created if missing."""
    directory = tls_dir(data_dir)
    ca_path, ca_key_path = directory / "ca.pem", directory / "ca.key"
    if _ca_action(directory, fix_mode=True) == "keep":
        return ca_path, ca_key_path
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, key = _create_ca()
    write_key(ca_key_path, key)
    write_cert(ca_path, cert)
    return ca_path, ca_key_path


def ensure_dev_tls(
    data_dir: str | os.PathLike[str],
    hosts: Iterable[str] = (),
    *,
    lifetime: float = LEAF_DAYS * 86400,
    renew_before: float = RENEW_BEFORE.total_seconds(),
) -> TLSPaths:
    """The dev server certificate, key and CA under ``<data_dir>/tls``: created once, then reused.

    The server certificate covers localhost, 127.0.0.1, ::1 and ``hosts``; it
    is issued again (valid ``lifetime`` seconds) when it expires within
    ``renew_before`` seconds (30 days), does not cover ``hosts``, was not
    signed by the CA in the directory, or does not match its key (or either
    file is unreadable). A running server calls this periodically
    (bastion/cli/cert.py ``keep_dev_certificate``).
    """
    directory = tls_dir(data_dir)
    ca_path, ca_key_path = ensure_dev_ca(data_dir)
    paths = TLSPaths(directory / "server.pem", directory / "server.key", ca_path)
    ca = read_cert(ca_path)
    wanted = san_entries(hosts)
    if _server_cert_current(paths, ca, wanted, renew_before, fix_mode=True):
        return paths
    return _issue_server(directory, ca, read_key(ca_key_path), wanted, lifetime)


def _issue_server(
    directory: Path,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    sans: Sequence[x509.GeneralName],
    lifetime: float = LEAF_DAYS * 86400,
) -> TLSPaths:
    usage = ExtendedKeyUsageOID.SERVER_AUTH
    cert, key = issue_certificate(ca, ca_key, "bastion server", usage, sans, days=lifetime / 86400)
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    # Key first, then certificate: each replace is atomic, and a reload that
    # reads a new key with the old certificate fails its check and keeps the
    # pair already loaded.
    write_key(key_path, key)
    write_cert(cert_path, cert)
    return TLSPaths(cert_path, key_path, directory / "ca.pem")


def renew_dev_tls(data_dir: str | os.PathLike[str], hosts: Iterable[str] = (), *, new_ca: bool = False) -> TLSPaths:
    """Issue a new dev server certificate now (and, with ``new_ca``, a new CA first).

    The new certificate keeps the names of the one it replaces and adds ``hosts``.
    """
    directory = tls_dir(data_dir)
    sans = san_entries(hosts)
    old = directory / "server.pem"
    if old.exists():
        with contextlib.suppress(UsageError, x509.ExtensionNotFound):
            have = read_cert(old).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            sans += [name for name in have if name not in sans]
    if new_ca:
        for name in ("ca.pem", "ca.key"):
            with contextlib.suppress(OSError):
                (directory / name).unlink()
    ca_path, ca_key_path = ensure_dev_ca(data_dir)
    return _issue_server(directory, read_cert(ca_path), read_key(ca_key_path), sans)


def issue_client_cert(
    data_dir: str | os.PathLike[str], name: str, out_dir: str | os.PathLike[str] | None = None, days: int = LEAF_DAYS
) -> tuple[Path, Path]:
    """A client certificate with subject CN ``name`` signed by the dev CA; returns (cert, key) paths.

    The files are ``<out_dir>/<name>.pem`` and ``<name>.key`` (default
    ``out_dir``: ``<data_dir>/tls/clients``), the key mode 0600. Valid from now, not backdated: the
    server refuses a certificate issued before its user was created (a name given again).
    """
    if USER_NAME.fullmatch(name) is None:  # the server refuses any other subject
        raise UsageError(f"bad client certificate name {name!r}: not a user name ({USER_NAME_RULE})")
    ca_path, ca_key_path = ensure_dev_ca(data_dir)
    ca, ca_key = read_cert(ca_path), read_key(ca_key_path)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH
    cert, key = issue_certificate(ca, ca_key, name, usage, days=days, backdate=datetime.timedelta(0))
    directory = Path(out_dir) if out_dir is not None else tls_dir(data_dir) / "clients"
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    write_key(key_path, key)
    write_cert(cert_path, cert)
    return cert_path, key_path


def create_crl(data_dir: str | os.PathLike[str], serials: Iterable[int], path: str | os.PathLike[str]) -> Path:
    """Write a CRL signed by the dev CA revoking ``serials`` to ``path`` (valid 30 days)."""
    ca_path, ca_key_path = ensure_dev_ca(data_dir)
    ca, ca_key = read_cert(ca_path), read_key(ca_key_path)
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + datetime.timedelta(days=30))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - CLOCK_SKEW).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    out = Path(path)
    write_pem(out, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return out
