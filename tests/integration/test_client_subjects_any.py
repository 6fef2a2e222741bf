"""``bastion serve`` with ``tls.client_subjects = "any"``: a certificate naming no user still writes its own
``~NAME`` and uploads its own files, though the store keeps users -- elsewhere the store refuses a kv write
or an upload for a name no user holds (tests/store/test_kv_owners.py, test_files_owners.py)."""

from __future__ import annotations

import hashlib

import pytest

from bastion import NotFound, SyncClient
from bastion.security import tls
from tests.conftest import StartServer


def test_a_certificate_naming_no_user_writes_its_own_namespace_when_any_subject_speaks(
    server_factory: StartServer,
) -> None:
    server = server_factory(env={"BASTION_TLS__CLIENT_AUTH": "optional", "BASTION_TLS__CLIENT_SUBJECTS": "any"})
    assert server.ca_file is not None
    cert, key = tls.issue_client_cert(server.data_dir, "sensor-7")
    with SyncClient(server.address, ca=str(server.ca_file), cert=str(cert), key=str(key), timeout=10) as sensor:
        assert sensor.call("kv.put", key="reading", value=b"21.5") > 0
        assert sensor.call("kv.get", key="reading")["value"] == b"21.5"
        assert sensor.call("kv.delete", key="reading") is True
        data = b"21.5\n"
        info = sensor.call(
            "files.begin_upload", name="log.txt", size=len(data), sha256=hashlib.sha256(data).hexdigest()
        )
        assert sensor.upload("files.upload", [data], upload_id=info["upload_id"])["file"]["owner"] == "sensor-7"
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as admin:
        assert admin.call("admin.health")["status"] == "ok"  # the store keeps users: the admin is one
        with pytest.raises(NotFound, match="no user 'ghost'"):  # the service refuses it, "any" or not
            admin.call("kv.put", key="k", value=b"", namespace="~ghost")
