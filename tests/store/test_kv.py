"""The kv domain of every backend: versions, compare-and-swap, lists, expiry, the change log, namespaces."""

from __future__ import annotations

import asyncio

import pytest

from bastion.exceptions import Aborted, NotFound
from bastion.store import SQLiteStore, Store
from bastion.store.kv import DELETE, PUT, KVNamespace, KVWrite, ValuesTooLarge, personal_namespace, prefix_end
from tests.store.conftest import MakeStore

NS = "~ada"
NOW = 1_000_000.0


def w(key: str, value: bytes = b"v", **kw: object) -> KVWrite:
    return KVWrite(key, value, **kw)  # type: ignore[arg-type]


def test_prefix_end() -> None:
    assert prefix_end("ab") == "ac"
    assert prefix_end("a\U0010ffff") == "b"
    assert prefix_end("\U0010ffff") is None
    assert prefix_end("a\ud7ff") == "a\ue000"
    assert personal_namespace("ada") == "~ada"


async def test_versions_are_store_wide_revisions(store: Store) -> None:
    assert (await store.kv_revisions()).current == 0
    assert await store.kv_put(NS, [w("a", b"1")], NOW) == [1]
    assert await store.kv_put("~bob", [w("a", b"x")], NOW) == [2]
    assert await store.kv_put(NS, [w("a", b"2"), w("b", b"3", content_type="text/plain")], NOW) == [3, 4]
    a, b, c = await store.kv_get_many(NS, ["a", "b", "c"], NOW)
    assert a is not None and (a.value, a.version) == (b"2", 3)
    assert b is not None and (b.value, b.version, b.content_type) == (b"3", 4, "text/plain")
    assert c is None
    assert (await store.kv_revisions()).current == 4


async def test_compare_and_swap(store: Store) -> None:
    (v1,) = await store.kv_put(NS, [w("k", expected_version=0)], NOW)
    with pytest.raises(Aborted) as info:
        await store.kv_put(NS, [w("k", expected_version=0)], NOW)
    assert info.value.details == {"key": "k", "expected_version": 0, "version": v1}
    (v2,) = await store.kv_put(NS, [w("k", b"new", expected_version=v1)], NOW)
    with pytest.raises(Aborted):
        await store.kv_put(NS, [w("k", expected_version=v1)], NOW)
    with pytest.raises(Aborted):
        await store.kv_delete(NS, "k", v1, NOW)
    assert await store.kv_delete(NS, "k", v2, NOW) > v2
    assert await store.kv_delete(NS, "k", None, NOW) == 0  # already gone
    with pytest.raises(Aborted):
        await store.kv_put(NS, [w("k", expected_version=v2)], NOW)


async def test_a_batch_is_all_or_nothing(store: Store) -> None:
    await store.kv_put(NS, [w("taken")], NOW)
    before = await store.kv_revisions()
    with pytest.raises(Aborted):
        await store.kv_put(NS, [w("fresh"), w("taken", expected_version=0)], NOW)
    assert await store.kv_get_many(NS, ["fresh"], NOW) == [None]
    assert await store.kv_revisions() == before
    assert await store.kv_changes(0, None, 100) == await store.kv_changes(0, before.current, 100)


async def test_concurrent_compare_and_swap_lets_exactly_one_win(store: Store) -> None:
    results = await asyncio.gather(
        *(store.kv_put(NS, [w("lock", str(i).encode(), expected_version=0)], NOW) for i in range(20)),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, Aborted) for r in results if isinstance(r, BaseException))


