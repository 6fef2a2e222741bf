"""Plain-language reasons for TLS failures, shared by the asyncio and blocking edges.

OpenSSL reports failures as reason codes (``WRONG_VERSION_NUMBER``,
``TLSV13_ALERT_CERTIFICATE_REQUIRED`` ...); ``describe_tls_error`` turns the
ones a user can act on into a sentence that says what went wrong and, where
it is clear, what to do.
"""

from __future__ import annotations

import re
import ssl

__all__ = ["HTTP_PEER", "describe_tls_error", "looks_like_http", "looks_like_tls"]

# X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH = frozenset({62, 64})
# X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT, SELF_SIGNED_CERT_IN_CHAIN: the chain is whole, and ends at a CA the
# client lacks
_UNTRUSTED_ISSUER = frozenset({18, 19})
# X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT, UNABLE_TO_GET_ISSUER_CERT_LOCALLY, UNABLE_TO_VERIFY_LEAF_SIGNATURE: that,
# or a server under a CA the client does trust (public, a company's) that sends its own certificate without the
# intermediate ones between (OpenSSL says "unable to get local issuer certificate" for both)
_MISSING_ISSUER = frozenset({2, 20, 21})
_GIVE_CA = "give it that CA (ca=, --ca or BASTION_CA; a development server's is <data-dir>/tls/ca.pem)"
_UNTRUSTED_HINT = f"; this client does not trust the CA that issued the server's certificate: {_GIVE_CA}"
_MISSING_HINT = (
    f"; this client does not trust the CA that issued the server's certificate ({_GIVE_CA}), or the server "
    "does not send the intermediate certificate(s) between its own and that CA (its certificate file should "
    "hold the whole chain)"
)

_REASONS: dict[str, str] = {
    "WRONG_VERSION_NUMBER": "server does not speak TLS (is it a plaintext --insecure server?)",
    "RECORD_LAYER_FAILURE": "server does not speak TLS (is it a plaintext --insecure server?)",
    "PACKET_LENGTH_TOO_LONG": "server does not speak TLS (is it a plaintext --insecure server?)",
    "UNKNOWN_PROTOCOL": "server does not speak TLS (is it a plaintext --insecure server?)",
    "HTTP_REQUEST": "peer is not a TLS endpoint",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate (give cert= and key=)",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the server refused the client certificate: it is revoked",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust the client certificate's CA",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server refused the client certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the server refused the client certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server refused the client certificate: it has expired",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the server refused the client certificate: unsupported certificate",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no TLS version in common with the peer (bastion needs TLS 1.2 or later)",
    "UNSUPPORTED_PROTOCOL": "no TLS version in common with the peer (bastion needs TLS 1.2 or later)",
    "NO_PROTOCOLS_AVAILABLE": "no TLS version in common with the peer (bastion needs TLS 1.2 or later)",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "no TLS cipher suite or version in common with the peer",
    "NO_SHARED_CIPHER": "no TLS cipher suite in common with the peer",
    "TLSV1_ALERT_INSUFFICIENT_SECURITY": "no TLS cipher suite in common with the peer",
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": "the peer does not speak bastion/1 (ALPN)",
    "DECRYPTION_FAILED_OR_BAD_RECORD_MAC": "a TLS record failed its integrity check (data altered in transit)",
    "BAD_RECORD_MAC": "a TLS record failed its integrity check (data altered in transit)",
    "SSLV3_ALERT_BAD_RECORD_MAC": "the peer saw a TLS record fail its integrity check (data altered in transit)",
    "TLSV1_ALERT_DECRYPT_ERROR": "the peer could not decrypt a TLS record (data altered in transit?)",
    "UNEXPECTED_EOF_WHILE_READING": "the peer closed the connection in the middle of TLS",
    # What a bastion server with trusted_proxies answers a client connecting directly from one of them.
    "TLSV1_ALERT_ACCESS_DENIED": (
        "the server refused the connection (TLS alert access_denied): a bastion server does this when it "
        "expects a PROXY protocol header from this address (it is in the server's trusted_proxies): "
        "connect through the load balancer, or remove the address from trusted_proxies"
    ),
}


def describe_tls_error(exc: BaseException) -> str:
    """One line saying why a TLS handshake or record failed."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or exc.reason or str(exc)
        if exc.verify_code in _NAME_MISMATCH:
            return f"hostname mismatch: {detail}"
        code = exc.verify_code
        hint = _UNTRUSTED_HINT if code in _UNTRUSTED_ISSUER else _MISSING_HINT if code in _MISSING_ISSUER else ""
        return f"certificate verify failed: {detail}{hint}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or _reason_in(str(exc))
        text = _REASONS.get(reason)
        if text is not None:
            return text
        if isinstance(exc, ssl.SSLEOFError):
            return "the peer closed the connection during TLS (does it speak TLS?)"
        return f"TLS error: {reason or exc}"
    return f"TLS error: {exc}"


def _reason_in(message: str) -> str:
    """The reason an ``SSLError`` without ``reason`` names in its message: an OpenSSL reason this Python's
    ssl module has no code for reads "[SSL] tlsv1 alert no application protocol (_ssl.c:1006)"."""
    found = re.match(r"\[\w+\] ([a-z0-9 ]+) \(", message)
    return found.group(1).upper().replace(" ", "_") if found else ""


def looks_like_tls(data: bytes) -> bool:
    """True when ``data`` starts like a TLS record (handshake or alert), as a TLS peer's first bytes do."""
    return len(data) >= 2 and data[0] in (0x15, 0x16) and data[1] == 0x03


#: Why a connection failed whose peer answered in HTTP (a bastion client pointed at an HTTP port).
HTTP_PEER = (
    "the server answered in HTTP: this is an HTTP port (the gateway's?), not a bastion server's; "
    "bastion clients connect to the port `bastion serve` listens on (7400 by default)"
)


def looks_like_http(data: bytes) -> bool:
    """True when ``data`` starts like an HTTP/1 response, as an HTTP server's answer to our Hello does."""
    return data[:5] == b"HTTP/"
