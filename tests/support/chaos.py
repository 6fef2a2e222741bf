"""A checkable client load for chaos tests: replicas die and drain while workers read and compare-and-swap.

Theory of operation. ``run_load`` starts ``workers`` async workers for
``duration`` seconds. Worker ``i`` alone writes the keys ``cas-i`` and
``blind-i``, so nothing but a fault can make its compare-and-swap fail:

* each round it reads ``cas-i`` (``kv.get``, idempotent) and checks it holds
  the last value it knows was written -- an acknowledged write read back
  through whichever replica answers;
* then it writes ``cas-i`` with ``expected_version=<the version it knows>``
  and a fresh idempotency key, value ``"<i>:<seq>"`` (unique per logical
  write);
* every ``BLIND_EVERY``-th round it also writes ``blind-i`` without
  compare-and-swap (value unique again) under an idempotency key: there
  only the key stands between a retry and a second application.

Every answer is recorded: acknowledged writes as (value, version);
writes that failed after the client's retries as "unknown outcome". After an
unknown outcome the worker reads the key back (``reconcile``) to learn
whether its write took effect and what version to compare against next.

``Tally`` counts *offered* calls -- the logical calls workers make, each
``invoke`` once, whatever its retries -- and *attempts*: ``CountingClient``
counts every attempt ``Client.invoke`` makes (first tries, retries, and the
replay of a call a go-away proved never started), by wrapping the client's
per-attempt step. Retry traffic is ``attempts / offered``.

``verify`` reads the final state and the change log (``kv.watch`` replayed
from version 1) and asserts, per key:

* no acknowledged write lost: every acknowledged (value, version) is in the
  log at exactly that revision, and the key's final value is the last
  acknowledged one -- or a later write whose answer was lost but which the
  log shows applied;
* no write applied twice: each value appears at most once in the log, every
  logged value is one the worker wrote, in the order it wrote them, and the
  number of changes equals the acknowledged writes plus the unknown-outcome
  writes found applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bastion.client.aio import Client
from bastion.exceptions import BastionError
from tests.support.server import ServerProcess, start_server

__all__ = [
    "BLIND_EVERY",
    "CountingClient",
    "Fault",
    "KeyHistory",
    "Replicas",
    "Tally",
    "run_load",
    "verify",
]

#: A blind (no compare-and-swap) keyed put every this many rounds.
BLIND_EVERY = 4


class CountingClient(Client):
    """A ``Client`` that counts the attempts its ``invoke`` makes (``attempts``), retries included."""

    attempts = 0

    async def _attempt(self, *args: Any, **kwargs: Any) -> Any:
        self.attempts += 1
        return await super()._attempt(*args, **kwargs)


@dataclasses.dataclass
class KeyHistory:
    """What one worker knows about one of its keys."""

    key: str
    #: (value, version) of every acknowledged write, in order.
    acked: list[tuple[bytes, int]] = dataclasses.field(default_factory=list)
    #: Values of writes whose outcome the client never learnt, and whether a read showed them applied.
    unknown: dict[bytes, bool] = dataclasses.field(default_factory=dict)
    #: Every value written, in order (acknowledged or not).
    written: list[bytes] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Tally:
    """Outcomes of a load run."""

    offered: int = 0
    succeeded: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    latencies: list[float] = dataclasses.field(default_factory=list)
    keys: dict[str, KeyHistory] = dataclasses.field(default_factory=dict)
    attempts: int = 0
    events: list[str] = dataclasses.field(default_factory=list)

    @property
    def success_rate(self) -> float:
        return self.succeeded / self.offered if self.offered else 0.0

    @property
    def retry_ratio(self) -> float:
        return self.attempts / self.offered if self.offered else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]

    @property
    def unknown_outcomes(self) -> int:
        """Writes whose outcome the client never learnt (each read back afterwards)."""
        return sum(len(history.unknown) for history in self.keys.values())

    def summary(self) -> str:
        applied = sum(sum(history.unknown.values()) for history in self.keys.values())
        return (
            f"{self.offered} calls, {self.succeeded} ok ({100 * self.success_rate:.3f}%), "
            f"{len(self.errors)} failed ({self.unknown_outcomes} writes of unknown outcome, {applied} of them "
            f"applied), attempts/offered {self.retry_ratio:.4f}, "
            f"p50 {1000 * self.percentile(50):.1f} ms, p99 {1000 * self.percentile(99):.1f} ms, "
            f"max {1000 * max(self.latencies, default=0.0):.0f} ms; events: {'; '.join(self.events)}"
        )


class _Call:
    """Times and counts one logical call."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    async def __call__(self, call: Awaitable[Any]) -> Any:
        """The call's answer; a failure is counted and raised."""
        tally = self.tally
        tally.offered += 1
        started = time.monotonic()
        try:
            result = await call
        except BastionError as exc:
            tally.errors.append(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            tally.latencies.append(time.monotonic() - started)
        tally.succeeded += 1
        return result


async def _worker(index: int, client: Client, tally: Tally, run: str, stop: float) -> None:
    call = _Call(tally)
    cas = tally.keys[f"cas-{index}"] = KeyHistory(f"cas-{index}")
    blind = tally.keys[f"blind-{index}"] = KeyHistory(f"blind-{index}")
    # The keys' first versions (before the faults; these are calls like any other).
    first = f"{index}:0".encode()
    cas.written.append(first)
    version = await call(client.invoke("kv.put", {"key": cas.key, "value": first}, idempotency_key=f"{run}-{index}-0"))
    cas.acked.append((first, version))
    current = first
    seq = 0
    while time.monotonic() < stop:
        seq += 1
        with contextlib.suppress(BastionError):
            # Read your writes, on any replica. (A write of unknown outcome cannot apply after the read-back
            # that settled it: its server is dead, or the call long over -- the timeout is far above a put's.)
            item = await call(client.invoke("kv.get", {"key": cas.key}))
            assert (item["value"], item["version"]) == (current, version), (cas.key, item, current, version)
        value = f"{index}:{seq}".encode()
        cas.written.append(value)
        args = {"key": cas.key, "value": value, "expected_version": version}
        try:
            version = await call(client.invoke("kv.put", args, idempotency_key=f"{run}-{index}-{seq}"))
        except BastionError:
            current, version = await _reconcile(client, call, cas, value, stop)
        else:
            cas.acked.append((value, version))
            current = value
        if seq % BLIND_EVERY == 0:
            value = f"{index}:b{seq}".encode()
            blind.written.append(value)
            args = {"key": blind.key, "value": value}
            try:
                blind_version = await call(client.invoke("kv.put", args, idempotency_key=f"{run}-{index}-b{seq}"))
            except BastionError:
                await _reconcile(client, call, blind, value, stop)
            else:
                blind.acked.append((value, blind_version))


async def _reconcile(client: Client, call: _Call, history: KeyHistory, value: bytes, stop: float) -> tuple[bytes, int]:
    """After a write's outcome was lost: read the key back (until a read works) and note whether it applied."""
    while True:
        try:
            item = await call(client.invoke("kv.get", {"key": history.key}))
        except BastionError:
            if time.monotonic() > stop + 30:
                raise
            await asyncio.sleep(0.1)
            continue
        history.unknown[value] = item["value"] == value
        return item["value"], item["version"]


Fault = Callable[[], Awaitable[None]]


async def run_load(
    clients: Sequence[Client],
    *,
    workers: int,
    duration: float,
    faults: Sequence[tuple[float, str, Fault]] = (),
    run: str = "chaos",
) -> Tally:
    """``workers`` workers (worker i on ``clients[i % len(clients)]``) for ``duration`` seconds.

    ``faults``: (seconds after the start, name, coroutine function) to run
    meanwhile; each is awaited in turn and its name and time recorded.
    """
    tally = Tally()
    started = time.monotonic()
    stop = started + duration

    async def inject() -> None:
        for at, name, fault in faults:
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            tally.events.append(f"{name} at {time.monotonic() - started:.1f}s")
            await fault()
            tally.events.append(f"{name} done at {time.monotonic() - started:.1f}s")

    injector = asyncio.ensure_future(inject())
    try:
        await asyncio.gather(*(_worker(i, clients[i % len(clients)], tally, run, stop) for i in range(workers)))
        await injector
    finally:
        injector.cancel()
    tally.attempts = sum(c.attempts for c in clients if isinstance(c, CountingClient))
    return tally


async def verify(client: Client, tally: Tally) -> None:
    """Assert no acknowledged write was lost and none applied twice (see the module docstring)."""
    state: dict[str, tuple[bytes, int]] = {}
    after: str | None = None
    while True:
        page = await client.call("kv.list", after=after)
        for item in page["items"]:
            state[item["key"]] = (item["value"], item["version"])
        after = page["next"]
        if after is None:
            break
    written = {key for key, history in tally.keys.items() if history.acked or any(history.unknown.values())}
    assert written <= set(state) <= set(tally.keys), sorted(set(state) ^ written)
    log: dict[str, list[tuple[bytes, int]]] = {key: [] for key in state}
    upto = max(version for _, version in state.values())
    async for event in client.stream("kv.watch", from_version=1):
        if event["type"] == "start":
            assert event["version"] >= upto
            upto = event["version"]
            continue
        assert event["type"] == "put", event
        log[event["key"]].append((event["value"], event["version"]))
        if event["version"] >= upto:
            break
    for key, history in tally.keys.items():
        changes = log.get(key, [])
        if not changes:
            assert not history.acked and not any(history.unknown.values()), f"{key}: every write is lost"
            continue
        values = [value for value, _ in changes]
        # Applied at most once each, and only what the worker wrote, in its order.
        assert len(values) == len(set(values)), f"{key}: a write was applied twice: {values}"
        order = {value: n for n, value in enumerate(history.written)}
        assert all(value in order for value in values), f"{key}: unknown values in the log"
        assert [order[v] for v in values] == sorted(order[v] for v in values), f"{key}: out of order"
        # Every acknowledged write is there, at the version its answer gave.
        at = dict(changes)
        for value, version in history.acked:
            assert at.get(value) == version, f"{key}: acknowledged {value!r}@{version} not in the log: {changes}"
        applied_unknown = [v for v in values if v in history.unknown]
        assert len(changes) == len(history.acked) + len(applied_unknown), (key, changes, history)
        # A write of unknown outcome the worker read back as applied is in the log.
        for value, seen in history.unknown.items():
            if seen:
                assert value in at, f"{key}: {value!r} was read back yet is not in the log"
        # The final value is the last acknowledged write, or a later one whose answer was lost.
        assert state[key] == changes[-1], (key, state[key], changes[-1])
        if history.acked:
            last_acked = history.acked[-1][0]
            assert all(v in history.unknown for v in values[values.index(last_acked) + 1 :]), (key, last_acked)
        else:
            assert all(v in history.unknown for v in values), key


class Replicas:
    """``bastion serve`` replicas on one shared store, started one at a time (the first bootstraps admin)."""

    def __init__(self, workdir: Path, env: dict[str, str], count: int) -> None:
        self.workdir = workdir
        self.env = env
        self.processes: list[ServerProcess] = []
        self.retired: list[ServerProcess] = []
        self.killed: set[int] = set()  # pids
        for i in range(count):
            self.processes.append(start_server(workdir / f"r{i}", env=env))

    @property
    def token(self) -> str:
        return self.processes[0].token

    @property
    def addresses(self) -> list[str]:
        return [p.address for p in self.processes]

    def kill(self, i: int) -> None:
        """kill -9 replica ``i``."""
        self.killed.add(self.processes[i].pid)
        self.processes[i].signal(signal.SIGKILL)

    async def drain_and_restart(self, i: int, timeout: float = 30.0) -> int:
        """SIGTERM replica ``i``, wait for it to exit, start a new one on the same port and data directory.

        Returns the drained process's exit code.
        """
        old = self.processes[i]
        old.signal(signal.SIGTERM)
        code = await asyncio.to_thread(old.process.wait, timeout)
        generation = len(self.retired) + 1
        new = await asyncio.to_thread(
            start_server,
            self.workdir / f"r{i}.{generation}",
            env=self.env,
            data_dir=old.data_dir,
            args=("--port", str(old.port)),
        )
        assert new.port == old.port
        self.retired.append(old)
        self.processes[i] = new
        return code

    def all(self) -> Iterator[ServerProcess]:
        yield from self.processes
        yield from self.retired

    def stop(self) -> dict[int, int]:
        """Stop every process still running; their exit codes by pid."""
        return {p.pid: p.stop() for p in self.all()}