async def test_list_pages_by_key_within_a_prefix(store: Store) -> None:
    keys = ["a", "app/1", "app/2", "app/3", "apq", "b", "é", "日本"]
    await store.kv_put(NS, [w(k) for k in keys], NOW)
    await store.kv_put("~other", [w("app/9")], NOW)
    page = await store.kv_list(NS, "app/", None, 2, NOW)
    assert [e.key for e in page] == ["app/1", "app/2"]
    assert [e.key for e in await store.kv_list(NS, "app/", "app/2", 2, NOW)] == ["app/3"]
    assert [e.key for e in await store.kv_list(NS, "", None, 100, NOW)] == keys  # byte order on both backends
    assert [e.key for e in await store.kv_list(NS, "", "apq", 100, NOW)] == ["b", "é", "日本"]
    assert [e.key for e in await store.kv_list(NS, "app", "a", 100, NOW)] == ["app/1", "app/2", "app/3"]


async def test_a_list_reads_values_up_to_max_bytes_then_says_more_follow(store: Store) -> None:
    await store.kv_put(NS, [w(f"k{i}", bytes([i]) * 10) for i in range(6)], NOW)
    page = await store.kv_list(NS, "", None, 100, NOW, max_bytes=25)
    # 10 + 10 bytes are within 25: the third value is read (taking it past), the fourth only says more follow.
    assert [(e.key, len(e.value)) for e in page] == [("k0", 10), ("k1", 10), ("k2", 10), ("k3", 0)]
    assert page[3].version == (await store.kv_get_many(NS, ["k3"], NOW))[0].version  # type: ignore[union-attr]
    assert [len(e.value) for e in await store.kv_list(NS, "", None, 100, NOW, max_bytes=0)] == [10, 0]
    assert [len(e.value) for e in await store.kv_list(NS, "", "k3", 100, NOW, max_bytes=1000)] == [10, 10]
    keys = await store.kv_list(NS, "", None, 100, NOW, max_bytes=0, keys_only=True)
    assert [(e.key, e.value) for e in keys] == [(f"k{i}", b"") for i in range(6)]


async def test_get_many_measures_the_values_before_reading_any(store: Store) -> None:
    await store.kv_put(NS, [w(f"k{i}", bytes([i]) * 10) for i in range(3)], NOW)
    with pytest.raises(ValuesTooLarge) as info:
        await store.kv_get_many(NS, ["k0", "k1", "k2", "none"], NOW, max_bytes=29)
    assert info.value.total == 30
    got = await store.kv_get_many(NS, ["k2", "none", "k0", "k2"], NOW, max_bytes=30)
    assert [None if e is None else e.value for e in got] == [b"\x02" * 10, None, b"\x00" * 10, b"\x02" * 10]
    assert await store.kv_get_many(NS, ["none"], NOW, max_bytes=0) == [None]


async def test_expired_keys_are_invisible_then_swept_and_logged(store: Store) -> None:
    await store.kv_put(NS, [w("short", expires_at=NOW + 10), w("long", expires_at=NOW + 100), w("forever")], NOW)
    later = NOW + 10
    assert await store.kv_get_many(NS, ["short", "long"], later) == [None, await _one(store, "long", later)]
    assert [e.key for e in await store.kv_list(NS, "", None, 10, later)] == ["forever", "long"]
    (v,) = await store.kv_put(NS, [w("cas", expires_at=NOW + 1)], NOW)
    with pytest.raises(Aborted):  # an expired key counts as absent
        await store.kv_put(NS, [w("cas", expected_version=v)], later)
    before = (await store.kv_revisions()).current
    assert await store.kv_expire(later, 100) == 2  # "short" and "cas"
    assert await store.kv_expire(later, 100) == 0
    changes = await store.kv_changes(before, None, 100)
    assert sorted((c.op, c.key) for c in changes) == [(DELETE, "cas"), (DELETE, "short")]


async def _one(store: Store, key: str, now: float) -> object:
    return (await store.kv_get_many(NS, [key], now))[0]


async def test_a_put_over_an_expired_key_logs_its_expiry_first(store: Store) -> None:
    await store.kv_put(NS, [w("k", b"old", expires_at=NOW + 1)], NOW)
    (v,) = await store.kv_put(NS, [w("k", b"new", expected_version=0)], NOW + 2)
    changes = await store.kv_changes(1, None, 10)
    assert [(c.op, c.key, c.revision) for c in changes] == [(DELETE, "k", v - 1), (PUT, "k", v)]


