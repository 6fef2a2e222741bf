"""The audit log of a real ``bastion serve`` under rotation by renaming (logrotate's default, ``create``)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from bastion import SyncClient
from bastion.exceptions import Unauthenticated
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
    assert _failed_logins(rotated) == ["before"]
    assert audit.exists(), "the record after the rotation went to the renamed file"
    assert _failed_logins(audit) == ["after"]
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
