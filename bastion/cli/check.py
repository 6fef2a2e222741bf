"""``bastion serve --check``: validate what ``serve`` would run, then exit -- like ``nginx -t`` or ``sshd -t``.

The configuration is loaded exactly as ``serve`` loads it (the same
``ConfigSource``: the file from ``--config``/``BASTION_CONFIG``, the
``BASTION_*`` environment, the flags), and each part ``serve`` would use is
tried with serve's own functions (bastion/cli/serve.py, bastion/cli/cert.py):
the worker count, the ``--service`` and ``--jobs`` modules (imported), the
backup passphrase and store password files, the TLS certificate and key (loaded
into a server context: they must match), the client CA and CRL (no
``tls.client_ca`` with client certificates on: the development CA ``serve``
would trust, or create, for them), the data directory, the store's schema
version, Redis, the listening ports and the backup directory.

Nothing is started, written, created, chmod-ed or migrated. What ``serve``
would create -- the data directory, the development CA and server
certificate, a new store -- is reported as a ``note``, and a store at an
older schema version as "would migrate from N to M". A SQLite store is read
through a read-only connection (``immutable`` when no write-ahead log is
present, which would otherwise leave ``-wal``/``-shm`` files behind); a
PostgreSQL one over one connection in a read-only transaction
(``PostgresStore.probe``), which also reads the role's rights: with
migrations pending, what it lacks to apply them (CREATE on the schema; the
owner's, REFERENCES or TRIGGER rights on the existing tables the pending
statements name, found in their text) is an error, as serve would fail. Ports are tried by binding a socket, never
listening on it; port 0 is skipped, and a port in use (a running server
being checked before its restart) is a warning.

Exit status: 0 when everything passes, 2 when the configuration is wrong (the
CLI's usage-error code), 1 when something outside it -- the store, Redis --
cannot be reached. Secrets never show: DSNs and URLs go through
``redact_dsn``, and no password, passphrase or token is read out.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import socket
import sqlite3
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from bastion import __version__
from bastion.cli.cert import INSECURE_WARNING, ConfigSource, is_loopback, server_hosts, warn_loose_key
from bastion.cli.common import EXIT_CALL_ERROR, EXIT_USAGE, shown
from bastion.config import Config
from bastion.exceptions import BastionError, Unavailable, UsageError
from bastion.security.tls import load_verify, server_context
from bastion.security.tls_devca import dev_ca_plan, dev_tls_plan, tls_dir
from bastion.security.tls_files import parse_serial
from bastion.store.postgres_dsn import redact_dsn

if TYPE_CHECKING:
    from bastion.store.postgres import Probe

__all__ = ["EXIT_UNREACHABLE", "check_config"]

#: Something outside the configuration (the store, Redis) cannot be reached.
EXIT_UNREACHABLE = EXIT_CALL_ERROR

#: Seconds a connection to the store or Redis may take.
CONNECT_TIMEOUT = 10.0


class Report:
    """The check's lines, printed as they come (a step that hangs shows where), and its tally."""

    def __init__(self) -> None:
        self.errors = 0
        self.unreachable = 0

    def line(self, tag: str, what: str, text: str) -> None:
        print(f"{tag:<5} {what}: {shown(text)}", flush=True)

    def ok(self, what: str, text: str) -> None:
        self.line("ok", what, text)

    def note(self, what: str, text: str) -> None:
        self.line("note", what, text)

    def warn(self, what: str, text: str) -> None:
        self.line("warn", what, text)

    def skip(self, what: str, text: str) -> None:
        self.line("skip", what, text)

    def error(self, what: str, text: str) -> None:
        self.errors += 1
        self.line("ERROR", what, text)

    def down(self, what: str, text: str) -> None:
        self.unreachable += 1
        self.line("DOWN", what, text)

    def failure(self, what: str, exc: BaseException) -> None:
        """``exc`` as the line it deserves: unreachable (Unavailable), else a configuration error."""
        if isinstance(exc, Unavailable):
            self.down(what, str(exc))
        elif isinstance(exc, OSError):
            where = f"{exc.filename}: " if exc.filename is not None else ""
            self.error(what, f"{where}{exc.strerror or exc}")
        else:
            self.error(what, str(exc))

    def code(self) -> int:
        if self.errors:
            return EXIT_USAGE
        return EXIT_UNREACHABLE if self.unreachable else 0


