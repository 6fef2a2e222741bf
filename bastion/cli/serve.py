"""``bastion serve``: compose the server from the configuration and run it.

This is an entry point: it reads the finished ``Config``, prepares the data
directory, bootstraps the admin credential, imports user services, and runs
the server on uvloop (where installed) until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bastion._version import __version__
from bastion.cli.cert import prepare_tls
from bastion.config import Config
from bastion.exceptions import UsageError
from bastion.jobs import JobRegistry
from bastion.security.audit import AuditLog
from bastion.security.authn import StoreAuthenticator, hash_token, new_token, new_token_id
from bastion.security.credentials import Token, User
from bastion.security.passwords import PasswordHasher
from bastion.security.principal import ADMIN_ROLE
from bastion.security.ratelimit import create_limiter
from bastion.security.throttle import LoginThrottle
from bastion.server.scheduler import Scheduler
from bastion.server.server import Server
from bastion.service import Service
from bastion.services import Component, HostedComponent
from bastion.services.admin import create_service as create_admin_service
from bastion.services.auth import create_service
from bastion.services.backup import Backups
from bastion.services.files import Files
from bastion.services.jobs import Jobs
from bastion.services.kv import KV
from bastion.store import Store, open_store

__all__ = ["bootstrap_admin", "load_job_registries", "load_services", "run", "store_location"]

log = logging.getLogger("bastion.server")

T = TypeVar("T")


def _tighten(path: Path) -> bool:
    """Make an existing secret file 0600; whether it exists."""
    if not path.exists():
        return False
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    return True


async def bootstrap_admin(store: Store, path: Path) -> str:
    """On an empty store: create the ``admin`` user and its API token in ``path`` (0600).

    Returns how ``path`` relates to this start: "written to", "in" or "not in".
    """
    exists = _tighten(path)
    if await store.list_users():
        return "in" if exists else "not in"
    now = time.time()
    await store.create_user(User("admin", frozenset({ADMIN_ROLE}), None, now))
    token = new_token()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    await store.add_token(Token(new_token_id(), hash_token(token), "admin", "api", "bootstrap", now))
    return "written to"


def _import_objects(specs: list[str], kind: type[T], kind_name: str, flag: str, example: str) -> list[T]:
    """Import ``module:attribute`` for each spec; the attribute is a ``kind`` (or a list of them)."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    found: list[T] = []
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise UsageError(f"{flag} {spec!r}: expected MODULE:ATTRIBUTE, e.g. {example}")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UsageError(f"{flag} {spec!r}: cannot import {module_name}: {exc}") from None
        value = getattr(module, attr, None)
        items: list[object] = list(value) if isinstance(value, list | tuple) else [value]
        objects = [item for item in items if isinstance(item, kind)]
        if not objects or len(objects) != len(items):
            raise UsageError(f"{flag} {spec!r}: {attr} is not a {kind_name}")
        found.extend(objects)
    return found


def load_services(specs: list[str]) -> list[Service]:
    """Import ``module:attribute`` for each spec; the attribute is a Service (or a list of them)."""
    return _import_objects(specs, Service, "bastion.Service", "--service", "myapp.api:service")


def load_job_registries(specs: list[str]) -> list[JobRegistry]:
    """Import ``module:attribute`` for each spec; the attribute is a JobRegistry."""
    return _import_objects(specs, JobRegistry, "bastion.jobs.JobRegistry", "--jobs", "myapp.tasks:jobs")


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
    if not text:
        raise UsageError("backup.passphrase_file is empty")
    return text.encode()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(config: Config, *, echo: Callable[[str], None]) -> int:
    """Start the server described by ``config``; return the exit code."""
    logging.basicConfig(
        level=config.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    user_services = load_services(config.services)
    registries = load_job_registries(config.jobs.modules)
    data_dir = Path(config.data_dir)
    files_dir = Path(config.files.directory) if config.files.directory else data_dir / "files"
    passphrase = backup_passphrase(config)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tls = prepare_tls(config, warn=lambda line: print(line, file=sys.stderr, flush=True))

    async def main() -> None:
        async with open_store(store_location(config), password=store_password(config)) as store:
            token_path = data_dir / "admin.token"
            token_state = await bootstrap_admin(store, token_path)
            audit = AuditLog(data_dir / "audit.log")
            auth = config.auth
            throttle = LoginThrottle(
                store,
                max_failures=auth.max_failures_per_user_source,
                lockout=auth.lockout,
                global_per_hour=auth.max_failures_per_user_global,
                burst=auth.max_failures_per_source,
            )
            limiter = create_limiter(config.rate_limits)
            auth_service = create_service(store, hasher=PasswordHasher(), throttle=throttle, audit=audit, config=auth)
            backups = Backups(
                store, data_dir=data_dir, files_dir=files_dir, config=config.backup, passphrase=passphrase
            )
            hosted: list[HostedComponent] = [
                KV(store, config.kv),
                Files(store, files_dir, config.files),
                Jobs(store, registries, config.jobs),
            ]
            components: list[Component] = [*hosted, backups]
            builtin = [create_admin_service(backups), auth_service, *(c.service for c in hosted)]
            server = Server(
                [*builtin, *user_services],
                limits=config.limits,
                authenticator=StoreAuthenticator(store, throttle, audit),
                audit=audit,
                revalidate_interval=auth.revalidate_interval,
                ssl_context=tls.context,
                cert_files=tls.cert_files,
                crl_file=config.tls.crl,
                revoked_serials=config.tls.revoked_serials,
                limiter=limiter,
                scheduler=Scheduler(config.scheduler),
            )
            started: list[Component] = []
            try:
                for component in components:
                    await component.start()
                    started.append(component)
                await _serve(server, config, echo, token_state, token_path.resolve(), list(tls.messages))
            finally:
                for component in reversed(started):
                    await component.aclose()
                audit.close()
                await limiter.aclose()
        log.info("stopped")

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())
    return 0


async def _serve(
    server: Server,
    config: Config,
    echo: Callable[[str], None],
    token_state: str,
    token_path: Path,
    tls_messages: list[str],
) -> None:
    try:
        await server.start(config.host, config.port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
    server.install_signal_handlers()  # before the banner: readiness means SIGTERM drains
    host, port = server.addresses[0][:2]
    names = ", ".join(sorted(server.table.services))
    echo(f"bastion {__version__} listening on {host}:{port} (services: {names})")
    echo(f"admin token {token_state} {token_path} (mode 0600)")
    for line in tls_messages:
        echo(line)
    await server.serve_forever(handle_signals=False)
