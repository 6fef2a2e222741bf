"""The kv service's watches: a hub tailing the change log, each watcher's bounded buffer, replay.

The kv service's module docstring (bastion/services/kv.py, "Watches") gives
the theory of operation: one feeder per process reads the durable change log
in revision order and offers each change to every matching watcher, whose
buffer never blocks the feeder; a watcher that falls behind ends with
RESOURCE_EXHAUSTED carrying ``resume_from``; replay reads the log from a
version, checked against compaction.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator

from bastion.exceptions import CallError, OutOfRange, ResourceExhausted
from bastion.services import on_wakeup
from bastion.store.kv import KVChange, KVStore

__all__ = ["FEED_PAGE", "POLL_INTERVAL", "Hub", "Watcher", "behind", "check_reached", "replay"]

log = logging.getLogger("bastion.kv")

POLL_INTERVAL = 0.5  # seconds between log polls while anyone watches (changes from other processes)
FEED_PAGE = 1000  # changes the hub reads at once


class Watcher:
    """One watch stream's bounded buffer; ``offer`` never blocks."""

    def __init__(self, namespace: str, prefix: str, max_items: int, max_bytes: int, owner: str = "") -> None:
        self.namespace, self.prefix, self.owner = namespace, prefix, owner
        self.max_items, self.max_bytes = max_items, max_bytes
        self.buffer: deque[KVChange] = deque()
        self.bytes = 0
        self.overflowed = False
        self.ended: CallError | None = None  # set by the hub: the stream ends with this after its buffer
        self.wakeup = asyncio.Event()

    def offer(self, change: KVChange) -> None:
        if self.overflowed or change.namespace != self.namespace or not change.key.startswith(self.prefix):
            return
        size = len(change.value or b"")
        if len(self.buffer) >= self.max_items or self.bytes + size > self.max_bytes:
            self.overflowed = True
        else:
            self.buffer.append(change)
            self.bytes += size
        self.wakeup.set()

    def take(self) -> KVChange | None:
        if not self.buffer:
            return None
        change = self.buffer.popleft()
        self.bytes -= len(change.value or b"")
        return change

    def end(self, error: CallError) -> None:
        self.ended = error
        self.wakeup.set()


class Hub:
    """Tails the change log and fans changes out to this process's watchers (see the module docstring)."""

    def __init__(self, store: KVStore) -> None:
        self._store = store
        self._watchers: set[Watcher] = set()
        self._position: int | None = None  # last revision delivered; None while nobody watches
        self._lock = asyncio.Lock()  # the feeder's read-and-deliver step vs. a watcher joining
        self._nudged = asyncio.Event()
        #: Watchers whose ``join`` waits (for the lock, or the log's position): they count against the limits.
        self._joining: list[Watcher] = []

    def __len__(self) -> int:
        return len(self._watchers) + len(self._joining)

    def nudge(self) -> None:
        """New changes may be in the log (a write committed here, or a notification from elsewhere)."""
        if self._watchers:
            self._nudged.set()

    async def join(self, watcher: Watcher) -> int:
        """Add ``watcher``; the revision P up to which changes are not delivered to it live.

        It counts (``len``, ``count``) from the call on, before the first await: watches checked
        against the limits at once cannot all pass while each waits here."""
        self._joining.append(watcher)
        try:
            async with self._lock:
                if self._position is None:
                    self._position = (await self._store.kv_revisions()).current
                self._watchers.add(watcher)
                return self._position
        finally:
            self._joining.remove(watcher)

    def leave(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)
        if not self._watchers:
            self._position = None

    def end_all(self, error: CallError) -> None:
        for watcher in list(self._watchers):
            watcher.end(error)
        self._watchers.clear()
        self._position = None

    async def run(self) -> None:
        """The feeder: deliver every new logged change, in order, whenever nudged (or polled)."""
        await on_wakeup(self._nudged, POLL_INTERVAL, self._feed_all, log, "kv watch feed")

    async def _feed_all(self) -> None:
        while await self._feed_once():
            pass

    async def _feed_once(self) -> bool:
        """Deliver one page of changes; whether there may be more."""
        async with self._lock:
            if self._position is None or not self._watchers:
                return False
            after = self._position
            changes = await self._store.kv_changes(after, None, FEED_PAGE)
            if self._position is None:  # the last watcher left meanwhile (leaving takes no lock)
                return False
            if changes and changes[0].revision != after + 1:
                # Compacted under us (a feed stalled for `history` changes): nobody can be served gaplessly.
                self.end_all(behind(after + 1, "the change history moved past it"))
                return False
            for change in changes:
                for watcher in self._watchers:
                    watcher.offer(change)
            if changes:
                self._position = changes[-1].revision
            return len(changes) == FEED_PAGE


def behind(resume_from: int, why: str) -> ResourceExhausted:
    return ResourceExhausted(
        f"watch fell behind ({why}); watch again with from_version={resume_from} to continue",
        details={"resume_from": resume_from},
    )


async def check_reached(store: KVStore, from_version: int, start: int) -> None:
    """OUT_OF_RANGE if the store has not reached ``from_version - 1`` (``start``: the hub's position, which
    may lag the store's): a version from elsewhere, or from before a restore into a fresh place. Watching
    from it would skip every change up to it without a word."""
    if from_version <= start + 1:
        return
    revisions = await store.kv_revisions()
    if from_version > revisions.current + 1:
        raise OutOfRange(
            f"version {from_version} is past the store's end: the next version is {revisions.current + 1} "
            f"(the earliest available is {revisions.compacted + 1}); watch without from_version to start afresh",
            details={"earliest": revisions.compacted + 1, "next": revisions.current + 1},
        )


async def replay(store: KVStore, ns: str, prefix: str, from_version: int, upto: int) -> AsyncIterator[KVChange]:
    """Logged changes of ``ns``/``prefix`` with ``from_version <= revision <= upto``, checked for compaction."""
    after = from_version - 1
    while after < upto:
        changes = await store.kv_changes(after, upto, FEED_PAGE, ns, prefix)
        compacted = (await store.kv_revisions()).compacted
        if compacted > after:  # some of what we asked for was gone before we read it
            raise OutOfRange(
                f"version {after + 1} is no longer in the change history; the earliest available is "
                f"{compacted + 1} (kv.history keeps the newest changes)",
                details={"earliest": compacted + 1},
            )
        for change in changes:
            yield change
        if len(changes) < FEED_PAGE:
            return
        after = changes[-1].revision
