"""The ``jobs`` storage domain: the durable queue, leases and results.

Theory of operation
-------------------

One row per job, in one of five states::

    queued ──claim──> running ──finish──> succeeded | failed | cancelled
      │                  │
      └─cancel─> cancelled   └─lease expired / abandoned─> queued (retryable, attempts left)
                                                         or failed ("runner lost …")

A runner *claims* a queued job whose name it can run, in one statement
that also sets ``runner`` and ``lease_until`` (SQLite: a single ``UPDATE …
WHERE id = (SELECT … LIMIT 1) RETURNING`` inside one write; PostgreSQL: the
inner select takes ``FOR UPDATE SKIP LOCKED``, so replicas sharing the table
never claim the same row and never wait on each other). Which job: the
oldest of the owner with the fewest jobs running, then the least recently
served -- fair between users, FIFO within one (bastion/store/jobs_owners.py).
While the job runs, the runner renews the lease; every later write of the
runner (progress, finish) names the runner and changes nothing if the row
is no longer its own, so a runner that lost its lease cannot overwrite what
another runner or a recovery decided.

Recovery turns every ``running`` row whose lease has expired (its runner
died: the server was killed) into ``queued`` again when the job is retryable
and has attempts left, into ``cancelled`` when a cancel was pending, and
otherwise into ``failed`` with the reason given. No row ever leaves the
table except through the retention sweep (finished jobs only) or
``jobs_reassign_owner(…, None)``, or a submit or a finish that keeps only
its owner's newest ``max_kept`` jobs and ``max_bytes`` bytes (deleting
older finished ones): a job never silently vanishes.

Cancelling a queued job finishes it at once; cancelling a running one sets
``cancel_requested``, which the runner holding it sees when it renews its
lease (or at once, when the cancel arrives at the same server) and answers
by killing the job's process and finishing it ``cancelled``.
"""

from __future__ import annotations

import json
import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from bastion.exceptions import AlreadyExists
from bastion.store._access import SQLiteAccess
from bastion.store.jobs_owners import NEXT_TURN, SERVED, USAGE, bytes_error, prune_sql, result_too_big

__all__ = [
    "FINISHED_STATES",
    "JOB_STATES",
    "POSTGRES_SCHEMA",
    "SQLITE_SCHEMA",
    "JobRecord",
    "JobStore",
    "RenewOutcome",
    "SQLiteJobs",
]

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED_STATES = ("succeeded", "failed", "cancelled")
#: The states that count against ``max_pending``.
PENDING_STATES = ("queued", "running")
RenewOutcome = Literal["running", "cancel", "lost"]


class JobRecord(msgspec.Struct, frozen=True):
    """One job as stored. ``args`` and ``result`` are MessagePack; times are UNIX seconds."""

    id: str
    owner: str
    name: str
    args: bytes
    state: str = "queued"
    retryable: bool = False
    attempts: int = 0
    max_attempts: int = 1
    timeout: float = 3600.0
    memory_mb: int = 1024
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    progress: float = 0.0
    message: str = ""
    result: bytes | None = None
    error: str | None = None
    runner: str | None = None
    lease_until: float | None = None
    cancel_requested: bool = False

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


_COLUMNS = (
    "id, owner, name, args, state, retryable, attempts, max_attempts, timeout, memory_mb, created_at, "
    "started_at, finished_at, progress, message, result, error, runner, lease_until, cancel_requested"
)

_TABLE = """CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,             -- time-ordered: listing by id lists by age
    owner            TEXT NOT NULL,
    name             TEXT NOT NULL,
    args             {blob} NOT NULL,              -- MessagePack, validated against the job's hints
    state            TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    retryable        {bool} NOT NULL,
    attempts         INTEGER NOT NULL,
    max_attempts     INTEGER NOT NULL,
    timeout          {real} NOT NULL,
    memory_mb        INTEGER NOT NULL,
    created_at       {real} NOT NULL,
    started_at       {real},
    finished_at      {real},
    progress         {real} NOT NULL,
    message          TEXT NOT NULL,
    result           {blob},
    error            TEXT,
    runner           TEXT,
    lease_until      {real},
    cancel_requested {bool} NOT NULL
)"""

