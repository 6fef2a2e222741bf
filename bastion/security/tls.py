"""TLS: the development CA, server and client contexts, client identities.

Theory of operation. With no certificate configured, ``bastion serve`` calls
``ensure_dev_tls``: on first start it creates a private development CA and a
server certificate signed by it under ``<data_dir>/tls/``; later starts
reuse them, issuing a new server certificate when the old one is within 30
days of expiry (``tls.dev_renew_before``; a running server checks too, see
bastion/cli/cert.py), no longer covers the configured host, or was signed by
a different CA. Keys are EC P-256 and are written with mode 0600, atomically
(a temporary file renamed into place), so a reload never sees half a file.

``server_context`` builds the one ``ssl.SSLContext`` a server uses: TLS 1.3
by default, TLS 1.2 only when configured and then with ECDHE + AEAD suites
only; no compression, no renegotiation; ALPN ``bastion/1``; client
certificates none, optional or required, checked against a CA bundle and,
when given, a CRL (leaf only). ``reload`` swaps the certificate and key of a
live context (SIGHUP): new handshakes use the new pair, connections already
established keep theirs.

Client certificates from the development CA (``issue_client_cert``) are not
backdated (the server's certificate is, by ``CLOCK_SKEW``): a certificate's
notBefore is when it was issued, and the server refuses one issued before
its subject's user was created (bastion/security/authn.py), so a user
created and then given a certificate at once must get one dated after the
user.

``client_context`` is the client side: verify the server against a CA file or
the system trust store, hostname checking on, TLS 1.2 or later, ALPN
``bastion/1``, and optionally a client certificate for mutual TLS.

This module creates and reads the files named above and nothing else: no
sockets, no logging of key material.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import ssl
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bastion.durable import replace_file
from bastion.exceptions import UsageError
from bastion.security.principal import USER_NAME, USER_NAME_RULE

if TYPE_CHECKING:
    from bastion.config import TLSConfig

__all__ = [
    "ALPN_PROTOCOL",
    "PeerCertificate",
    "TLSIdentity",
    "TLSPaths",
    "certificate_info",
    "client_certificate",
    "client_context",
    "client_identity",
    "create_crl",
    "ensure_dev_ca",
    "ensure_dev_tls",
    "http_server_context",
    "issue_client_cert",
    "parse_serial",
    "reload",
    "renew_dev_tls",
    "server_context",
]

ALPN_PROTOCOL = "bastion/1"
#: TLS 1.2 suites allowed when ``min_version = "1.2"``: forward secret (ECDHE) and AEAD only.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!PSK:!SRP:!DSS"
CA_DAYS = 3650
LEAF_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=30)
CLOCK_SKEW = datetime.timedelta(hours=1)
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})


class TLSPaths(NamedTuple):
    """Where a server's TLS files are."""

    cert: Path
    key: Path
    ca: Path


class TLSIdentity(NamedTuple):
    """Who a verified client certificate names: its subject (the CN, else the whole subject) and serial."""

    subject: str
    serial: int


class PeerCertificate(NamedTuple):
    """A verified client certificate: who it names, and its validity (Unix times)."""

    identity: TLSIdentity
    expires_at: float  # notAfter: the connection's end
    issued_at: float  # notBefore: its user must be no newer (no name reuse)


# -- files ------------------------------------------------------------------------------


