"""Publish/subscribe: bastion's ``messages`` topics vs NATS and Redis pub/sub, side by side in one run.

    .venv/bin/python bench/pubsub.py [--quick] [--repeat 3] [--duration 3] [--systems ...] [--json out.json]

The servers, each in its own process pinned to CPU 0 (the load generator,
this process, to CPU 1, as bench/run.py does):

* ``bastion``: a real ``python -m bastion serve`` (a temporary --data-dir,
  its SQLite store with the defaults, --port 0, --no-http), **plaintext**
  (--insecure, loopback) like the NATS and Redis servers it is set against.
  Its config declares ``bench.durable.>`` durable and a rule letting the
  bench users use ``bench.>``; the per-principal rate limit stays on but is
  raised far above the offered load. The admin token (``admin.token`` in the
  data directory) creates two users, ``bench-pub`` and ``bench-sub``, and a
  token for each, so every publish and delivery goes through the real ACL
  checks. Publishers call ``messages.publish``; subscribers read
  ``client.stream("messages.subscribe", ...)`` (the public async Client).
* ``nats``: a throwaway ``nats-server -js`` on a free port (nats-py);
  without the binary, the one at 127.0.0.1:4222 (not pinned).
* ``redis``: a throwaway ``redis-server`` without persistence (bench/redisref.py;
  redis.asyncio, PUBLISH / SUBSCRIBE); without the binary, 127.0.0.1:6379.

A system that cannot be reached is skipped with a note.

The points (payloads of 100 bytes: a perf_counter_ns timestamp and padding;
every subscriber has its own connection, the publishers share one):

* ``1 sub`` / ``10 subs``: ``PUBLISHERS`` publisher tasks publish as fast as
  a window allows: at most ``WINDOW`` messages published but not yet received
  by the slowest subscriber (so no system is driven into dropping messages).
  msgs/s is what each subscriber receives per second (the mean over the
  subscribers); p50/p99 are publish-to-receive latencies over every delivery
  (under this load they include waiting in the window).
* ``1 sub, 1 in flight``: one publisher, window 1: the unloaded latency.
* ``durable, 1 sub``: bastion's durable topic (each publish committed to
  SQLite, fsynced, before it returns), NATS JetStream (file storage, publish
  waits for the stream's ack; JetStream does not fsync each message by
  default), Redis: n/a (pub/sub keeps nothing).
* ``10 subs + 1 stopped``: the 10-subscriber load plus an eleventh subscriber
  in a child process that subscribes, then is stopped (SIGSTOP): it reads
  nothing more, as a hung client would. The ratio of the 10 subscribers'
  msgs/s to the mean of the ``10 subs`` points just before and after it
  (``10 subs, again``) is the issue's [bench] target (a drop of less than
  10%: ratio >= 0.90). The server's resident set is sampled before and
  during the point (peak): what it holds for the stopped subscriber must stay
  bounded (bastion: the stream's credit window, 16 items, then
  ``subscriber_buffer`` messages, then the subscription is over; NATS: its
  slow-consumer limit; Redis: ``client-output-buffer-limit pubsub`` -- in a
  short point their backlog fits in the kernel's socket buffers). After the
  point the child runs again (SIGCONT) and says how its subscription ended,
  if the server ended it.

Every point runs ``--repeat`` times (a repeat runs each system's points back
to back, then the next system's) and is printed as its median with the spread
(bench/report.py); the stopped-subscriber ratio is taken per repeat, against
the ``10 subs`` points around it, then its median. ``--quick`` is short points
(about a minute in all). The load generator is one Python process for every
system, so at 10 subscribers its own decoding is a large part of what is
measured, for all three alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (HERE, ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from report import Target, fmt, markdown_table, summarize  # noqa: E402
from run import cpu_busy, percentile, pick_cpus, process_cpu_seconds, process_memory_kib  # noqa: E402

PAYLOAD_BYTES = 100
PAD = bytes(PAYLOAD_BYTES - 8)
WINDOW = 256  # messages published but not yet received by the slowest subscriber
PUBLISHERS = 8  # publisher tasks (one shared connection)
MANY = 10  # subscribers of the "10 subs" points
STALL = 2.0  # seconds a publisher waits for the window before publishing anyway (a message was lost)
STARTUP_DEADLINE = 20.0
SLOW_RATIO = 0.90
TOPIC = "bench.live.t"
DURABLE_TOPIC = "bench.durable.t"
NATS_STREAM = "BENCH"

BASTION_CONFIG = """\
[rate_limits.per_principal]  # on, but far above the offered load
rate = 1e9
burst = 1e9

