"""The built-in ``jobs`` service: submit registered job functions, watch them, cancel them.

Theory of operation
-------------------

``Jobs`` is a component: the ``jobs`` service plus the runner that executes
what it queues. Everything durable lives in the store's job queue
(``bastion.store.jobs``); the component keeps only what dies with the
process: the running jobs' processes and the events that wake watchers.

* ``jobs.submit`` validates the arguments against the job's hints, stores a
  ``queued`` row (owner = the caller) and wakes the dispatcher.
* The dispatcher holds ``concurrency`` slots. For each free slot it claims
  a queued job this server can run (a name in its registries) -- the
  oldest of the user with the fewest running, then the least recently
  served, so users take turns (bastion/store/jobs_owners.py) -- then
  looks again when a slot frees, when a job is submitted here, or every
  ``poll_interval`` (jobs submitted to other replicas).
* Each claimed job runs in its own process (``jobs_runner.JobProcess``),
  killed at its wall-clock timeout (counted from the spawn: a process that
  never reads its request is killed too). Beside it run a lease renewer (every
  ``min(lease / 3, poll_interval)``, which also learns of a cancel asked on
  another replica; a lease that ends unrenewed -- the store unreachable or
  locked -- kills the job, which another runner may take from then on) and
  a progress writer (at most one write per ``PROGRESS_INTERVAL``). A
  cancel asked on this server kills the process at once. The job ends ``succeeded`` (its result converted to
  its return type), ``failed`` (with a reason: its exception, a limit, a crash, a result that does not
  match its return type) or ``cancelled``.
* A maintenance task recovers expired leases (jobs whose runner died) and
  deletes finished jobs past ``retention``; it also runs once at start.
* Closing kills the running processes and gives their jobs back: re-queued
  if retryable with attempts left, otherwise failed ("server stopped while
  it ran"); a job claimed as it closes, which never started, is put back
  queued as it was. A job is never lost, whether the server stops or is killed.

Only a job's owner, or an admin, can see, watch, cancel or fetch a job; to
anyone else it does not exist (the same NOT_FOUND as an unknown id). The
methods and the records they return are in bastion/services/jobs_methods.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Sequence

from bastion.config import JobsConfig
from bastion.exceptions import Unavailable
from bastion.jobs import JobRegistry, JobSpec, ResultMismatch, job_specs
from bastion.service import Service
from bastion.services.jobs_methods import JobInfo, JobResult, JobStatus, declare, new_job_id
from bastion.services.jobs_runner import Done, Failed, JobProcess, JobProtocolError, exit_reason, job_environment
from bastion.store.jobs import JobRecord, JobStore
from bastion.store.jobs_owners import result_too_big

__all__ = ["JobInfo", "JobResult", "JobStatus", "Jobs", "new_job_id"]

log = logging.getLogger("bastion.jobs")

PROGRESS_INTERVAL = 0.25  # seconds between progress writes of one job
SWEEP_INTERVAL = 60.0  # seconds between retention sweeps
LOST_REASON = "runner lost (server stopped while it ran)"


def _storable(text: str) -> str:
    """A job's own words (its failure, its progress message) with NUL escaped: PostgreSQL text cannot
    hold one, and a refused finish would leave the job running until its lease ran out (and then re-run
    it as if its runner were lost). Escaped on every backend, so both report the same."""
    return text.replace("\x00", "\\x00")


def _internal_failure(exc: Exception) -> str:
    """The failure of a job the server could not run to its end (its traceback is in the server's log):
    the type of the error only, as its message may hold what the job's owner should not see."""
    return f"the server failed while running the job ({type(exc).__name__}); its log has the details"


class _Running:
    """A job this server is running: its process and why it was stopped, if it was."""

    def __init__(self, job: JobRecord) -> None:
        self.job = job
        self.process: JobProcess | None = None
        self.stop: str | None = None  # "cancel", "timeout", "lost" or "shutdown"
        self.reported = False  # its process sent its outcome (a result or its own failure)
        self.progress: tuple[float, str] | None = None
        self.progress_ready = asyncio.Event()
        self.output: tuple[list[str], int] = ([], 0)  # the tail of what it printed, and the bytes before it

    def halt(self, reason: str) -> None:
        if self.stop is None:
            self.stop = reason
        if self.process is not None:
            self.process.kill()


class Jobs:
    """The ``jobs`` component: its ``service`` and the runner behind it."""

    def __init__(
        self, store: JobStore, registries: Sequence[JobRegistry], config: JobsConfig | None = None, *,
        leader: bool = True,
    ) -> None:  # fmt: skip
        """``leader``: recover lost jobs and delete old ones here (with several workers, only worker 0
        does; every worker runs jobs)."""
        self.store = store
        self.leader = leader
        self.registries = list(registries)
        self.config = config or JobsConfig()
        self.specs: dict[str, JobSpec] = job_specs(self.registries)
        self.runner_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._environment = job_environment(self.config.env_pass, self.config.env)
        self._running: dict[str, _Running] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._changes: dict[str, asyncio.Event] = {}
        self._watchers: dict[str, int] = {}  # job id -> watches waiting on its event (dropped at none)
        self._wake: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._closed = False
        self.service = Service(
            "jobs", doc="Computation jobs: submit, watch progress, cancel, fetch results.", refuse_nul=True
        )
        declare(self, self.service)

    def __repr__(self) -> str:
        return f"Jobs({sorted(self.specs)}, running={len(self._running)})"

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(self.config.concurrency)
        if self.leader:
            await self._maintain(sweep=True)
            self._background.append(asyncio.create_task(self._maintenance_loop(), name="bastion-jobs-maintenance"))
        if self.specs:
            self._background.append(asyncio.create_task(self._dispatch_loop(), name="bastion-jobs-dispatch"))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for running in list(self._running.values()):
            running.halt("shutdown")
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the runner -----------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        assert self._wake is not None and self._slots is not None
        names = sorted(self.specs)
        while True:
            await self._slots.acquire()
            self._wake.clear()
            # Shielded: closing cancels this loop, but not a claim the store may already be committing
            # (SQLite's writer goes on with it); a job claimed so is given back, not left "running" here.
            claim = asyncio.ensure_future(self.store.jobs_claim(self.runner_id, names, time.time(), self.config.lease))
            try:
                job = await asyncio.shield(claim)
            except asyncio.CancelledError:
                await self._give_back(claim)
                raise
            except Exception:
                log.exception("jobs: claiming a job failed; trying again")
                job = None
            if job is None:
                self._slots.release()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.config.poll_interval)
                continue
            task = asyncio.create_task(self._run(job), name=f"bastion-job {job.id}")
            self._tasks.add(task)
            task.add_done_callback(self._job_done)

    async def _give_back(self, claim: asyncio.Future[JobRecord | None]) -> None:
        """Put back the job of a claim made as this runner closed (it never started here)."""
        try:
            job = await claim
        except Exception:
            return  # nothing was claimed
        if job is None:
            return
        try:
            if await self.store.jobs_release(job.id, self.runner_id, time.time()):
                log.info("jobs: job %s was claimed as the runner closed; queued again", job.id)
        except Exception:
            log.exception(
                "jobs: giving back job %s, claimed as the runner closed, failed (its lease will expire)", job.id
            )

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        assert self._slots is not None
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("jobs: runner task failed", exc_info=task.exception())

    async def _maintenance_loop(self) -> None:
        last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(max(0.2, min(self.config.lease / 2, self.config.poll_interval * 5)))
            sweep = time.monotonic() - last_sweep >= SWEEP_INTERVAL
            if sweep:
                last_sweep = time.monotonic()
            try:
                await self._maintain(sweep=sweep)
            except Exception:
                log.exception("jobs: maintenance failed; trying again")

    async def _maintain(self, *, sweep: bool) -> None:
        now = time.time()
        recovered = await self.store.jobs_recover(now, LOST_REASON)
        if recovered:
            log.warning("jobs: recovered jobs whose runner was lost: %s", recovered)
            if recovered.get("queued") and self._wake is not None:
                self._wake.set()
        if sweep:
            removed = await self.store.jobs_sweep(now - self.config.retention)
            if removed:
                log.info("jobs: deleted %d finished jobs past retention", removed)

    async def _run(self, job: JobRecord) -> None:
        running = _Running(job)
        self._running[job.id] = running
        self._notify(job.id)
        helpers = [
            asyncio.create_task(self._renew_loop(running)),
            asyncio.create_task(self._progress_loop(running)),
        ]
        try:
            state, result, error = await self._execute(self.specs[job.name], running)
        except Exception as exc:  # a bug here, or a return type's own check raising (its __post_init__)
            log.exception("jobs: running job %s (%s) failed unexpectedly; the job is failed", job.id, job.name)
            state, result, error = "failed", None, _internal_failure(exc)
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            if self._running.get(job.id) is running:  # not a later run of the same job, reclaimed meanwhile
                del self._running[job.id]
        try:
            if running.stop == "lost":
                log.warning("jobs: job %s was taken from this runner (lease lost); its process was killed", job.id)
            elif running.stop == "shutdown" and not running.reported:  # an outcome that arrived is kept
                after = await self.store.jobs_abandon(
                    job.id, self.runner_id, "server stopped while it ran", time.time()
                )
                log.info("jobs: job %s stopped with the server: now %s", job.id, after)
            elif (ended := await self._finish(job, state, result, error)) is None:
                log.warning("jobs: job %s (%s) %s, but this runner no longer held it: not recorded", job.id,
                            job.name, state)  # fmt: skip
            else:
                if ended != state and result is not None:  # its result was not kept: failed, saying so
                    state, error = ended, result_too_big(len(result), self.config.max_bytes)
                log.info("jobs: job %s (%s) %s%s", job.id, job.name, state, f": {error}" if error else "")
        finally:
            self._log_output(running, state)
            self._notify(job.id)

    @staticmethod
    def _log_output(running: _Running, state: str) -> None:
        """Log the tail of what the job printed, a record per line naming the job (a warning if it did
        not succeed: its traceback is there)."""
        lines, dropped = running.output
        if not lines and not dropped:
            return
        level = logging.INFO if state == "succeeded" else logging.WARNING
        job = running.job
        if dropped:
            log.log(level, "jobs: job %s (%s) output: (%d earlier bytes not kept)", job.id, job.name, dropped)
        for line in lines:
            log.log(level, "jobs: job %s (%s) output: %s", job.id, job.name, line)

    async def _finish(self, job: JobRecord, state: str, result: bytes | None, error: str | None) -> str | None:
        """Record how the job ended; the state recorded (``failed`` if its result was not kept; None: no
        longer held). While the store is unavailable (a failover, a lock held past SQLite's busy timeout)
        keep trying for up to ``lease`` seconds, as long as a lease would hold the job: giving up at once
        left it running until recovery failed it as lost, its result thrown away."""
        ended, delay = time.time(), 0.1
        while True:
            try:
                return await self.store.jobs_finish(
                    job.id, self.runner_id, state, now=ended, result=result, error=error,
                    max_bytes=self.config.max_bytes,
                )  # fmt: skip
            except Unavailable as exc:
                if time.time() - ended >= self.config.lease:
                    raise
                log.warning("jobs: recording the outcome of %s failed (%s); trying again", job.id, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.poll_interval)

    async def _execute(self, spec: JobSpec, running: _Running) -> tuple[str, bytes | None, str | None]:
        """Run the job's process to its end; (state, result, error)."""
        job = running.job
        # Armed at the spawn: the timeout covers the process's start-up and the reading of its request.
        timer = asyncio.get_running_loop().call_later(job.timeout, running.halt, "timeout")
        try:
            process = await JobProcess.start(
                spec.module, spec.qualname, job.args,
                memory_mb=job.memory_mb, max_result_bytes=self.config.max_result_bytes,
                env=self._environment, output_bytes=self.config.output_bytes,
            )  # fmt: skip
        except OSError as exc:
            timer.cancel()
            return "failed", None, f"could not start the job's process: {exc.strerror or exc}"
        running.process = process
        if running.stop is not None:  # a cancel, or the timeout, while it started
            process.kill()
        # Once the job's process exits, what it left in its group (forked children holding the channel
        # open) is killed with it, so the channel ends with the job, not with its leftovers.
        reaper = asyncio.create_task(process.exited())
        outcome: Done | Failed | None = None
        try:
            async for message in process.messages():
                if isinstance(message, Done | Failed):
                    outcome = message
                    running.reported = True
                else:
                    running.progress = (message.fraction, _storable(message.message))
                    running.progress_ready.set()
        except JobProtocolError as exc:
            outcome = Failed(str(exc))
            process.kill()
        except BaseException:  # not waiting out the job's timeout for a process nobody reads any more
            process.kill()
            raise
        finally:
            try:
                await reaper  # under the timer still: a job that closed its channel is not waited for forever
            finally:
                timer.cancel()
            code = await process.wait()
            running.output = process.output.lines()
        if isinstance(outcome, Done):
            return self._converted(spec, outcome.result)
        if running.stop == "cancel":
            return "cancelled", None, "cancelled while running"
        if running.stop == "timeout":
            return "failed", None, f"timed out: killed at its limit of {job.timeout:g} s"
        if isinstance(outcome, Failed):
            return "failed", None, _storable(outcome.error)
        return "failed", None, exit_reason(code, job.memory_mb)

    def _converted(self, spec: JobSpec, result: bytes) -> tuple[str, bytes | None, str | None]:
        """A result as its job's return type has it (converted, re-encoded), or the job's failure saying
        why it does not match: never stored as it came, where a client decoding it by that type fails."""
        try:
            converted = spec.convert_result(result)
        except ResultMismatch as exc:
            return "failed", None, _storable(str(exc))
        limit = self.config.max_result_bytes
        if len(converted) > limit:  # a conversion may widen it (an int to a float)
            return "failed", None, f"the job's result is {len(converted)} bytes, over the limit of {limit}"
        return "succeeded", converted, None

    async def _renew_loop(self, running: _Running) -> None:
        """Renew the lease while the job runs; stop the job when the lease ends unrenewed. Past its lease a
        recovery may queue the job again and another runner start it: going on here (renewals failing, or
        waiting on a lock) would run it twice at once."""
        interval = min(self.config.lease / 3, self.config.poll_interval)
        loop = asyncio.get_running_loop()
        job_id = running.job.id
        expiry = loop.call_later((running.job.lease_until or 0.0) - time.time(), self._lease_ended, running)
        failing = False  # logged once while renewals fail (a store outage): not a traceback per job per interval
        try:
            while True:
                await asyncio.sleep(interval)
                until = time.time() + self.config.lease  # taken before the call: the lease may start no later
                try:
                    outcome = await self.store.jobs_renew(job_id, self.runner_id, until)
                except Exception as exc:
                    if not failing:
                        log.warning("jobs: renewing the lease of %s failed (%s); trying again", job_id, exc)
                        failing = True
                    continue
                if failing:
                    log.info("jobs: the lease of %s is renewed again", job_id)
                    failing = False
                if outcome == "lost":
                    running.halt("lost")
                    continue
                expiry.cancel()
                expiry = loop.call_later(until - time.time(), self._lease_ended, running)
                if outcome == "cancel":
                    running.halt("cancel")
        finally:
            expiry.cancel()

    @staticmethod
    def _lease_ended(running: _Running) -> None:
        if running.stop is None:
            log.warning(
                "jobs: the lease of job %s ended before it could be renewed; its process is killed", running.job.id
            )
        running.halt("lost")

    async def _progress_loop(self, running: _Running) -> None:
        while True:
            await running.progress_ready.wait()
            running.progress_ready.clear()
            assert running.progress is not None
            fraction, message = running.progress
            try:
                await self.store.jobs_progress(running.job.id, self.runner_id, fraction, message)
            except Exception:
                log.exception("jobs: recording progress of %s failed", running.job.id)
            self._notify(running.job.id)
            await asyncio.sleep(PROGRESS_INTERVAL)  # throttle: at most one write per interval

    # -- watchers -------------------------------------------------------------------------

    def _notify(self, job_id: str) -> None:
        event = self._changes.pop(job_id, None)
        if event is not None:
            event.set()

    async def _changed(self, job_id: str, timeout: float) -> None:
        event = self._changes.setdefault(job_id, asyncio.Event())
        self._watchers[job_id] = self._watchers.get(job_id, 0) + 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        finally:
            # The last watch of a job that ran elsewhere (no _notify here) must not leave its event behind.
            left = self._watchers.pop(job_id) - 1
            if left:
                self._watchers[job_id] = left
            elif self._changes.get(job_id) is event:
                del self._changes[job_id]
