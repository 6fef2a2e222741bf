"""The ``jobs`` service's methods: the wire surface of bastion/services/jobs.py's ``Jobs``, and the
records they return.

Each method checks its arguments and calls into ``Jobs`` and its store; the theory of operation is in
bastion/services/jobs.py.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec

from bastion.exceptions import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from bastion.jobs import JobSpec
from bastion.security.principal import ADMIN_ROLE
from bastion.service import Context, Service
from bastion.store.jobs import JOB_STATES, JobRecord

if TYPE_CHECKING:
    from bastion.services.jobs import Jobs

__all__ = ["MAX_LIST", "MAX_LIST_BYTES", "JobInfo", "JobResult", "JobStatus", "declare", "new_job_id"]

MAX_LIST = 1000
#: The most bytes of JobStatus one ``jobs.list`` answers with (half the 1 MiB frame clients take by
#: default): a page stops early rather than fail to be sent.
MAX_LIST_BYTES = 512 * 1024
_encode = msgspec.msgpack.Encoder().encode


class JobStatus(msgspec.Struct, frozen=True):
    """What ``jobs.status``, ``jobs.list`` and ``jobs.watch`` report of a job."""

    id: str
    name: str
    owner: str
    state: str  # queued, running, succeeded, failed, cancelled
    progress: float
    message: str
    error: str | None
    attempts: int
    retryable: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    cancel_requested: bool


class JobResult(msgspec.Struct, frozen=True):
    """A finished job's outcome: ``result`` if it succeeded, else ``error``."""

    id: str
    state: str
    result: Any  # its MessagePack, as stored (a msgspec.Raw), in what jobs.result returns
    error: str | None


class JobInfo(msgspec.Struct, frozen=True):
    """A job function this server offers (``jobs.registered``)."""

    name: str
    doc: str
    retryable: bool
    timeout: float
    memory_mb: int
    params: dict[str, Any]


def _status(job: JobRecord) -> JobStatus:
    return JobStatus(
        job.id, job.name, job.owner, job.state, job.progress, job.message, job.error, job.attempts, job.retryable,
        job.created_at, job.started_at, job.finished_at, job.cancel_requested,
    )  # fmt: skip


def _page(jobs: list[JobRecord]) -> list[JobStatus]:
    """The statuses of ``jobs``, as many as fit in ``MAX_LIST_BYTES`` (at least one): a job's error may
    hold thousands of characters, and a thousand of them would pass the frame a client takes."""
    page: list[JobStatus] = []
    total = 0
    for job in jobs:
        status = _status(job)
        total += len(_encode(status))
        if page and total > MAX_LIST_BYTES:
            break
        page.append(status)
    return page


def _named(text: str) -> str:
    """A caller's argument as an error names it: in full if short, else its start and length (as auth
    does), so an error never echoes a megabyte back."""
    return repr(text) if len(text) <= 64 else f"{text[:64]!r}... ({len(text)} characters)"


_last_id_ms = 0  # the millisecond of the last id made here


