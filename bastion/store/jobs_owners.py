"""Each owner's share of the job queue: fair claims and the bound on the bytes one user's jobs hold.

Theory of operation
-------------------

``job_owners`` keeps, per owner, how many of their jobs are queued and
running, how many bytes their jobs hold (arguments and results, as stored),
and when one of their jobs was last claimed (``served``). Triggers keep the
counts whoever writes -- code of the previous schema version included -- so
the table never drifts from ``jobs``; a claim sets ``served`` itself, to one
more than the highest ``served`` of anyone: a turn counter, not a clock, so
a replica whose clock runs ahead cannot send the owners it serves to the
back of the line for as long as it is ahead. A row lasts as long as its
owner has jobs: the write that leaves them nothing queued or running and no
bytes deletes it, so the table holds the owners with jobs, not everyone who
ever submitted one. A new row (a first job, jobs handed to a new owner, an
owner back after their row went) takes the next turn too, as if just
served: it waits behind every owner already waiting, so neither handing
jobs over nor letting one's row go jumps the queue (migration 17; rows
from before it that were never served keep a negative ``served``, their
first submission's time less 2**40, below every turn).

Fairness: a claim walks the owners who have jobs queued, those with the
fewest jobs running first, then the least recently served (new owners in
the order they came), and takes the
oldest queued job (one this runner can run) of the first of them. So one
user who queues a thousand jobs takes turns with everyone else instead of
making them wait behind all thousand, and each user's own jobs still run in
the order they were submitted. With several runners claiming at once
(PostgreSQL replicas) the choice is made from a snapshot: two claims at the
same instant may both serve the same owner, but never the same job (the
job's row is taken ``FOR UPDATE SKIP LOCKED``).

Bytes: a submit first deletes the submitter's oldest finished jobs until
the new job's arguments fit in ``max_bytes`` (as it already deleted those
past their newest ``max_kept``, in the same statement), and is refused
(``ResourceExhausted``) when they do not fit even so: the queued and running
jobs' arguments alone are too many bytes. A result is made room for the same
way when its job finishes; one that cannot fit is not kept, and the job
fails saying so. The check is made after the write, in its transaction,
against the owner's row the triggers just updated, so concurrent writers on
any replica cannot overshoot together.

On PostgreSQL the insert and delete triggers are statement-level, over
transition tables: a statement that inserts or deletes many jobs (a sweep,
a prune) locks the owners' rows once each, in owner order, after the jobs'
rows. The update trigger is a row trigger (migration 17): a statement
trigger over transition tables cannot name columns, so it ran on every
update of a job, lease renewals and progress reports included; a row
trigger runs only for updates naming ``owner``, ``state``, ``args`` or
``result``, and only for rows whose owner, state or size changed. The
updates of many jobs (a recovery, a reassignment) lock their jobs, then
the owners' rows in owner order, before updating (jobs_postgres.py), so
the row trigger's locks are already held, in the same order as ever. A
write that prunes locks the jobs it deletes before any owner row, which
keeps it from deadlocking with a sweep deleting the same jobs.
"""

from __future__ import annotations

from bastion.exceptions import ResourceExhausted

__all__ = [
    "NEXT_TURN",
    "OWNERS_V17",
    "POSTGRES_OWNERS_SCHEMA",
    "POSTGRES_OWNERS_V17",
    "SERVED",
    "SQLITE_OWNERS_SCHEMA",
    "SQLITE_OWNERS_V17",
    "USAGE",
    "bytes_error",
    "prune_sql",
    "result_too_big",
]

# -- Migration 14: the table, its indexes and the triggers that keep it ---------------------

