"""Lifting a user's lockouts in Redis (``auth.unlock_user``): a part of ``RedisLoginLimits`` (throttle_redis.py).

Theory of operation
-------------------

A user's pairs in Redis are keyed ``<prefix>{login}:l:USER|SOURCE`` (a
lockout ``FAILED`` decided, which ``LIMITS`` answers as locked on every
replica) and ``<prefix>{login}:f:USER|SOURCE`` (failures in a row), one of
each per source, and no index names the sources. An admin's unlock is rare,
so it finds them with SCAN (never KEYS: it would block Redis for the whole
keyspace at once) matching ``<prefix>{login}:[fl]:USER|*`` -- a user name
holds no ``|`` (``USER_NAME``), so the match is that user's alone -- a batch
of ``SCAN_COUNT`` keys per round trip, and deletes what it found, with the
user's allowance (``u:USER``) when the password changed or the name went
(``refill``: not for ``auth.unlock_user``, whose password stays the same). SCAN may return a key twice, never misses one
that exists throughout; a failure counted meanwhile (a login racing the
unlock) may survive it, as it would one an instant later.

The failures of the user whose answers were lost (``_unsettled``), which
would be run again and could lock a pair once more, are forgotten first, as
a success forgives its pair's. Those of other replicas are theirs: a pair
one of them locks that way is locked as by a failure after the unlock.
"""

from __future__ import annotations

import re
from typing import Final

from bastion.security.throttle_redis import RedisDown, RedisLoginLimits

__all__ = ["SCAN_COUNT", "unlock_redis"]

#: Keys SCAN looks at per round trip.
SCAN_COUNT: Final = 1000
_BATCH: Final = 500  # keys per DEL
_GLOB = re.compile(r"([\\*?\[\]])")


def _glob(text: str) -> str:
    """``text`` matched literally by a Redis glob pattern."""
    return _GLOB.sub(r"\\\1", text)


async def unlock_redis(limits: RedisLoginLimits, username: str, *, refill: bool = True) -> tuple[set[str], set[str]]:
    """Delete ``username``'s lockouts, failure counts and (``refill``) allowance in Redis; the sources that were
    locked, and every source with a lockout or a count. Raises RedisDown (calling again finishes it)."""
    for failure_id, failure in list(limits._unsettled.items()):
        if failure.username == username:
            del limits._unsettled[failure_id]
    locked: set[str] = set()
    sources: set[str] = set()
    found = [limits.keys(username, "")[2]] if refill else []  # the user's allowance
    try:
        await _scan_and_delete(limits, username, locked, sources, found)
    except limits._gate.errors as exc:
        limits._failed(exc)
        raise RedisDown(str(exc)) from None
    return locked, sources


async def _scan_and_delete(
    limits: RedisLoginLimits, username: str, locked: set[str], sources: set[str], found: list[str]
) -> None:
    gate, client, prefix = limits._gate, limits._gate.client, limits.prefix
    lock_at, fail_at = f"{prefix}l:{username}|", f"{prefix}f:{username}|"
    pattern = f"{_glob(prefix)}[fl]:{_glob(username)}|*"
    cursor: int = 0
    while True:
        cursor, keys = await gate.ask(client.scan(cursor, match=pattern, count=SCAN_COUNT))
        for raw in keys:
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            if key.startswith(lock_at):
                locked.add(key[len(lock_at) :])
                sources.add(key[len(lock_at) :])
            elif key.startswith(fail_at):
                sources.add(key[len(fail_at) :])
            else:
                continue
            found.append(key)
        if not int(cursor):
            break
    for start in range(0, len(found), _BATCH):
        await gate.ask(client.delete(*found[start : start + _BATCH]))
