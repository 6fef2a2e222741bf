"""Login attempts in flight, counted across the workers of one server (the login throttle's pending counts).

Theory of operation
-------------------

``LoginThrottle`` (throttle.py) counts a password attempt being verified as
pending against the (username, source) pair, the source and the username,
so guesses sent at once cannot all be verified before the first failure is
counted. In one process a ``Counter`` does. With ``bastion serve --workers
N`` each worker's counter saw only its own connections, so guesses spread
by the kernel over N workers got N rounds; ``SharedPending`` counts them in
a ``SharedTable`` (ratelimit_shared.py) of their own, which the supervisor
creates beside the rate-limit table (``pending_table``) and every worker
maps, as it maps that one.

As ``SharedHolds`` does, each worker counts its own attempts, in a slot per
key of its own stamped with its *epoch* (a random number drawn when it
starts), and a total adds up the slots stamped with their worker's current
epoch. The epoch is published with the worker's process id (``WorkerEpochs``
in ratelimit_shared.py, which both use), and a worker whose process no
longer exists counts nothing: the attempts of a worker
killed in the middle of a login (SIGKILL: nobody counted them off) stop
counting as soon as the supervisor reaps it, and its replacement draws a new
epoch anyway. (Should its pid be reused by then, they count until the
replacement starts: a second or so of "at once" refusals, never more.)

Bounded: a worker holds at most ``MAX_IN_FLIGHT`` attempts at once, each
under three keys, and the table has four slots for every key that can be
held, so a spray of user names cannot fill it. A slot is reused once its
count is 0 or its worker is gone, and never forgotten while it counts
(``SharedTable.claim_free``): an attempt is never let through because the
table forgot the others (it does not fail open). One past the worker's
``MAX_IN_FLIGHT`` -- or, rarer still, one whose keys find every slot they
may probe in use -- is refused: ``LoginThrottled`` (RESOURCE_EXHAUSTED)
"too many logins in flight", with a retry-after of a second. A worker that
many logins behind would keep the next one waiting for its turn at argon2
for tens of seconds anyway.

Locking: the table's own lock. The throttle holds it from reading the
counts to taking the holds, so two workers cannot both pass on the last
place; inside it takes the rate-limit table's lock, never the other way
round. The supervisor never takes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from bastion.security.ratelimit_shared import SharedTable, WorkerEpochs

__all__ = ["MAX_IN_FLIGHT", "SharedPending", "pending_table"]

#: Password attempts one worker may have in flight (being verified, or waiting for argon2) at once.
MAX_IN_FLIGHT: Final = 1024
_KEYS_PER_ATTEMPT: Final = 3  # the (username, source) pair, the source, the username


def pending_table(workers: int, per_worker: int = MAX_IN_FLIGHT) -> SharedTable:
    """A table for ``workers`` workers' ``SharedPending`` (the supervisor makes it): four slots for every key
    they can hold, and their epochs."""
    return SharedTable.create(2 * workers * (_KEYS_PER_ATTEMPT * per_worker + 1))


class SharedPending:
    """Attempts in flight per key across the workers of one server; see the module docstring.

    ``counter`` and ``hold`` are called with the table's lock held (``table.locked()``), ``release`` takes it.
    """

    def __init__(self, table: SharedTable, worker: int, workers: int, *, limit: int = MAX_IN_FLIGHT) -> None:
        """``worker``: this process's index of ``workers``; ``limit``: attempts it may hold at once."""
        self.table = table
        self.limit = limit
        #: Attempts this worker holds now.
        self.held = 0
        self._worker = worker
        self._epochs = WorkerEpochs(table, "", worker, workers, evictable=False)
        self._epoch = self._epochs.epoch
        with table.locked():
            self._published = self._epochs.publish()

    def counter(self) -> Callable[[str], int]:
        """How many attempts the live workers hold for a key, now (hold the lock while using it)."""
        table = self.table
        epochs = self._epochs.live()

        def count(key: str) -> int:
            return int(WorkerEpochs.total(table, epochs, "", key))

        return count

    def hold(self, keys: Sequence[str]) -> bool:
        """Count one attempt more under each of ``keys`` (hold the lock); False, holding nothing, if this
        worker holds ``limit`` already or the table has no room for a key."""
        if self.held >= self.limit:
            return False
        if not self._published:
            self._published = self._epochs.publish()
            if not self._published:
                return False
        table = self.table
        live = set(self._epochs.live().values())

        def free(count: float, stamp: float) -> bool:
            return stamp >= 0 and (count <= 0 or stamp not in live)

        taken: list[int] = []
        for key in keys:  # each counted at once: a slot claimed and still at 0 would be free for the next key
            at = table.claim_free(table.digest(f"{self._worker}|{key}"), 0.0, self._epoch, free)
            if at is None:
                for at in taken:
                    held, _ = table.get(at)
                    table.put(at, held - 1, self._epoch)
                return False
            held, stamp = table.get(at)
            table.put(at, (held if stamp == self._epoch else 0.0) + 1, self._epoch)
            taken.append(at)
        self.held += 1
        return True

    def release(self, keys: Sequence[str]) -> None:
        """Count off one attempt ``hold`` counted under ``keys`` (takes the lock)."""
        table = self.table
        with table.locked():
            for key in keys:
                at = table.find(table.digest(f"{self._worker}|{key}"))
                if at is not None:
                    held, stamp = table.get(at)
                    if stamp == self._epoch:
                        table.put(at, max(0.0, held - 1), self._epoch)
        self.held -= 1