_INDEXES = (
    "CREATE INDEX jobs_queue ON jobs (state, id)",
    "CREATE INDEX jobs_by_owner ON jobs (owner, id)",
    "CREATE INDEX jobs_finished ON jobs (finished_at)",
)

# Schema migration statements of this domain (its migration version is fixed in migrations.py).
SQLITE_SCHEMA: tuple[str, ...] = (_TABLE.format(blob="BLOB", bool="INTEGER", real="REAL"), *_INDEXES)
POSTGRES_SCHEMA: tuple[str, ...] = (
    _TABLE.format(blob="BYTEA", bool="BOOLEAN", real="DOUBLE PRECISION"),
    *_INDEXES,
)


class JobStore(ABC):
    """What every backend offers for jobs (see the module docstring for the state machine)."""

    @abstractmethod
    async def jobs_submit(
        self, job: JobRecord, *, max_pending: int | None = None, max_kept: int | None = None,
        max_bytes: int | None = None,
    ) -> bool:  # fmt: skip
        """Insert a new job; ``AlreadyExists`` if its id is taken.

        ``max_pending``: only if its owner has fewer jobs queued or running,
        counted in the same transaction, so concurrent submits cannot overshoot
        (False: at the limit, nothing inserted).
        ``max_kept``: also delete the owner's finished jobs older than their
        newest ``max_kept`` jobs (the new one included), so one user's history is bounded.
        ``max_bytes``: also delete the owner's oldest finished jobs until their jobs' arguments and
        results, the new one's included, fit in ``max_bytes``; ``ResourceExhausted`` (nothing
        inserted or deleted) if they do not fit even so.
        """

    @abstractmethod
    async def jobs_get(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    async def jobs_list(
        self,
        *,
        owner: str | None = None,
        state: str | None = None,
        limit: int = 100,
        after: str | None = None,
        newest_first: bool = False,
    ) -> list[JobRecord]:
        """Jobs by id (oldest first), of ``owner`` (every owner if None), in ``state``, ids after ``after``;
        ``newest_first``: by id from the newest, ids before ``after`` (the last id seen either way)."""

    @abstractmethod
    async def jobs_count(self, owner: str, states: Sequence[str]) -> int:
        """How many jobs ``owner`` has in any of ``states``."""

    @abstractmethod
    async def jobs_claim(self, runner: str, names: Sequence[str], now: float, lease: float) -> JobRecord | None:
        """Take a queued job named in ``names`` -- the oldest of the owner with the fewest jobs running, then
        the least recently served -- running, held by ``runner`` until ``now + lease``."""

    @abstractmethod
    async def jobs_renew(self, job_id: str, runner: str, lease_until: float) -> RenewOutcome:
        """Extend the lease: "running", "cancel" (a cancel is pending) or "lost" (no longer ours)."""

    @abstractmethod
    async def jobs_progress(self, job_id: str, runner: str, progress: float, message: str) -> bool:
        """Record progress of a job ``runner`` holds; False if it no longer does."""

    @abstractmethod
    async def jobs_finish(
        self, job_id: str, runner: str, state: str, *, now: float, result: bytes | None = None,
        error: str | None = None, max_bytes: int | None = None,
    ) -> str | None:  # fmt: skip
        """End a job ``runner`` holds in ``state`` (a finished state); the state it ended in, or None if
        ``runner`` no longer held it.

        ``max_bytes``: make room for ``result`` as a submit does; a result that does not fit even so is
        not kept, and the job ends failed, saying why (the state returned is then ``failed``)."""

    @abstractmethod
    async def jobs_cancel(self, job_id: str, now: float) -> JobRecord | None:
        """Queued: cancelled now; running: cancel requested; finished: unchanged. The row after, or None."""

    @abstractmethod
    async def jobs_release(self, job_id: str, runner: str, now: float) -> bool:
        """Put back a job ``runner`` claimed but never started: queued, as before the claim (cancelled at
        ``now`` if a cancel was asked meanwhile); False if it did not hold it."""

    @abstractmethod
    async def jobs_abandon(self, job_id: str, runner: str, reason: str, now: float) -> str | None:
        """Give back a job ``runner`` holds (re-queued if retryable with attempts left, else failed
        with ``reason``); the new state, or None if it did not hold it."""

    @abstractmethod
    async def jobs_recover(self, now: float, reason: str) -> dict[str, int]:
        """Abandon every running job whose lease expired before ``now``; how many went to each state."""

    @abstractmethod
    async def jobs_sweep(self, before: float) -> int:
        """Delete finished jobs that finished before ``before``; how many."""

    @abstractmethod
    async def jobs_reassign_owner(self, old: str, new: str | None) -> int:
        """Hand every job of ``old`` to ``new``, or delete them when ``new`` is None; how many."""


# -- SQL shared by both dialects (written with ?, numbered for PostgreSQL) -----------------

_RETRY = "(retryable AND attempts < max_attempts AND NOT cancel_requested)"
_ABANDON_SET = f"""state = CASE WHEN cancel_requested THEN 'cancelled' WHEN {_RETRY} THEN 'queued' ELSE 'failed' END,
    error = CASE WHEN cancel_requested THEN 'cancelled (its runner was lost)' WHEN {_RETRY} THEN NULL ELSE ?t END,
    finished_at = CASE WHEN {_RETRY} THEN NULL ELSE ?f END,
    message = CASE WHEN {_RETRY} THEN 'queued again: its runner was lost' ELSE message END,
    runner = NULL, lease_until = NULL"""
_ABANDON = f"UPDATE jobs SET {_ABANDON_SET} WHERE id = ? AND runner = ? AND state = 'running' RETURNING state"
_RECOVER = f"UPDATE jobs SET {_ABANDON_SET} WHERE state = 'running' AND lease_until < ? RETURNING state"
_RENEW = "UPDATE jobs SET lease_until = ? WHERE id = ? AND runner = ? AND state = 'running' RETURNING cancel_requested"
_PROGRESS = "UPDATE jobs SET progress = ?, message = ? WHERE id = ? AND runner = ? AND state = 'running'"
_FINISH = (
    "UPDATE jobs SET state = ?, finished_at = ?, result = ?, error = ?, runner = NULL, lease_until = NULL, "
    "progress = CASE WHEN ?t = 'succeeded' THEN 1.0 ELSE progress END "
    "WHERE id = ? AND runner = ? AND state = 'running'"
)
# Queued: cancelled now; running: cancel requested. One statement, deciding on the row as it is when
# locked: as two ("if queued", then "if running"), a job given back to the queue between them (a release,
# a recovery) was seen running by the first and queued by the second, and the cancel was lost.
_CANCEL = (
    "UPDATE jobs SET state = CASE WHEN state = 'queued' THEN 'cancelled' ELSE state END, "
    "finished_at = CASE WHEN state = 'queued' THEN ?f ELSE finished_at END, "
    "error = CASE WHEN state = 'queued' THEN 'cancelled before it ran' ELSE error END, "
    "cancel_requested = (state = 'running' OR cancel_requested) "
    "WHERE id = ? AND state IN ('queued', 'running')"
)
# A cancel asked since the claim is kept: the job is then cancelled (before it ran), not queued to run.
_RELEASE = (
    "UPDATE jobs SET state = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END, "
    "finished_at = CASE WHEN cancel_requested THEN ?f ELSE NULL END, "
    "error = CASE WHEN cancel_requested THEN 'cancelled before it ran' ELSE error END, "
    "runner = NULL, lease_until = NULL, started_at = NULL, attempts = attempts - 1 "
    "WHERE id = ? AND runner = ? AND state = 'running'"
)
_SWEEP = "DELETE FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at < ?"
_COUNT = "SELECT count(*) FROM jobs WHERE owner = ? AND state IN ({})"
_GET = f"SELECT {_COLUMNS} FROM jobs WHERE id = ?"
_INSERT = f"INSERT INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * 20)})"
_CLAIM_SET = (
    "state = 'running', runner = ?, lease_until = ?, started_at = ?, attempts = attempts + 1, "
    "cancel_requested = ?, progress = 0.0"
)
# Owners in the order they are served (the index job_owners_waiting), each one's oldest runnable job:
# the first owner who has one is served. SQLite evaluates the head of each owner in turn, in that order.
_OWNERS_IN_TURN = "FROM job_owners AS o WHERE o.queued > 0 {} ORDER BY o.running, o.served, o.owner"
_SQLITE_CLAIM = (
    f"UPDATE jobs SET {_CLAIM_SET} WHERE id = (SELECT (SELECT j.id FROM jobs AS j WHERE j.owner = o.owner "
    "AND j.state = 'queued' AND j.name IN (SELECT value FROM json_each(?)) ORDER BY j.id LIMIT 1) AS head "
    f"{_OWNERS_IN_TURN.format('AND head IS NOT NULL')} LIMIT 1) RETURNING {_COLUMNS}"
)
# PostgreSQL: the nested loop pulls owners in turn and stops at the first row, so only the job taken is
# locked (an owner whose runnable jobs are all being claimed by others is passed over, not waited for).
_POSTGRES_CLAIM = (
    f"WITH taken AS (UPDATE jobs SET {_CLAIM_SET} WHERE id = (SELECT head.id FROM (SELECT o.owner "
    f"{_OWNERS_IN_TURN.format('')}) AS turn CROSS JOIN LATERAL (SELECT j.id FROM jobs AS j WHERE j.owner = "
    "turn.owner AND j.state = 'queued' AND j.name = ANY(?::text[]) ORDER BY j.id LIMIT 1 FOR UPDATE SKIP LOCKED) "
    f"AS head LIMIT 1) RETURNING {_COLUMNS}), served AS (UPDATE job_owners SET served = {NEXT_TURN} "
    f"WHERE owner = (SELECT owner FROM taken)) SELECT {_COLUMNS} FROM taken"
)
_FINISH_HELD = "SELECT owner FROM jobs WHERE id = ? AND runner = ? AND state = 'running'"
# A result that did not fit: the job fails instead (parameters: error, id).
_FINISH_UNKEPT = "UPDATE jobs SET state = 'failed', result = NULL, error = ? WHERE id = ?"
# A finish not held (any more): how the job ended at exactly that time, if it did (parameters: id, now).
_FINISHED_AT = "SELECT state, error FROM jobs WHERE id = ? AND finished_at = ? AND runner IS NULL"


_CASTS = {"": "", "t": "::text", "f": "::double precision"}


def _numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2 …`` (``?t``/``?f``: typed text/double, where
    PostgreSQL cannot infer a parameter's type)."""
    counter = iter(range(1, 1000))
    return re.sub(r"\?([tf]?)", lambda m: f"${next(counter)}{_CASTS[m[1]]}", sql)


def _qmarks(sql: str) -> str:
    """The same statement for SQLite: typed placeholders are plain ``?``."""
    return re.sub(r"\?[tf]", "?", sql)


_SQ = {
    "_RELEASE": _qmarks(_RELEASE),
    "_ABANDON": _qmarks(_ABANDON),
    "_RECOVER": _qmarks(_RECOVER),
    "_FINISH": _qmarks(_FINISH),
    "_CANCEL": _qmarks(_CANCEL),
}


def _row(job: JobRecord) -> tuple[Any, ...]:
    return tuple(getattr(job, field) for field in JobRecord.__struct_fields__)


def _record(row: Sequence[Any]) -> JobRecord:
    values = list(row)
    for index in (5, 19):  # retryable, cancel_requested: 0/1 in SQLite
        values[index] = bool(values[index])
    for index in (3, 15):  # args, result: memoryview/bytes
        if values[index] is not None:
            values[index] = bytes(values[index])
    return JobRecord(*values)


def _list_query(
    owner: str | None, state: str | None, limit: int, after: str | None, newest_first: bool = False
) -> tuple[str, list[Any]]:
    """A page of jobs by id, the unique key a cursor needs; newest first reads the same index (the primary
    key, jobs_by_owner or jobs_queue) backwards, so neither order sorts."""
    clauses: list[str] = []
    args: list[Any] = []
    cursor = "id < ?" if newest_first else "id > ?"
    for clause, value in (("owner = ?", owner), ("state = ?", state), (cursor, after)):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
    args.append(max(0, limit))
    return f"SELECT {_COLUMNS} FROM jobs {where}ORDER BY id{' DESC' if newest_first else ''} LIMIT ?", args


def _tally(states: Sequence[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for (state,) in states:
        out[str(state)] = out.get(str(state), 0) + 1
    return out


def _prune_args(owner: str, max_kept: int | None, excess: int) -> tuple[Any, ...]:
    """Parameters of ``prune_sql``: keep the newest ``max_kept`` - 1 others (None: every one) and free
    ``excess`` bytes (none if not positive)."""
    kept = (owner, owner, (max_kept if max_kept is not None else 2**62) - 1)
    return (*kept, owner, excess) if excess > 0 else kept


def _excess(used: Any, size: int, max_bytes: int | None) -> int:
    return 0 if max_bytes is None else int(used or 0) + size - max_bytes


def _sqlite_prune(conn: sqlite3.Connection, owner: str, size: int, kept: int | None, most: int | None) -> None:
    """Make room for ``size`` more bytes of ``owner`` (see ``jobs_owners``)."""
    used = conn.execute(USAGE, (owner,)).fetchone() if most is not None else None
    excess = _excess(used and used[0], size, most)
    if kept is not None or excess > 0:
        conn.execute(prune_sql(postgres=False, by_bytes=excess > 0), _prune_args(owner, kept, excess))


class SQLiteJobs(SQLiteAccess, JobStore):
    async def jobs_submit(
        self, job: JobRecord, *, max_pending: int | None = None, max_kept: int | None = None,
        max_bytes: int | None = None,
    ) -> bool:  # fmt: skip
        def insert(conn: sqlite3.Connection) -> bool:
            # The writer runs one write at a time: the count cannot change before the insert.
            if max_pending is not None:
                (pending,) = conn.execute(_COUNT.format("?, ?"), (job.owner, *PENDING_STATES)).fetchone()
                if pending >= max_pending:
                    return False
            _sqlite_prune(conn, job.owner, len(job.args), max_kept, max_bytes)
            try:
                conn.execute(_INSERT, _sqlite_row(job))
            except sqlite3.IntegrityError as exc:
                if exc.sqlite_errorname not in _TAKEN:  # a CHECK or NOT NULL refused: no conflict, a bug
                    raise
                raise AlreadyExists(f"job {job.id!r} exists") from exc
            if max_bytes is not None:
                (used,) = conn.execute(USAGE, (job.owner,)).fetchone()
                if used > max_bytes:
                    raise bytes_error(job.owner, used, max_bytes)  # the write, prune included, is undone
            return True

        return await self._write(insert)

    async def jobs_get(self, job_id: str) -> JobRecord | None:
        row = await self._read(lambda c: c.execute(_GET, (job_id,)).fetchone())
        return None if row is None else _record(row)

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
        return [_record(r) for r in await self._read(lambda c: c.execute(sql, args).fetchall())]

    async def jobs_count(self, owner: str, states: Sequence[str]) -> int:
        sql = _COUNT.format(", ".join("?" * len(states)))
        row = await self._read(lambda c: c.execute(sql, (owner, *states)).fetchone())
        return int(row[0])

    async def jobs_claim(self, runner: str, names: Sequence[str], now: float, lease: float) -> JobRecord | None:
        args = (runner, now + lease, now, 0, json.dumps(list(names)))

        def claim(conn: sqlite3.Connection) -> Any:
            row = conn.execute(_SQLITE_CLAIM, args).fetchone()
            if row is not None:
                conn.execute(SERVED, (row[1],))
            return row

        row = await self._write(claim)
        return None if row is None else _record(row)

    async def jobs_renew(self, job_id: str, runner: str, lease_until: float) -> RenewOutcome:
        row = await self._write(lambda c: c.execute(_RENEW, (lease_until, job_id, runner)).fetchone())
        return "lost" if row is None else "cancel" if row[0] else "running"

    async def jobs_progress(self, job_id: str, runner: str, progress: float, message: str) -> bool:
        args = (progress, message, job_id, runner)
        return bool(await self._write(lambda c: c.execute(_PROGRESS, args).rowcount))

    async def jobs_finish(
        self, job_id: str, runner: str, state: str, *, now: float, result: bytes | None = None,
        error: str | None = None, max_bytes: int | None = None,
    ) -> str | None:  # fmt: skip
        _check_finished(state)
        args = (state, now, result, error, state, job_id, runner)

        def recorded(conn: sqlite3.Connection) -> str | None:  # a retry of a finish that did commit
            row = conn.execute(_FINISHED_AT, (job_id, now)).fetchone()
            return own_finish(row, state, error, result, max_bytes)

        if result is None or max_bytes is None:
            return await self._write(lambda c: state if c.execute(_SQ["_FINISH"], args).rowcount else recorded(c))

        def finish(conn: sqlite3.Connection) -> str | None:
            held = conn.execute(_FINISH_HELD, (job_id, runner)).fetchone()
            if held is None:
                return recorded(conn)
            _sqlite_prune(conn, held[0], len(result), None, max_bytes)
            conn.execute(_SQ["_FINISH"], args)
            (used,) = conn.execute(USAGE, (held[0],)).fetchone()
            if used > max_bytes:
                conn.execute(_FINISH_UNKEPT, (result_too_big(len(result), max_bytes), job_id))
                return "failed"
            return state

        return await self._write(finish)

    async def jobs_cancel(self, job_id: str, now: float) -> JobRecord | None:
        def cancel(conn: sqlite3.Connection) -> JobRecord | None:
            conn.execute(_SQ["_CANCEL"], (now, job_id))
            row = conn.execute(_GET, (job_id,)).fetchone()
            return None if row is None else _record(row)

        return await self._write(cancel)

    async def jobs_release(self, job_id: str, runner: str, now: float) -> bool:
        return bool(await self._write(lambda c: c.execute(_SQ["_RELEASE"], (now, job_id, runner)).rowcount))

    async def jobs_abandon(self, job_id: str, runner: str, reason: str, now: float) -> str | None:
        row = await self._write(lambda c: c.execute(_SQ["_ABANDON"], (reason, now, job_id, runner)).fetchone())
        return None if row is None else str(row[0])

    async def jobs_recover(self, now: float, reason: str) -> dict[str, int]:
        return _tally(await self._write(lambda c: c.execute(_SQ["_RECOVER"], (reason, now, now)).fetchall()))

    async def jobs_sweep(self, before: float) -> int:
        return int(await self._write(lambda c: c.execute(_SWEEP, (before,)).rowcount))

    async def jobs_reassign_owner(self, old: str, new: str | None) -> int:
        if new is None:
            return int(await self._write(lambda c: c.execute("DELETE FROM jobs WHERE owner = ?", (old,)).rowcount))
        sql = "UPDATE jobs SET owner = ? WHERE owner = ?"
        return int(await self._write(lambda c: c.execute(sql, (new, old)).rowcount))


# SQLite's names for the constraint errors of an id already taken (its primary key is a unique index).
_TAKEN = frozenset({"SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"})


def _sqlite_row(job: JobRecord) -> tuple[Any, ...]:
    row = list(_row(job))
    row[5], row[19] = int(job.retryable), int(job.cancel_requested)
    return tuple(row)


def own_finish(row: Any, state: str, error: str | None, result: bytes | None, max_bytes: int | None) -> str | None:
    """The state a finish recorded, if ``row`` (state, error of the job finished at the finish's time) is
    what this very finish would have written: its retry, after a write that committed but whose answer was
    lost (the connection dropped), is told what it recorded rather than that the job was not held."""
    if row is None:
        return None
    if (row[0], row[1]) == (state, error):
        return state
    if (
        result is not None
        and max_bytes is not None
        and (row[0], row[1]) == ("failed", result_too_big(len(result), max_bytes))
    ):
        return "failed"
    return None


def _check_finished(state: str) -> None:
    if state not in FINISHED_STATES:
        raise ValueError(f"a job finishes succeeded, failed or cancelled, not {state!r}")