def check_config(source: ConfigSource) -> int:
    """Validate what ``bastion serve`` would run from ``source``; print the report; return the exit status."""
    from bastion.cli.loading import load_job_registries, load_services
    from bastion.cli.serve import backup_passphrase
    from bastion.server.supervisor import resolve_workers

    report = Report()
    print(f"bastion {__version__}: checking the configuration (nothing is started or written)", flush=True)
    try:
        config = source.load()
    except (UsageError, OSError, ValueError) as exc:
        report.failure("configuration", exc)
        return _summary(report)
    path = source.path or os.environ.get("BASTION_CONFIG")
    read = f"{Path(path).resolve()}, environment and flags" if path else "defaults, environment and flags"
    report.ok("configuration", read if path else f"{read} (no configuration file)")
    steps: tuple[tuple[str, Callable[[], str]], ...] = (
        ("workers", lambda: f"{resolve_workers(config.workers)}"),
        ("services", lambda: ", ".join(s.name for s in load_services(config.services)) or "built-in only"),
        ("jobs", lambda: f"{sum(len(r) for r in load_job_registries(config.jobs.modules))} job(s)"),
        ("backup passphrase", lambda: "set" if backup_passphrase(config) else "not set"),
    )
    metrics_token = config.gateway.metrics_token_file
    if config.gateway.enabled and metrics_token:
        steps += (("metrics token file", lambda: _metrics_token(metrics_token)),)
    for what, step in steps:
        try:
            report.ok(what, step())
        except (BastionError, OSError, ValueError) as exc:
            report.failure(what, exc)
    _check_tls(config, report)
    _check_directory(report, "data directory", Path(config.data_dir), private=True)
    files = Path(config.files.directory) if config.files.directory else Path(config.data_dir) / "files"
    _check_directory(report, "files directory", files, private=False)
    _check_outside(config, report)
    _check_ports(config, report)
    if config.backup.directory:
        _check_directory(report, "backup directory", Path(config.backup.directory), private=False)
    else:
        report.skip("backup directory", "not configured (<data_dir>/backups)")
    return _summary(report)


def _metrics_token(path: str) -> str:
    """What serve reads for gateway.metrics_token_file (read, never shown)."""
    from bastion.gateway import read_token_file

    read_token_file(path)
    return f"{path}, readable"


def _summary(report: Report) -> int:
    code = report.code()
    if code == 0:
        print("configuration OK", flush=True)
    else:
        print(f"configuration check failed: {report.errors} error(s), {report.unreachable} unreachable", flush=True)
    return code


# -- TLS ----------------------------------------------------------------------------------


def _check_tls(config: Config, report: Report) -> None:
    """What ``prepare_tls`` would do, without creating or renewing the development CA and certificate."""
    tls = config.tls
    if tls.insecure:
        if not is_loopback(config.host) and not tls.force_insecure:
            report.error("TLS", f"--insecure refuses to serve plaintext on the non-loopback address {config.host}")
        else:
            report.warn("TLS", INSECURE_WARNING.removeprefix("WARNING: "))
        return
    for serial in tls.revoked_serials:
        try:
            parse_serial(serial)
        except UsageError as exc:
            report.error("tls.revoked_serials", str(exc))
    pair: tuple[str, str] | None = None
    if tls.cert is not None and tls.key is not None:
        pair = (tls.cert, tls.key)
        warn_loose_key(tls.key, lambda line: report.warn("TLS key", line.removeprefix("WARNING: ")))
    else:
        pair = _dev_pair(config, report)
    if pair is not None:
        try:
            server_context(msgspec.structs.replace(tls, client_auth="none"), *pair)
            report.ok("TLS certificate", f"{Path(pair[0]).resolve()} loads with its key {Path(pair[1]).resolve()}")
        except UsageError as exc:
            report.error("TLS certificate", str(exc))
    if tls.client_auth == "none":
        report.skip("client certificates", "tls.client_auth is none")
        return
    client_ca = tls.client_ca if tls.client_ca is not None else _dev_client_ca(config, report)
    verify = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    checks = [("client CA file", client_ca)] if client_ca is not None else []
    if tls.crl is not None:
        checks.append(("CRL file", tls.crl))
    for what, file in checks:
        try:
            load_verify(verify, file, what)
            report.ok(what, str(Path(file).resolve()))
        except UsageError as exc:
            report.error(what, str(exc))


