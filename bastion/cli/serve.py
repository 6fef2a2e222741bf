"""``bastion serve``: compose the server from the configuration and run it.

This is an entry point: it reads the finished ``Config``, prepares the data
directory, bootstraps the admin credential, imports user services, and runs
the server on uvloop (where installed) until SIGTERM/SIGINT.

With ``workers`` above 1 (``--workers N|auto``) this process does the
one-time work (data directory, TLS certificates, store migrations, the admin
credential), binds the port and becomes the supervisor of N worker
processes (bastion/server/supervisor.py). Each worker is
``python -m bastion.cli.serve FD``: it gets the finished configuration from
the supervisor, composes the same server, serves on its own SO_REUSEPORT
socket, and keeps its rate-limit buckets (unless a Redis limiter is
configured) and the login throttle's buckets and failure counts in the table
the supervisor shares with every worker (ratelimit_shared.py), and the
logins it has in flight in a second one (throttle_shared.py). Worker 0 is the leader: it alone runs the
once-per-server background work (kv and files sweeps, job recovery and
retention, scheduled backups); its replacement takes over if it dies.

The HTTP gateway (bastion/gateway/, ``[gateway]``) runs in the same event
loop as the server, on its own port (``--http-port``, default 7401; off
with ``--no-http``), with the same certificate. It starts once the native
port listens, and the banner's second line is ``gateway listening on URL``.
On SIGTERM the server drains first -- /readyz answers 503 meanwhile -- and
then the gateway closes. With workers, the supervisor binds the gateway's
port too (one SO_REUSEPORT socket per worker), every worker serves it, and
/metrics adds up every worker's numbers through the snapshots they publish
in ``<data_dir>/metrics`` (bastion/observability/metrics.py).

Serving the development certificate, a task renews it before it expires
and reloads it (bastion/cli/cert.py ``keep_dev_certificate``; the leader
writes the files, every worker reloads them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from bastion import allocator
from bastion._version import __version__
from bastion.cli.bootstrap import bootstrap_admin, token_banner
from bastion.cli.cert import ConfigSource, TLSSetup, keep_dev_certificate, prepare_tls, reread_revoked_serials
from bastion.cli.data_dir import new_data_dir
from bastion.cli.loading import load_job_registries, load_services
from bastion.config import Config
from bastion.exceptions import UsageError
from bastion.gateway.runner import GatewayServer
from bastion.gateway.runner import serve as serve_gateway
from bastion.observability import logs
from bastion.observability.metrics import WorkerSnapshots, server_snapshot
from bastion.security.audit import AuditLog
from bastion.security.authn import StoreAuthenticator
from bastion.security.passwords import PasswordHasher
from bastion.security.ratelimit import Limiter, create_limiter
from bastion.security.ratelimit_shared import SharedHolds, SharedRateLimiter, SharedTable
from bastion.security.throttle import LoginThrottle
from bastion.security.throttle_shared import SharedPending, pending_table
from bastion.server.dispatch import IdempotencyKeys
from bastion.server.memtrim import HeapTrimmer
from bastion.server.notify import SystemdNotifier
from bastion.server.scheduler import Scheduler
from bastion.server.server import HANDLER_THREAD_PREFIX, Server
from bastion.server.supervisor import Supervisor, WorkerChannel, bind_listeners, resolve_workers
from bastion.services import Component, HostedComponent
from bastion.services.admin import create_service as create_admin_service
from bastion.services.auth import Reassign, create_service
from bastion.services.backup import Backups
from bastion.services.files import Files
from bastion.services.jobs import Jobs
from bastion.services.kv import KV
from bastion.services.messages import Messages
from bastion.store import observe as store_observe
from bastion.store import open_store
from bastion.store.sqlite import SQLiteStore

__all__ = ["bootstrap_admin", "run", "store_location", "worker_main"]

log = logging.getLogger("bastion.server")


def store_location(config: Config) -> str:
    """The store URL or path ``config`` names (default: ``<data_dir>/bastion.db``)."""
    return config.store or str(Path(config.data_dir) / "bastion.db")


def store_password(config: Config) -> str | None:
    """The store's password from ``store_password_file`` (0600 expected), if one is set."""
    if not config.store_password_file:
        return None
    path = Path(config.store_password_file)
    try:
        if path.stat().st_mode & 0o077:
            log.warning("store password file %s is readable by others; chmod 600 it", path)
        return path.read_text().strip() or None
    except OSError as exc:
        raise UsageError(f"cannot read store_password_file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:  # said without the bytes: they are a secret
        raise UsageError(f"store_password_file {path} is not UTF-8 text") from None


def backup_passphrase(config: Config) -> bytes | None:
    """The backup passphrase from ``BASTION_BACKUP_PASSPHRASE`` or ``backup.passphrase_file``."""
    env = os.environ.get("BASTION_BACKUP_PASSPHRASE")
    if env:
        return env.encode()
    if not config.backup.passphrase_file:
        return None
    try:
        text = Path(config.backup.passphrase_file).read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read backup.passphrase_file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError("backup.passphrase_file is not UTF-8 text") from None
    if not text:
        raise UsageError("backup.passphrase_file is empty")
    return text.encode()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(config: Config, *, echo: Callable[[str], None], source: ConfigSource | None = None) -> int:
    """Start the server described by ``config``; return the exit code.

    With ``config.workers`` above 1 this process becomes the supervisor of
    that many worker processes (bastion/server/supervisor.py); else it serves.
    ``source``: where ``config`` came from; SIGHUP re-reads ``tls.revoked_serials`` from it.
    """
    logs.configure(config.log_level, config.log_format)
    notifier = SystemdNotifier.from_environ()  # taken out of the environment: workers and jobs must not notify
    workers = resolve_workers(config.workers)
    load_services(config.services)  # fail here, not in every worker, if they cannot be imported
    load_job_registries(config.jobs.modules)
    backup_passphrase(config)
    with new_data_dir(Path(config.data_dir)) as store_opened:
        warn = log.warning if config.log_format == "json" else lambda line: print(line, file=sys.stderr, flush=True)
        tls = prepare_tls(config, warn=warn)
        if workers > 1:
            return _supervise(
                config, workers, tls.messages, echo, tls.cert_files is not None, source, notifier, store_opened
            )
        role = _Role(notifier=notifier, store_opened=store_opened)

        async def main() -> None:
            await _compose_and_serve(config, role, echo, list(tls.messages), tls, source)

        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(main())
    _leave_stuck_handlers(0)
    return 0


#: Seconds the handler threads get, once the server has stopped, to finish before the process leaves them.
HANDLER_EXIT_WAIT = 1.0


def _leave_stuck_handlers(code: int) -> None:
    """Exit now (``code``) if a synchronous handler's thread is still busy after the drain.

    The drain answered its call UNAVAILABLE when the grace period ran out,
    but a thread cannot be cancelled, and the interpreter joins the
    executor's threads before it exits: one handler stuck in a blocking call
    would keep the stopped server's process alive for as long as it blocks.
    """
    deadline = time.monotonic() + HANDLER_EXIT_WAIT
    for thread in threading.enumerate():
        if thread.name.startswith(HANDLER_THREAD_PREFIX):
            thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threading.enumerate() if t.name.startswith(HANDLER_THREAD_PREFIX) and t.is_alive()]
    if not stuck:
        return
    log.warning("%d handler thread(s) still busy after the drain: exiting without waiting for them", len(stuck))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass(frozen=True)
