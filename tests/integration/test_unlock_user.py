"""``auth.unlock_user``: an admin lifts a login lockout at once, instead of the user waiting ``auth.lockout``.

Real server processes over TCP+TLS: one on SQLite (by itself, and with
``--workers 2``), and two replicas on one PostgreSQL store sharing Redis
(skipped, saying why, without BASTION_TEST_POSTGRES_DSN or
BASTION_TEST_REDIS_URL; a Redis key prefix of this test's own, deleted
afterwards). An admin's ``auth.set_password`` lifts the user's lockouts too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import bastion
from bastion import SyncClient
from tests.integration.test_login_replicas import DEAD_URL, MAX_FAILURES, URL, _replicas, needs_redis, redis
from tests.integration.test_login_replicas import prefix as prefix  # (the fixture: a Redis key prefix of its own)
from tests.support.server import ServerProcess

RIGHT = "the right password 42"
LOCKED = "too many failed attempts"
ENV = {"BASTION_AUTH__MAX_FAILURES_PER_USER_SOURCE": str(MAX_FAILURES), "BASTION_AUTH__LOCKOUT": "300"}


def _admin(server: ServerProcess) -> SyncClient:
    return SyncClient(server.address, token_file=str(server.token_file), timeout=10)


def _lock_out(client: SyncClient, user: str = "victim") -> None:
    """Lock ``user`` out from this client's address with wrong passwords; the right one is refused then."""
    for i in range(MAX_FAILURES):
        with pytest.raises(bastion.Unauthenticated):
            client.auth.login(username=user, password=f"wrong guess {i}")
    with pytest.raises(bastion.ResourceExhausted, match=LOCKED) as info:
        client.auth.login(username=user, password=RIGHT)
    assert (info.value.retry_after or 0) > 30  # (60 s on the replicas, 300 s here)


def _audit(server: ServerProcess, event: str) -> list[dict[str, Any]]:
    lines = (server.data_dir / "audit.log").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record.get("event") == event]


def test_an_admin_unlock_lets_a_locked_out_user_log_in_at_once(server_factory: Any) -> None:
    server = server_factory(env=ENV)
    with _admin(server) as root, SyncClient(server.address, timeout=10) as user:
        root.auth.create_user(name="victim", password=RIGHT)
        _lock_out(user)
        assert root.auth.unlock_user(name="victim") == {"name": "victim", "lifted": 1}
        assert user.auth.login(username="victim", password=RIGHT)["user"] == "victim"
        assert root.auth.unlock_user(name="victim") == {"name": "victim", "lifted": 0}  # nothing left to lift
    records = _audit(server, "admin.unlock_user")
    assert [(r["target"], r["lifted"], r["principal"]) for r in records] == [("victim", n, "admin") for n in (1, 0)]
    assert RIGHT not in (server.data_dir / "audit.log").read_text()


def test_an_unlock_forgets_the_failures_short_of_a_lockout_too(server_factory: Any) -> None:
    """Failures in a row that locked nothing yet are forgotten: the user gets the whole allowance again."""
    server = server_factory(env=ENV)
    with _admin(server) as root, SyncClient(server.address, timeout=10) as user:
        root.auth.create_user(name="victim", password=RIGHT)
        for _ in range(2):
            for i in range(MAX_FAILURES - 1):  # one short of a lockout, twice: none if the first were forgotten
                with pytest.raises(bastion.Unauthenticated):
                    user.auth.login(username="victim", password=f"wrong guess {i}")
            assert root.auth.unlock_user(name="victim")["lifted"] == 0
        assert user.auth.login(username="victim", password=RIGHT)["user"] == "victim"