def _dev_pair(config: Config, report: Report) -> tuple[str, str] | None:
    """The development certificate and key if ``ensure_dev_tls`` would keep them as they are; else None, with a note
    of what it would create or renew."""
    try:
        plan = dev_tls_plan(config.data_dir, server_hosts(config.host), renew_before=config.tls.dev_renew_before)
    except UsageError as exc:
        report.error("TLS", str(exc))
        return None
    paths, directory = plan.paths, plan.paths.ca.parent.resolve()
    if plan.action == "create":
        report.note("TLS", f"would create the development CA and server certificate in {directory}")
    elif plan.action == "renew-ca":
        report.note("TLS", f"would renew the development CA {paths.ca.resolve()} (it expires soon)")
    elif plan.action == "issue":
        report.note("TLS", f"would issue a development server certificate in {directory}")
    else:
        report.ok("TLS", f"development certificate; CA certificate: {paths.ca.resolve()}")
        return str(paths.cert), str(paths.key)
    return None


def _dev_client_ca(config: Config, report: Report) -> str | None:
    """With client certificates on and no ``tls.client_ca``, ``serve`` trusts the development CA for them
    (``ensure_dev_ca``): the CA file to check if it would keep it as it is; else None, with a line saying what
    it would create or renew (or why it cannot)."""
    what, ca_path = "client certificates", tls_dir(config.data_dir).resolve() / "ca.pem"
    try:
        action = dev_ca_plan(config.data_dir)
    except UsageError as exc:
        report.error(what, str(exc))
        return None
    if action == "create":
        report.note(what, f"tls.client_ca is not set: would create the development CA {ca_path} and trust only "
                    "client certificates it issues (bastion cert client NAME)")  # fmt: skip
        return None
    if action == "renew":
        report.warn(what, f"tls.client_ca is not set: would replace the development CA {ca_path} (it expires "
                    "soon): client certificates the old one issued would be refused")  # fmt: skip
        return None
    report.note(what, f"tls.client_ca is not set: the development CA {ca_path} is trusted for client certificates")
    return str(ca_path)


# -- directories --------------------------------------------------------------------------


def _check_directory(report: Report, what: str, directory: Path, *, private: bool) -> None:
    """``directory`` usable: a directory this user may write to (and, if ``private``, its own and closed to others),
    or one that could be made (its nearest existing parent writable)."""
    shown_path = directory.resolve()
    if not directory.exists():
        parent = next((p for p in directory.absolute().parents if p.exists()), Path("/"))
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            report.error(what, f"{shown_path} does not exist and cannot be created: {parent} is not writable")
        else:
            report.note(what, f"{shown_path} would be created (mode 0700)")
        return
    if not directory.is_dir():
        report.error(what, f"{shown_path} is not a directory")
        return
    if not os.access(directory, os.W_OK | os.X_OK):
        report.error(what, f"{shown_path} is not writable by this user")
        return
    status = directory.stat()
    mode = status.st_mode & 0o777
    if private and status.st_uid != os.geteuid():
        report.warn(what, f"{shown_path} belongs to uid {status.st_uid}, not to this user ({os.geteuid()})")
    if private and mode & 0o077:
        report.warn(what, f"{shown_path} has mode {mode:04o}: others can reach it; chmod 700 it")
    report.ok(what, f"{shown_path} (mode {mode:04o})")


# -- the store and Redis ------------------------------------------------------------------


def _check_outside(config: Config, report: Report) -> None:
    from bastion.cli.serve import store_location, store_password

    location = store_location(config)
    try:
        password = store_password(config)
        _check_store(location, password, report)
    except (BastionError, OSError) as exc:
        report.failure("store", exc)
    except sqlite3.Error as exc:
        report.error("store", f"{location}: {exc}")
    if config.rate_limits.redis_url is not None:
        asyncio.run(_check_redis(config.rate_limits.redis_url, report))
    else:
        report.skip("Redis", "rate_limits.redis_url is not set")


