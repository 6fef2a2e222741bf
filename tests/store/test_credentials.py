"""Every ``CredentialStore`` method, on every backend (see conftest.py).

These are the contract bastion.security relies on: a call that returned was
committed, duplicates are reported not raised (users) or raised as
AlreadyExists (tokens), lists come back in a stable order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from bastion.exceptions import AlreadyExists, NotFound, UsageError
from bastion.security.credentials import Token, User
from bastion.store import LATEST_SCHEMA_VERSION, PostgresStore, SQLiteStore, Store, open_store
from bastion.store.migrations import MIGRATIONS
from bastion.store.postgres import POSTGRES_MIGRATIONS
from tests.support.stores import store_location

MakeStore = Callable[..., Store]  # the make_store fixture (conftest.py)

ADA = User("ada", frozenset({"admin", "ops"}), "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA", 1700000000.5)


def token(id: str, user: str = "ada", **fields: object) -> Token:
    return Token(id=id, digest=f"digest-{id}", user=user, **fields)  # type: ignore[arg-type]


async def add_users(store: Store, *names: str) -> None:
    for name in names:
        assert await store.create_user(User(name))


# -- users --------------------------------------------------------------------------------------


async def test_a_new_store_is_empty_and_at_the_latest_schema(store: Store) -> None:
    assert store.schema_version == LATEST_SCHEMA_VERSION
    assert await store.list_users() == []
    assert await store.list_tokens() == []
    assert await store.get_lockout("anything") is None


async def test_a_created_user_reads_back_with_every_field(store: Store) -> None:
    assert await store.create_user(ADA) is True
    assert await store.get_user("ada") == ADA
    token_only = User("bot", created_at=1.0, disabled=True)
    assert await store.create_user(token_only)
    assert await store.get_user("bot") == token_only


async def test_creating_a_taken_name_returns_false_and_keeps_the_first(store: Store) -> None:
    assert await store.create_user(ADA)
    assert await store.create_user(User("ada", frozenset({"intruder"}))) is False
    assert await store.get_user("ada") == ADA


async def test_an_unknown_user_is_none(store: Store) -> None:
    assert await store.get_user("nobody") is None


async def test_update_replaces_the_whole_record(store: Store) -> None:
    assert await store.create_user(ADA)
    changed = User("ada", frozenset({"reader"}), None, 5.0, disabled=True)
    assert await store.update_user(changed) is True
    assert await store.get_user("ada") == changed


async def test_setting_a_password_hash_changes_that_alone(store: Store) -> None:
    assert await store.create_user(ADA)
    assert await store.update_user(User("ada", frozenset({"reader"}), ADA.password_hash, 5.0, disabled=True))
    assert await store.set_password_hash("ada", "$argon2id$new") is True
    assert await store.get_user("ada") == User("ada", frozenset({"reader"}), "$argon2id$new", 5.0, disabled=True)
    assert await store.set_password_hash("nobody", "$argon2id$new") is False
    assert await store.get_user("nobody") is None


async def test_setting_access_changes_roles_and_flag_alone(store: Store) -> None:
    assert await store.create_user(ADA)
    assert await store.set_access("ada", frozenset({"reader"}), True) is True
    assert await store.get_user("ada") == User("ada", frozenset({"reader"}), ADA.password_hash, ADA.created_at, True)
    assert await store.users_with_role("reader", 10) == ["ada"]
    assert await store.users_with_role("admin", 10) == []
    assert await store.set_access("nobody", frozenset(), False) is False


async def test_a_conditional_password_hash_change_needs_the_hash_it_replaces(store: Store) -> None:
    assert await store.create_user(ADA)
    assert await store.set_password_hash("ada", "$argon2id$rehashed", replacing="$argon2id$other") is False
    assert await store.get_user("ada") == ADA
    assert await store.set_password_hash("ada", "$argon2id$rehashed", replacing=ADA.password_hash) is True
    assert (await store.get_user("ada")) == User("ada", ADA.roles, "$argon2id$rehashed", ADA.created_at)


async def test_updating_an_unknown_user_returns_false_and_creates_nothing(store: Store) -> None:
    assert await store.update_user(ADA) is False
    assert await store.get_user("ada") is None


async def test_delete_user(store: Store) -> None:
    await add_users(store, "ada", "bob")
    assert await store.delete_user("ada") is True
    assert await store.get_user("ada") is None
    assert await store.delete_user("ada") is False
    assert [u.name for u in await store.list_users()] == ["bob"]


async def test_deleting_a_user_deletes_their_tokens_so_a_reused_name_starts_clean(store: Store) -> None:
    await add_users(store, "ada", "bob")
    await store.add_token(token("t1"))
    await store.add_token(token("t2", user="bob"))
    assert await store.delete_user("ada")
    assert await store.token_by_digest("digest-t1") is None
    assert await store.create_user(User("ada"))
    assert await store.list_tokens("ada") == []
    assert [t.id for t in await store.list_tokens()] == ["t2"]


async def test_deleting_a_user_deletes_their_throttle_rows_so_a_reused_name_starts_clean(store: Store) -> None:
    """The login throttle's rows for a user -- ``known:USER|SOURCE`` (sources escaping the per-user
    allowance) and ``login:USER|SOURCE`` (lockouts) -- stayed after the user was deleted, so a new user
    given the same name inherited the old one's known addresses (and lockouts)."""
    await add_users(store, "ada", "ada_b", "adab", "bob")
    rows = {
        "known:ada|10.0.0.1": 5000.0, "login:ada|10.0.0.2": 5000.0, "known:ada|2001:db8::/64": 5000.0,
        "known:ada_b|10.0.0.1": 5000.0, "login:adab|10.0.0.1": 5000.0, "known:bob|10.0.0.1": 5000.0,
        "login:bob|10.0.0.1": 5000.0, "other:ada|10.0.0.1": 5000.0,
    }  # fmt: skip
    for key, until in rows.items():
        await store.set_lockout(key, until)
    assert await store.delete_user("ada")
    for key in rows:
        gone = key.startswith(("known:ada|", "login:ada|"))
        assert (await store.get_lockout(key) is None) is gone, key
    assert not await store.delete_user("ada")  # an unknown user: nothing else goes either
    assert await store.get_lockout("known:bob|10.0.0.1") == 5000.0


