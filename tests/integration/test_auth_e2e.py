"""Authentication and authorization end to end: real server processes over real TLS.

Covers the security acceptance points: bad credentials of every kind are
refused before any handler runs, missing roles are denied, everything is in
the audit log, revocation reaches a live connection within seconds, password
guessing from one address is throttled while another user logs in from
another address, and no secret ever reaches a log.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import bastion
from bastion import SyncClient
from tests.support.server import ServerProcess, wait_for

#: Timing assertions, or effects on the whole PostgreSQL server: runs alone under
#: ``pytest -n`` (the "exclusive" marker, tests/conftest.py).
pytestmark = pytest.mark.exclusive

PASSWORD = "correct horse battery staple"
OTHER_PASSWORD = "another long passphrase"


def admin(server: ServerProcess) -> SyncClient:
    return SyncClient(server.address, token_file=str(server.token_file), timeout=10)


def audit_log(server: ServerProcess) -> str:
    return (server.data_dir / "audit.log").read_text()


def test_bad_credentials_never_reach_a_handler(server: ServerProcess) -> None:
    with admin(server) as root:
        root.auth.create_user(name="ada", roles=["user"])
        revoked = root.auth.create_token(user="ada", label="to revoke")
        expiring = root.auth.create_token(user="ada", label="short", ttl=0.5)
        root.auth.revoke_token(id=revoked["id"])

    with SyncClient(server.address, timeout=5) as anonymous, pytest.raises(bastion.Unauthenticated):
        anonymous.demo.watched(tag="anon", seconds=0)
    for token in ("not-a-token", "bst_" + "x" * 43, revoked["token"]):
        with pytest.raises(bastion.Unauthenticated), SyncClient(server.address, token=token, timeout=5) as client:
            client.demo.watched(tag="bad", seconds=0)

    def expired() -> bool:
        try:
            with SyncClient(server.address, token=expiring["token"], timeout=5) as client:
                client.auth.whoami()
        except bastion.Unauthenticated:
            return True
        return False

    wait_for(expired, timeout=10, interval=0.2, what="the short-lived token to expire")
    assert not list(server.marker_dir.glob("started-*")), "no handler may have run"

    log = audit_log(server)
    for reason in ("malformed token", "unknown token", "revoked token", "expired token"):
        assert reason in log
    assert '"status": "UNAUTHENTICATED"' in log  # the anonymous call, denied at dispatch


def test_a_missing_role_is_denied_and_audited(server: ServerProcess) -> None:
    with admin(server) as root:
        root.auth.create_user(name="bob", roles=["user"])
        token = root.auth.create_token(user="bob")["token"]
    with SyncClient(server.address, token=token, timeout=5) as bob:
        with pytest.raises(bastion.PermissionDenied):
            bob.demo.ops_only(tag="bob")
        with pytest.raises(bastion.PermissionDenied):
            bob.auth.list_users()
        assert bob.auth.whoami()["name"] == "bob"
    assert not (server.marker_dir / "ops-bob").exists()
    log = audit_log(server)
    assert '"method": "demo.ops_only"' in log and '"status": "PERMISSION_DENIED"' in log


def test_role_grant_and_revocation_reach_a_live_connection(server: ServerProcess) -> None:
    with admin(server) as root:
        root.auth.create_user(name="carol", roles=["user"])
        issued = root.auth.create_token(user="carol")
        with SyncClient(server.address, token=issued["token"], timeout=5) as carol:
            with pytest.raises(bastion.PermissionDenied):
                carol.demo.ops_only(tag="early")
            root.auth.set_roles(name="carol", roles=["user", "ops"])

            def granted() -> bool:
                try:
                    return carol.demo.ops_only(tag="late") == "late"
                except bastion.PermissionDenied:
                    return False

            wait_for(granted, timeout=5, interval=0.2, what="the new role to apply")
            revoked_at = time.monotonic()
            root.auth.revoke_token(id=issued["id"])

            def cut_off() -> bool:
                try:
                    carol.auth.whoami()
                except (bastion.Unauthenticated, bastion.ConnectionClosed, bastion.ConnectError):
                    return True
                return False

            wait_for(cut_off, timeout=5, interval=0.1, what="the revocation to close the connection")
            assert time.monotonic() - revoked_at < 5
    assert "auth.revoked_connection" in audit_log(server)


def test_password_guessing_is_throttled_while_others_log_in(server: ServerProcess) -> None:
    with admin(server) as root:
        root.auth.create_user(name="victim", password=PASSWORD)
        root.auth.create_user(name="ada", password=OTHER_PASSWORD)

    checked: list[float] = []  # attempts whose password was actually verified
    refused = 0
    errors: list[BaseException] = []
    stop = time.monotonic() + 10

    def attacker(n: int) -> None:
        try:
            attack(n)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    def attack(n: int) -> None:
        nonlocal refused
        with SyncClient(server.address, timeout=10, source_address="127.0.0.2") as client:
            i = 0
            while time.monotonic() < stop:
                i += 1
                name = "victim" if i % 2 else f"user{n}-{i}"
                try:
                    client.auth.login(username=name, password=f"guess-{n}-{i}")
                except bastion.Unauthenticated:
                    checked.append(time.monotonic())
                except bastion.ResourceExhausted as exc:
                    refused += 1
                    assert exc.retry_after is not None and exc.retry_after > 0

    threads = [threading.Thread(target=attacker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: refused > 0, timeout=8, what="the attack to be throttled")
        started = time.monotonic()
        with SyncClient(server.address, timeout=5, source_address="127.0.0.3") as bystander:
            token = bystander.auth.login(username="ada", password=OTHER_PASSWORD)["token"]
        assert time.monotonic() - started < 1.0
    finally:
        for thread in threads:
            thread.join()

    assert not errors, errors
    assert refused > 0, "the attacker must have been throttled"
    assert len(checked) <= 10 * 10 + 20, f"{len(checked)} guesses verified in 10 s"
    with SyncClient(server.address, token=token, timeout=5) as ada:
        assert ada.auth.whoami()["name"] == "ada"
    log = audit_log(server)
    assert "auth.login_failure" in log and "auth.lockout" in log


def test_no_secret_reaches_any_log(server: ServerProcess, tmp_path: Path) -> None:
    secrets = [server.token_file.read_text().strip(), PASSWORD]
    with admin(server) as root:
        root.auth.create_user(name="dora", password=PASSWORD, roles=["user"])
        created = root.auth.create_token(user="dora")
        secrets.append(created["token"])
        root.auth.set_password(name="dora", password=OTHER_PASSWORD)
        secrets.append(OTHER_PASSWORD)
    with SyncClient(server.address, timeout=5) as anonymous:
        session = anonymous.auth.login(username="dora", password=OTHER_PASSWORD)["token"]
        secrets.append(session)
        with pytest.raises(bastion.Unauthenticated):
            anonymous.auth.login(username="dora", password=PASSWORD)
    with pytest.raises(bastion.Unauthenticated), SyncClient(server.address, token=session + "x", timeout=5) as c:
        c.auth.whoami()
    with SyncClient(server.address, token=session, timeout=5) as dora:
        dora.auth.logout()
    assert server.stop() == 0
    logs = audit_log(server) + server.log()
    assert "auth.login" in logs
    for secret in secrets:
        assert secret not in logs
