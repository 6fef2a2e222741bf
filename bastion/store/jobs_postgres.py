"""The ``jobs`` storage domain on PostgreSQL (``PostgresJobs``): see jobs.py for how it works."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bastion.exceptions import AlreadyExists
from bastion.store._access import PostgresAccess
from bastion.store.jobs import (
    _ABANDON,
    _ABANDON_SET,
    _CANCEL,
    _FINISH,
    _FINISH_HELD,
    _FINISH_UNKEPT,
    _FINISHED_AT,
    _GET,
    _INSERT,
    _POSTGRES_CLAIM,
    _PROGRESS,
    _RECOVER,
    _RELEASE,
    _RENEW,
    _SWEEP,
    PENDING_STATES,
    JobRecord,
    JobStore,
    RenewOutcome,
    _check_finished,
    _excess,
    _list_query,
    _numbered,
    _prune_args,
    _record,
    _row,
    _tally,
    own_finish,
)
from bastion.store.jobs_owners import USAGE, bytes_error, prune_sql, result_too_big

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
        "cancel": _CANCEL,
        "sweep": _SWEEP,
        "get": _GET,
        "insert": _INSERT + " ON CONFLICT (id) DO NOTHING RETURNING id",
        "claim": _POSTGRES_CLAIM,
        "delete_owner": "DELETE FROM jobs WHERE owner = ?",
        "reassign_owner": "UPDATE jobs SET owner = ? WHERE id = ANY(?::text[])",
        # Multi-row updates lock their jobs, then the owners' rows in owner order, and only then update:
        # the row trigger keeping job_owners (migration 17) would lock the owners in the jobs' order.
        "expired": "SELECT id, owner FROM jobs WHERE state = 'running' AND lease_until < ? ORDER BY id FOR UPDATE",
        "recover_held": f"UPDATE jobs SET {_ABANDON_SET} WHERE id = ANY(?::text[]) AND state = 'running' "
        "RETURNING state",
        "of_owner": "SELECT id, owner FROM jobs WHERE owner = ? ORDER BY id FOR UPDATE",
        "lock_owners": "SELECT owner FROM job_owners WHERE owner = ANY(?::text[]) ORDER BY owner FOR UPDATE",
        "count": "SELECT count(*) FROM jobs WHERE owner = ? AND state = ANY(?::text[])",
        "lock_owner": "SELECT pg_advisory_xact_lock(hashtext(?))",
        "usage": USAGE,
        "held": _FINISH_HELD + " FOR UPDATE",
        "unkept": _FINISH_UNKEPT,
        "finished_at": _FINISHED_AT,
        "prune": prune_sql(postgres=True, by_bytes=False),
        "prune_bytes": prune_sql(postgres=True, by_bytes=True),
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

    async def jobs_submit(
        self, job: JobRecord, *, max_pending: int | None = None, max_kept: int | None = None,
        max_bytes: int | None = None,
    ) -> bool:  # fmt: skip
        async def insert(conn: Any) -> bool:  # an asyncpg connection
            async with conn.transaction():
                if max_pending is not None or max_bytes is not None:
                    # Concurrent submits of one owner (any replica) take turns until this transaction ends.
                    await conn.execute(_PG["lock_owner"], f"bastion.jobs.pending:{job.owner}")
                if max_pending is not None:
                    pending = await conn.fetchval(_PG["count"], job.owner, list(PENDING_STATES))
                    if pending >= max_pending:
                        return False
                await _pg_prune(conn, job.owner, len(job.args), max_kept, max_bytes)
                if not await conn.fetch(_PG["insert"], *_row(job)):
                    raise AlreadyExists(f"job {job.id!r} exists")  # raised here, the prune is undone
                if max_bytes is not None:
                    used = await conn.fetchval(_PG["usage"], job.owner)
                    if used > max_bytes:
                        raise bytes_error(job.owner, used, max_bytes)
                return True

        return bool(await self._call(insert))

    async def jobs_get(self, job_id: str) -> JobRecord | None:
        rows = await self._jobs_fetch(_PG["get"], job_id)
        return _record(rows[0]) if rows else None

    async def jobs_list(
        self,
        *,
        owner: str | None = None,
        state: str | None = None,
        limit: int = 100,
        after: str | None = None,
        newest_first: bool = False,
    ) -> list[JobRecord]:
        sql, args = _list_query(owner, state, limit, after, newest_first)
        return [_record(r) for r in await self._jobs_fetch(_numbered(sql), *args)]

    async def jobs_count(self, owner: str, states: Sequence[str]) -> int:
        rows = await self._jobs_fetch(_PG["count"], owner, list(states))
        return int(rows[0][0])

    async def jobs_claim(self, runner: str, names: Sequence[str], now: float, lease: float) -> JobRecord | None:
        rows = await self._jobs_fetch(_PG["claim"], runner, now + lease, now, False, list(names))
        return _record(rows[0]) if rows else None

    async def jobs_renew(self, job_id: str, runner: str, lease_until: float) -> RenewOutcome:
        rows = await self._jobs_fetch(_PG["renew"], lease_until, job_id, runner)
        return "lost" if not rows else "cancel" if rows[0][0] else "running"

    async def jobs_progress(self, job_id: str, runner: str, progress: float, message: str) -> bool:
        return bool(await self._jobs_execute(_PG["progress"], progress, message, job_id, runner))

    async def jobs_finish(
        self, job_id: str, runner: str, state: str, *, now: float, result: bytes | None = None,
        error: str | None = None, max_bytes: int | None = None,
    ) -> str | None:  # fmt: skip
        _check_finished(state)
        args = (state, now, result, error, state, job_id, runner)

        async def recorded(conn: Any) -> str | None:  # a retry of a finish that did commit
            row = await conn.fetchrow(_PG["finished_at"], job_id, now)
            return own_finish(row, state, error, result, max_bytes)

        async def finish(conn: Any) -> str | None:
            async with conn.transaction():
                if result is None or max_bytes is None:
                    return state if _affected(await conn.execute(_PG["finish"], *args)) else await recorded(conn)
                # The job's row first, then the pruned ones, then (by the triggers) the owner's.
                owner = await conn.fetchval(_PG["held"], job_id, runner)
                if owner is None:
                    return await recorded(conn)
                await _pg_prune(conn, owner, len(result), None, max_bytes)
                await conn.execute(_PG["finish"], *args)
                if await conn.fetchval(_PG["usage"], owner) > max_bytes:
                    await conn.execute(_PG["unkept"], result_too_big(len(result), max_bytes), job_id)
                    return "failed"
                return state

        ended: str | None = await self._call(finish)
        return ended

    async def jobs_cancel(self, job_id: str, now: float) -> JobRecord | None:
        async def cancel(conn: Any) -> JobRecord | None:
            async with conn.transaction():
                await conn.execute(_PG["cancel"], now, job_id)
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
        async def recover(conn: Any) -> list[Any]:
            async with conn.transaction():
                held = await _lock_in_order(conn, _PG["expired"], now)
                return list(await conn.fetch(_PG["recover_held"], reason, now, held)) if held else []

        return _tally(await self._call(recover))

    async def jobs_sweep(self, before: float) -> int:
        return await self._jobs_execute(_PG["sweep"], before)

    async def jobs_reassign_owner(self, old: str, new: str | None) -> int:
        if new is None:
            return await self._jobs_execute(_PG["delete_owner"], old)

        async def reassign(conn: Any) -> int:
            async with conn.transaction():
                held = await _lock_in_order(conn, _PG["of_owner"], old, also=new)
                return _affected(await conn.execute(_PG["reassign_owner"], new, held)) if held else 0

        return int(await self._call(reassign))


async def _lock_in_order(conn: Any, select: str, *args: Any, also: str | None = None) -> list[str]:
    """Lock the jobs ``select`` names (their ids and owners, ``FOR UPDATE``), then their owners' rows (and
    ``also``'s) in owner order, as a statement trigger would: the ids locked."""
    rows = await conn.fetch(select, *args)
    if rows:
        owners = {str(owner) for _, owner in rows} | ({also} if also is not None else set())
        await conn.execute(_PG["lock_owners"], sorted(owners))
    return [str(job_id) for job_id, _ in rows]


async def _pg_prune(conn: Any, owner: str, size: int, kept: int | None, most: int | None) -> None:
    """Make room for ``size`` more bytes of ``owner`` (see ``jobs_owners``); reads the usage unlocked, so
    the jobs pruned are locked before the owner's row."""
    excess = _excess(await conn.fetchval(_PG["usage"], owner) if most is not None else None, size, most)
    if kept is not None or excess > 0:
        await conn.execute(_PG["prune_bytes" if excess > 0 else "prune"], *_prune_args(owner, kept, excess))