def _check_store(location: str, password: str | None, report: Report) -> None:
    from bastion.store import open_store
    from bastion.store.migrations import LATEST, current_version, recorded_compatible_from
    from bastion.store.postgres import PostgresStore
    from bastion.store.sqlite import SQLiteStore

    store = open_store(location, password=password)
    if isinstance(store, PostgresStore):
        postgres = PostgresStore(location, password=password, connect_timeout=CONNECT_TIMEOUT)
        probe = asyncio.run(postgres.probe())
        version, recorded = probe.version, probe.recorded
        label = f"PostgreSQL {postgres.dsn} (schema {probe.schema})"
        if version < LATEST and (missing := _migration_rights_missing(probe)):
            report.error("store", f"{label}: role {probe.role} cannot migrate it from schema version {version} to "
                         f"{LATEST}, as serve would at start: it lacks {'; and '.join(missing)}")  # fmt: skip
            return
    else:
        assert isinstance(store, SQLiteStore)
        path = store.path
        label = f"SQLite {path.resolve()}"
        if not path.exists():
            report.note("store", f"{label} would be created; would migrate from schema version 0 to {LATEST}")
            return
        # immutable: a read-only connection to a database in WAL mode would otherwise create -wal and -shm files.
        wal = Path(f"{path}-wal").exists()
        uri = f"{path.resolve().as_uri()}?mode=ro" + ("" if wal else "&immutable=1")
        conn = sqlite3.connect(uri, uri=True, timeout=CONNECT_TIMEOUT)
        try:
            version, recorded = current_version(conn), recorded_compatible_from(conn)
        finally:
            conn.close()
    if version == LATEST:
        report.ok("store", f"{label} at schema version {version} (current)")
    elif version < LATEST:
        report.note("store", f"{label}: would migrate from schema version {version} to {LATEST}")
    elif recorded is not None and recorded <= LATEST:
        report.warn("store", f"{label} at schema version {version}, newer than this bastion knows ({LATEST}), "
                    f"but it declares code of schema version {recorded} and later compatible")  # fmt: skip
    else:
        report.error("store", f"{label} has schema version {version}, newer than this bastion knows ({LATEST}): "
                     "upgrade bastion, or restore a backup made by this version")  # fmt: skip


#: Dollar-quoted bodies (of functions), where no statement's own words are.
_DOLLAR_QUOTED = re.compile(r"\$\$.*?\$\$", re.DOTALL)
#: A name, perhaps quoted; a table's or function's perhaps qualified by its schema (the last part captured).
_NAME = r'(?:"(?:[^"]|"")+"|\w+)'
_OBJECT = rf"(?:{_NAME}\.)?({_NAME})"
#: The rights a migration statement needs on an existing table, and where it names the table (any case;
#: IF [NOT] EXISTS, ONLY, CONCURRENTLY and an index's optional name allowed for).
_TABLE_RIGHTS = tuple(
    (right, re.compile(pattern, re.IGNORECASE))
    for right, pattern in (
        ("OWNER", rf"\bALTER TABLE (?:IF EXISTS )?(?:ONLY )?{_OBJECT}"),
        ("OWNER", rf"\bINDEX (?:CONCURRENTLY )?(?:(?:IF NOT EXISTS )?{_NAME} )?ON (?:ONLY )?{_OBJECT}"),
        ("OWNER", rf"\bDROP TRIGGER (?:IF EXISTS )?{_NAME} ON {_OBJECT}"),
        ("TRIGGER", rf"\bTRIGGER {_NAME} (?:BEFORE|AFTER|INSTEAD OF) [^;]*?\bON (?:ONLY )?{_OBJECT}"),
        ("REFERENCES", rf"\bREFERENCES {_OBJECT}"),
    )
)
#: Functions a statement replaces or alters: their owner's rights are needed.
_OWNED_FUNCTION = re.compile(rf"\b(?:CREATE OR REPLACE|ALTER) FUNCTION (?:IF EXISTS )?{_OBJECT}", re.IGNORECASE)
#: DROP TABLE and DROP FUNCTION name a list (``DROP TABLE a, b``; ``DROP FUNCTION f(int, text), g()``): each
#: item's owner's rights are needed.
_DROP = re.compile(r"\bDROP (TABLE|FUNCTION) (?:IF EXISTS )?", re.IGNORECASE)
_DROPPED = re.compile(rf"\s*{_OBJECT}\s*")
#: Statements that need no rights on existing objects beyond those the store's role serves with (a new
#: table or function; rows written). Any other statement must be read by the patterns above: a unit test
#: (tests/cli/test_migration_rights.py) holds every migration's statements to one or the other.
_NO_RIGHTS_NEEDED = re.compile(r"(?:CREATE (?:TABLE|FUNCTION)|INSERT INTO|DELETE FROM|UPDATE) ", re.IGNORECASE)


def _identifier(name: str) -> str:
    """A name as PostgreSQL keeps it: quoted, as written; else folded to lower case."""
    return name[1:-1].replace('""', '"') if name.startswith('"') else name.lower()


