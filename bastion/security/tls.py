"""TLS: the server's and clients' contexts, client identities, live reloads; the names of its two sibling modules.

Theory of operation. ``server_context`` builds the one ``ssl.SSLContext`` a
server uses: TLS 1.3 by default, TLS 1.2 only when configured and then with
ECDHE + AEAD suites only; no compression, no renegotiation; ALPN
``bastion/1``; client certificates none, optional or required, checked
against a CA bundle (``load_verify``) and, when given, a CRL (leaf only).
``reload`` swaps the certificate and key of a live context (SIGHUP): new
handshakes use the new pair, connections already established keep theirs.

``client_context`` is the client side: verify the server against a CA file or
the system trust store, hostname checking on, TLS 1.2 or later, ALPN
``bastion/1``, and optionally a client certificate for mutual TLS.

The development CA and the certificates it issues are in
bastion/security/tls_devca.py; reading and writing certificate and key files
in bastion/security/tls_files.py. Their public names are found here too, on
first use (``__getattr__``), so ``from bastion.security.tls import
ensure_dev_tls`` keeps working while a client, which needs only ``ssl``,
loads neither of them nor the ``cryptography`` package they (and
``client_certificate``) use.

These modules create and read the files named above and nothing else: no
sockets, no logging of key material.
"""

from __future__ import annotations

import importlib
import os
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from bastion.exceptions import UsageError

if TYPE_CHECKING:
    from bastion.config import TLSConfig
    from bastion.security.tls_devca import (
        TLSPaths,
        create_crl,
        ensure_dev_ca,
        ensure_dev_tls,
        issue_client_cert,
        renew_dev_tls,
    )
    from bastion.security.tls_files import certificate_info, parse_serial

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
    "load_verify",
    "parse_serial",
    "reload",
    "renew_dev_tls",
    "server_context",
]

#: The sibling modules' names, loaded on first use (they import ``cryptography``; a client needs neither).
_LAZY = {
    "TLSPaths": "bastion.security.tls_devca",
    "certificate_info": "bastion.security.tls_files",
    "create_crl": "bastion.security.tls_devca",
    "ensure_dev_ca": "bastion.security.tls_devca",
    "ensure_dev_tls": "bastion.security.tls_devca",
    "issue_client_cert": "bastion.security.tls_devca",
    "parse_serial": "bastion.security.tls_files",
    "renew_dev_tls": "bastion.security.tls_devca",
}


if not TYPE_CHECKING:  # for mypy the names are the imports above, so a misspelt one is still an error

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(globals()) | set(_LAZY))


ALPN_PROTOCOL = "bastion/1"
#: TLS 1.2 suites allowed when ``min_version = "1.2"``: forward secret (ECDHE) and AEAD only.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!PSK:!SRP:!DSS"


class TLSIdentity(NamedTuple):
    """Who a verified client certificate names: its subject (the CN, else the whole subject) and serial."""

    subject: str
    serial: int


class PeerCertificate(NamedTuple):
    """A verified client certificate: who it names, and its validity (Unix times)."""

    identity: TLSIdentity
    expires_at: float  # notAfter: the connection's end
    issued_at: float  # notBefore: its user must be no newer (no name reuse)


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


def load_verify(context: ssl.SSLContext, path: str | os.PathLike[str], what: str) -> None:
    """Trust the CA certificates (or, for a CRL, the revocations) in ``path`` in ``context``; a ``UsageError``
    naming the file as ``what`` ("client CA file", "CRL file") if it is missing or not PEM that ``ssl`` loads.
    ``bastion serve --check`` loads the client CA and CRL into a scratch context with it, as ``serve`` does."""
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
    load_verify(context, client_ca, "client CA file")
    if config.crl is not None:
        load_verify(context, config.crl, "CRL file")
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
        load_verify(context, ca, "CA file")
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
    # Here, not at the top: only a server reads a peer's certificate, and a client need not load cryptography.
    from cryptography import x509
    from cryptography.x509.oid import NameOID

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
    from bastion.security.tls_files import read_cert  # server only (cryptography): see client_certificate

    _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key)
    _load_chain(context, cert, key)
    return read_cert(Path(cert)).serial_number
