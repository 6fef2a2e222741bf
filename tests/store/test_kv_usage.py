"""kv usage and quotas on every backend: the usage the triggers keep always equals what the
namespace holds, whichever path changed it, and a put past a quota writes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bastion.exceptions import ResourceExhausted
from bastion.store import PostgresStore, SQLiteStore, Store
from bastion.store.kv import KVNamespace, KVQuota, KVUsage, KVWrite, write_bytes
from bastion.store.migrations import MIGRATIONS
from bastion.store.postgres import POSTGRES_MIGRATIONS
from tests.support.stores import store_location

NS = "~ada"
NOW = 1_000_000.0


def w(key: str, value: bytes = b"v", **kw: object) -> KVWrite:
    return KVWrite(key, value, **kw)  # type: ignore[arg-type]


async def held(store: Store, namespace: str) -> KVUsage:
    """The usage of ``namespace`` counted afresh from its keys (expired ones included, as the triggers count)."""
    entries = await store.kv_list(namespace, "", None, 100_000, 0.0)
    total = sum(write_bytes(KVWrite(e.key, e.value, e.content_type)) for e in entries)
    return KVUsage(len(entries), total)


async def test_usage_follows_every_kind_of_change(store: Store) -> None:
    assert await store.kv_usage(NS) == KVUsage(0, 0)
    await store.kv_put(NS, [w("a", b"x" * 10), w("ключ", b"y" * 3, content_type="text/plain")], NOW)
    assert await store.kv_usage(NS) == KVUsage(2, 1 + 10 + len("ключ".encode()) + 3 + 10) == await held(store, NS)
    await store.kv_put(NS, [w("a", b"z" * 100), w("ключ", b"", content_type="")], NOW)  # bigger, smaller, new type
    assert await store.kv_usage(NS) == await held(store, NS) == KVUsage(2, 1 + 100 + len("ключ".encode()))
    (v,) = await store.kv_put(NS, [w("cas", b"1", expected_version=0)], NOW)
    await store.kv_put(NS, [w("cas", b"22", expected_version=v)], NOW)
    assert await store.kv_delete(NS, "a", None, NOW)
    assert await store.kv_usage(NS) == await held(store, NS) == KVUsage(2, len("ключ".encode()) + 3 + 2)

    await store.kv_put(NS, [w("brief", b"b" * 50, expires_at=NOW + 1)], NOW)
    assert (await store.kv_usage(NS)).keys == 3  # expired keys count until the sweep removes them
    assert await store.kv_expire(NOW + 2, 100) == 1
    assert await store.kv_usage(NS) == await held(store, NS)

    await store.kv_put("~bob", [w("k", b"bob's")], NOW)
    assert await store.kv_reassign_owner("bob", "ada") == 1  # ~bob/k becomes ~ada/from-bob/k
    assert await store.kv_usage("~bob") == KVUsage(0, 0)
    assert await store.kv_usage(NS) == await held(store, NS)

    assert await store.kv_create_namespace(KVNamespace("team", created_at=NOW))
    await store.kv_put("team", [w(f"k{i}", b"t" * i) for i in range(5)], NOW)
    assert await store.kv_usage("team") == await held(store, "team") == KVUsage(5, 5 * 2 + 10)
    assert await store.kv_delete_namespace("team", NOW) == 5
    assert await store.kv_usage("team") == KVUsage(0, 0)


async def test_a_put_past_a_quota_writes_nothing(store: Store) -> None:
    quota = KVQuota(keys=3, bytes=100)
    await store.kv_put(NS, [w("a", b"x" * 40), w("b", b"x" * 40)], NOW, quota)  # 2 keys, 82 bytes
    before = await store.kv_revisions()
    with pytest.raises(ResourceExhausted, match=r"namespace '~ada' is full") as refused:
        await store.kv_put(NS, [w("c", b"x" * 30)], NOW, quota)  # 113 bytes
    assert refused.value.details == {"namespace": NS, "keys": 3, "bytes": 113, "quota_keys": 3, "quota_bytes": 100}
    with pytest.raises(ResourceExhausted):  # all or none: the first write alone would fit
        await store.kv_put(NS, [w("c"), w("d")], NOW, quota)
    with pytest.raises(ResourceExhausted):  # the compare-and-swap path checks too
        await store.kv_put(NS, [w("c", b"x" * 30, expected_version=0)], NOW, quota)
    assert await store.kv_get_many(NS, ["c", "d"], NOW) == [None, None]
    assert await store.kv_revisions() == before
    assert await store.kv_usage(NS) == KVUsage(2, 82)

    # At the limit exactly is within it; replacing a value with one no bigger always fits.
    await store.kv_put(NS, [w("c", b"x" * 17)], NOW, quota)
    assert await store.kv_usage(NS) == KVUsage(3, 100)
    await store.kv_put(NS, [w("a", b"y" * 40)], NOW, quota)
    with pytest.raises(ResourceExhausted):  # a fourth key, even an empty one
        await store.kv_put(NS, [w("e", b"")], NOW, quota)
    await store.kv_put("~bob", [w("e", b"x" * 500)], NOW, KVQuota(10, 1000))  # others go on
    assert await store.kv_delete(NS, "a", None, NOW)  # deleting frees room
    await store.kv_put(NS, [w("e", b"")], NOW, quota)
    assert await store.kv_usage(NS) == await held(store, NS) == KVUsage(3, 60)


async def test_concurrent_puts_near_a_quota_fill_it_exactly_and_spare_the_others(store: Store) -> None:
    """Calls gathered into one group commit: those that fit are written, the rest refused alone,
    and puts to other namespaces in the same group are untouched."""
    quota = KVQuota(keys=1000, bytes=10 * 12)  # room for ten of the 12-byte puts below
    mine = [store.kv_put(NS, [w(f"k{i:02}", b"x" * 9)], NOW, quota) for i in range(25)]
    others = [store.kv_put("~bob", [w(f"k{i:02}", b"x" * 9)], NOW, quota) for i in range(5)]
    results = await asyncio.gather(*mine, *others, return_exceptions=True)
    written = [r for r in results[:25] if isinstance(r, list)]
    refused = [r for r in results[:25] if isinstance(r, ResourceExhausted)]
    assert (len(written), len(refused)) == (10, 15), results
    assert all(isinstance(r, list) for r in results[25:]), results
    assert await store.kv_usage(NS) == await held(store, NS) == KVUsage(10, 120)
    assert await store.kv_usage("~bob") == KVUsage(5, 60)
    versions = sorted(v for r in results if isinstance(r, list) for v in r)
    assert versions == list(range(1, 16))  # the refused left no gap in the revisions


async def test_a_group_near_a_quota_counts_text_in_utf8_bytes(store: Store) -> None:
    """Two concurrent puts that fit the quota if their keys and content type were counted in characters
    (23) but not in UTF-8 bytes (31): the group must not be written unchecked; the second is refused."""
    quota = KVQuota(keys=10, bytes=30)
    first = store.kv_put(NS, [w("ключ", b"x" * 10, content_type="тип")], NOW, quota)  # 8 + 10 + 6 bytes
    second = store.kv_put(NS, [w("ü", b"y" * 5)], NOW, quota)  # 2 + 5 bytes
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert isinstance(results[0], list) and isinstance(results[1], ResourceExhausted), results
    assert await store.kv_usage(NS) == await held(store, NS) == KVUsage(1, 24)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_the_migration_counts_the_keys_already_stored(backend: str, tmp_path: Path) -> None:
    location = store_location(backend, tmp_path)
    if backend == "sqlite":
        older: Store = SQLiteStore(location, migrations=MIGRATIONS[:-1])
        newer: Store = SQLiteStore(location)
    else:
        older, newer = PostgresStore(location, migrations=POSTGRES_MIGRATIONS[:-1]), PostgresStore(location)
    async with older:
        await older.kv_put(NS, [w("a", b"x" * 10), w("ü", b"y", content_type="t")], NOW)
        await older.kv_put("~bob", [w("b")], NOW)
    async with newer:
        assert await newer.kv_usage(NS) == KVUsage(2, 1 + 10 + 2 + 1 + 1)
        assert await newer.kv_usage("~bob") == KVUsage(1, 2)
        assert await newer.kv_usage("~nobody") == KVUsage(0, 0)