class _Role:
    """What this process is: the only server (the defaults), or one worker of several."""

    channel: WorkerChannel | None = None
    shared: SharedTable | None = None
    pending: SharedTable | None = None  # the login attempts in flight (throttle_shared.py)
    notifier: SystemdNotifier | None = None  # systemd's, for the only server (the supervisor keeps its own)
    store_opened: Callable[[], None] | None = None  # told once the store has opened (data_dir.new_data_dir)

    @property
    def leader(self) -> bool:
        return self.channel is None or self.channel.leader

    def holds(self, namespace: str) -> SharedHolds | None:
        """Holds counted across the workers (None: one process counts its own)."""
        ch = self.channel
        return None if ch is None or self.shared is None else SharedHolds(self.shared, namespace, ch.index, ch.count)

    def logins(self) -> SharedPending | None:
        """Login attempts in flight counted across the workers (None: one process counts its own)."""
        ch = self.channel
        return None if ch is None or self.pending is None else SharedPending(self.pending, ch.index, ch.count)


async def _compose_and_serve(
    config: Config,
    role: _Role,
    echo: Callable[[str], None],
    tls_messages: list[str],
    tls: TLSSetup,
    source: ConfigSource | None = None,
) -> None:
    user_services = load_services(config.services)
    registries = load_job_registries(config.jobs.modules)
    data_dir = Path(config.data_dir)
    files_dir = Path(config.files.directory) if config.files.directory else data_dir / "files"
    passphrase = backup_passphrase(config)
    async with open_store(store_location(config), password=store_password(config)) as store:
        if role.store_opened is not None:
            role.store_opened()
        token_path = data_dir / "admin.token"
        token_state = "in" if role.channel is not None else await bootstrap_admin(store, token_path)
        audit = AuditLog(data_dir / "audit.log")
        auth = config.auth
        throttle = LoginThrottle(
            store,
            max_failures=auth.max_failures_per_user_source,
            lockout=auth.lockout,
            global_per_hour=auth.max_failures_per_user_global,
            burst=auth.max_failures_per_source,
            shared=role.shared,
            pending=role.logins(),
            ipv6_prefix=config.rate_limits.ipv6_prefix,
            redis_url=config.rate_limits.redis_url,
            redis_prefix=config.rate_limits.redis_prefix,
            redis_timeout=config.rate_limits.redis_timeout,
            redis_fail_open=auth.redis_fail_open,
        )
        limiter: Limiter
        if role.shared is not None and config.rate_limits.redis_url is None:
            limiter = SharedRateLimiter(config.rate_limits, role.shared)
        else:
            limiter = create_limiter(config.rate_limits)
        # Every principal here is a user (the store's authenticator), so a write to ~NAME or an upload commits
        # only while its user has a row (not the library default) -- unless a certificate naming no user may
        # own ~NAME and files ("any").
        store.userless_owners = config.tls.client_subjects == "any"
        leader = role.leader
        # Live topic messages go through the store only when another process may share it.
        relay = role.channel is not None or not isinstance(store, SQLiteStore)
        messages = Messages(store, config.messages, leader=leader, relay=relay, holds=role.holds)
        # What auth.delete_user hands over or deletes (mailboxes go with the user row itself; the durable
        # topics of the user's personal space are emptied, whoever the heir).
        owned_data: dict[str, Reassign] = {
            "kv": store.kv_reassign_owner,
            "files": store.files_reassign_owner,
            "jobs": store.jobs_reassign_owner,
            "idempotency": store.idempotency_reassign_owner,
            "topics": messages.topics.forget_user,
        }
        auth_service = create_service(
            store, hasher=PasswordHasher(), throttle=throttle, audit=audit, config=auth, owned_data=owned_data
        )
        backups = Backups(
            store, data_dir=data_dir, files_dir=files_dir, config=config.backup, passphrase=passphrase, leader=leader
        )
        hosted: list[HostedComponent] = [
            KV(store, config.kv, leader=leader, watch_holds=role.holds("kv-watch")),
            Files(store, files_dir, config.files, leader=leader),
            Jobs(store, registries, config.jobs, leader=leader),
            messages,
        ]
        components: list[Component] = [*hosted, backups]
        builtin = [create_admin_service(backups), auth_service, *(c.service for c in hosted)]
        server = Server(
            [*builtin, *user_services],
            limits=config.limits,
            authenticator=StoreAuthenticator(store, throttle, audit, client_subjects=config.tls.client_subjects),
            audit=audit,
            revalidate_interval=auth.revalidate_interval,
            ssl_context=tls.context,
            cert_files=tls.cert_files,
            crl_file=config.tls.crl,
            revoked_serials=config.tls.revoked_serials,
            limiter=limiter,
            scheduler=Scheduler(config.scheduler),
            trusted_proxies=config.trusted_proxies,
            idempotency=IdempotencyKeys(store),
            ipv6_prefix=config.rate_limits.ipv6_prefix,
        )
        store_observe.observer = server.metrics.observe_store
        backups.counters = server.counters  # bastion_backups_total on /metrics
        if source is not None and tls.context is not None:
            server.hangup_hooks.append(lambda: reread_revoked_serials(server, source))
        started: list[Component] = []
        renewal: asyncio.Task[None] | None = None
        try:
            for component in components:
                await component.start()
                started.append(component)
            if tls.dev:
                renewal = asyncio.create_task(keep_dev_certificate(config, server.reload_tls, leader=leader))
            if role.channel is None:
                await _serve(server, config, echo, token_state, token_path.resolve(), tls_messages, tls, role.notifier)
            else:
                await _serve_worker(server, role.channel, config, tls)
        finally:
            if renewal is not None:
                renewal.cancel()
            store_observe.observer = None
            for component in reversed(started):
                await component.aclose()
            audit.close()
            await limiter.aclose()
            await throttle.aclose()
    log.info("stopped")