def _tls_dir(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / "tls"


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temporary file created with ``mode`` and renamed over it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    replace_file(path, data, mode)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_atomic(path, pem, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise UsageError(f"cannot read certificate {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"{path} is not a PEM certificate: {exc}") from None


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise UsageError(f"cannot read private key {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UsageError(f"{path}: the development CA key must be an EC key")
    return key


# -- certificates -----------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _san_entries(hosts: Iterable[str]) -> list[x509.GeneralName]:
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
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    usage: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName] = (),
    days: float = LEAF_DAYS,
    backdate: datetime.timedelta = CLOCK_SKEW,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
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
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _leaf_is_good(
    leaf: x509.Certificate,
    ca: x509.Certificate,
    wanted: Sequence[x509.GeneralName],
    renew_before: datetime.timedelta = RENEW_BEFORE,
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


def ensure_dev_ca(data_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The development CA's (certificate, key) paths under ``<data_dir>/tls``, created if missing."""
    directory = _tls_dir(data_dir)
    ca_path, ca_key_path = directory / "ca.pem", directory / "ca.key"
    if ca_path.exists() and ca_key_path.exists():
        ca = _read_cert(ca_path)
        _read_key(ca_key_path)  # fail early on a bad key; tightens a loose mode
        if ca.not_valid_after_utc - _now() >= RENEW_BEFORE:
            return ca_path, ca_key_path
    elif ca_path.exists():
        raise UsageError(f"{ca_path} exists but its key {ca_key_path} does not: cannot issue certificates")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, key = _create_ca()
    _write_key(ca_key_path, key)
    _write_cert(ca_path, cert)
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
    directory = _tls_dir(data_dir)
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    ca_path, ca_key_path = ensure_dev_ca(data_dir)
    ca = _read_cert(ca_path)
    wanted = _san_entries(hosts)
    if cert_path.exists() and key_path.exists():
        with contextlib.suppress(UsageError):
            leaf, key = _read_cert(cert_path), _read_key(key_path)
            margin = datetime.timedelta(seconds=renew_before)
            if _leaf_is_good(leaf, ca, wanted, margin) and leaf.public_key() == key.public_key():
                return TLSPaths(cert_path, key_path, ca_path)
    return _issue_server(directory, ca, _read_key(ca_key_path), wanted, lifetime)


def _issue_server(
    directory: Path,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    sans: Sequence[x509.GeneralName],
    lifetime: float = LEAF_DAYS * 86400,
) -> TLSPaths:
    cert, key = _issue(ca, ca_key, "bastion server", ExtendedKeyUsageOID.SERVER_AUTH, sans, days=lifetime / 86400)
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    # Key first, then certificate: each replace is atomic, and a reload that
    # reads a new key with the old certificate fails its check and keeps the
    # pair already loaded.
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return TLSPaths(cert_path, key_path, directory / "ca.pem")


def renew_dev_tls(data_dir: str | os.PathLike[str], hosts: Iterable[str] = (), *, new_ca: bool = False) -> TLSPaths:
    """Issue a new dev server certificate now (and, with ``new_ca``, a new CA first).

    The new certificate keeps the names of the one it replaces and adds ``hosts``.
    """
    directory = _tls_dir(data_dir)
    sans = _san_entries(hosts)
    old = directory / "server.pem"
    if old.exists():
        with contextlib.suppress(UsageError, x509.ExtensionNotFound):
            have = _read_cert(old).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            sans += [name for name in have if name not in sans]
    if new_ca:
        for name in ("ca.pem", "ca.key"):
            with contextlib.suppress(OSError):
                (directory / name).unlink()
    ca_path, ca_key_path = ensure_dev_ca(data_dir)
    return _issue_server(directory, _read_cert(ca_path), _read_key(ca_key_path), sans)


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
    ca, ca_key = _read_cert(ca_path), _read_key(ca_key_path)
    cert, key = _issue(ca, ca_key, name, ExtendedKeyUsageOID.CLIENT_AUTH, days=days, backdate=datetime.timedelta(0))
    directory = Path(out_dir) if out_dir is not None else _tls_dir(data_dir) / "clients"
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def create_crl(data_dir: str | os.PathLike[str], serials: Iterable[int], path: str | os.PathLike[str]) -> Path:
    """Write a CRL signed by the dev CA revoking ``serials`` to ``path`` (valid 30 days)."""
    ca_path, ca_key_path = ensure_dev_ca(data_dir)
    ca, ca_key = _read_cert(ca_path), _read_key(ca_key_path)
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
    _write_atomic(out, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return out


def certificate_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``bastion cert show`` prints about one certificate file."""
    cert = _read_cert(Path(path))
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [str(n.value) for n in san]
    except x509.ExtensionNotFound:
        sans = []
    return {
        "path": str(path),
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sans": sans,
        "serial": f"0x{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256())),
    }


def parse_serial(text: str | int) -> int:
    """A certificate serial from config: an int, ``0x``-prefixed or colon-separated hex, hex with a-f, or decimal."""
    if isinstance(text, int):
        return text
    value = text.strip().lower()
    try:
        if value.startswith("0x"):
            return int(value[2:], 16)
        if ":" in value:
            return int(value.replace(":", ""), 16)
        if any(c in "abcdef" for c in value):
            return int(value, 16)
        return int(value, 10)
    except ValueError:
        raise UsageError(f"bad certificate serial {text!r}: use decimal or 0x-prefixed hex") from None


# -- contexts ---------------------------------------------------------------------------


def _harden(context: ssl.SSLContext, min_version: str) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    if min_version == "1.2":
        context.set_ciphers(TLS12_CIPHERS)  # TLS 1.3 suites are all AEAD and set separately
    context.options |= ssl.OP_NO_COMPRESSION
    no_renegotiation = getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    context.options |= no_renegotiation
    context.set_alpn_protocols([ALPN_PROTOCOL])


def _load_chain(context: ssl.SSLContext, cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> None:
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        # ssl names no file (filename None): say which of the two is missing.
        missing = next((path for path in (cert, key) if not os.path.exists(path)), exc.filename)
        raise UsageError(f"cannot read TLS certificate or key: {missing}: {exc.strerror}") from None
    except ssl.SSLError as exc:
        raise UsageError(f"cannot load TLS certificate {cert} with key {key}: {exc.reason or exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read TLS certificate or key: {exc}") from None


def _load_verify(context: ssl.SSLContext, path: str | os.PathLike[str], what: str) -> None:
    try:
        context.load_verify_locations(cafile=os.fspath(path))
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except ssl.SSLError as exc:
        raise UsageError(f"cannot load {what} {path}: {exc.reason or exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc}") from None


def server_context(
    config: TLSConfig,
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
    client_ca: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """The server's context for ``config`` with this certificate chain and key.

    ``client_ca`` is the bundle client certificates are checked against; it
    is required when ``config.client_auth`` is not "none".
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context, config.min_version)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
    _load_chain(context, cert, key)
    if config.client_auth == "none":
        context.verify_mode = ssl.CERT_NONE
        return context
    if client_ca is None:
        raise UsageError("tls.client_auth needs a CA for client certificates (tls.client_ca)")
    context.verify_mode = ssl.CERT_REQUIRED if config.client_auth == "required" else ssl.CERT_OPTIONAL
    _load_verify(context, client_ca, "client CA file")
    if config.crl is not None:
        _load_verify(context, config.crl, "CRL file")
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def http_server_context(
    cert: str | os.PathLike[str], key: str | os.PathLike[str], min_version: str = "1.3"
) -> ssl.SSLContext:
    """The HTTP gateway's context: hardened as the server's (``tls.min_version``, and with 1.2 only forward
    secret AEAD suites), with this certificate chain and key and ALPN ``http/1.1`` (browsers present no
    client certificate: none is asked for)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context, min_version)
    context.set_alpn_protocols(["http/1.1"])
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
    _load_chain(context, cert, key)
    return context


def client_context(
    ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    *,
    min_version: str = "1.2",
) -> ssl.SSLContext:
    """A client context: verify the server against ``ca`` (else the system store), by hostname, ALPN bastion/1.

    ``cert``/``key`` present a client certificate (mutual TLS).
    """
    if key is not None and cert is None:
        raise UsageError("a client key needs its certificate (cert=)")
    if ca is None:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # the system trust store
    else:
        # Only the given CA, as create_default_context(cafile=ca) would, with our error messages.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        _load_verify(context, ca, "CA file")
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    _harden(context, min_version)
    if cert is not None:
        _load_chain(context, cert, key if key is not None else cert)  # no key: the cert file holds both
    return context


def client_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> TLSIdentity | None:
    """The verified peer certificate's (subject, serial), or None when the peer sent none."""
    found = client_certificate(ssl_object)
    return None if found is None else found[0]


def client_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> PeerCertificate | None:
    """The verified peer certificate's (subject, serial), expiry and start, or None when it sent none."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    cert = x509.load_der_x509_certificate(der)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = str(names[0].value) if names else cert.subject.rfc4514_string()
    return PeerCertificate(
        TLSIdentity(subject, cert.serial_number),
        cert.not_valid_after_utc.timestamp(),
        cert.not_valid_before_utc.timestamp(),
    )


def reload(context: ssl.SSLContext, cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> int:
    """Load a new certificate chain and key into a live ``context``; returns the new serial.

    The pair is first checked in a scratch context, so a bad or mismatched
    pair raises ``UsageError`` and leaves ``context`` serving the old one.
    """
    _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key)
    _load_chain(context, cert, key)
    return _read_cert(Path(cert)).serial_number
