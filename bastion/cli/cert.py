"""``bastion cert``: the development CA and server certificate; TLS set-up for ``bastion serve``.

``create`` makes the dev CA and server certificate under ``<data-dir>/tls/``
if they are missing (``bastion serve`` does the same on first start);
``show`` prints what they are; ``renew`` issues a new server certificate
(``--ca``: a new CA too) -- send the server SIGHUP to load it without
dropping connections; ``client`` issues a client certificate from the dev CA
for mutual TLS.

``prepare_tls`` is what ``bastion serve`` calls: it turns ``config.tls``
into the server's SSLContext (or refuses an unsafe plaintext set-up).
``reread_revoked_serials`` is what SIGHUP adds to the TLS reload: the
configuration (``ConfigSource``) read again for ``tls.revoked_serials``.
``keep_dev_certificate`` runs beside a server serving the development
certificate: it renews the certificate ``tls.dev_renew_before`` seconds
before it expires and loads it into the live contexts as SIGHUP does, so a
server left up for longer than the certificate's lifetime keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bastion.exceptions import UsageError
from bastion.security import tls as security_tls  # the dev CA's names load on first use: client commands need none

if TYPE_CHECKING:
    from bastion.config import Config  # loaded by the commands that read a configuration: client commands need none
    from bastion.security.tls_devca import TLSPaths
    from bastion.server.server import Server

__all__ = [
    "ConfigSource",
    "TLSSetup",
    "cert_app",
    "is_loopback",
    "keep_dev_certificate",
    "prepare_tls",
    "reread_revoked_serials",
    "server_hosts",
    "warn_loose_key",
]

log = logging.getLogger("bastion.server")

#: Longest wait, in seconds, between two looks at the development certificate's expiry.
RENEW_CHECK_INTERVAL = 3600.0

cert_app = typer.Typer(
    name="cert",
    help="Create, show and renew the development CA and server certificate (under <data-dir>/tls/).",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="Where bastion keeps its data (default ./bastion-data).")
]
Hosts = Annotated[
    list[str] | None,
    typer.Option("--host", help="Also name this host in the server certificate (repeatable)."),
]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="TOML configuration file.")]

INSECURE_WARNING = (
    "WARNING: --insecure: serving PLAINTEXT. Anyone on the network path can read and alter "
    "every message, tokens included. Use only for local development."
)


# -- bastion serve ---------------------------------------------------------------------


@dataclass
class TLSSetup:
    """What ``bastion serve`` needs to run TLS (``context`` None: plaintext)."""

    context: ssl.SSLContext | None = None
    cert_files: tuple[str, str] | None = None
    messages: list[str] = field(default_factory=list)
    #: The certificate is the development one (``ensure_dev_tls``): the server renews it while it runs.
    dev: bool = False


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_hosts(host: str) -> list[str]:
    """Names the dev certificate should carry for a server listening on ``host``."""
    if host in ("", "0.0.0.0", "::", "*"):
        return [socket.gethostname()]
    return [host]


def prepare_tls(config: Config, warn: Callable[[str], None]) -> TLSSetup:
    """The server's TLS set-up from ``config.tls``; raises UsageError for an unsafe or broken one."""
    tls = config.tls
    if tls.insecure:
        if not is_loopback(config.host) and not tls.force_insecure:
            raise UsageError(
                f"--insecure refuses to serve plaintext on the non-loopback address {config.host}: "
                "add --force-insecure if you really mean it"
            )
        warn(INSECURE_WARNING)
        return TLSSetup()
    messages: list[str] = []
    if tls.cert is not None and tls.key is not None:
        cert, key = tls.cert, tls.key
        messages.append(f"TLS on; certificate: {Path(cert).resolve()}")
        warn_loose_key(key, warn)
    else:
        paths = _ensure_dev_tls(config)
        cert, key = str(paths.cert), str(paths.key)
        messages.append(f"TLS on; CA certificate: {paths.ca.resolve()}")
    client_ca = tls.client_ca
    if tls.client_auth != "none" and client_ca is None:
        client_ca = str(security_tls.ensure_dev_ca(config.data_dir)[0])
    context = security_tls.server_context(tls, cert, key, client_ca)
    if tls.client_auth != "none":
        messages.append(f"client certificates {tls.client_auth}; trusted CA: {Path(client_ca or '').resolve()}")
    return TLSSetup(context, (cert, key), messages, dev=tls.cert is None)


