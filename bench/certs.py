"""TLS material for the benchmarks: one throwaway CA and a server certificate, minted with trustme.

``make_certs(directory)`` writes ``ca.pem``, ``cert.pem`` and ``key.pem``
(an ECDSA chain for 127.0.0.1 and localhost) and returns the directory; the
server processes get the directory on their command line (``--tls DIR``),
never a key's contents. Every TLS point of a run uses the same files, so the
floor, grpc and bastion pay for the same key type and TLS 1.3 suite.
"""

from __future__ import annotations

import ssl
from pathlib import Path

HOSTS = ("127.0.0.1", "localhost")


def make_certs(directory: Path) -> Path:
    """Write a fresh CA and server certificate under ``directory``; return it."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert(*HOSTS)
    directory.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    for extra in leaf.cert_chain_pems[1:]:
        extra.write_to_path(str(directory / "cert.pem"), append=True)
    leaf.private_key_pem.write_to_path(str(directory / "key.pem"))
    (directory / "key.pem").chmod(0o600)
    return directory


def floor_server_context(directory: Path) -> ssl.SSLContext:
    """The raw floor's server context: TLS 1.3 only, the bench certificate, nothing else."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


def floor_client_context(directory: Path) -> ssl.SSLContext:
    """A verifying TLS 1.3 client context that trusts the bench CA."""
    context = ssl.create_default_context(cafile=str(directory / "ca.pem"))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def bastion_server_context(directory: Path) -> ssl.SSLContext:
    """bastion's own server context (TLS 1.3, ALPN bastion/1, hardened) for the bench certificate."""
    from bastion.config import TLSConfig
    from bastion.security.tls import server_context

    return server_context(TLSConfig(), directory / "cert.pem", directory / "key.pem")


def bastion_client_context(directory: Path) -> ssl.SSLContext:
    """bastion's own client context (verifying, ALPN bastion/1) trusting the bench CA."""
    from bastion.security.tls import client_context

    return client_context(ca=directory / "ca.pem", min_version="1.3")