[[messages.topics.durable]]
pattern = "bench.durable.>"
keep = 100000

[[messages.topics.rules]]
pattern = "bench.>"
publish = ["user:bench-pub"]
subscribe = ["user:bench-sub"]
"""

Publish = Callable[[bytes], Awaitable[Any]]
Close = Callable[[], Awaitable[None]]
Deliver = Callable[[bytes], None]

# (name, subscribers, window, publishers, durable, slow)
POINTS: list[tuple[str, int, int, int, bool, bool]] = [
    ("1 sub", 1, WINDOW, PUBLISHERS, False, False),
    (f"{MANY} subs", MANY, WINDOW, PUBLISHERS, False, False),
    (f"{MANY} subs + 1 stopped", MANY, WINDOW, PUBLISHERS, False, True),
    (f"{MANY} subs, again", MANY, WINDOW, PUBLISHERS, False, False),
    ("1 sub, 1 in flight", 1, 1, 1, False, False),
    ("durable, 1 sub", 1, WINDOW, PUBLISHERS, True, False),
]


def stamp() -> bytes:
    return time.perf_counter_ns().to_bytes(8, "big") + PAD


def reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin_child(cpu: int | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` pinning the child (and every thread it starts) to ``cpu``."""
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


# -- server processes -----------------------------------------------------------------------