def _ensure_dev_tls(config: Config) -> TLSPaths:
    tls = config.tls
    return security_tls.ensure_dev_tls(
        config.data_dir, server_hosts(config.host), lifetime=tls.dev_cert_lifetime, renew_before=tls.dev_renew_before
    )


async def keep_dev_certificate(config: Config, reload: Callable[[], bool], *, leader: bool = True) -> None:
    """Renew the development certificate before it expires and ``reload`` it; runs until cancelled.

    Every ``tls.dev_renew_before / 10`` seconds (at most hourly) the leader
    issues a new certificate if the one on disk expires within
    ``tls.dev_renew_before`` (``ensure_dev_tls``; the workers of one server
    share the files, so only one writes them), and every process calls
    ``reload`` (``Server.reload_tls``) when the file holds a certificate
    other than the one it loaded. A failure is logged and tried again at
    the next look; the certificate already loaded keeps serving.
    """
    interval = min(RENEW_CHECK_INTERVAL, config.tls.dev_renew_before / 10)
    cert_path = Path(config.data_dir) / "tls" / "server.pem"
    loaded: str | None = None  # unknown: the first good look reloads (the same certificate, if nothing changed)
    with contextlib.suppress(Exception):
        loaded = (await asyncio.to_thread(security_tls.certificate_info, cert_path))["serial"]
    while True:
        await asyncio.sleep(interval)
        try:
            if leader:
                await asyncio.to_thread(_ensure_dev_tls, config)
            info = await asyncio.to_thread(security_tls.certificate_info, cert_path)
        except Exception as exc:  # this task must outlive any one failure, or renewal would stop for good
            log.error("cannot renew the development TLS certificate (next try in %.0fs): %s", interval, exc)
            continue
        if info["serial"] != loaded and reload():
            loaded = info["serial"]
            log.info("renewed the development TLS certificate: serial %s, valid until %s", loaded, info["not_after"])


def warn_loose_key(key: str, warn: Callable[[str], None]) -> None:
    """Call ``warn`` with a "WARNING: ..." line when users other than the key file's owner may read it
    (docs/security.md: mode 0600); say nothing of a file that cannot be stat-ed (loading it says why)."""
    try:
        mode = os.stat(key).st_mode & 0o777
    except OSError:
        return  # loading it says what is wrong
    if mode & 0o077:
        warn(f"WARNING: TLS key {key} has mode {mode:04o}: others can read it; chmod 600 it")


@dataclass(frozen=True)
class ConfigSource:
    """Where ``config`` came from -- the file (None: ``BASTION_CONFIG``, if set) and the flags -- to read it again."""

    path: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Config:
        from bastion.config import load_config

        return load_config(self.path, overrides=self.overrides)


def reread_revoked_serials(server: Server, source: ConfigSource) -> None:
    """SIGHUP: take ``tls.revoked_serials`` from the configuration again (one that fails keeps the list in force)."""
    try:
        serials = frozenset(security_tls.parse_serial(serial) for serial in source.load().tls.revoked_serials)
    except UsageError as exc:
        log.error(
            "SIGHUP: cannot re-read tls.revoked_serials, keeping the %d in force: %s", len(server.revoked_serials), exc
        )
        return
    if serials != server.revoked_serials:
        log.info("SIGHUP: tls.revoked_serials lists %d serial(s), was %d", len(serials), len(server.revoked_serials))
        server.revoked_serials = serials


# -- bastion cert ------------------------------------------------------------------------


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(2)


def _reason(exc: Exception) -> str:
    """A usage error's message; for a file or directory that cannot be used, which one and why."""
    if isinstance(exc, OSError):
        return f"{exc.filename}: {exc.strerror}" if exc.filename is not None else str(exc.strerror or exc)
    return str(exc)


def _settings(config: Path | None, data_dir: Path | None, hosts: list[str] | None) -> tuple[Path, list[str]]:
    from bastion.config import load_config

    overrides: dict[str, Any] = {"data_dir": str(data_dir)} if data_dir is not None else {}
    try:
        cfg = load_config(config, overrides=overrides)
    except (UsageError, OSError) as exc:
        _fail(_reason(exc))
        raise  # unreachable
    return Path(cfg.data_dir), [*server_hosts(cfg.host), *(hosts or [])]


