"""Rate-limit and login-throttle state shared by the worker processes of one server (and the mailbox
watches each user holds open: ``SharedHolds``).

Theory of operation
-------------------

With ``bastion serve --workers N`` every worker admits calls, so per-process
token buckets would let a caller spend N times its allowance (the kernel
spreads its connections over the workers). Unless a Redis limiter is
configured, the buckets live instead in one ``SharedTable``: a fixed-size
hash table in a shared memory mapping that the supervisor creates (an
anonymous ``memfd``, or an unlinked temporary file where there is none) and
every worker maps. It outlives any one worker, so a restarted worker finds
the buckets as they were.

Layout: a 64-byte header (magic, version, slot count, a random 16-byte
hash key), then ``slots`` records of 40 bytes: a 16-byte key digest (all
zero: free), two float64 values ``a`` and ``b`` (a token bucket's tokens
and time stamp, or a counter and its time stamp) and a float64 ``used``
(monotonic time of the last use). A key is hashed with keyed BLAKE2b (so
callers cannot aim collisions at someone else's bucket) and looked up by
linear probing over ``PROBE`` slots; when they are all taken, the least
recently used one is reused -- forgetting a bucket refills it, exactly as
the in-memory limiter forgets its least recently used buckets. The table
is sized at twice the number of keys to remember, so that is rare.
``claim_free`` instead reuses only slots its caller says are free, and
answers None when there is none: for counts that must not fail open (the
logins in flight, throttle_shared.py, in a table of their own).

Locking: one POSIX record lock (``fcntl.lockf``) over the whole table,
held for the few microseconds a check takes. POSIX locks belong to the
process and are dropped when it dies, so a worker killed in the middle of a
check cannot wedge the others (at worst one bucket misses one debit).
Everything is called from the event loop thread only.

Cost: a check of two buckets takes a few microseconds more than the
in-memory limiter (two system calls for the lock, the digests, the struct
reads); see the "Several workers" section of docs/operations.md.
Counting in the store instead would cost a durable write per call; asking
the supervisor, a round trip per call.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import mmap
import os
import secrets
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, Protocol

from bastion.security.principal import Principal
from bastion.security.ratelimit import EPSILON, RateLimitConfig, RateLimiter

__all__ = [
    "PROBE",
    "Holds",
    "LocalHolds",
    "SharedBuckets",
    "SharedCounts",
    "SharedHolds",
    "SharedRateLimiter",
    "SharedTable",
    "WorkerEpochs",
    "process_runs",
]

_MAGIC: Final = b"BSTNSHM1"
_HEADER = struct.Struct("<8sII16s")  # magic, version, slots, hash key
_HEADER_SIZE: Final = 64
_VALUES = struct.Struct("<ddd")  # a, b, used
_SLOT_SIZE: Final = 40  # 16-byte digest + _VALUES
_EMPTY: Final = bytes(16)
_DIGEST_CACHE: Final = 4096
#: Slots probed for a key before the least recently used of them is reused.
PROBE: Final = 8


class SharedTable:
    """A hash table of (a, b) float pairs in shared memory; see the module docstring."""

    def __init__(self, fd: int) -> None:
        """Map the table already in ``fd`` (made by ``create``)."""
        self._fd = fd
        size = os.fstat(fd).st_size
        if size < _HEADER_SIZE:
            raise ValueError("not a bastion shared table: too short")
        self._map = mmap.mmap(fd, size)
        magic, version, slots, key = _HEADER.unpack_from(self._map, 0)
        if magic != _MAGIC or version != 1 or size != _HEADER_SIZE + slots * _SLOT_SIZE or slots & (slots - 1):
            raise ValueError("not a bastion shared table")
        self.slots: int = slots
        self._key: bytes = key
        self._mask: int = slots - 1
        self._digests: dict[str, bytes] = {}

    @classmethod
    def create(cls, keys: int) -> SharedTable:
        """A new table with room for about ``keys`` keys (rounded up to a power of two, times two)."""
        slots = 1 << max(6, (2 * keys - 1).bit_length())
        size = _HEADER_SIZE + slots * _SLOT_SIZE
        try:
            fd = os.memfd_create("bastion-shared", 0)
        except (AttributeError, OSError):
            directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
            handle, path = tempfile.mkstemp(prefix="bastion-shared-", dir=directory)
            os.unlink(path)
            fd = handle
        os.ftruncate(fd, size)  # sparse: pages exist once touched
        os.pwrite(fd, _HEADER.pack(_MAGIC, 1, slots, secrets.token_bytes(16)), 0)
        return cls(fd)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def lock(self) -> None:
        """Take the table's lock (excludes other processes, not other threads); ``unlock`` in a finally."""
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """``lock`` ... ``unlock`` as a context manager (for paths where 2 us do not matter)."""
        self.lock()
        try:
            yield
        finally:
            self.unlock()

    def digest(self, key: str) -> bytes:
        """``key``'s 16-byte keyed hash (the recent ones are remembered: hashing costs more than a lookup)."""
        digest = self._digests.get(key)
        if digest is None:
            digest = hashlib.blake2b(key.encode(), digest_size=16, key=self._key).digest()
            if len(self._digests) >= _DIGEST_CACHE:
                self._digests.clear()
            self._digests[key] = digest
        return digest

    def find(self, digest: bytes) -> int | None:
        """The offset of the slot holding ``digest``, or None (hold the lock)."""
        start = int.from_bytes(digest[:8], "little")
        view = self._map
        for i in range(PROBE):
            offset = _HEADER_SIZE + ((start + i) & self._mask) * _SLOT_SIZE
            stored = view[offset : offset + 16]
            if stored == digest:
                return offset
            if stored == _EMPTY:
                return None
        return None

    def claim(self, digest: bytes, a: float, b: float) -> int:
        """The offset of ``digest``'s slot, made with values (a, b) if it is not there (hold the lock)."""
        start = int.from_bytes(digest[:8], "little")
        view = self._map
        victim, oldest = -1, math.inf
        for i in range(PROBE):
            offset = _HEADER_SIZE + ((start + i) & self._mask) * _SLOT_SIZE
            stored = view[offset : offset + 16]
            if stored == digest:
                return offset
            if stored == _EMPTY:
                victim = offset
                break
            used = _VALUES.unpack_from(view, offset + 16)[2]
            if used < oldest:
                victim, oldest = offset, used
        view[victim : victim + 16] = digest
        _VALUES.pack_into(view, victim + 16, a, b, time.monotonic())
        return victim

    def claim_free(self, digest: bytes, a: float, b: float, free: Callable[[float, float], bool]) -> int | None:
        """The offset of ``digest``'s slot; else of a free one (empty, or whose values ``free`` says may
        go) made ``digest``'s with values (a, b); None if none of the PROBE slots is (hold the lock).
        Unlike ``claim`` it never forgets a slot in use: for counts that must not fail open."""
        start = int.from_bytes(digest[:8], "little")
        view = self._map
        spare = None
        for i in range(PROBE):
            offset = _HEADER_SIZE + ((start + i) & self._mask) * _SLOT_SIZE
            stored = view[offset : offset + 16]
            if stored == digest:
                return offset
            if stored == _EMPTY:  # slots are reused, never emptied: no key lies past an empty one
                spare = offset if spare is None else spare
                break
            if spare is None and free(*_VALUES.unpack_from(view, offset + 16)[:2]):
                spare = offset
        if spare is not None:
            view[spare : spare + 16] = digest
            _VALUES.pack_into(view, spare + 16, a, b, time.monotonic())
        return spare

    def get(self, offset: int) -> tuple[float, float]:
        a, b, _ = _VALUES.unpack_from(self._map, offset + 16)
        return a, b

    def put(self, offset: int, a: float, b: float) -> None:
        _VALUES.pack_into(self._map, offset + 16, a, b, time.monotonic())