async def test_users_are_listed_by_name(store: Store) -> None:
    await add_users(store, "carol", "ada", "bob")
    assert [u.name for u in await store.list_users()] == ["ada", "bob", "carol"]


async def test_names_and_roles_keep_unusual_characters(store: Store) -> None:
    odd = User("Zoë 'O\"Brien'; DROP TABLE users;--", frozenset({"ünïcode", "with space", ""}))
    assert await store.create_user(odd)
    assert await store.get_user(odd.name) == odd
    assert await store.list_users() == [odd]


async def test_a_roles_holders_are_found_by_name_up_to_a_limit(store: Store) -> None:
    # Mail to role:NAME read every user to find a role's holders; now the store finds them by role.
    for name, roles in (("dan", {"ops"}), ("ada", {"ops", "admin"}), ("cy", {"dev"}), ("bob", {"ops", "dev"})):
        assert await store.create_user(User(name, frozenset(roles)))
    assert await store.users_with_role("ops", 10) == ["ada", "bob", "dan"]
    assert await store.users_with_role("ops", 2) == ["ada", "bob"]
    assert await store.users_with_role("nobody", 10) == []
    assert await store.update_user(User("cy", frozenset({"ops"})))
    assert await store.update_user(User("bob", frozenset({"dev"})))
    assert await store.delete_user("dan")
    assert await store.users_with_role("ops", 10) == ["ada", "cy"]
    assert await store.users_with_role("dev", 10) == ["bob"]
    odd = User("zoë", frozenset({"with space", "ünïcode", ""}))
    assert await store.create_user(odd)
    assert [await store.users_with_role(r, 10) for r in sorted(odd.roles)] == [["zoë"]] * 3