def test_unlocking_is_for_admins_and_names_a_user(server_factory: Any) -> None:
    server = server_factory(env=ENV)
    with _admin(server) as root, SyncClient(server.address, timeout=10) as user:
        root.auth.create_user(name="victim", password=RIGHT)
        root.auth.create_user(name="ada", password=RIGHT, roles=["user"])
        _lock_out(user)
        with SyncClient(server.address, token=user_token(server, "ada"), timeout=10) as ada:
            with pytest.raises(bastion.PermissionDenied):
                ada.auth.unlock_user(name="victim")
            with pytest.raises(bastion.PermissionDenied):  # the same answer: a denial reveals no user
                ada.auth.unlock_user(name="nobody")
        with pytest.raises(bastion.ResourceExhausted, match=LOCKED):  # still locked
            user.auth.login(username="victim", password=RIGHT)
        with pytest.raises(bastion.NotFound):
            root.auth.unlock_user(name="nobody")
        with pytest.raises(bastion.InvalidArgument, match="argument name must not contain NUL"):
            root.auth.unlock_user(name="nul\x00")
    assert _audit(server, "admin.unlock_user") == []


def user_token(server: ServerProcess, name: str) -> str:
    """A fresh API token for ``name`` (made by the admin; no login, so no throttle involved)."""
    with _admin(server) as root:
        token: str = root.auth.create_token(user=name)["token"]
    return token


def test_an_admin_setting_the_password_lifts_the_lockout(server_factory: Any) -> None:
    """The guesses that locked the user out were against the old password: the new one works at once."""
    server = server_factory(env=ENV)
    with _admin(server) as root, SyncClient(server.address, timeout=10) as user:
        root.auth.create_user(name="victim", password="the old password 1")
        _lock_out(user)
        assert root.auth.set_password(name="victim", password=RIGHT)
        assert user.auth.login(username="victim", password=RIGHT)["user"] == "victim"
    assert [r["unlocked"] for r in _audit(server, "admin.set_password")] == [1]


def test_an_unlock_reaches_every_worker(server_factory: Any) -> None:
    """With ``--workers 2`` the lockout and the counts are shared: unlocked on one connection, the user logs in
    at once on new connections, whichever worker the kernel hands them to."""
    server = server_factory(env=ENV, args=("--workers", "2"))
    with _admin(server) as root, SyncClient(server.address, timeout=10) as user:
        root.auth.create_user(name="victim", password=RIGHT)
        _lock_out(user)
        with (  # (perhaps on the other worker) locked there too
            SyncClient(server.address, timeout=10) as other,
            pytest.raises(bastion.ResourceExhausted, match=LOCKED),
        ):
            other.auth.login(username="victim", password=RIGHT)
        assert root.auth.unlock_user(name="victim")["lifted"] == 1
    for _ in range(6):
        with SyncClient(server.address, timeout=10) as fresh:
            assert fresh.auth.login(username="victim", password=RIGHT)["user"] == "victim"


@needs_redis
def test_an_unlock_on_one_replica_lifts_the_lockout_on_the_other(
    server_factory: Any, tmp_path: Path, prefix: str
) -> None:
    """Two replicas on one PostgreSQL store sharing Redis: the lockout is both a row in the store and a key
    in Redis (which every replica answers as locked); unlocked on a, the user logs in on b at once, and no
    key of the user's is left in Redis."""
    a, b, _ = _replicas(server_factory, tmp_path, prefix)
    with SyncClient(a.address, timeout=10) as on_a, SyncClient(b.address, timeout=10) as on_b:
        _lock_out(on_b)
        with pytest.raises(bastion.ResourceExhausted, match=LOCKED):
            on_a.auth.login(username="victim", password=RIGHT)
        for i in range(MAX_FAILURES - 1):  # and failures short of a lockout from another user, left alone
            with pytest.raises(bastion.Unauthenticated):
                on_a.auth.login(username="bystander", password=f"wrong guess {i}")
        admin = a if a.token_file.exists() else b
        with _admin(admin) as root:
            assert root.auth.unlock_user(name="victim") == {"name": "victim", "lifted": 1}
        assert on_b.auth.login(username="victim", password=RIGHT)["user"] == "victim"
        assert on_a.auth.login(username="victim", password=RIGHT)["user"] == "victim"
    client = redis.Redis.from_url(URL)
    try:
        left = sorted(k.decode()[len(prefix) :] for k in client.scan_iter(match=prefix + "*"))
    finally:
        client.close()
    assert not [k for k in left if k.startswith(("{login}:l:victim|", "{login}:f:victim|"))], left
    assert [k for k in left if k.startswith("{login}:f:bystander|")], left


