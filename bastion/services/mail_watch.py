"""The messages service's mailbox watches: a hub that wakes each watcher when its mailbox may have mail.

See bastion/services/mail.py ("Watches") for the theory of operation:
mail committed here nudges the mailbox's watchers at once; mail committed by
another process is found by polling the watched mailboxes' heads (one query
for all of them) when poked by a notification, and every ``POLL_INTERVAL``
while anyone watches.

A watch never finishes by itself, so a draining server would wait out its
whole grace period for it and then cut it off. Each poll therefore first
ends, with UNAVAILABLE, the watches whose server has begun to drain: they
send the mail already committed, then end, and the client resumes with
``from_id`` on another replica (or once this one is back).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from bastion.exceptions import CallError, Unavailable
from bastion.services import on_wakeup
from bastion.store.base import Store

__all__ = ["POLL_INTERVAL", "Hub", "Watcher"]

log = logging.getLogger("bastion.messages")

POLL_INTERVAL = 0.5  # seconds between head polls while anyone watches (mail from other processes)
DRAINING = "the server is shutting down; watch again with from_id (the last id you saw + 1) on a running server"


class Watcher:
    """One watch stream: its mailbox, the last id it yielded, and how to wake it."""

    def __init__(self, owner: str, last: int, draining: Callable[[], bool] = lambda: False) -> None:
        """``draining``: whether the server hosting this watch has begun to shut down."""
        self.owner = owner
        self.last = last
        self.draining = draining
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
        self._end_draining()
        if not self._watchers:
            return
        heads = await self._store.mail_heads(sorted(self._watchers))
        for owner, head in heads.items():
            for watcher in self._watchers.get(owner, ()):
                if head > watcher.last:
                    watcher.wakeup.set()

    def _end_draining(self) -> None:
        """End the watches of a server that is shutting down: they would hold up its drain (module docstring)."""
        for group in list(self._watchers.values()):
            for watcher in list(group):
                if watcher.ended is None and watcher.draining():
                    watcher.end(Unavailable(DRAINING))