async def test_a_roles_holders_are_found_in_a_store_upgraded_from_schema_15(backend: str, tmp_path: Path) -> None:
    location = store_location(backend, tmp_path, "upgraded")
    old: Store = (
        SQLiteStore(location, migrations=MIGRATIONS[:15])
        if backend == "sqlite"
        else PostgresStore(location, migrations=POSTGRES_MIGRATIONS[:15])
    )
    async with old as store:
        assert store.schema_version == 15
        await store.create_user(User("bob", frozenset({"ops", "dev"})))
        await store.create_user(User("ada", frozenset({"ops"})))
    async with open_store(location) as store:
        assert store.schema_version == LATEST_SCHEMA_VERSION
        assert await store.users_with_role("ops", 10) == ["ada", "bob"]
        assert await store.users_with_role("dev", 10) == ["bob"]


# -- tokens -------------------------------------------------------------------------------------


async def test_a_token_is_found_by_digest_and_by_id_with_every_field(store: Store) -> None:
    await add_users(store, "ada")
    full = Token("t1", "d1", "ada", "session", "laptop", 10.0, 20.0, None)
    await store.add_token(full)
    assert await store.token_by_digest("d1") == full
    assert await store.token_by_id("t1") == full
    assert await store.token_by_digest("t1") is None  # an id is not a digest
    assert await store.token_by_id("d1") is None
    assert await store.token_by_digest("unknown") is None
    assert await store.token_by_id("unknown") is None


async def test_tokens_are_listed_per_user_or_all_in_creation_order(store: Store) -> None:
    await add_users(store, "ada", "bob")
    await store.add_token(token("c", created_at=3.0))
    await store.add_token(token("a", user="bob", created_at=2.0))
    await store.add_token(token("b", created_at=1.0))
    await store.add_token(token("a2", created_at=3.0))  # same time: by id
    assert [t.id for t in await store.list_tokens("ada")] == ["b", "a2", "c"]
    assert [t.id for t in await store.list_tokens("bob")] == ["a"]
    assert [t.id for t in await store.list_tokens()] == ["b", "a", "a2", "c"]
    assert await store.list_tokens("nobody") == []


async def test_a_duplicate_token_id_or_digest_is_already_exists(store: Store) -> None:
    await add_users(store, "ada")
    await store.add_token(token("t1"))
    with pytest.raises(AlreadyExists):
        await store.add_token(Token("t1", "another-digest", "ada"))
    with pytest.raises(AlreadyExists):
        await store.add_token(Token("t2", "digest-t1", "ada"))
    assert [t.id for t in await store.list_tokens()] == ["t1"]


async def test_a_token_for_an_unknown_user_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.add_token(token("t1", user="ghost"))
    assert await store.list_tokens() == []


async def test_revoking_a_token_marks_it_once(store: Store) -> None:
    await add_users(store, "ada")
    await store.add_token(token("t1"))
    assert await store.revoke_token("t1", at=50.0) is True
    revoked = await store.token_by_id("t1")
    assert revoked is not None and revoked.revoked_at == 50.0 and not revoked.valid_at(60.0)
    assert await store.revoke_token("t1", at=99.0) is False  # already revoked: the first time stands
    again = await store.token_by_digest("digest-t1")
    assert again is not None and again.revoked_at == 50.0
    assert await store.revoke_token("unknown", at=1.0) is False