def test_with_redis_down_an_unlock_lifts_the_store_lockout_and_says_unavailable(server_factory: Any) -> None:
    """Redis failing (``auth.redis_fail_open``: this server's own limits meanwhile): the lockout in the store
    is lifted, so the user logs in; the admin is told UNAVAILABLE (Redis's keys could not be deleted) once
    the client's retries are spent, and the audit records say the unlock was incomplete."""
    server = server_factory(env={**ENV, "BASTION_RATE_LIMITS__REDIS_URL": DEAD_URL})
    with _admin(server) as root, SyncClient(server.address, timeout=10) as user:
        root.auth.create_user(name="victim", password=RIGHT)
        _lock_out(user)
        with pytest.raises(bastion.Unavailable, match="Redis failed"):
            root.auth.unlock_user(name="victim")
        assert user.auth.login(username="victim", password=RIGHT)["user"] == "victim"
    records = _audit(server, "admin.unlock_user")  # (one per try: the client retries an idempotent call UNAVAILABLE)
    assert records and all(r.get("incomplete") is True and "lifted" not in r for r in records), records


@needs_redis
def test_a_user_recreated_under_a_deleted_name_inherits_no_lockout_on_any_replica(
    server_factory: Any, tmp_path: Path, prefix: str
) -> None:
    """Deleting a user used to leave their lockouts and failure counts in Redis (and in the replicas' memory):
    a new user given the same name was refused from that source on every replica for up to auth.lockout."""
    a, b, _ = _replicas(server_factory, tmp_path, prefix)
    admin = a if a.token_file.exists() else b
    with SyncClient(a.address, timeout=10) as on_a, SyncClient(b.address, timeout=10) as on_b, _admin(admin) as root:
        _lock_out(on_b)
        with pytest.raises(bastion.ResourceExhausted, match=LOCKED):  # (Redis's lockout: on a too)
            on_a.auth.login(username="victim", password=RIGHT)
        root.auth.delete_user(name="victim")
        root.auth.create_user(name="victim", password=RIGHT)  # a new user, the same name
        assert on_b.auth.login(username="victim", password=RIGHT)["user"] == "victim"
        assert on_a.auth.login(username="victim", password=RIGHT)["user"] == "victim"
    client = redis.Redis.from_url(URL)
    try:
        left = [k.decode() for k in client.scan_iter(match=prefix + "{login}:[fl]:victim|*")]
    finally:
        client.close()
    assert not left, left
    assert [r["unlocked"] for r in _audit(admin, "admin.delete_user")] == [1]


def test_a_user_recreated_under_a_deleted_name_gets_the_whole_allowance_of_failures(server_factory: Any) -> None:
    """One server: the failures in a row the deleted user had from a source are not the new user's."""
    server = server_factory(env=ENV)
    with _admin(server) as root, SyncClient(server.address, timeout=10) as user:
        root.auth.create_user(name="victim", password=RIGHT)
        for i in range(MAX_FAILURES - 1):  # one short of a lockout
            with pytest.raises(bastion.Unauthenticated):
                user.auth.login(username="victim", password=f"wrong guess {i}")
        root.auth.delete_user(name="victim")
        root.auth.create_user(name="victim", password=RIGHT)
        for i in range(MAX_FAILURES - 1):  # the new user's typos: a lockout would have come with the first
            with pytest.raises(bastion.Unauthenticated):
                user.auth.login(username="victim", password=f"a typo {i}")
        assert user.auth.login(username="victim", password=RIGHT)["user"] == "victim"