def _statement_rights(statement: str) -> tuple[set[tuple[str, str]], set[str]]:
    """The (table, right) pairs and the functions' owner's rights a migration statement needs."""
    text = " ".join(_DOLLAR_QUOTED.sub("", statement).split())
    tables = {(_identifier(name), right) for right, pattern in _TABLE_RIGHTS for name in pattern.findall(text)}
    functions = {_identifier(name) for name in _OWNED_FUNCTION.findall(text)}
    for drop in _DROP.finditer(text):
        kind, position = drop.group(1).upper(), drop.end()
        while (item := _DROPPED.match(text, position)) is not None:
            if kind == "TABLE":
                tables.add((_identifier(item.group(1)), "OWNER"))
            else:
                functions.add(_identifier(item.group(1)))
            position = _past_arguments(text, item.end())
            if not text.startswith(",", position):  # no comma: the list has ended
                break
            position += 1
    return tables, functions


def _past_arguments(text: str, position: int) -> int:
    """Where ``text`` goes on after a function's argument list at ``position`` (``(numeric(10, 2), text)``:
    parentheses nest), and the spaces after it; ``position`` itself if there is none."""
    if not text.startswith("(", position):
        return position
    depth = 0
    for i in range(position, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return len(text) - len(text[i + 1 :].lstrip())
    return len(text)


def _needs_no_rights(statement: str) -> bool:
    """Whether a statement is of a kind that needs no rights on existing objects (``_NO_RIGHTS_NEEDED``)."""
    return _NO_RIGHTS_NEEDED.match(" ".join(statement.split())) is not None


_RIGHT_NAMES = {"OWNER": "the owner's rights over", "REFERENCES": "REFERENCES on", "TRIGGER": "TRIGGER on"}


def _migration_rights_missing(probe: Probe) -> list[str]:
    """What the store's role lacks to apply the migrations after ``probe.version``, as serve would at start: CREATE
    on the schema, and rights on the existing tables and functions they alter, point foreign keys at or replace."""
    from bastion.store.postgres_migrations import POSTGRES_MIGRATIONS

    needed: set[tuple[str, str]] = set()
    functions: set[str] = set()
    for migration in POSTGRES_MIGRATIONS[probe.version :]:
        for statement in migration.statements:
            on_tables, owned = _statement_rights(statement)
            needed |= on_tables
            functions |= owned
    rights = []
    lacking = needed & probe.tables_lacking
    for right, shown_right in _RIGHT_NAMES.items():
        if tables := sorted(table for table, lacks in lacking if lacks == right):
            rights.append(f"{shown_right} the table(s) {', '.join(tables)}")
    if replaced := sorted(functions & probe.functions_not_owned):
        rights.append(f"the owner's rights over the function(s) {', '.join(replaced)}")
    if rights:
        rights[-1] += " (grant them, or run this upgrade once as the owner of the schema's tables)"
    if not probe.may_create:
        rights.insert(0, f'CREATE on schema {probe.schema} (GRANT CREATE ON SCHEMA "{probe.schema}" TO "{probe.role}")')
    return rights


async def _check_redis(url: str, report: Report) -> None:
    from bastion.security.ratelimit_redis import redis_module

    shown_url = redact_dsn(url)
    try:
        redis = redis_module()
    except UsageError as exc:
        report.error("Redis", str(exc))
        return
    client = redis.asyncio.Redis.from_url(url, socket_timeout=CONNECT_TIMEOUT, socket_connect_timeout=CONNECT_TIMEOUT)
    try:
        await client.ping()
        report.ok("Redis", f"{shown_url} answers")
    except redis.exceptions.AuthenticationError:
        report.error("Redis", f"{shown_url}: authentication failed")
    except (redis.exceptions.RedisError, OSError) as exc:
        report.down("Redis", f"cannot reach {shown_url}: {type(exc).__name__}")
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()


# -- ports ----------------------------------------------------------------------------------


def _check_ports(config: Config, report: Report) -> None:
    ports = [("port", config.port)]
    if config.gateway.enabled:
        ports.append(("gateway port", config.gateway.http_port))
    else:
        report.skip("gateway port", "the gateway is off")
    for what, port in ports:
        if port == 0:
            report.skip(what, "0: a free port is picked at start")
            continue
        _try_bind(report, what, config.host, port)


def _try_bind(report: Report, what: str, host: str, port: int) -> None:
    """Bind (never listen on) a socket for each address of ``host`` -- an address not on this machine, a port this
    user may not bind -- and close it at once."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        report.error(what, f"cannot resolve {host}: {exc.strerror}")
        return
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    report.warn(what, f"{host}:{port} is in use (by the running server?): the server could not start "
                                "while it is")  # fmt: skip
                else:
                    report.error(what, f"cannot listen on {host}:{port}: {exc.strerror}")
                return
    report.ok(what, f"{host}:{port} bindable")