def new_job_id() -> str:
    """Time-ordered (milliseconds, hex) then random: ids sort by submission time.

    Within a process the millisecond part only ever goes up (a second id in the
    same millisecond takes the next one), so ids made here sort in the order
    they were made, not by their random part; across processes, ids of one
    millisecond sort by chance.
    """
    global _last_id_ms
    _last_id_ms = max(time.time_ns() // 1_000_000, _last_id_ms + 1)
    return f"{_last_id_ms:012x}{secrets.token_hex(6)}"


async def _visible(jobs: Jobs, ctx: Context, job_id: str) -> JobRecord:
    # Ids are short hex: a longer one names no job.
    job = await jobs.store.jobs_get(job_id) if len(job_id) <= 64 else None
    if job is None or not (job.owner == ctx.principal.name or ADMIN_ROLE in ctx.principal.roles):
        raise NotFound(f"no job {_named(job_id)}")
    return job


def declare(jobs: Jobs, service: Service) -> None:
    """Declare the ``jobs`` methods on ``service``, served by ``jobs``."""
    store, config = jobs.store, jobs.config

    @service.method
    async def submit(ctx: Context, name: str, args: dict[str, Any] | None = None) -> str:
        """Queue the registered job ``name`` with ``args``; its id."""
        spec = jobs.specs.get(name)
        if spec is None:
            raise NotFound(f"no job named {_named(name)} is registered here (jobs.registered lists them)")
        data = spec.validate(args or {})
        owner = ctx.principal.name
        job = JobRecord(
            id=new_job_id(),
            owner=owner,
            name=name,
            args=data,
            retryable=spec.retryable,
            max_attempts=config.max_attempts if spec.retryable else 1,
            timeout=spec.timeout or config.timeout,
            memory_mb=spec.memory_mb or config.memory_mb,
            created_at=time.time(),
        )
        kept = await store.jobs_submit(
            job, max_pending=config.max_pending, max_kept=config.max_kept, max_bytes=config.max_bytes
        )  # ResourceExhausted if its arguments do not fit in jobs.max_bytes
        if not kept:
            raise ResourceExhausted(
                f"you have {config.max_pending} jobs queued or running (the limit); wait for some to finish",
                retry_after=config.poll_interval,
            )
        if jobs._wake is not None:
            jobs._wake.set()
        return job.id

    @service.method(idempotent=True)
    async def status(ctx: Context, id: str) -> JobStatus:
        """A job's state and progress."""
        return _status(await _visible(jobs, ctx, id))

    @service.method(name="list", idempotent=True)
    async def list_jobs(
        ctx: Context, state: str | None = None, limit: int = 100, after: str | None = None, newest_first: bool = False
    ) -> list[JobStatus]:
        """Your jobs (an admin sees everyone's), oldest first (``newest_first``: newest first); page with
        ``after`` = the last id seen, in either order (a page holds fewer than ``limit`` when more would pass
        ``MAX_LIST_BYTES``: page on until an empty one)."""
        if state is not None and state not in JOB_STATES:
            raise InvalidArgument(f"state must be one of {', '.join(JOB_STATES)}, not {_named(state)}")
        if not 1 <= limit <= MAX_LIST:
            raise InvalidArgument(f"limit must be 1..{MAX_LIST}")
        owner = None if ADMIN_ROLE in ctx.principal.roles else ctx.principal.name
        listed = await store.jobs_list(owner=owner, state=state, limit=limit, after=after, newest_first=newest_first)
        return _page(listed)

    @service.method(idempotent=True, resumable=True)
    async def watch(ctx: Context, id: str) -> AsyncIterator[JobStatus]:
        """The job's status now and at every change, until it finishes (call again after a reconnect)."""
        job: JobRecord | None = await _visible(jobs, ctx, id)
        last = None
        while job is not None:
            current = _status(job)
            if current != last:
                yield current
                last = current
            if job.finished:
                return
            await jobs._changed(id, config.poll_interval)
            job = await store.jobs_get(id)
        raise NotFound(f"job {id!r} was deleted")

    @service.method(idempotent=True)
    async def cancel(ctx: Context, id: str) -> JobStatus:
        """Cancel a job: a queued one at once, a running one by killing its process. Finished: unchanged."""
        await _visible(jobs, ctx, id)
        job = await store.jobs_cancel(id, time.time())
        if job is None:
            raise NotFound(f"no job {id!r}")
        running = jobs._running.get(id)
        if running is not None:
            running.halt("cancel")
        jobs._notify(id)
        return _status(job)

    @service.method(idempotent=True)
    async def result(ctx: Context, id: str) -> JobResult:
        """A finished job's result (or its failure reason); FAILED_PRECONDITION while it has not finished."""
        job = await _visible(jobs, ctx, id)
        if not job.finished:
            raise FailedPrecondition(f"job {id!r} is {job.state}; its result is not ready", retry_after=1.0)
        # As stored (MessagePack the runner checked): written into the answer as it is, not decoded into
        # Python objects many times its size and encoded again.
        value = msgspec.Raw(job.result) if job.result is not None else None
        return JobResult(job.id, job.state, value, job.error)

    @service.method(idempotent=True)
    async def registered(ctx: Context) -> list[JobInfo]:
        """The jobs this server runs, with the JSON Schema of their arguments."""
        return [_info(jobs, spec) for spec in sorted(jobs.specs.values(), key=lambda s: s.name)]


def _info(jobs: Jobs, spec: JobSpec) -> JobInfo:
    described = spec.describe()
    timeout = spec.timeout or jobs.config.timeout
    memory = spec.memory_mb or jobs.config.memory_mb
    return JobInfo(spec.name, spec.doc, spec.retryable, timeout, memory, described["params"])