async def test_revoking_a_users_tokens_counts_only_live_ones(store: Store) -> None:
    await add_users(store, "ada", "bob")
    await store.add_token(token("live"))
    await store.add_token(token("live-until-later", expires_at=200.0))
    await store.add_token(token("expired", expires_at=50.0))
    await store.add_token(token("revoked", revoked_at=10.0))
    await store.add_token(token("bobs", user="bob"))
    assert await store.revoke_user_tokens("ada", at=100.0) == 2
    by_id = {t.id: t for t in await store.list_tokens()}
    assert by_id["live"].revoked_at == 100.0
    assert by_id["live-until-later"].revoked_at == 100.0
    assert by_id["expired"].revoked_at is None
    assert by_id["revoked"].revoked_at == 10.0
    assert by_id["bobs"].revoked_at is None
    assert not any(t.valid_at(100.0) for t in await store.list_tokens("ada"))
    assert await store.revoke_user_tokens("ada", at=101.0) == 0
    assert await store.revoke_user_tokens("nobody", at=101.0) == 0


# -- lockouts -----------------------------------------------------------------------------------


async def test_ended_sessions_of_one_user_are_purged_a_bounded_batch_at_a_time(store: Store) -> None:
    await add_users(store, "ada", "bob")
    for i in range(3):
        await store.add_token(token(f"rev{i}", kind="session", revoked_at=5.0))
    await store.add_token(token("old", kind="session", expires_at=10.0))
    await store.add_token(token("live", kind="session", expires_at=100.0))
    await store.add_token(token("api", kind="api", revoked_at=5.0, expires_at=10.0))
    await store.add_token(token("bobs", user="bob", kind="session", revoked_at=5.0))
    assert await store.purge_sessions("ada", 50.0, 2) == 2
    assert await store.purge_sessions("ada", 50.0, 100) == 2
    assert await store.purge_sessions("ada", 50.0, 100) == 0
    assert [t.id for t in await store.list_tokens("ada")] == ["api", "live"]
    assert [t.id for t in await store.list_tokens("bob")] == ["bobs"]


async def test_lockouts_are_set_read_and_overwritten(store: Store) -> None:
    assert await store.get_lockout("login:ada|10.0.0.1") is None
    await store.set_lockout("login:ada|10.0.0.1", 1000.5)
    assert await store.get_lockout("login:ada|10.0.0.1") == 1000.5
    await store.set_lockout("login:ada|10.0.0.1", 500.0)  # replaced, even by an earlier time
    assert await store.get_lockout("login:ada|10.0.0.1") == 500.0
    assert await store.get_lockout("login:ada|10.0.0.2") is None


async def test_expired_lockouts_are_deleted_a_bounded_batch_at_a_time(store: Store) -> None:
    for i in range(5):
        await store.set_lockout(f"old{i}", 100.0 + i)
    await store.set_lockout("live", 200.0)
    assert await store.expire_lockouts(50.0, 10) == 0  # none has ended yet
    assert await store.expire_lockouts(104.0, 3) == 3  # ended at or before 104: five, three at most
    assert await store.expire_lockouts(104.0, 3) == 2
    assert await store.expire_lockouts(104.0, 3) == 0
    assert [await store.get_lockout(f"old{i}") for i in range(5)] == [None] * 5
    assert await store.get_lockout("live") == 200.0


# -- durability and lifecycle -------------------------------------------------------------------


async def test_everything_written_is_there_after_close_and_reopen(make_store: MakeStore) -> None:
    async with make_store() as store:
        await add_users(store, "bob", "carol")
        assert await store.create_user(ADA)
        assert await store.update_user(User("bob", frozenset({"x"})))
        assert await store.delete_user("carol")
        await store.add_token(token("t1", created_at=1.0))
        await store.add_token(token("t2", created_at=2.0, expires_at=9.0))
        assert await store.revoke_token("t1", at=5.0)
        await store.set_lockout("k", 42.0)
        users, tokens = await store.list_users(), await store.list_tokens()
    async with make_store() as again:
        assert again.schema_version == LATEST_SCHEMA_VERSION
        assert await again.list_users() == users == [ADA, User("bob", frozenset({"x"}))]
        assert await again.list_tokens() == tokens
        assert await again.get_lockout("k") == 42.0