async def _serve(
    server: Server,
    config: Config,
    echo: Callable[[str], None],
    token_state: str,
    token_path: Path,
    tls_messages: list[str],
    tls: TLSSetup,
    notifier: SystemdNotifier | None,
) -> None:
    try:
        await server.start(config.host, config.port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
    gateway: GatewayServer | None = None
    if config.gateway.enabled:
        try:
            gateway = await serve_gateway(
                server,
                config.gateway,
                host=config.host,
                cert_files=tls.cert_files,
                tls_min_version=config.tls.min_version,
            )
        except BaseException:
            await server.shutdown(0)
            raise
    server.install_signal_handlers()  # before the banner: readiness means SIGTERM drains
    allocator.settle_gc()  # start-up is over: keep the collector off what it built
    trimmer = HeapTrimmer(server)  # gives back the heap a storm of connections leaves (server/memtrim.py)
    trimmer.start()
    host, port = server.addresses[0][:2]
    names = ", ".join(sorted(server.table.services))
    echo(f"bastion {__version__} listening on {host}:{port} (services: {names})")
    if gateway is not None:
        echo(f"gateway listening on {gateway.url}")
    echo(token_banner(token_state, token_path))
    for line in tls_messages:
        echo(line)
    if notifier is not None:
        notifier.serving(server, f"serving on {host}:{port}")  # its watchdog pings end with the loop
    try:
        await server.serve_forever(handle_signals=False)  # returns once drained: /readyz said 503 meanwhile
    finally:
        trimmer.stop()
        if gateway is not None:
            await gateway.aclose()


#: Seconds between a worker's publications of its metrics snapshot.
METRICS_PUBLISH_INTERVAL = 1.0


async def _serve_worker(server: Server, channel: WorkerChannel, config: Config, tls: TLSSetup) -> None:
    """Serve on the sockets the supervisor handed over; drain when told to or when it goes away."""
    for sock in channel.listeners:
        await server.start(sock=sock)
    payload = channel.payload
    snapshots = WorkerSnapshots(Path(payload["metrics_dir"]), channel.index, channel.count)
    gateway: GatewayServer | None = None
    if channel.http_listeners:
        gateway = await serve_gateway(
            server,
            config.gateway,
            host=config.host,
            cert_files=tls.cert_files,
            sockets=channel.http_listeners,
            tls_min_version=config.tls.min_version,
            # Before it accepts: a scrape that came first would show this worker's numbers alone.
            metrics_snapshot=lambda: snapshots.gather(server_snapshot(server)),
        )
    server.install_signal_handlers(supervised=True)  # the supervisor passes signals on
    allocator.settle_gc()
    trimmer = HeapTrimmer(server)
    trimmer.start()
    stopping: list[asyncio.Task[None]] = []

    def orphaned() -> None:
        log.warning("the supervisor has exited: draining")
        stopping.append(asyncio.get_running_loop().create_task(server.shutdown()))

    async def publish() -> None:
        while True:
            try:
                snapshots.publish(server_snapshot(server))
            except OSError as exc:
                log.warning("cannot publish metrics to %s: %s", snapshots.directory, exc.strerror or exc)
            await asyncio.sleep(METRICS_PUBLISH_INTERVAL)

    publisher = asyncio.get_running_loop().create_task(publish())
    channel.watch(orphaned)
    channel.ready({"pid": os.getpid(), "services": sorted(server.table.services)})
    try:
        await server.serve_forever(handle_signals=False)
    finally:
        publisher.cancel()
        trimmer.stop()
        with contextlib.suppress(OSError):
            snapshots.publish(server_snapshot(server))  # the last counts, for a replacement to continue from
        if gateway is not None:
            await gateway.aclose()
        channel.close()


# -- several workers ---------------------------------------------------------------------------


#: Keys the login throttle may remember in the shared table (its three maps).
_THROTTLE_KEYS = 3 * 100_000


def _metrics_dir(data_dir: Path) -> Path:
    """``<data_dir>/metrics``, emptied of an earlier run's worker snapshots."""
    directory = data_dir / "metrics"
    directory.mkdir(mode=0o700, exist_ok=True)
    for path in directory.glob("*worker-*.json*"):
        with contextlib.suppress(OSError):
            path.unlink()
    return directory


def _supervise(
    config: Config,
    workers: int,
    tls_messages: list[str],
    echo: Callable[[str], None],
    tls_on: bool = True,
    source: ConfigSource | None = None,
    notifier: SystemdNotifier | None = None,
    store_opened: Callable[[], None] = lambda: None,
) -> int:
    """Bootstrap the data once, bind the port, and supervise ``workers`` worker processes."""
    data_dir = Path(config.data_dir)
    token_path = data_dir / "admin.token"

    async def bootstrap() -> str:
        async with open_store(store_location(config), password=store_password(config)) as store:  # migrates
            store_opened()
            return await bootstrap_admin(store, token_path)

    token_state = asyncio.run(bootstrap())
    try:
        listeners = bind_listeners(config.host, config.port, workers)
    except OSError as exc:
        raise UsageError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
    http_listeners: list[list[socket.socket]] = []
    if config.gateway.enabled:
        try:
            http_listeners = bind_listeners(config.host, config.gateway.http_port, workers)
        except OSError as exc:
            for group in listeners:
                for sock in group:
                    sock.close()
            raise UsageError(
                f"gateway: cannot listen on {config.host}:{config.gateway.http_port}: {exc.strerror}"
            ) from None
    metrics_dir = _metrics_dir(data_dir)
    # SharedHolds: a slot per watch or subscription, and an epoch per worker and kind.
    watch_keys = workers * (config.kv.max_watchers + config.messages.max_watchers + 3)
    watch_keys += workers * config.messages.topics.max_subscribers
    shared = SharedTable.create(config.rate_limits.max_tracked + _THROTTLE_KEYS + watch_keys)
    pending = pending_table(workers)
    host, port = listeners[0][0].getsockname()[:2]

    def announce(reports: list[dict[str, Any]]) -> None:
        names = ", ".join(reports[0].get("services", []))
        echo(f"bastion {__version__} listening on {host}:{port} (services: {names})")
        if http_listeners:
            http_host, http_port = http_listeners[0][0].getsockname()[:2]
            scheme = "https" if tls_on else "http"
            shown = f"[{http_host}]" if ":" in http_host else http_host
            echo(f"gateway listening on {scheme}://{shown}:{http_port}")
        echo(token_banner(token_state, token_path.resolve()))
        for line in tls_messages:
            echo(line)
        log.info("%d workers serving: pids %s", len(reports), ", ".join(str(r.get("pid")) for r in reports))

    payload = {
        "config": msgspec.to_builtins(config),
        "source": None if source is None else {"path": source.path, "overrides": source.overrides},
        "shared_fd": shared.fileno(),
        "pending_fd": pending.fileno(),
        "metrics_dir": str(metrics_dir),
    }
    supervisor = Supervisor(
        [sys.executable, "-m", "bastion.cli.serve"],
        listeners,
        payload,
        on_ready=announce,
        grace=config.limits.grace_period,
        extra_fds=[shared.fileno(), pending.fileno()],
        http_listeners=http_listeners,
        hang_timeout=config.worker_timeout or None,
        notifier=notifier,
    )
    try:
        code = supervisor.run()
    finally:
        shared.close()
        pending.close()
    log.info("stopped")
    return code


def worker_main(argv: list[str]) -> int:
    """A worker process's entry point: ``python -m bastion.cli.serve FD`` (started by the supervisor)."""
    for sig in (signal.SIGHUP, signal.SIGUSR2):  # until the server's own handlers (TLS reload, hurry) are in
        signal.signal(sig, signal.SIG_IGN)
    channel = WorkerChannel.open(int(argv[0]))
    payload = channel.payload
    config = msgspec.convert(payload["config"], Config)
    logs.configure(config.log_level, config.log_format, channel.index)
    shared = SharedTable(int(payload["shared_fd"]))
    # A supervisor started before an upgrade respawns workers of the new code with its old payload.
    pending = None if payload.get("pending_fd") is None else SharedTable(int(payload["pending_fd"]))
    tls = prepare_tls(config, warn=lambda line: None)  # the supervisor has shown the warnings
    source = None if payload.get("source") is None else ConfigSource(**payload["source"])

    async def main() -> None:
        await _compose_and_serve(config, _Role(channel, shared, pending), lambda line: None, [], tls, source)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())
    _leave_stuck_handlers(0)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
