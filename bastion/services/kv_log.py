"""The kv change log's two bounds: its newest ``kv.history`` changes, and at most ``kv.history_bytes`` of them.

The count bound alone let the log hold ``history`` changes of up to
``max_value_bytes`` each (100,000 x 512 KiB: about 50 GB), outside every
namespace's quota: one user rewriting one large key could fill the disk.

The count bound is a revision: everything up to ``current - history`` goes.
The byte bound needs the log's size, which nothing stores (a counter kept by
every put would cost every put): the sweeper keeps a tally of the bytes
logged between the compacted revision and the newest revision it has
counted. Each sweep adds only the changes logged since the last (a range the
log's primary key reaches directly), subtracts what it trims, and trims the
oldest changes until the rest fits. It counts the whole log afresh when it
starts and whenever someone else compacted in between (a leader elsewhere,
or older code during a rolling upgrade), so the tally is exact whoever
writes.
"""

from __future__ import annotations

from bastion.store.kv import KVStore

__all__ = ["SIZES_PAGE", "ChangeLogTrimmer"]

#: Changes read per page while finding how far the byte bound trims.
SIZES_PAGE = 1000


class ChangeLogTrimmer:
    """Keeps ``store``'s change log within ``keep`` changes and ``keep_bytes`` bytes (run by the sweeper)."""

    def __init__(self, store: KVStore, keep: int, keep_bytes: int) -> None:
        self.store, self.keep, self.keep_bytes = store, keep, keep_bytes
        self.start = -1  # the compacted revision the tally counts from; -1: not counted yet
        self.end = 0  # the newest revision counted
        self.bytes = 0  # the bytes logged after ``start`` up to ``end``

    def __repr__(self) -> str:
        return f"ChangeLogTrimmer(keep={self.keep}, keep_bytes={self.keep_bytes}, bytes={self.bytes})"

    async def trim(self) -> int:
        """Trim the log to both bounds; how many changes were removed."""
        store = self.store
        revisions = await store.kv_revisions()
        current, compacted = revisions.current, revisions.compacted
        if compacted != self.start:  # first sweep, or compacted by someone else: count afresh
            self.start = self.end = compacted
            self.bytes = 0
        if current > self.end:
            self.bytes += await store.kv_log_bytes(self.end, current)
            self.end = current
        through = max(current - self.keep, compacted)
        if through > compacted:
            self.bytes -= await store.kv_log_bytes(compacted, through)
        while self.bytes > self.keep_bytes:
            sizes = await store.kv_log_sizes(through, SIZES_PAGE)
            for revision, size in sizes:
                self.bytes -= size
                through = revision
                if self.bytes <= self.keep_bytes:
                    break
            if len(sizes) < SIZES_PAGE:
                break
        if through <= compacted:
            return 0
        removed = await store.kv_compact(through=through)
        self.start = through
        return removed