def _refill(tokens: float, stamp: float, now: float, rate: float, burst: float) -> tuple[float, float]:
    if now > stamp:  # a clock stepping back refills nothing
        return min(burst, tokens + (now - stamp) * rate), now
    return tokens, stamp


class SharedRateLimiter(RateLimiter):
    """The in-memory limiter's rules with its buckets in a ``SharedTable`` (limits hold across workers).

    A ``RateLimiter``, so the server checks it inline, before a call is admitted.
    """

    def __init__(
        self, config: RateLimitConfig | None, table: SharedTable, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(config, clock=clock)
        self._table = table

    def _key(self, ident: str, index: int) -> bytes:
        return self._table.digest(f"rl|{index}|{ident}")

    def check_sync(
        self, principal: Principal, source: str, method: str, cost: float | None = None, now: float | None = None
    ) -> None:
        if not self.config.enabled:
            return
        charge = self._compiled.charge(principal, method, cost)
        if charge is None:
            return
        cost, limits = charge
        for limit in limits:
            if cost > limit.burst:
                raise self._compiled.refusal(limit, math.inf, cost)
        if now is None:
            now = self.clock()
        ident = self._compiled.identity(principal, source)
        digests = [self._key(ident, limit.index) for limit in limits]
        table = self._table
        worst = 0.0
        refused = None
        slots = []
        table.lock()
        try:
            for limit, digest in zip(limits, digests, strict=True):
                offset = table.claim(digest, limit.burst, now)
                # Another worker may have charged the bucket at a later time than ``now`` (the
                # time this call's read arrived): its stamp stays, or the interval would refill twice.
                tokens, stamp = _refill(*table.get(offset), now, limit.rate, limit.burst)
                short = cost - tokens
                if short > EPSILON and short / limit.rate > worst:
                    worst, refused = short / limit.rate, limit
                slots.append((offset, tokens, stamp))
            if refused is None:
                for offset, tokens, stamp in slots:
                    table.put(offset, tokens - cost, stamp)
        finally:
            table.unlock()
        if refused is not None:
            raise self._compiled.refusal(refused, worst, cost)

    def usage_sync(self, principal: Principal, source: str, now: float | None = None) -> dict[str, Any]:
        if now is None:
            now = self.clock()
        ident = self._compiled.identity(principal, source)
        limits = []
        table = self._table
        with table.locked():
            for limit in self._compiled.all_for(principal):
                offset = table.find(self._key(ident, limit.index))
                if offset is None:
                    tokens = limit.burst
                else:
                    tokens, _ = _refill(*table.get(offset), now, limit.rate, limit.burst)
                limits.append(limit.describe(tokens))
        return self._compiled.report(ident, limits)


class SharedBuckets:
    """Token buckets per key in a ``SharedTable`` (the login throttle's; the API of its in-memory ones)."""

    def __init__(self, table: SharedTable, namespace: str, capacity: float, rate: float) -> None:
        self._table = table
        self._prefix = namespace + "|"
        self.capacity, self.rate = capacity, rate

    def wait(self, key: str, now: float, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens will be there (0: now); takes nothing."""
        table = self._table
        with table.locked():
            offset = table.find(table.digest(self._prefix + key))
            if offset is None:  # a full bucket
                return 0.0 if n <= self.capacity else (n - self.capacity) / self.rate
            tokens, _ = _refill(*table.get(offset), now, self.rate, self.capacity)
        return 0.0 if tokens >= n else (n - tokens) / self.rate

    def take(self, key: str, now: float, n: float = 1.0) -> float:
        """0 if taken, else the seconds until ``n`` tokens will be there."""
        table = self._table
        with table.locked():
            offset = table.claim(table.digest(self._prefix + key), self.capacity, now)
            tokens, stamp = _refill(*table.get(offset), now, self.rate, self.capacity)
            if tokens >= n:
                table.put(offset, tokens - n, stamp)
                return 0.0
        return (n - tokens) / self.rate

    def pop(self, key: str) -> None:
        """Fill the bucket again (as one never used)."""
        table = self._table
        with table.locked():
            offset = table.find(table.digest(self._prefix + key))
            if offset is not None:
                table.put(offset, self.capacity, 0.0)


class SharedCounts:
    """Counters per key in a ``SharedTable`` (the login throttle's failures in a row), each forgotten ``ttl``
    seconds after it last grew (its time stamp is kept beside it)."""

    def __init__(self, table: SharedTable, namespace: str, ttl: float) -> None:
        self._table = table
        self._prefix = namespace + "|"
        self.ttl = ttl

    def add(self, key: str, now: float) -> int:
        """Count one more at ``now``; the new count."""
        table = self._table
        with table.locked():
            offset = table.claim(table.digest(self._prefix + key), 0.0, now)
            count, stamp = table.get(offset)
            count = 1.0 if now - stamp >= self.ttl else count + 1
            table.put(offset, count, now)
        return int(count)

    def get(self, key: str, now: float) -> int:
        """The count at ``now`` (0 if none, or forgotten)."""
        table = self._table
        with table.locked():
            offset = table.find(table.digest(self._prefix + key))
            if offset is None:
                return 0
            count, stamp = table.get(offset)
        return 0 if now - stamp >= self.ttl else int(count)

    def pop(self, key: str) -> None:
        """Forget the count (start again from 0)."""
        table = self._table
        with table.locked():
            offset = table.find(table.digest(self._prefix + key))
            if offset is not None:
                table.put(offset, 0.0, 0.0)

    def generation(self, group: str) -> str:
        """A suffix for the keys of ``group``'s counts (the login throttle's: a user's), '' until ``renew``.
        Reading it marks its slot used, so it is reused no sooner than the counts it names."""
        table = self._table
        with table.locked():
            offset = table.find(table.digest(self._prefix + "generation|" + group))
            if offset is None:
                return ""
            generation, _ = table.get(offset)
            table.put(offset, generation, 0.0)
        return f"#{int(generation)}"

    def renew(self, group: str) -> None:
        """Forget every count of ``group`` at once (those of keys ending in its ``generation``): a new one,
        drawn at random, so a generation forgotten and renewed again never names the counts of an old one."""
        table = self._table
        with table.locked():
            offset = table.claim(table.digest(self._prefix + "generation|" + group), 0.0, 0.0)
            table.put(offset, float(secrets.randbits(52) + 1), 0.0)


def process_runs(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie not reaped yet does; one its parent reaped does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process has the number now: its replacement's epoch tells
        return True
    return True


def _never(a: float, b: float) -> bool:
    return False


class WorkerEpochs:
    """Which life of each worker of one server counts, for tables where each worker counts its own holds
    (``SharedHolds``; ``SharedPending``, throttle_shared.py).

    A worker draws a random *epoch* when it starts and stamps the slots it counts in with it; ``publish``
    writes the epoch with the worker's process id under ``<prefix>epoch|<worker>``. ``live`` answers the
    epoch of each worker whose process exists, so a count adds up only the slots stamped with those: what
    a worker killed in the middle (SIGKILL: nobody counted it off) held stops counting as soon as the
    supervisor reaps it, and its replacement's new epoch disowns it anyway. (Should the pid be reused by
    then, it counts until the replacement starts: a second or so.) The worker itself always counts.

    ``evictable``: the table's other keys may reuse the epoch's slot once it is the least recently used (a
    table shared with rate buckets): ``publish`` then claims it as they do (call it before each use), and
    ``live`` marks the live ones used. Else the slot is only ever taken free, never reused (a restarted
    worker finds its predecessor's), and ``publish`` may find no room (False).
    Everything here is called with the table's lock held.
    """

    def __init__(self, table: SharedTable, prefix: str, worker: int, workers: int, *, evictable: bool) -> None:
        """``worker``: this process's index of ``workers``; ``prefix``: the namespace of the epochs' keys."""
        self.table = table
        #: This worker's epoch: exact in a float64, and never a free slot's 0.
        self.epoch = float(secrets.randbits(52) + 1)
        self._worker = worker
        self._pid = os.getpid()
        self._digests = [table.digest(f"{prefix}epoch|{i}") for i in range(workers)]
        self._evictable = evictable

    def publish(self) -> bool:
        """Write (or refresh) this worker's epoch and pid; False if there was no room (not ``evictable``:
        never in practice, a restarted worker finds its predecessor's slot)."""
        table = self.table
        digest = self._digests[self._worker]
        at = table.claim(digest, 0.0, 0.0) if self._evictable else table.claim_free(digest, 0.0, 0.0, _never)
        if at is None:
            return False
        table.put(at, self.epoch, -float(self._pid))  # b < 0: an epoch, never a free count's slot
        return True

    def live(self) -> dict[int, float]:
        """The current epoch of each worker whose process exists (this one's always)."""
        table = self.table
        epochs: dict[int, float] = {}
        for worker, digest in enumerate(self._digests):
            at = table.find(digest)
            if at is not None:
                epoch, pid = table.get(at)
                if worker == self._worker or process_runs(int(-pid)):
                    epochs[worker] = epoch
                    if self._evictable:
                        table.put(at, epoch, pid)  # in use: not the least recently used
        return epochs

    @staticmethod
    def total(table: SharedTable, epochs: dict[int, float], prefix: str, key: str) -> float:
        """What the workers of ``epochs`` (``live``) count for ``key``, each in its slot
        ``<prefix><worker>|<key>`` stamped with its epoch."""
        total = 0.0
        for worker, epoch in epochs.items():
            at = table.find(table.digest(f"{prefix}{worker}|{key}"))
            if at is not None:
                count, stamp = table.get(at)
                if stamp == epoch:
                    total += count
        return total


class Holds(Protocol):
    """How many of something each key (a user) holds open: ``LocalHolds`` in one process, ``SharedHolds``
    across the workers of one server."""

    def acquire(self, key: str, limit: int) -> int:
        """Take one hold for ``key`` unless ``limit`` are held; what was held before (when that is ``limit``
        or more, nothing was taken)."""
        ...

    def release(self, key: str) -> None:
        """Give back one hold ``acquire`` took for ``key``."""
        ...


class LocalHolds:
    """``Holds`` counted in this process (one worker, or a test)."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    def acquire(self, key: str, limit: int) -> int:
        held = self._held.get(key, 0)
        if held < limit:
            self._held[key] = held + 1
        return held

    def release(self, key: str) -> None:
        held = self._held.get(key, 0) - 1
        if held > 0:
            self._held[key] = held
        else:
            self._held.pop(key, None)


class SharedHolds:
    """How many of something each key holds open across the workers of one server, in a ``SharedTable``
    (the mailbox watches a user has open: ``messages.max_watchers_per_user``).

    Each worker counts its own holds, in a slot per key of its own, stamped with the worker's epoch
    (``WorkerEpochs``). A total adds up the slots stamped with their worker's current epoch, of the workers
    whose process exists: the holds of a worker that died (killed, crashed: nobody counted them off) stop
    counting as soon as the supervisor reaps it, with nothing to clean up, and its replacement draws a new
    epoch anyway. A slot lost to the table's least-recently-used reuse forgets its holds: the limit then
    lets a few more through (it fails open), as a forgotten rate bucket does.
    """

    def __init__(self, table: SharedTable, namespace: str, worker: int, workers: int) -> None:
        """``worker``: this process's index of ``workers``."""
        self._table = table
        self._prefix = namespace + "|"
        self._worker = worker
        self._epochs = WorkerEpochs(table, self._prefix, worker, workers, evictable=True)
        self._epoch = self._epochs.epoch
        with table.locked():
            self._epochs.publish()

    def _count(self, epochs: dict[int, float], key: str) -> float:
        """What the live workers (``WorkerEpochs.live``) hold for ``key`` now (hold the lock)."""
        return WorkerEpochs.total(self._table, epochs, self._prefix, key)

    def acquire(self, key: str, limit: int) -> int:
        """Take one hold for ``key`` unless the workers together hold ``limit``; what they held before
        (when that is ``limit`` or more, nothing was taken)."""
        table = self._table
        with table.locked():
            self._epochs.publish()  # again: the rate buckets may have taken its slot meanwhile
            held = int(self._count(self._epochs.live(), key))
            if held < limit:
                slot = table.claim(table.digest(f"{self._prefix}{self._worker}|{key}"), 0.0, self._epoch)
                count, stamp = table.get(slot)
                table.put(slot, (count if stamp == self._epoch else 0.0) + 1, self._epoch)
        return held

    def release(self, key: str) -> None:
        """Give back one hold ``acquire`` took for ``key`` in this process."""
        table = self._table
        with table.locked():
            slot = table.find(table.digest(f"{self._prefix}{self._worker}|{key}"))
            if slot is not None:
                count, stamp = table.get(slot)
                if stamp == self._epoch:
                    table.put(slot, max(0.0, count - 1), self._epoch)