async def test_a_plain_put_over_an_expired_key_logs_its_expiry_first(store: Store) -> None:
    # Without expected_version the put skips reading the key: this checks its expired-key path.
    await store.kv_put(NS, [w("k", b"old", expires_at=NOW + 1), w("live", expires_at=NOW + 100)], NOW)
    versions = await store.kv_put(NS, [w("a"), w("k", b"new"), w("live", b"2")], NOW + 2)
    assert versions == [3, 5, 6]
    changes = await store.kv_changes(2, None, 10)
    assert [(c.op, c.key, c.revision, c.value) for c in changes] == [
        (PUT, "a", 3, b"v"), (DELETE, "k", 4, None), (PUT, "k", 5, b"new"), (PUT, "live", 6, b"2"),
    ]  # fmt: skip
    (k,) = await store.kv_get_many(NS, ["k"], NOW + 2)
    assert k is not None and (k.value, k.version, k.expires_at) == (b"new", 5, None)
    assert (await store.kv_revisions()).current == 6


async def test_concurrent_plain_puts_each_get_their_own_dense_versions(store: Store) -> None:
    # On SQLite concurrent puts without compare-and-swap are written together (one batch).
    calls = [store.kv_put(NS if i % 2 else "~bob", [w(f"k{i % 3}", str(i).encode())], NOW) for i in range(9)]
    calls.append(store.kv_put(NS, [w("x"), w("y", expires_at=NOW + 60)], NOW))
    results = await asyncio.gather(*calls)
    assert sorted(v for r in results for v in r) == list(range(1, 12))
    assert len(results[-1]) == 2 and results[-1][1] == results[-1][0] + 1  # put_many: consecutive
    if isinstance(store, SQLiteStore):  # one group, in call order
        assert results == [[1], [2], [3], [4], [5], [6], [7], [8], [9], [10, 11]]
    changes = await store.kv_changes(0, None, 100)
    assert [c.revision for c in changes] == list(range(1, 12))
    last: dict[tuple[str, str], tuple[int, bytes]] = {}  # (namespace, key): (version, value) of its last put
    for i, (version,) in enumerate(results[:9]):
        where = (NS if i % 2 else "~bob", f"k{i % 3}")
        last[where] = max(last.get(where, (0, b"")), (version, str(i).encode()))
    for (ns, key), expected in last.items():
        (entry,) = await store.kv_get_many(ns, [key], NOW)
        assert entry is not None and (entry.version, entry.value) == expected
    (y,) = await store.kv_get_many(NS, ["y"], NOW)
    assert y is not None and y.expires_at == NOW + 60