class BastionServe:
    """``python -m bastion serve`` (plaintext, --no-http) in a temporary data directory."""

    def __init__(self, cpu: int | None) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="bastion-bench-pubsub-"))
        config = self.directory / "bastion.toml"
        config.write_text(BASTION_CONFIG)
        data = self.directory / "data"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        cmd = [sys.executable, "-m", "bastion", "serve", "--host", "127.0.0.1", "--port", "0",
               "--data-dir", str(data), "--config", str(config), "--insecure", "--no-http"]  # fmt: skip
        self.log = open(self.directory / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log,
            preexec_fn=pin_child(cpu),
        )  # fmt: skip
        self.pid: int | None = self.proc.pid
        self.port = self._wait_banner()
        self.admin_token = (data / "admin.token").read_text().strip()

    def _wait_banner(self) -> int:
        assert self.proc.stdout is not None
        deadline, buf = time.monotonic() + STARTUP_DEADLINE, b""
        while True:
            for line in buf.decode(errors="replace").splitlines():
                if " listening on " in line and line.startswith("bastion "):
                    return int(line.split(" listening on ", 1)[1].split()[0].rpartition(":")[2])
            left = deadline - time.monotonic()
            ready = select.select([self.proc.stdout], [], [], max(0.0, left))[0] if left > 0 else []
            chunk = os.read(self.proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                self.stop()
                log = (self.directory / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"bastion serve did not start: {buf!r}\n{log}")
            buf += chunk

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class NatsServe:
    """A throwaway ``nats-server -js`` pinned to ``cpu``; without the binary, the one at 127.0.0.1:4222."""

    def __init__(self, cpu: int | None) -> None:
        self.directory = tempfile.mkdtemp(prefix="bastion-bench-nats-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.note = ""
        if shutil.which("nats-server") is None:
            self.port = 4222
            self.note = "nats-server not installed: the one at 127.0.0.1:4222, not pinned"
            if not reachable(self.port):
                raise RuntimeError("nats-server not installed and nothing at 127.0.0.1:4222")
            return
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["nats-server", "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", self.directory],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=pin_child(cpu),
        )  # fmt: skip
        self.pid = self.proc.pid
        deadline = time.monotonic() + STARTUP_DEADLINE
        while not reachable(self.port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("nats-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


class RedisServe:
    """A throwaway ``redis-server`` (no persistence) pinned to ``cpu``; without the binary, 127.0.0.1:6379."""

    def __init__(self, cpu: int | None) -> None:
        from redisref import RedisServer

        self.server: RedisServer | None = None
        self.pid: int | None = None
        self.note = ""
        if shutil.which("redis-server") is None:
            self.port = 6379
            self.note = "redis-server not installed: the one at 127.0.0.1:6379, not pinned"
            if not reachable(self.port):
                raise RuntimeError("redis-server not installed and nothing at 127.0.0.1:6379")
            return
        self.server = RedisServer(cpu)
        self.port, self.pid = self.server.port, self.server.proc.pid

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


# -- the systems, as seen by the load generator ---------------------------------------------


class System:
    """One pub/sub system: how to publish, subscribe and start a subscriber that will be stopped."""

    name = ""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.pid: int | None = server.pid
        self.note: str = getattr(server, "note", "")

    async def setup(self) -> None:
        """Once per run, before any point."""

    async def publisher(self, durable: bool) -> tuple[Publish, Close]:
        raise NotImplementedError

    async def subscribe(self, deliver: Deliver, durable: bool) -> Close:
        """Subscribe (ready once this returns) and call ``deliver(payload)`` for each message."""
        raise NotImplementedError

    def slow_args(self) -> tuple[list[str], str]:
        """Arguments for ``pubsub.py --slow-subscriber`` and what to write on its stdin (a token)."""
        return [self.name, str(self.server.port)], ""

    def supports_durable(self) -> bool:
        return True


class Bastion(System):
    name = "bastion"

    async def setup(self) -> None:
        from bastion.client.aio import Client

        async with Client(f"127.0.0.1:{self.server.port}", token=self.server.admin_token, insecure=True) as admin:
            self.tokens = {}
            for user in ("bench-pub", "bench-sub"):
                await admin.auth.create_user(name=user)
                self.tokens[user] = (await admin.auth.create_token(user=user, label="bench"))["token"]

    def client(self, user: str) -> Any:
        from bastion.client.aio import Client

        return Client(f"127.0.0.1:{self.server.port}", token=self.tokens[user], insecure=True, timeout=3600)

    async def publisher(self, durable: bool) -> tuple[Publish, Close]:
        client = self.client("bench-pub")
        await client.connect()
        topic = DURABLE_TOPIC if durable else TOPIC

        def publish(payload: bytes) -> Awaitable[Any]:
            return client.call("messages.publish", topic=topic, payload=payload)  # type: ignore[no-any-return]

        return publish, client.close

    async def subscribe(self, deliver: Deliver, durable: bool) -> Close:
        client = self.client("bench-sub")
        stream = client.stream("messages.subscribe", pattern=DURABLE_TOPIC if durable else TOPIC).__aiter__()
        first = await anext(stream)
        if first["type"] != "start":
            raise RuntimeError(f"bastion: expected the start item, got {first!r}")

        async def read() -> None:
            async for item in stream:
                deliver(item["payload"])

        return await _reader(read, client.close)

    def slow_args(self) -> tuple[list[str], str]:
        return [self.name, str(self.server.port)], self.tokens["bench-sub"]


class Nats(System):
    name = "nats"

    async def connect(self) -> Any:
        import nats

        return await nats.connect(f"nats://127.0.0.1:{self.server.port}", allow_reconnect=False)

    async def setup(self) -> None:
        from nats.js.api import StorageType, StreamConfig

        nc = await self.connect()
        try:
            js = nc.jetstream()
            config = StreamConfig(name=NATS_STREAM, subjects=[DURABLE_TOPIC], storage=StorageType.FILE)
            with contextlib.suppress(Exception):
                await js.delete_stream(NATS_STREAM)  # left over by an earlier run against a shared server
            await js.add_stream(config)
        finally:
            await nc.close()

    async def publisher(self, durable: bool) -> tuple[Publish, Close]:
        nc = await self.connect()
        if durable:
            js = nc.jetstream()

            def publish(payload: bytes) -> Awaitable[Any]:
                return js.publish(DURABLE_TOPIC, payload)  # type: ignore[no-any-return]
        else:

            def publish(payload: bytes) -> Awaitable[Any]:
                return nc.publish(TOPIC, payload)  # type: ignore[no-any-return]

        return publish, nc.close

    async def subscribe(self, deliver: Deliver, durable: bool) -> Close:
        from nats.js.api import DeliverPolicy

        nc = await self.connect()

        async def on_message(msg: Any) -> None:
            deliver(msg.data)

        if durable:
            await nc.jetstream().subscribe(
                DURABLE_TOPIC, cb=on_message, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
            )
        else:
            await nc.subscribe(TOPIC, cb=on_message)
        await nc.flush()
        return nc.close  # type: ignore[no-any-return]


class Redis(System):
    name = "redis"

    def supports_durable(self) -> bool:
        return False

    async def publisher(self, durable: bool) -> tuple[Publish, Close]:
        import redis.asyncio as redis

        client = redis.Redis(host="127.0.0.1", port=self.server.port)

        def publish(payload: bytes) -> Awaitable[Any]:
            return client.publish(TOPIC, payload)

        return publish, client.aclose

    async def subscribe(self, deliver: Deliver, durable: bool) -> Close:
        import redis.asyncio as redis

        client = redis.Redis(host="127.0.0.1", port=self.server.port)
        pubsub = client.pubsub()
        await pubsub.subscribe(TOPIC)
        async with asyncio.timeout(STARTUP_DEADLINE):  # subscribed once its confirmation is read
            while (reply := await pubsub.get_message(timeout=1.0)) is None or reply["type"] != "subscribe":
                pass

        async def read() -> None:
            async for message in pubsub.listen():
                if message["type"] == "message":
                    deliver(message["data"])

        async def close() -> None:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            await client.aclose()

        return await _reader(read, close)


async def _reader(read: Callable[[], Coroutine[Any, Any, None]], close: Close) -> Close:
    """Run ``read`` as a task; the returned close cancels it, then calls ``close``."""
    task = asyncio.create_task(read())

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await close()

    return stop


SYSTEMS: dict[str, tuple[type[System], Callable[[int | None], Any]]] = {
    "bastion": (Bastion, BastionServe),
    "nats": (Nats, NatsServe),
    "redis": (Redis, RedisServe),
}


# -- the subscriber that stops reading (a child process) ------------------------------------


class StoppedSubscriber:
    """A child process subscribed to the live topic, stopped (SIGSTOP) once subscribed."""

    def __init__(self, system: System) -> None:
        args, secret = system.slow_args()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--slow-subscriber", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(secret + "\n")  # the token never goes on a command line
        self.proc.stdin.close()
        ready = select.select([self.proc.stdout], [], [], STARTUP_DEADLINE)[0]
        line = self.proc.stdout.readline().strip() if ready else ""
        if line != "READY":
            self.kill()
            raise RuntimeError(f"{system.name}: the slow subscriber did not start ({line!r})")
        os.kill(self.proc.pid, signal.SIGSTOP)

    def outcome(self, timeout: float = 2.0) -> str:
        """Let it run again: how the server ended its subscription ("" if it did not, within ``timeout``)."""
        assert self.proc.stdout is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        ready = select.select([self.proc.stdout], [], [], timeout)[0]
        return self.proc.stdout.readline().strip() if ready else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


async def slow_subscriber_main(system_name: str, port: int) -> None:
    """``--slow-subscriber``: subscribe, say READY, then read (until stopped by the parent).

    bastion's stream ends when the server gives up on this subscriber: then
    it says how (``ENDED after N messages: <error>``), once it runs again.
    """
    token = sys.stdin.readline().strip()

    class _Server:
        pid = None

    server = _Server()
    server.port = port  # type: ignore[attr-defined]
    system = SYSTEMS[system_name][0](server)
    if isinstance(system, Bastion):
        system.tokens = {"bench-sub": token}
        stream = system.client("bench-sub").stream("messages.subscribe", pattern=TOPIC).__aiter__()
        await anext(stream)
        print("READY", flush=True)
        count = 0
        try:
            async for _ in stream:
                count += 1
        except Exception as exc:
            print(f"ENDED after {count} messages: {type(exc).__name__}: {exc}", flush=True)
    else:
        await system.subscribe(lambda payload: None, durable=False)
        print("READY", flush=True)
    await asyncio.Event().wait()


# -- one point --------------------------------------------------------------------------------


class _Load:
    """The publishers' window: publish while fewer than ``window`` messages are unreceived by the slowest."""

    def __init__(self, subscribers: int, window: int) -> None:
        self.counts = [0] * subscribers
        self.window = window
        self.sent = 0
        self.stalls = 0
        self.latencies: list[int] = []
        self.measuring = False
        self.stopping = False
        self.waiters: list[asyncio.Future[None]] = []

    def deliverer(self, index: int) -> Deliver:
        counts, clock, record = self.counts, time.perf_counter_ns, self.latencies.append

        def deliver(payload: bytes) -> None:
            counts[index] += 1
            if self.measuring:
                record(clock() - int.from_bytes(payload[:8], "big"))
            if self.waiters:
                self.wake()

        return deliver

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def stop(self, tasks: list[asyncio.Task[None]]) -> None:
        """Let the publishers finish their publish in flight and return (nats-py's swallows cancellation)."""
        self.stopping = True
        self.wake()
        if tasks:
            await asyncio.wait(tasks, timeout=STALL + 5)
        for task in tasks:
            task.cancel()

    async def publish_forever(self, publish: Publish) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping:
            while self.sent - min(self.counts) >= self.window and not self.stopping:
                waiter = loop.create_future()
                self.waiters.append(waiter)
                done, _ = await asyncio.wait([waiter], timeout=STALL)
                if not done:  # a message was lost (at most once): go on rather than wait forever
                    self.stalls += 1
                    self.sent = min(self.counts)
            self.sent += 1
            await publish(stamp())


async def _sample_rss(pid: int | None, peak: list[int]) -> None:
    while pid is not None:
        with contextlib.suppress(OSError):
            peak[0] = max(peak[0], process_memory_kib(pid).get("rss", 0))
        await asyncio.sleep(0.05)


async def run_point(
    system: System, subscribers: int, window: int, publishers: int, durable: bool, slow: bool, opts: Any
) -> dict[str, Any]:
    load = _Load(subscribers, window)
    closers: list[Close] = []
    stopped: StoppedSubscriber | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        for i in range(subscribers):
            closers.append(await system.subscribe(load.deliverer(i), durable))
        rss_before = process_memory_kib(system.pid).get("rss") if system.pid else None
        if slow:
            stopped = StoppedSubscriber(system)
        publish, close = await system.publisher(durable)
        closers.append(close)
        tasks = [asyncio.create_task(load.publish_forever(publish)) for _ in range(publishers)]
        await _watch(tasks, opts.warmup)
        peak = [0]
        sampler = asyncio.create_task(_sample_rss(system.pid, peak))
        counts0, sent0, t0 = list(load.counts), load.sent, time.perf_counter()
        cpu0 = process_cpu_seconds(system.pid) if system.pid else None
        load.measuring = True
        await _watch(tasks, opts.duration)
        load.measuring = False
        elapsed, counts1, sent1 = time.perf_counter() - t0, list(load.counts), load.sent
        cpu = process_cpu_seconds(system.pid) - cpu0 if system.pid and cpu0 is not None else None
        sampler.cancel()
        ended = stopped.outcome() if stopped is not None else None
    finally:
        await load.stop(tasks)
        if stopped is not None:
            stopped.kill()
        for closer in closers:
            with contextlib.suppress(Exception):
                await closer()
        if tasks:
            await asyncio.wait(tasks, timeout=5)  # a publish still in flight fails once its connection closed
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a failure during the point was raised by _watch already
    received = [b - a for a, b in zip(counts0, counts1, strict=True)]
    latencies = sorted(load.latencies)
    return {
        "msgs_s": sum(received) / len(received) / elapsed,
        "published_s": (sent1 - sent0) / elapsed,
        "p50_us": percentile(latencies, 0.50),
        "p99_us": percentile(latencies, 0.99),
        "server_cpu_us_per_msg": cpu * 1e6 / (sent1 - sent0) if cpu is not None and sent1 > sent0 else None,
        "rss_before_kib": rss_before,
        "rss_peak_kib": peak[0] or None,
        "stalls": load.stalls,
        "stopped_subscriber": ended,
    }


async def _watch(tasks: list[asyncio.Task[None]], seconds: float) -> None:
    """Wait ``seconds``, raising at once if a publisher failed."""
    done, _ = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_EXCEPTION)
    for task in done:
        task.result()


# -- the run ----------------------------------------------------------------------------------


KEYS = ("msgs_s", "published_s", "p50_us", "p99_us", "server_cpu_us_per_msg", "rss_before_kib", "rss_peak_kib")


async def bench(systems: list[System], opts: Any) -> tuple[dict[tuple[str, str], list[dict[str, Any]]], list[str]]:
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    notes: list[str] = []
    for system in systems:
        await system.setup()
    # System by system within a repeat, so that a system's "10 subs" and "10 subs + 1 stopped" run back to back.
    for repeat in range(opts.repeat):
        for system in systems:
            for name, subscribers, window, publishers, durable, slow in POINTS:
                if durable and not system.supports_durable():
                    continue
                try:
                    async with asyncio.timeout(opts.warmup + opts.duration + 60):
                        row = await run_point(system, subscribers, window, publishers, durable, slow, opts)
                except Exception as exc:
                    notes.append(f"{system.name} {name}: {type(exc).__name__}: {exc}")
                    print(f"[{system.name}] {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    continue
                samples.setdefault((system.name, name), []).append(row | {"repeat": repeat})
                print(f"[{system.name}] {name}: {row['msgs_s']:,.0f} msgs/s", file=sys.stderr, flush=True)
    return samples, notes


def report(samples: dict[tuple[str, str], list[dict[str, Any]]], opts: Any, header: str) -> dict[str, Any]:
    rows = {key: summarize(runs, KEYS) for key, runs in samples.items()}
    for key, runs in samples.items():
        rows[key]["stalls"] = sum(r["stalls"] for r in runs)
    table = [
        [system, point, fmt(r, "msgs_s", 0), fmt(r, "p50_us", 0), fmt(r, "p99_us", 0),
         fmt(r, "server_cpu_us_per_msg", 1), fmt(r, "rss_peak_kib", 0, 1 / 1024)]
        for (point, *_) in POINTS for (system, p), r in rows.items() if p == point
    ]  # fmt: skip
    columns = ["system", "point", "msgs/s per sub", "p50 µs", "p99 µs", "server CPU µs/publish", "server RSS MiB"]
    print(header + "\n")
    print(markdown_table("publish -> subscribe, 100-byte payloads", columns, table))
    others = [s for s in ("nats", "redis") if any(system == s for system, _ in rows)]
    ratios = []
    for point, *_ in POINTS:
        mine = rows.get(("bastion", point), {}).get("msgs_s")
        theirs = [rows.get((other, point), {}).get("msgs_s") for other in others]
        if mine is not None:
            ratios.append([point, *("-" if not t else f"{mine / t:.2f}x" for t in theirs)])
    if others:
        print(markdown_table("msgs/s per subscriber, bastion / reference", ["point", *others], ratios))
    slow = f"{MANY} subs + 1 stopped"
    verdicts = []
    for system in dict.fromkeys(s for s, _ in rows):
        with_slow = rows.get((system, slow), {})
        # The baseline of each repeat: the mean of the 10-subscriber points just before and just after.
        paired: dict[int, list[float]] = {}
        for point in (f"{MANY} subs", f"{MANY} subs, again"):
            for r in samples.get((system, point), []):
                paired.setdefault(r["repeat"], []).append(r["msgs_s"])
        ratios_s = [
            {"ratio": r["msgs_s"] * len(paired[r["repeat"]]) / sum(paired[r["repeat"]])}
            for r in samples.get((system, slow), [])
            if sum(paired.get(r["repeat"], [])) > 0
        ]
        stat = summarize(ratios_s, ["ratio"])
        ratio = stat.get("ratio")
        target = Target(
            f"{system}: {MANY} subscribers' msgs/s with 1 stopped / without",
            f">= {SLOW_RATIO:.2f}" if system == "bastion" else "reference",
            ratio,
            (lambda x: x >= SLOW_RATIO) if system == "bastion" else None,
        )
        rss = f"server RSS {fmt(with_slow, 'rss_before_kib', 1, 1 / 1024)} MiB before, peak {fmt(with_slow, 'rss_peak_kib', 1, 1 / 1024)} MiB during"  # noqa: E501
        value = fmt(stat, "ratio", 3) if ratio is not None else "n/a"
        print(f"- {target.name}: {value} ({target.bound}) **{target.verdict}**; {rss}")
        ends = [r["stopped_subscriber"] for r in samples.get((system, slow), [])]
        if ends:
            print(f"  - the stopped subscriber, let run again after the point: {ends[-1] or 'still subscribed'}")
        verdicts.append(target.as_dict() | {"stopped_subscriber": ends})
    stalls = {f"{s} {p}": r["stalls"] for (s, p), r in rows.items() if r["stalls"]}
    if stalls:
        print(f"\nstalls (a message lost, the window waited {STALL:g}s): {stalls}")
    return {"rows": [{"system": s, "point": p, **r} for (s, p), r in rows.items()], "slow_subscriber": verdicts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short points: about a minute in all")
    parser.add_argument("--repeat", type=int, default=3, help="samples per point (default 3)")
    parser.add_argument(
        "--duration", type=float, default=None, help="measured seconds per point (default 3; quick 0.8)"
    )
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds per point (default 1; quick 0.3)")
    parser.add_argument("--systems", nargs="+", choices=sorted(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--slow-subscriber", nargs=2, metavar=("SYSTEM", "PORT"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    import uvloop

    if opts.slow_subscriber:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(slow_subscriber_main(opts.slow_subscriber[0], int(opts.slow_subscriber[1])))
        return 0
    opts.duration = opts.duration or (0.8 if opts.quick else 3.0)
    opts.warmup = opts.warmup if opts.warmup is not None else (0.3 if opts.quick else 1.0)
    if opts.repeat < 1 or opts.duration <= 0 or opts.warmup < 0:
        parser.error("repeat must be >= 1, duration > 0, warmup >= 0")
    server_cpu, client_cpu = pick_cpus()
    pinning = "fewer than 2 CPUs: no pinning"
    if server_cpu is not None and client_cpu is not None:
        pinning = f"servers on CPU {server_cpu}, load generator on CPU {client_cpu}"
        busy = cpu_busy([server_cpu, client_cpu])
        pinning += " (busy before the run: " + ", ".join(f"CPU {c} {f:.0%}" for c, f in busy.items()) + ")"
    servers: list[Any] = []
    systems: list[System] = []
    notes: list[str] = []
    try:
        for name in opts.systems:
            kind, serve = SYSTEMS[name]
            try:
                servers.append(serve(server_cpu))
            except Exception as exc:
                notes.append(f"{name} skipped: {exc}")
                continue
            systems.append(kind(servers[-1]))
            if systems[-1].note:
                notes.append(f"{name}: {systems[-1].note}")
        if client_cpu is not None:
            os.sched_setaffinity(0, {client_cpu})
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            samples, failures = runner.run(bench(systems, opts))
    finally:
        for server in servers:
            server.stop()
    header = (
        f"python {platform.python_version()}, uvloop, {pinning}; plaintext on loopback; "
        f"{opts.repeat} x ({opts.warmup:g}s warm-up + {opts.duration:g}s) per point; window {WINDOW}, "
        f"{PUBLISHERS} publisher tasks; median (min-max)"
    )
    doc = report(samples, opts, header)
    for note in notes + failures:
        print(f"\nnote: {note}")
    if opts.json:
        doc |= {"header": header, "notes": notes + failures}
        doc["samples"] = {f"{system} | {point}": runs for (system, point), runs in samples.items()}
        opts.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
