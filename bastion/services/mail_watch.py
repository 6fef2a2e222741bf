"""The messages service's mailbox watches: a hub that wakes each watcher when its mailbox may have mail.

See bastion/services/mail.py ("Watches") for the theory of operation:
mail committed here nudges the mailbox's watchers at once; mail committed by
another process is found by polling the watched mailboxes' heads (one query
for all of them) when poked by a notification, and every ``POLL_INTERVAL``
while anyone watches.
"""

from __future__ import annotations

import asyncio
import logging

from bastion.exceptions import CallError
from bastion.services import on_wakeup
from bastion.store.base import Store

__all__ = ["POLL_INTERVAL", "Hub", "Watcher"]

log = logging.getLogger("bastion.messages")

POLL_INTERVAL = 0.5  # seconds between head polls while anyone watches (mail from other processes)


class Watcher:
    """One watch stream: its mailbox, the last id it yielded, and how to wake it."""

    def __init__(self, owner: str, last: int) -> None:
        self.owner = owner
        self.last = last
        self.wakeup = asyncio.Event()
        self.ended: CallError | None = None  # set by the hub: the stream ends with this

    def end(self, error: CallError) -> None:
        self.ended = error
        self.wakeup.set()


class Hub:
    """Wakes this process's watchers when their mailbox may have new mail (see the module docstring)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._watchers: dict[str, set[Watcher]] = {}
        self._poked = asyncio.Event()

    def __len__(self) -> int:
        return sum(len(group) for group in self._watchers.values())

    def count(self, owner: str) -> int:
        return len(self._watchers.get(owner, ()))

    def join(self, watcher: Watcher) -> None:
        self._watchers.setdefault(watcher.owner, set()).add(watcher)

    def leave(self, watcher: Watcher) -> None:
        group = self._watchers.get(watcher.owner)
        if group is not None:
            group.discard(watcher)
            if not group:
                del self._watchers[watcher.owner]

    def end_all(self, error: CallError) -> None:
        for group in self._watchers.values():
            for watcher in group:
                watcher.end(error)
        self._watchers.clear()

    def nudge(self, owners: list[str]) -> None:
        """Mail was committed to these mailboxes, here."""
        for owner in owners:
            for watcher in self._watchers.get(owner, ()):
                watcher.wakeup.set()

    def poke(self) -> None:
        """Mail may have arrived from elsewhere: poll now."""
        if self._watchers:
            self._poked.set()

    async def run(self) -> None:
        """Poll the watched mailboxes' heads whenever poked, and every ``POLL_INTERVAL`` while anyone watches."""
        await on_wakeup(self._poked, POLL_INTERVAL, self._poll, log, "mail watch poll")

    async def _poll(self) -> None:
        if not self._watchers:
            return
        heads = await self._store.mail_heads(sorted(self._watchers))
        for owner, head in heads.items():
            for watcher in self._watchers.get(owner, ()):
                if head > watcher.last:
                    watcher.wakeup.set()
