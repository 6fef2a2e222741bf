"""Idempotency keys in the store: claim, record, replay, release, expire -- on every backend."""

from __future__ import annotations

import asyncio

from bastion.store import Store
from bastion.store.idempotency import IdempotencyRecord


def claim(owner: str, *, now: float = 100.0, key: str = "k1", principal: str = "ada") -> IdempotencyRecord:
    return IdempotencyRecord(
        principal, key, "kv.put", b"d" * 32, "running", owner, None, None, None, now, now + 60, now + 5
    )


async def test_first_claim_wins_and_the_answer_is_replayed(store: Store) -> None:
    assert await store.idempotency_begin(claim("o1"), 100.0) is None  # type: ignore[attr-defined]
    found = await store.idempotency_begin(claim("o2"), 101.0)  # type: ignore[attr-defined]
    assert found is not None and found.owner == "o1" and found.state == "running"
    assert not await store.idempotency_finish("ada", "k1", "o2", 0, None, b"\x01")  # type: ignore[attr-defined]
    assert await store.idempotency_finish("ada", "k1", "o1", 0, None, b"\x2a")  # type: ignore[attr-defined]
    done = await store.idempotency_begin(claim("o3"), 102.0)  # type: ignore[attr-defined]
    assert done is not None and done.state == "done" and done.status == 0 and done.value == b"\x2a"
    assert done.method == "kv.put" and done.digest == b"d" * 32
    # Keys are per principal.
    assert await store.idempotency_begin(claim("o4", principal="bob"), 102.0) is None  # type: ignore[attr-defined]


async def test_concurrent_claims_let_exactly_one_run(store: Store) -> None:
    results = await asyncio.gather(*(store.idempotency_begin(claim(f"o{i}"), 100.0) for i in range(8)))  # type: ignore[attr-defined]
    assert sum(r is None for r in results) == 1
    owners = {r.owner for r in results if r is not None}
    assert len(owners) == 1


async def test_release_lets_a_retry_claim_and_expiry_forgets(store: Store) -> None:
    assert await store.idempotency_begin(claim("o1"), 100.0) is None  # type: ignore[attr-defined]
    assert not await store.idempotency_release("ada", "k1", "other")  # type: ignore[attr-defined]
    assert await store.idempotency_release("ada", "k1", "o1")  # type: ignore[attr-defined]
    assert await store.idempotency_get("ada", "k1") is None  # type: ignore[attr-defined]
    assert await store.idempotency_begin(claim("o2"), 100.0) is None  # type: ignore[attr-defined]
    assert await store.idempotency_finish("ada", "k1", "o2", 10, "conflict", None)  # type: ignore[attr-defined]
    # After the window (expires_at = 160) the row counts as absent and is replaced.
    assert await store.idempotency_begin(claim("o3", now=170.0), 170.0) is None  # type: ignore[attr-defined]
    row = await store.idempotency_get("ada", "k1")  # type: ignore[attr-defined]
    assert row is not None and row.owner == "o3" and row.state == "running"
    assert await store.idempotency_begin(claim("o5", key="k2"), 100.0) is None  # type: ignore[attr-defined]
    assert await store.idempotency_expire(200.0, 10) == 1  # type: ignore[attr-defined]  # k2 (expires 160)
    assert await store.idempotency_get("ada", "k2") is None  # type: ignore[attr-defined]
    assert await store.idempotency_reassign_owner("ada", "bob") == 1  # type: ignore[attr-defined]
    assert await store.idempotency_get("ada", "k1") is None  # type: ignore[attr-defined]


async def test_expired_keys_are_deleted_as_fast_as_calls_make_them(store: Store) -> None:
    """The server's sweep deletes at most one batch (1000) of expired keys at a time: while a batch
    comes back full, the next call sweeps again, instead of one batch a minute -- which, with more
    than 1000 keyed calls a minute, would let the table grow without bound."""
    from bastion.server.dispatch import IdempotencyKeys

    backlog = 2500
    await asyncio.gather(*(store.idempotency_begin(claim(f"o{i}", key=f"old{i}"), 100.0) for i in range(backlog)))  # type: ignore[attr-defined]
    clock = [200.0]  # every claim above expired at 160
    keys = IdempotencyKeys(store, window=60, clock=lambda: clock[0])  # type: ignore[arg-type]
    for i in range(3):  # three keyed calls within a second of each other
        assert isinstance(await keys.begin("ada", f"new{i}", "kv.put", b"args", None), str)
        clock[0] += 0.3
    assert await store.idempotency_expire(200.0, 10 * backlog) == 0  # type: ignore[attr-defined]
    assert all(await asyncio.gather(*(store.idempotency_get("ada", f"new{i}") for i in range(3))))  # type: ignore[attr-defined]