_OWNERS_TABLE = """CREATE TABLE job_owners (
    owner   TEXT{collate} PRIMARY KEY,
    queued  {int} NOT NULL,     -- the owner's jobs in each state, kept by triggers whoever writes
    running {int} NOT NULL,
    bytes   {int} NOT NULL,     -- arguments and results of all the owner's jobs, as stored
    served  {real} NOT NULL     -- the turn a job of the owner was last claimed in (never: negative, see _NEW)
)"""
_OWNERS_INDEXES = (
    # Claims walk the owners waiting for a slot in the order they are served in, then each owner's queue.
    "CREATE INDEX job_owners_waiting ON job_owners (running, served, owner) WHERE queued > 0",
    "CREATE INDEX job_owners_served ON job_owners (served)",  # the last turn, for the next
    "CREATE INDEX jobs_queued_by_owner ON jobs (owner, id) WHERE state = 'queued'",
)
# An owner never served comes before every owner served so far, in the order they first submitted: their
# ``served`` is their first submission's time less this (2**40), below every turn (turns count up from 1).
_NEW = "1099511627776"
_SQLITE_SIZE = "length({0}.args) + coalesce(length({0}.result), 0)"
_SQLITE_ADD = (
    "INSERT INTO job_owners (owner, queued, running, bytes, served) VALUES "
    "({0}.owner, {0}.state = 'queued', {0}.state = 'running', " + _SQLITE_SIZE + ", {0}.created_at - " + _NEW + ") "
    "ON CONFLICT (owner) DO UPDATE SET queued = queued + excluded.queued, running = running + excluded.running, "
    "bytes = bytes + excluded.bytes;"
)
_SQLITE_SUBTRACT = (
    "UPDATE job_owners SET queued = queued - ({0}.state = 'queued'), running = running - ({0}.state = 'running'), "
    "bytes = bytes - (" + _SQLITE_SIZE + ") WHERE owner = {0}.owner;"
)
SQLITE_OWNERS_SCHEMA: tuple[str, ...] = (
    _OWNERS_TABLE.format(collate="", int="INTEGER", real="REAL") + " WITHOUT ROWID",
    *_OWNERS_INDEXES,
    f"CREATE TRIGGER job_owners_insert AFTER INSERT ON jobs BEGIN {_SQLITE_ADD.format('NEW')} END",
    f"CREATE TRIGGER job_owners_delete AFTER DELETE ON jobs BEGIN {_SQLITE_SUBTRACT.format('OLD')} END",
    # Renewals and progress do not name these columns: they do not fire it.
    "CREATE TRIGGER job_owners_update AFTER UPDATE OF owner, state, args, result ON jobs BEGIN "
    f"{_SQLITE_SUBTRACT.format('OLD')} {_SQLITE_ADD.format('NEW')} END",
    "INSERT INTO job_owners (owner, queued, running, bytes, served) SELECT owner, sum(state = 'queued'), "
    f"sum(state = 'running'), sum({_SQLITE_SIZE.format('jobs')}), min(created_at) - {_NEW} FROM jobs GROUP BY owner",
)

# PostgreSQL: statement-level triggers over transition tables, so a statement that changes many jobs
# (a sweep, a prune, a reassignment) locks each owner's row once, after the jobs' rows, in owner order:
# two such statements cannot deadlock over the owners' rows.
_PG_DELTA = (
    "SELECT owner, (state = 'queued')::int * {1} AS queued, (state = 'running')::int * {1} AS running, "
    "(octet_length(args) + coalesce(octet_length(result), 0)) * {1} AS bytes, created_at FROM {0}"
)
_PG_APPLY = """INSERT INTO job_owners AS o (owner, queued, running, bytes, served)
            SELECT owner, sum(queued), sum(running), sum(bytes), min(created_at) - {1} FROM ({0}) AS delta
            GROUP BY owner HAVING sum(queued) <> 0 OR sum(running) <> 0 OR sum(bytes) <> 0 ORDER BY owner
            ON CONFLICT (owner) DO UPDATE SET queued = o.queued + excluded.queued,
                running = o.running + excluded.running, bytes = o.bytes + excluded.bytes;"""
POSTGRES_OWNERS_SCHEMA: tuple[str, ...] = (
    _OWNERS_TABLE.format(collate=' COLLATE "C"', int="BIGINT", real="DOUBLE PRECISION"),
    *_OWNERS_INDEXES,
    f"""CREATE FUNCTION job_owners_track() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            {_PG_APPLY.format(_PG_DELTA.format("new_jobs", 1), _NEW)}
        ELSIF TG_OP = 'DELETE' THEN
            {_PG_APPLY.format(_PG_DELTA.format("old_jobs", -1), _NEW)}
        ELSE
            {_PG_APPLY.format(_PG_DELTA.format("new_jobs", 1) + " UNION ALL " + _PG_DELTA.format("old_jobs", -1), _NEW)}
        END IF;
        RETURN NULL;
    END $$""",
    # Created before the backfill: it locks jobs against writers until the migration commits.
    "CREATE TRIGGER job_owners_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_jobs "
    "FOR EACH STATEMENT EXECUTE FUNCTION job_owners_track()",
    "CREATE TRIGGER job_owners_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_jobs "
    "FOR EACH STATEMENT EXECUTE FUNCTION job_owners_track()",
    "CREATE TRIGGER job_owners_update AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs "
    "FOR EACH STATEMENT EXECUTE FUNCTION job_owners_track()",
    "INSERT INTO job_owners (owner, queued, running, bytes, served) SELECT owner, count(*) FILTER "
    "(WHERE state = 'queued'), count(*) FILTER (WHERE state = 'running'), "
    f"sum(octet_length(args) + coalesce(octet_length(result), 0)), min(created_at) - {_NEW} FROM jobs GROUP BY owner",
)

