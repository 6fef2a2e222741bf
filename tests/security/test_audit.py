"""The audit log: rotation by renaming (logrotate's default, ``create``) under a real ``bastion serve``, and
the fields it never writes."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from bastion import SyncClient
from bastion.exceptions import Unauthenticated
from bastion.security.audit import AuditLog
from tests.support.server import ServerProcess


def _failed_logins(path: Path) -> list[str]:
    records = map(json.loads, path.read_text().splitlines())
    return [r["username"] for r in records if r["event"] == "auth.login_failure"]


def test_a_renamed_audit_log_is_reopened_at_the_next_record(server: ServerProcess) -> None:
    audit = server.data_dir / "audit.log"
    with SyncClient(server.address, timeout=10, retry=None) as anonymous:
        with pytest.raises(Unauthenticated):
            anonymous.auth.login(username="before", password="wrong")
        rotated = audit.with_name("audit.log.1")
        audit.rename(rotated)  # logrotate: rename, then the writer must make a new file
        with pytest.raises(Unauthenticated):
            anonymous.auth.login(username="after", password="wrong")
    # Names no user has: logged as keyed hashes (they may be passwords typed into the wrong field).
    (before,) = _failed_logins(rotated)
    assert audit.exists(), "the record after the rotation went to the renamed file"
    (after,) = _failed_logins(audit)
    assert before.startswith("<unknown ") and after.startswith("<unknown ") and before != after
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600


def test_fields_named_like_secrets_are_never_written(tmp_path: Path) -> None:
    """The second line of defence: a field whose name suggests a secret is dropped, not only the five exact
    names it once knew -- while ids of secrets (token_id) and the rest stay."""
    log = AuditLog(tmp_path / "audit.log")
    log(
        "test.event",
        token_id="tok_1",
        principal="ada",
        session_token="S1",
        access_token="S2",
        passphrase="S3",
        api_key="S4",
        db_password="S5",
        client_secret="S6",
        private_key="S7",
        credentials="S8",
        Password="S9",
    )
    log.close()
    text = (tmp_path / "audit.log").read_text()
    assert not any(f"S{i}" in text for i in range(1, 10)), text
    record = json.loads(text)
    assert record["token_id"] == "tok_1" and record["principal"] == "ada"
