"""The ``jobs`` storage domain on PostgreSQL (``PostgresJobs``): see jobs.py for how it works."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bastion.exceptions import AlreadyExists
from bastion.store._access import PostgresAccess
from bastion.store.jobs import (
    _ABANDON,
    _CANCEL_QUEUED,
    _CANCEL_RUNNING,
    _FINISH,
    _GET,
    _INSERT,
    _POSTGRES_CLAIM,
    _PROGRESS,
    _PRUNE,
    _RECOVER,
    _RELEASE,
    _RENEW,
    _SWEEP,
    PENDING_STATES,
    JobRecord,
    JobStore,
    RenewOutcome,
    _check_finished,
    _list_query,
    _numbered,
    _record,
    _row,
    _tally,
)

__all__ = ["PostgresJobs"]

_PG = {
    name: _numbered(sql)
    for name, sql in {
        "abandon": _ABANDON,
        "release": _RELEASE,
        "recover": _RECOVER,
        "renew": _RENEW,
        "progress": _PROGRESS,
        "finish": _FINISH,
        "cancel_queued": _CANCEL_QUEUED,
        "cancel_running": _CANCEL_RUNNING,
        "sweep": _SWEEP,
        "get": _GET,
        "insert": _INSERT + " ON CONFLICT (id) DO NOTHING RETURNING id",
        "claim": _POSTGRES_CLAIM,
        "delete_owner": "DELETE FROM jobs WHERE owner = ?",
        "reassign_owner": "UPDATE jobs SET owner = ? WHERE owner = ?",
        "count": "SELECT count(*) FROM jobs WHERE owner = ? AND state = ANY(?::text[])",
        "lock_owner": "SELECT pg_advisory_xact_lock(hashtext(?))",
        "prune": _PRUNE,
    }.items()
}


def _affected(status: str) -> int:
    """Rows changed, from an asyncpg command status such as ``UPDATE 3``."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class PostgresJobs(PostgresAccess, JobStore):
    async def _jobs_fetch(self, sql: str, *args: Any) -> list[Any]:
        return list(await self._call(lambda conn: conn.fetch(sql, *args)))

    async def _jobs_execute(self, sql: str, *args: Any) -> int:
        return _affected(await self._call(lambda conn: conn.execute(sql, *args)))

    async def jobs_submit(self, job: JobRecord, *, max_pending: int | None = None, max_kept: int | None = None) -> bool:
        async def insert(conn: Any) -> list[Any] | None:  # an asyncpg connection
            async with conn.transaction():
                if max_pending is not None:
                    # Concurrent submits of one owner (any replica) take turns until this transaction ends.
                    await conn.execute(_PG["lock_owner"], f"bastion.jobs.pending:{job.owner}")
                    pending = await conn.fetchval(_PG["count"], job.owner, list(PENDING_STATES))
                    if pending >= max_pending:
                        return None
                rows = list(await conn.fetch(_PG["insert"], *_row(job)))
                if rows and max_kept is not None:
                    await conn.execute(_PG["prune"], job.owner, job.owner, max_kept)
                return rows

        rows = await self._call(insert)
        if rows is None:
            return False
        if not rows:
            raise AlreadyExists(f"job {job.id!r} exists")
        return True

    async def jobs_get(self, job_id: str) -> JobRecord | None:
        rows = await self._jobs_fetch(_PG["get"], job_id)
        return _record(rows[0]) if rows else None

    async def jobs_list(
        self, *, owner: str | None = None, state: str | None = None, limit: int = 100, after: str | None = None
    ) -> list[JobRecord]:
        sql, args = _list_query(owner, state, limit, after)
        return [_record(r) for r in await self._jobs_fetch(_numbered(sql), *args)]

    async def jobs_count(self, owner: str, states: Sequence[str]) -> int:
        rows = await self._jobs_fetch(_PG["count"], owner, list(states))
        return int(rows[0][0])

    async def jobs_claim(self, runner: str, names: Sequence[str], now: float, lease: float) -> JobRecord | None:
        rows = await self._jobs_fetch(_PG["claim"], runner, now + lease, now, False, list(names), now)
        return _record(rows[0]) if rows else None

    async def jobs_renew(self, job_id: str, runner: str, lease_until: float) -> RenewOutcome:
        rows = await self._jobs_fetch(_PG["renew"], lease_until, job_id, runner)
        return "lost" if not rows else "cancel" if rows[0][0] else "running"

    async def jobs_progress(self, job_id: str, runner: str, progress: float, message: str) -> bool:
        return bool(await self._jobs_execute(_PG["progress"], progress, message, job_id, runner))

    async def jobs_finish(
        self, job_id: str, runner: str, state: str, *, now: float, result: bytes | None = None, error: str | None = None
    ) -> bool:
        _check_finished(state)
        return bool(await self._jobs_execute(_PG["finish"], state, now, result, error, state, job_id, runner))

    async def jobs_cancel(self, job_id: str, now: float) -> JobRecord | None:
        async def cancel(conn: Any) -> JobRecord | None:
            async with conn.transaction():
                if not _affected(await conn.execute(_PG["cancel_queued"], now, job_id)):
                    await conn.execute(_PG["cancel_running"], True, job_id)
                row = await conn.fetchrow(_PG["get"], job_id)
            return None if row is None else _record(row)

        result: JobRecord | None = await self._call(cancel)
        return result

    async def jobs_release(self, job_id: str, runner: str, now: float) -> bool:
        return bool(await self._jobs_execute(_PG["release"], now, job_id, runner))

    async def jobs_abandon(self, job_id: str, runner: str, reason: str, now: float) -> str | None:
        rows = await self._jobs_fetch(_PG["abandon"], reason, now, job_id, runner)
        return str(rows[0][0]) if rows else None

    async def jobs_recover(self, now: float, reason: str) -> dict[str, int]:
        return _tally(await self._jobs_fetch(_PG["recover"], reason, now, now))

    async def jobs_sweep(self, before: float) -> int:
        return await self._jobs_execute(_PG["sweep"], before)

    async def jobs_reassign_owner(self, old: str, new: str | None) -> int:
        if new is None:
            return await self._jobs_execute(_PG["delete_owner"], old)
        return await self._jobs_execute(_PG["reassign_owner"], new, old)