# -- Migration 17: an owner with no jobs left leaves the table; a new row waits its turn ------------
#
# A row stayed, all zeros, once its owner's last job was gone (a deleted user, swept or pruned jobs): the
# table grew with everyone who ever submitted. The triggers now delete a row the write that empties it
# leaves with nothing queued or running and no bytes; the owner's next job makes it again.
#
# A new row started "never served", ahead of every owner waiting: jobs handed to another user, or those
# of a user whose row had gone, jumped the queue. A new row now takes the next turn, as a claim does: it
# waits behind everyone already waiting, new owners in the order they came.
_SQLITE_NEXT = "(SELECT max(coalesce(max(served), 0), 0) + 1 FROM job_owners)"
_SQLITE_ADD_V17 = _SQLITE_ADD.replace("{0}.created_at - " + _NEW, _SQLITE_NEXT)

#: The next turn (PostgreSQL).
NEXT_TURN = "(SELECT greatest(max(served), 0) + 1 FROM job_owners)"
OWNERS_V17 = "jobs: an owner with no jobs left leaves job_owners"
_EMPTY = "queued = 0 AND running = 0 AND bytes = 0"
_SQLITE_FORGET = "DELETE FROM job_owners WHERE owner = {0}.owner AND " + _EMPTY + ";"
SQLITE_OWNERS_V17: tuple[str, ...] = (
    "DROP TRIGGER job_owners_insert",
    "DROP TRIGGER job_owners_delete",
    "DROP TRIGGER job_owners_update",
    f"CREATE TRIGGER job_owners_insert AFTER INSERT ON jobs BEGIN {_SQLITE_ADD_V17.format('NEW')} END",
    "CREATE TRIGGER job_owners_delete AFTER DELETE ON jobs BEGIN "
    f"{_SQLITE_SUBTRACT.format('OLD')} {_SQLITE_FORGET.format('OLD')} END",
    "CREATE TRIGGER job_owners_update AFTER UPDATE OF owner, state, args, result ON jobs BEGIN "
    f"{_SQLITE_SUBTRACT.format('OLD')} {_SQLITE_ADD_V17.format('NEW')} {_SQLITE_FORGET.format('OLD')} END",
    f"DELETE FROM job_owners WHERE {_EMPTY}",
)


def _pg_apply_v16(delta: str, *, forget: bool) -> str:
    """Add ``delta`` (rows of owner, queued, running, bytes) to the owners' rows, in owner order (a new
    row at the next turn; several new in one statement share it, in owner order); with ``forget``, then
    delete those it emptied -- rows this statement has just locked, so the delete takes no lock out of
    order (and a concurrent writer's insert waits, then makes the row again)."""
    apply = f"""INSERT INTO job_owners AS o (owner, queued, running, bytes, served)
            SELECT owner, sum(queued), sum(running), sum(bytes), {NEXT_TURN} FROM ({delta}) AS delta
            GROUP BY owner HAVING sum(queued) <> 0 OR sum(running) <> 0 OR sum(bytes) <> 0 ORDER BY owner
            ON CONFLICT (owner) DO UPDATE SET queued = o.queued + excluded.queued,
                running = o.running + excluded.running, bytes = o.bytes + excluded.bytes"""
    if not forget:
        return apply + ";"
    return f"""WITH applied AS ({apply} RETURNING o.owner, o.queued, o.running, o.bytes)
            SELECT array_agg(owner) INTO emptied FROM applied WHERE {_EMPTY};
            IF emptied IS NOT NULL THEN
                DELETE FROM job_owners WHERE owner = ANY(emptied) AND {_EMPTY};
            END IF;"""