@pytest.mark.parametrize("content_type", ["", "text/plain"])
@pytest.mark.parametrize("namespaces", [[NS], [NS, "~bob"]])
async def test_a_large_batch_of_plain_puts_is_written_in_order_across_its_statements(
    store: Store, content_type: str, namespaces: list[str]
) -> None:
    # 150 puts in one group: SQLite writes them in multi-row statements of up to 64 rows (64, 64, 16, 4,
    # 2), with '' and NULL in the statement when no put has a content type or an expiry, and the
    # namespace bound once when all share it. Keys repeat within a statement and across them: the
    # later put wins, each is logged, and the usage counts each key once.
    n = 150
    ns = [namespaces[i % len(namespaces)] for i in range(n)]  # k{j} is always in the same namespace
    calls = [store.kv_put(ns[i], [w(f"k{i % 70}", b"v%d" % i, content_type=content_type)], NOW) for i in range(n)]
    results = await asyncio.gather(*calls)
    assert sorted(v for (v,) in results) == list(range(1, n + 1))
    if isinstance(store, SQLiteStore):
        assert results == [[i] for i in range(1, n + 1)]
    changes = await store.kv_changes(0, None, 1000)
    by_version = {version: i for i, (version,) in enumerate(results)}
    assert [(c.namespace, c.key, c.op, c.value, c.content_type) for c in changes] == [
        (ns[i], f"k{i % 70}", PUT, b"v%d" % i, content_type) for i in (by_version[c.revision] for c in changes)
    ]
    held = dict.fromkeys(namespaces, 0)
    for k in range(70):
        last = max(i for i in range(n) if i % 70 == k)
        (entry,) = await store.kv_get_many(ns[last], [f"k{k}"], NOW)
        assert entry is not None
        expected = (b"v%d" % last, results[last][0], content_type, None)
        assert (entry.value, entry.version, entry.content_type, entry.expires_at) == expected
        held[ns[last]] += len(f"k{k}") + len(entry.value) + len(content_type)
    for namespace in namespaces:
        usage = await store.kv_usage(namespace)
        assert (usage.keys, usage.bytes) == (70 // len(namespaces), held[namespace])


async def test_concurrent_plain_puts_over_an_expired_key_log_its_expiry_first(store: Store) -> None:
    await store.kv_put(NS, [w("k", b"old", expires_at=NOW + 1)], NOW)
    later = NOW + 2
    results = await asyncio.gather(*(store.kv_put(NS, [w(key, b"new")], later) for key in ("a", "k", "b")))
    versions = [v for r in results for v in r]
    changes = await store.kv_changes(1, None, 10)
    assert [c.revision for c in changes] == list(range(2, 6))
    (k_version,) = results[1]
    assert [(c.op, c.key) for c in changes if c.key == "k"] == [(DELETE, "k"), (PUT, "k")]
    assert next(c.revision for c in changes if c.op == DELETE) == k_version - 1
    assert sorted([*versions, k_version - 1]) == list(range(2, 6))
    (k,) = await store.kv_get_many(NS, ["k"], later)
    assert k is not None and (k.value, k.version, k.expires_at) == (b"new", k_version, None)


async def test_a_key_that_expires_between_two_concurrent_plain_puts_is_logged_expired(store: Store) -> None:
    # Both puts may share one batch on SQLite: the second still finds the first's key expired.
    first, second = await asyncio.gather(
        store.kv_put(NS, [w("k", b"1", expires_at=NOW + 1)], NOW), store.kv_put(NS, [w("k", b"2")], NOW + 2)
    )
    changes = await store.kv_changes(0, None, 10)
    if first[0] < second[0]:  # SQLite always; PostgreSQL may run them either way round
        assert [(c.op, c.revision) for c in changes] == [(PUT, 1), (DELETE, 2), (PUT, 3)]
        assert second == [3]
    (k,) = await store.kv_get_many(NS, ["k"], NOW + 2)
    if first[0] < second[0]:
        assert k is not None and k.version == second[0]
    else:  # PostgreSQL ran the second first: the first's value, expiring at NOW + 1, is the last one
        assert k is None


async def test_failed_writes_among_concurrent_ones_leave_no_gap_in_revisions(store: Store) -> None:
    # Concurrent writes share a transaction on SQLite (group commit); the ones that fail must
    # give their revisions back, or watchers would see a gap.
    await store.kv_put(NS, [w("taken")], NOW)
    attempts = [
        store.kv_put(NS, [w(f"k{i}")] if i % 3 else [w(f"k{i}"), w("taken", expected_version=0)], NOW)
        for i in range(12)
    ]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    assert sum(isinstance(r, Aborted) for r in results) == 4
    versions = sorted(v for r in results if isinstance(r, list) for v in r)
    assert versions == list(range(2, 10))
    assert [c.revision for c in await store.kv_changes(0, None, 100)] == list(range(1, 10))
    assert (await store.kv_revisions()).current == 9


async def test_a_compaction_in_the_same_group_as_puts_counts_their_revisions(store: Store) -> None:
    # On SQLite the revision counter reaches kv_meta only just before the group commits; a
    # compaction sharing the group must still see every put ahead of it.
    await store.kv_put(NS, [w("first")], NOW)
    puts = [store.kv_put(NS, [w(f"k{i}")], NOW) for i in range(5)]
    removed = (await asyncio.gather(*puts, store.kv_compact(keep=1)))[-1]
    if isinstance(store, SQLiteStore):  # one group, run in call order; PostgreSQL may run it anywhere
        assert removed == 5
    revisions = await store.kv_revisions()
    assert (revisions.current, revisions.compacted) == (6, removed)
    assert [c.revision for c in await store.kv_changes(0, None, 100)] == list(range(removed + 1, 7))


async def test_many_groups_with_failed_swaps_keep_revisions_dense(store: Store) -> None:
    # Failing writes in many consecutive groups (some groups run again, isolated): every
    # acknowledged version is in the log, in order, with no gap and no duplicate.
    await store.kv_put(NS, [w("taken")], NOW)
    versions: list[int] = []
    for round_ in range(20):
        attempts = [
            store.kv_put(
                NS, [w(f"r{round_}k{i}"), w("taken", expected_version=0)] if i == 2 else [w(f"r{round_}k{i}")], NOW
            )
            for i in range(4)
        ]
        results = await asyncio.gather(*attempts, return_exceptions=True)
        assert isinstance(results[2], Aborted)
        versions += [v for r in results if isinstance(r, list) for v in r]
    assert sorted(versions) == list(range(2, 62))
    assert [c.revision for c in await store.kv_changes(0, None, 100)] == list(range(1, 62))
    assert (await store.kv_revisions()).current == 61


async def test_the_change_log_filters_compacts_and_says_so(store: Store) -> None:
    for i in range(10):
        await store.kv_put(NS if i % 2 else "~bob", [w(f"p/{i}", str(i).encode())], NOW + i)
    await store.kv_delete(NS, "p/9", None, NOW)
    log = await store.kv_changes(0, None, 100)
    assert [c.revision for c in log] == list(range(1, 12))
    assert log[-1].op == DELETE and log[-1].value is None and log[0].value == b"0"
    mine = await store.kv_changes(2, 9, 100, NS, "p/")
    assert [(c.revision, c.key) for c in mine] == [(4, "p/3"), (6, "p/5"), (8, "p/7")]
    assert await store.kv_compact(keep=4) == 7
    assert await store.kv_compact(keep=4) == 0
    assert await store.kv_revisions() == (await store.kv_revisions()).__class__(11, 7)
    assert [c.revision for c in await store.kv_changes(0, None, 100)] == [8, 9, 10, 11]


async def test_namespaces(store: Store) -> None:
    ns = KVNamespace("team", ["role:dev"], ["user:ada"], NOW, "admin")
    assert await store.kv_create_namespace(ns)
    assert not await store.kv_create_namespace(ns)
    assert await store.kv_get_namespace("team") == ns
    updated = await store.kv_update_namespace("team", ["role:ops", "role:dev"], [])
    assert updated is not None and updated.readers == ["role:dev", "role:ops"] and updated.writers == []
    assert await store.kv_update_namespace("nope", [], []) is None
    await store.kv_put("team", [w("a"), w("b")], NOW)
    assert [n.name for n in await store.kv_list_namespaces()] == ["team"]
    before = (await store.kv_revisions()).current
    assert await store.kv_delete_namespace("team", NOW) == 2
    assert await store.kv_delete_namespace("team", NOW) is None
    assert await store.kv_get_many("team", ["a", "b"], NOW) == [None, None]
    assert [c.op for c in await store.kv_changes(before, None, 10)] == [DELETE, DELETE]


async def test_a_put_into_a_shared_namespace_that_is_gone_writes_nothing(store: Store) -> None:
    # The service checks that a shared namespace exists before it calls kv_put; a kv_delete_namespace
    # committing between the two used to leave the put's keys behind, in no namespace, shown to whoever
    # one of that name was created for later. The put's own transaction checks now (personal ones exist).
    await store.kv_create_namespace(KVNamespace("team", created_at=NOW))
    await store.kv_put("team", [w("kept")], NOW)
    assert await store.kv_delete_namespace("team", NOW) == 1
    before = await store.kv_revisions()
    for writes in ([w("a")], [w("a"), w("b", b"2")], [w("a", expected_version=0)]):
        with pytest.raises(NotFound, match="no namespace 'team'"):
            await store.kv_put("team", writes, NOW)
    # Among others in one group (SQLite: one batch, run again with each alone): only that put fails.
    results = await asyncio.gather(
        store.kv_put(NS, [w("x")], NOW), store.kv_put("team", [w("a")], NOW), store.kv_put(NS, [w("y")], NOW),
        return_exceptions=True,
    )  # fmt: skip
    assert isinstance(results[1], NotFound)
    assert results[0] == [before.current + 1] and results[2] == [before.current + 2]
    await store.kv_create_namespace(KVNamespace("team", created_at=NOW))
    assert await store.kv_list("team", "", None, 10, NOW) == []
    assert (await store.kv_usage("team")).keys == 0


async def test_reassign_owner_hands_keys_over_or_deletes_them(store: Store) -> None:
    await store.kv_put("~old", [w("a", b"1"), w("b/c", b"2", content_type="x/y")], NOW)
    await store.kv_put("~heir", [w("mine")], NOW)
    await store.kv_create_namespace(KVNamespace("team", ["user:old", "role:dev"], ["user:old"], NOW))
    assert await store.kv_reassign_owner("old", "heir") == 3  # two keys, one namespace's lists
    assert await store.kv_list("~old", "", None, 10, NOW) == []
    moved = await store.kv_list("~heir", "", None, 10, NOW)
    assert [(e.key, e.value, e.content_type) for e in moved] == [
        ("from-old/a", b"1", ""), ("from-old/b/c", b"2", "x/y"), ("mine", b"v", ""),
    ]  # fmt: skip
    team = await store.kv_get_namespace("team")
    assert team is not None and team.readers == ["role:dev", "user:heir"] and team.writers == ["user:heir"]
    assert await store.kv_reassign_owner("old", "heir") == 0  # repeating finds nothing left
    assert await store.kv_reassign_owner("heir", None) == 4
    assert await store.kv_list("~heir", "", None, 10, NOW) == []
    team = await store.kv_get_namespace("team")
    assert team is not None and team.readers == ["role:dev"] and team.writers == []


async def test_acknowledged_kv_writes_survive_reopening(make_store: MakeStore) -> None:
    async with make_store() as store:
        versions = await asyncio.gather(*(store.kv_put(NS, [w(f"k{i}", bytes([i]))], NOW) for i in range(50)))
    async with make_store() as store:
        entries = await store.kv_get_many(NS, [f"k{i}" for i in range(50)], NOW)
        assert [(e.value, e.version) for e in entries if e] == [(bytes([i]), v) for i, (v,) in enumerate(versions)]
        assert (await store.kv_revisions()).current == 50


async def test_one_key_reads_as_it_does_among_several(store: Store) -> None:
    """kv.get's read (one key, no max_bytes: SQLite's own statement) agrees with the general one."""
    await store.kv_put(NS, [w("live", b"\x00v", content_type="t/x"), w("brief", expires_at=NOW + 1)], NOW)
    await store.kv_put("~bob", [w("theirs")], NOW)
    for key in ("live", "brief", "absent", "theirs"):
        for now in (NOW, NOW + 1, NOW + 2):
            (alone,) = await store.kv_get_many(NS, [key], now)
            among = (await store.kv_get_many(NS, [key, "absent"], now))[0]
            assert alone == among, (key, now)
    (live,) = await store.kv_get_many(NS, ["live"], NOW)
    assert live is not None and (live.value, live.content_type, live.version) == (b"\x00v", "t/x", 1)
    assert await store.kv_get_many(NS, ["brief"], NOW + 1) == [None]  # expired at its expires_at
