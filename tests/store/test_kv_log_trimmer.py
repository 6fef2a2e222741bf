"""The kv change log's byte bound on every backend: rewriting one large key cannot grow the log
past ``kv.history_bytes``, whatever ``kv.history`` allows; the tally stays exact as the log is
written, trimmed by count, and compacted by someone else."""

from __future__ import annotations

from bastion.services.kv_log import SIZES_PAGE, ChangeLogTrimmer
from bastion.store import Store
from bastion.store.kv import KVWrite

NS = "~ada"
NOW = 1_000_000.0


async def log_bytes(store: Store) -> int:
    """The log's bytes counted afresh from its rows, as the bound counts them."""
    changes = await store.kv_changes(0, None, 100_000)
    return sum(len(c.key.encode()) + len(c.value or b"") + len(c.content_type.encode()) for c in changes)


async def test_one_key_rewritten_keeps_the_log_within_its_bytes(store: Store) -> None:
    trimmer = ChangeLogTrimmer(store, keep=100_000, keep_bytes=10_000)
    for i in range(30):  # 30 changes of 1,001 bytes each: 30 KB logged
        await store.kv_put(NS, [KVWrite("k", bytes([i]) * 1000)], NOW)
    assert await trimmer.trim() == 21
    changes = await store.kv_changes(0, None, 100)
    assert [c.revision for c in changes] == list(range(22, 31))  # the newest nine: 9,009 bytes
    assert trimmer.bytes == await log_bytes(store) == 9 * 1001
    assert (await store.kv_revisions()).compacted == 21
    assert await trimmer.trim() == 0  # nothing new: nothing read but the revisions, nothing removed

    await store.kv_put(NS, [KVWrite("k", b"z" * 3000)], NOW)  # 3,001 more: the oldest three go
    await store.kv_delete(NS, "k", None, NOW)  # a delete logs its key alone
    assert await trimmer.trim() == 3
    assert trimmer.bytes == await log_bytes(store) == 6 * 1001 + 3001 + 1
    assert (await store.kv_changes(0, None, 100))[0].revision == 25


async def test_the_count_bound_and_the_byte_bound_together(store: Store) -> None:
    trimmer = ChangeLogTrimmer(store, keep=5, keep_bytes=1_000_000)
    await store.kv_put(NS, [KVWrite(f"k{i:02d}", b"v" * 10) for i in range(12)], NOW)
    assert await trimmer.trim() == 7  # the count bound: the newest five stay
    assert trimmer.bytes == await log_bytes(store) == 5 * 13
    trimmer.keep_bytes = 40  # now the bytes bind: three changes of 13 bytes fit
    assert await trimmer.trim() == 2
    assert trimmer.bytes == await log_bytes(store) == 39


async def test_the_tally_counts_afresh_after_someone_else_compacts(store: Store) -> None:
    trimmer = ChangeLogTrimmer(store, keep=100_000, keep_bytes=100_000)
    await store.kv_put(NS, [KVWrite(f"k{i}", b"v" * 100) for i in range(10)], NOW)
    assert await trimmer.trim() == 0
    assert trimmer.bytes == 10 * 102
    assert await store.kv_compact(keep=4) == 6  # older code, or a leader elsewhere
    await store.kv_put(NS, [KVWrite("k0", b"w" * 50)], NOW)
    assert await trimmer.trim() == 0
    assert trimmer.bytes == await log_bytes(store) == 4 * 102 + 52


async def test_a_trim_longer_than_a_page(store: Store) -> None:
    trimmer = ChangeLogTrimmer(store, keep=100_000, keep_bytes=2 * 10)
    n = SIZES_PAGE + 250
    for start in range(0, n, 250):
        await store.kv_put(NS, [KVWrite(f"{i:08d}", b"") for i in range(start, min(start + 250, n))], NOW)
    assert await trimmer.trim() == n - 2  # eight-byte keys, no values: two fit in 20 bytes
    assert trimmer.bytes == await log_bytes(store) == 16