async def test_a_store_is_unusable_before_open_and_after_close(make_store: MakeStore) -> None:
    store = make_store()
    with pytest.raises(UsageError):
        await store.get_user("ada")
    async with store:
        assert await store.create_user(ADA)
    with pytest.raises(UsageError):
        await store.create_user(User("bob"))
    with pytest.raises(UsageError):
        await store.list_users()
    await store.close()  # idempotent
    async with store:  # and it can be opened again
        assert await store.get_user("ada") == ADA


async def test_closing_finishes_every_write_already_made(make_store: MakeStore) -> None:
    store = make_store()
    await store.open()
    writes = [asyncio.create_task(store.create_user(User(f"u{i:03}"))) for i in range(50)]
    await asyncio.sleep(0)  # every write is queued, none answered yet
    await store.close()
    assert all(await asyncio.gather(*writes))
    async with make_store() as again:
        assert len(await again.list_users()) == 50


# -- concurrency --------------------------------------------------------------------------------


async def test_concurrent_creates_of_the_same_names_let_exactly_one_win_each(store: Store) -> None:
    names = [f"user{i % 20}" for i in range(100)]
    results = await asyncio.gather(*(store.create_user(User(name)) for name in names))
    wins = [name for name, won in zip(names, results, strict=True) if won]
    assert sorted(wins) == sorted(set(names))
    assert len(await store.list_users()) == 20


async def test_one_failing_write_among_concurrent_ones_fails_alone(store: Store) -> None:
    await add_users(store, "ada")
    await store.add_token(token("taken"))
    attempts = [store.add_token(token(f"t{i}")) for i in range(20)]
    attempts.insert(10, store.add_token(token("taken")))
    results = await asyncio.gather(*attempts, return_exceptions=True)
    assert isinstance(results[10], AlreadyExists)
    assert [r for i, r in enumerate(results) if i != 10] == [None] * 20
    assert len(await store.list_tokens("ada")) == 21


async def test_reads_during_writes_see_only_whole_acknowledged_writes(store: Store) -> None:
    done: list[str] = []

    async def write() -> None:
        for i in range(100):
            name = f"u{i:03}"
            assert await store.create_user(User(name, frozenset({"r"})))
            done.append(name)

    async def read() -> int:
        reads = 0
        while len(done) < 100:
            acknowledged = list(done)
            seen = {u.name: u for u in await store.list_users()}
            assert set(acknowledged) <= set(seen)  # every acknowledged write is visible
            assert all(u.roles == {"r"} for u in seen.values())
            reads += 1
            await asyncio.sleep(0)
        return reads

    _, *reads = await asyncio.gather(write(), read(), read(), read())
    assert all(n > 0 for n in reads)


async def test_deleting_a_users_lockouts_takes_theirs_alone_and_answers_each_with_its_end(store: Store) -> None:
    """``delete_lockouts`` (an admin's ``auth.unlock_user``): the user's ``login:USER|SOURCE`` rows go, live or
    ended, each answered by its source and end; their known sources stay, and so does everyone else's row."""
    rows = {
        "login:ada|10.0.0.1": 5000.0, "login:ada|2001:db8::/64": 10.0, "known:ada|10.0.0.1": 5000.0,
        "login:ada_b|10.0.0.1": 5000.0, "login:adab|10.0.0.1": 5000.0, "login:bob|10.0.0.1": 5000.0,
    }  # fmt: skip
    for key, until in rows.items():
        await store.set_lockout(key, until)
    assert await store.delete_lockouts("ada") == {"10.0.0.1": 5000.0, "2001:db8::/64": 10.0}
    for key in rows:
        assert (await store.get_lockout(key) is None) is key.startswith("login:ada|"), key
    assert await store.delete_lockouts("ada") == {}
    assert await store.delete_lockouts("nobody") == {}
