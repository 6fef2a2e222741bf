"""``tls.revoked_serials`` is re-read on SIGHUP and reaches open mutual-TLS connections (server.py, upkeep.py).

A real ``bastion serve`` with certificates from a trustme CA, client
certificates required; the test rewrites the configuration file, sends
SIGHUP, and watches an open connection of the revoked certificate end
(within the revalidation interval) while another certificate's stays up.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from bastion import BastionError, ConnectError, SyncClient
from tests.support.server import ServerProcess, wait_for


def _write_config(path: Path, ca: Path, revoked: list[int]) -> None:
    serials = ", ".join(f'"0x{serial:x}"' for serial in revoked)
    path.write_text(
        "[tls]\n"
        f'cert = "{path.parent / "server.pem"}"\n'
        f'key = "{path.parent / "server.key"}"\n'
        'client_auth = "required"\n'
        f'client_ca = "{ca}"\n'
        f"revoked_serials = [{serials}]\n"
        'client_subjects = "any"\n'  # alice and bob are certificates, not users (test_tls_subjects.py)
        "[auth]\nrevalidate_interval = 0.5\n"
    )


def _client_cert(ca: trustme.CA, directory: Path, name: str) -> tuple[Path, Path, int]:
    issued = ca.issue_cert(f"{name}.example", common_name=name)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key, x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


def _alive(client: SyncClient) -> bool:
    try:
        return bool(client.call("admin.health")["status"] == "ok")
    except BastionError:
        return False


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_rereads_revoked_serials_and_closes_open_connections(
    tmp_path: Path, server_factory: Callable[..., ServerProcess], workers: str
) -> None:
    ca = trustme.CA()
    files = tmp_path / "tls"
    files.mkdir()
    ca_file = files / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    leaf.cert_chain_pems[0].write_to_path(str(files / "server.pem"))
    leaf.private_key_pem.write_to_path(str(files / "server.key"))
    (files / "server.key").chmod(0o600)
    alice, alice_key, alice_serial = _client_cert(ca, files, "alice")
    bob, bob_key, _ = _client_cert(ca, files, "bob")
    config = files / "bastion.toml"
    _write_config(config, ca_file, [])
    server = server_factory(args=("--config", str(config), "--workers", workers))

    def connect(cert: Path, key: Path) -> SyncClient:
        return SyncClient(server.address, ca=str(ca_file), cert=str(cert), key=str(key), timeout=5)

    with connect(alice, alice_key) as a, connect(bob, bob_key) as b:
        assert _alive(a) and _alive(b)
        _write_config(config, ca_file, [alice_serial])
        server.signal(signal.SIGHUP)
        wait_for(lambda: not _alive(a), 10, interval=0.2, what="alice's open connection to end")
        assert _alive(b)  # bob's certificate is not revoked: untouched
    assert f"0x{alice_serial:x}" in (server.data_dir / "audit.log").read_text()  # the audit names the serial
    with pytest.raises(BastionError, match="revoked"), connect(alice, alice_key) as again:
        again.call("admin.health")

    # A serial taken off the list is let in again after the next SIGHUP.
    _write_config(config, ca_file, [])
    server.signal(signal.SIGHUP)

    def readmitted() -> bool:
        try:
            with connect(alice, alice_key) as fresh:
                return _alive(fresh)
        except (BastionError, ConnectError):
            return False

    wait_for(readmitted, 10, interval=0.2, what="alice to be let in again")

    # A list that cannot be parsed keeps the one in force and says so.
    config.write_text(config.read_text().replace("revoked_serials = []", 'revoked_serials = ["zz"]'))
    server.signal(signal.SIGHUP)
    wait_for(lambda: "cannot re-read tls.revoked_serials" in server.log(), 10, what="the error line")
    assert readmitted()
    assert server.stop() == 0
