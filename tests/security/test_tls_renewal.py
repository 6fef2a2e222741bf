"""The development server certificate is renewed while the server runs (bastion/cli/cert.py, tls.py).

A server left up past its certificate's validity must not start failing
every client: ``bastion serve`` renews the dev certificate ``tls.dev_renew_before``
seconds before it expires and loads it into the live contexts (the native
port's and the gateway's), as SIGHUP does, without dropping connections.
The test shortens the lifetime (``tls.dev_cert_lifetime``) instead of waiting a year.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
from cryptography import x509

from bastion import SyncClient
from bastion.config import TLSConfig
from bastion.exceptions import UsageError
from bastion.security import tls
from tests.support.server import ServerProcess, wait_for


def _serial(host: str, port: int, ca: str, alpn: bool = True) -> int:
    """The serial of the certificate a new connection to ``host:port`` is shown."""
    context = tls.client_context(ca) if alpn else ssl.create_default_context(cafile=ca)
    with (
        socket.create_connection((host, port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname=host) as tls_sock,
    ):
        der = tls_sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.mark.parametrize("workers", ["1", "2"])
def test_dev_certificate_is_renewed_and_loaded_while_the_server_runs(
    server_factory: Callable[..., ServerProcess], workers: str
) -> None:
    server = server_factory(
        env={"BASTION_TLS__DEV_CERT_LIFETIME": "30", "BASTION_TLS__DEV_RENEW_BEFORE": "24"},
        args=("--http-port", "0", "--workers", workers),
    )
    assert server.ca_file is not None and server.gateway_url is not None
    ca = str(server.ca_file)
    gateway = urlsplit(server.gateway_url)
    assert gateway.hostname is not None and gateway.port is not None
    first = _serial(server.host, server.port, ca)
    assert _serial(gateway.hostname, gateway.port, ca, alpn=False) == first
    with SyncClient(server.address, token_file=str(server.token_file), ca=ca, timeout=5) as client:
        assert client.call("demo.echo", value=1) == 1
        link = client._link
        # Renewed within about 6 s (30 s lifetime, renewed 24 s before it ends): poll, with room to spare.
        wait_for(lambda: _serial(server.host, server.port, ca) != first, 30, interval=0.5, what="a renewed cert")
        assert "renewed the development TLS certificate" in server.log()
        assert client.call("demo.echo", value=2) == 2
        assert client._link is link  # the connection made before the renewal is still up
    wait_for(
        lambda: _serial(gateway.hostname or "", gateway.port or 0, ca, alpn=False) != first,
        10,
        interval=0.5,
        what="the gateway's renewed cert",
    )
    with SyncClient(server.address, ca=ca, timeout=5) as fresh:
        assert fresh.call("admin.health")["status"] == "ok"
    assert server.stop() == 0


@pytest.mark.parametrize(
    ("lifetime", "renew_before"), [(0, 0), (10, 10), (10, 20), (float("nan"), 1), (100, -1), (100, 0)]
)
def test_nonsense_renewal_settings_are_refused(lifetime: float, renew_before: float) -> None:
    with pytest.raises(UsageError, match=r"tls\.dev_"):
        TLSConfig(dev_cert_lifetime=lifetime, dev_renew_before=renew_before)
