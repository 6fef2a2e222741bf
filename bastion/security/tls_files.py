"""TLS files: PEM certificates and keys read and written, certificates described, serials parsed.

The one place the TLS code touches certificate and key files (the contexts
load theirs through ``ssl``, bastion/security/tls.py). Keys are written
mode 0600 and certificates 0644, each whole (``replace_file``: a temporary
file renamed into place), so a reload never sees half a file. Reading a key
tightens a mode that lets others read it, unless told not to
(``fix_mode=False``: ``bastion serve --check`` writes nothing). Errors are
``UsageError`` naming the file; key material is never put in one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bastion.durable import replace_file
from bastion.exceptions import UsageError

__all__ = ["certificate_info", "parse_serial", "read_cert", "read_key", "write_cert", "write_key", "write_pem"]


def write_pem(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` whole, with ``mode`` from the start (its directory made 0700 if missing)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    replace_file(path, data, mode)


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write ``key`` to ``path``: unencrypted PKCS #8 PEM, mode 0600."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_pem(path, pem, 0o600)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    """Write ``cert`` to ``path``: PEM, mode 0644."""
    write_pem(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def read_cert(path: Path) -> x509.Certificate:
    """The (first) PEM certificate in ``path``; UsageError if it cannot be read or is none."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise UsageError(f"cannot read certificate {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"{path} is not a PEM certificate: {exc}") from None


def read_key(path: Path, *, fix_mode: bool = True) -> ec.EllipticCurvePrivateKey:
    """The unencrypted PEM EC private key in ``path``; UsageError if it cannot be read or is another kind.

    With ``fix_mode`` (the default) a file others may read is first made 0600; without, nothing is written.
    """
    try:
        if fix_mode and path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise UsageError(f"cannot read private key {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UsageError(f"{path}: the development CA key must be an EC key")
    return key


def certificate_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``bastion cert show`` prints about one certificate file."""
    cert = read_cert(Path(path))
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