# One job's row before or after an update, as a delta's source (parameters of the row trigger).
_PG_ROW = "(VALUES ({0}.owner, {0}.state, {0}.args, {0}.result, {0}.created_at)) AS {1} ({2})"
_PG_ROW_COLUMNS = "owner, state, args, result, created_at"
_PG_ROW_DELTA = (
    _PG_DELTA.format(_PG_ROW.format("NEW", "new_job", _PG_ROW_COLUMNS), 1)
    + " UNION ALL "
    + _PG_DELTA.format(_PG_ROW.format("OLD", "old_job", _PG_ROW_COLUMNS), -1)
)
_PG_SIZE = "octet_length({0}.args) + coalesce(octet_length({0}.result), 0)"
POSTGRES_OWNERS_V17: tuple[str, ...] = (
    f"""CREATE OR REPLACE FUNCTION job_owners_track() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        emptied text[];
    BEGIN
        IF TG_OP = 'INSERT' THEN
            {_pg_apply_v16(_PG_DELTA.format("new_jobs", 1), forget=False)}
        ELSE
            {_pg_apply_v16(_PG_DELTA.format("old_jobs", -1), forget=True)}
        END IF;
        RETURN NULL;
    END $$""",
    f"""CREATE FUNCTION job_owners_track_row() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        emptied text[];
    BEGIN
        {_pg_apply_v16(_PG_ROW_DELTA, forget=True)}
        RETURN NULL;
    END $$""",
    # A statement trigger over transition tables cannot name columns, and so ran on every UPDATE of
    # jobs, lease renewals and progress reports included (+45% of the server's CPU time per renewal,
    # measured: bench/README.md). A row
    # trigger can: it runs for the updates that name a counted column, and of those only for rows whose
    # owner, state or size changed. Inserts and deletes (prunes, sweeps: many rows) stay statement-level.
    "DROP TRIGGER job_owners_update ON jobs",
    "CREATE TRIGGER job_owners_update AFTER UPDATE OF owner, state, args, result ON jobs FOR EACH ROW "
    "WHEN (OLD.owner IS DISTINCT FROM NEW.owner OR OLD.state IS DISTINCT FROM NEW.state OR "
    f"{_PG_SIZE.format('OLD')} <> {_PG_SIZE.format('NEW')}) EXECUTE FUNCTION job_owners_track_row()",
    f"DELETE FROM job_owners WHERE {_EMPTY}",
)

_FINISHED = "state IN ('succeeded', 'failed', 'cancelled')"
# The owner's finished jobs older than their newest N jobs (an index-only walk of (owner, id)).
_PAST_KEPT = "id <= (SELECT id FROM jobs WHERE owner = ? ORDER BY id DESC LIMIT 1 OFFSET ?)"
# ... or among the oldest whose bytes, added up in id order, first reach the excess over the bound.
_PAST_BYTES = (
    "id IN (SELECT id FROM (SELECT id, coalesce(sum({size}) OVER (ORDER BY id ROWS BETWEEN UNBOUNDED PRECEDING "
    f"AND 1 PRECEDING), 0) AS before FROM jobs WHERE owner = ? AND {_FINISHED}) AS oldest WHERE before < ?)"
)


def prune_sql(*, postgres: bool, by_bytes: bool) -> str:
    """Delete the owner's finished jobs past their newest N (parameters: owner, owner, N - 1) or, with
    ``by_bytes``, also the oldest until an excess of bytes is freed (then also: owner, excess).

    One statement either way, so it locks the rows it deletes before the owner's row (see above)."""
    sql = f"DELETE FROM jobs WHERE owner = ? AND {_FINISHED} AND ({_PAST_KEPT}"
    if by_bytes:
        size = "octet_length(args) + coalesce(octet_length(result), 0)" if postgres else _SQLITE_SIZE.format("jobs")
        sql += " OR " + _PAST_BYTES.format(size=size)
    return sql + ")"


#: The bytes the owner's jobs hold (0 when they have none, and no row).
USAGE = "SELECT coalesce((SELECT bytes FROM job_owners WHERE owner = ?), 0)"
#: The next turn (SQLite; parameter: the owner served in it).
SERVED = "UPDATE job_owners SET served = (SELECT max(max(served), 0) + 1 FROM job_owners) WHERE owner = ?"


def bytes_error(owner: str, used: int, max_bytes: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"the jobs of {owner!r} would hold {used} bytes of arguments and results, more than the limit of "
        f"{max_bytes} bytes (jobs.max_bytes), with their finished jobs deleted: wait for queued jobs to finish, "
        "or submit smaller arguments",
        details={"owner": owner, "limit": "bytes"},
    )


def result_too_big(size: int, max_bytes: int) -> str:
    """Why a job whose result could not be kept failed."""
    return (
        f"its result ({size} bytes) does not fit in the {max_bytes} bytes of arguments and results "
        "one user's jobs may hold (jobs.max_bytes); it was not kept"
    )