def _print_info(label: str, path: Path) -> None:
    info = security_tls.certificate_info(path)
    print(f"{label}: {info['path']}")
    print(f"  subject:     {info['subject']}")
    print(f"  issuer:      {info['issuer']}")
    if info["sans"]:
        print(f"  SANs:        {', '.join(info['sans'])}")
    print(f"  serial:      {info['serial']}")
    print(f"  valid from:  {info['not_before']}")
    print(f"  expires:     {info['not_after']}")
    print(f"  SHA-256:     {info['sha256']}")


@cert_app.command("create")
def create(data_dir: DataDir = None, host: Hosts = None, config: ConfigFile = None) -> None:
    """Create the dev CA and server certificate if missing (keys mode 0600)."""
    directory, hosts = _settings(config, data_dir, host)
    try:
        paths = security_tls.ensure_dev_tls(directory, hosts)
    except (UsageError, OSError) as exc:
        _fail(_reason(exc))
        return
    print(f"CA certificate: {paths.ca.resolve()}")
    print(f"server certificate: {paths.cert.resolve()}")
    print(f"server key: {paths.key.resolve()} (mode 0600)")


@cert_app.command("show")
def show(
    data_dir: DataDir = None,
    config: ConfigFile = None,
    cert: Annotated[
        list[Path] | None, typer.Option("--cert", help="Show this certificate file instead (repeatable).")
    ] = None,
) -> None:
    """Print subject, SANs, serial, expiry and SHA-256 fingerprint of the CA and server certificates."""
    try:
        if cert:
            for path in cert:
                _print_info("certificate", path)
            return
        directory, _ = _settings(config, data_dir, None)
        tls_dir = directory / "tls"
        if not (tls_dir / "ca.pem").exists():
            _fail(f"no development CA in {tls_dir}: run `bastion cert create` (or start the server)")
        _print_info("CA certificate", tls_dir / "ca.pem")
        if (tls_dir / "server.pem").exists():
            _print_info("server certificate", tls_dir / "server.pem")
    except (UsageError, OSError) as exc:
        _fail(_reason(exc))


@cert_app.command("renew")
def renew(
    data_dir: DataDir = None,
    host: Hosts = None,
    config: ConfigFile = None,
    ca: Annotated[
        bool, typer.Option("--ca", help="Also make a new CA (clients must then trust the new ca.pem).")
    ] = False,
) -> None:
    """Issue a new server certificate now; a running server loads it on SIGHUP."""
    directory, hosts = _settings(config, data_dir, host)
    try:
        paths = security_tls.renew_dev_tls(directory, hosts, new_ca=ca)
        info = security_tls.certificate_info(paths.cert)
    except (UsageError, OSError) as exc:
        _fail(_reason(exc))
        return
    if ca:
        print(f"new CA certificate: {paths.ca.resolve()}")
    print(f"new server certificate: {paths.cert.resolve()} (serial {info['serial']}, expires {info['not_after']})")
    print("send the running server SIGHUP to load it (connections stay up)")


@cert_app.command("client")
def client(
    name: Annotated[
        str,
        typer.Argument(
            help="The certificate's subject CN: the user it speaks as (create the user first: a certificate "
            "issued before its user was created is refused)."
        ),
    ],
    data_dir: DataDir = None,
    config: ConfigFile = None,
    out: Annotated[Path | None, typer.Option("--out", help="Directory for NAME.pem and NAME.key.")] = None,
) -> None:
    """Issue a client certificate from the dev CA, for mutual TLS; valid from now (not backdated)."""
    directory, _ = _settings(config, data_dir, None)
    try:
        cert_path, key_path = security_tls.issue_client_cert(directory, name, out)
        info = security_tls.certificate_info(cert_path)
    except (UsageError, OSError) as exc:
        _fail(_reason(exc))
        return
    print(f"client certificate: {cert_path.resolve()} (serial {info['serial']})")
    print(f"client key: {key_path.resolve()} (mode 0600)")
    print(
        f"it speaks as user {name!r} if that user exists now (a certificate issued before its user was "
        'created is refused), or, with tls.client_subjects = "any", as a principal with no roles'
    )
