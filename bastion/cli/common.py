"""What the commands share: option types, connecting, errors, output.

Credentials come from ``--token-file``, ``BASTION_TOKEN_FILE``/``BASTION_TOKEN``
or the session token ``bastion login`` saved (sent only to the server that
made it) -- never from a flag that holds the secret itself. Every command
that connects takes the same connection options (``TokenFile``, ``CA``,
``ClientCert``, ``ClientKey``, ``Insecure``) and passes them to ``connect``.
"""

from __future__ import annotations

import math
import os
import stat
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import msgspec
import typer

from bastion.client.sync import SyncClient
from bastion.exceptions import BastionError, CallError, ResourceExhausted, TransportError, Unavailable, UsageError

__all__ = [
    "CA",
    "EXIT_CALL_ERROR",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "LOGIN_TOKEN",
    "Address",
    "AsJson",
    "ClientCert",
    "ClientKey",
    "Insecure",
    "TokenFile",
    "call_guarded",
    "connect",
    "fail",
    "json_line",
    "print_json",
    "run_guarded",
    "seconds",
    "shown",
    "store_flag",
]

LOGIN_TOKEN = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "bastion" / "session.token"

EXIT_CALL_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

Address = Annotated[str, typer.Argument(help="Server address: HOST:PORT, :PORT or HOST (port 7400).")]
TokenFile = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        help="File holding the API token (or set BASTION_TOKEN / BASTION_TOKEN_FILE).",
        show_default=False,
    ),
]


def seconds(param: typer.CallbackParam, value: float | None) -> float | None:
    """An option's number of seconds, above 0 and finite (``callback=seconds``).

    nan, inf, 0 and negatives fail later, never end, or -- a token's --ttl of
    nan -- are taken as no limit at all.
    """
    if value is not None and not 0 < value < math.inf:
        raise typer.BadParameter(f"{value} is not a number of seconds above 0", param_hint=param.opts[0])
    return value


Timeout = Annotated[float | None, typer.Option("--timeout", help="Seconds to wait for an answer.", callback=seconds)]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
CA = Annotated[
    Path | None,
    typer.Option(
        "--ca",
        help="CA certificate to verify the server with (default: $BASTION_CA, else ./bastion-data/tls/ca.pem "
        "if present, else the system trust store).",
        show_default=False,
    ),
]
ClientCert = Annotated[
    Path | None,
    typer.Option(
        "--cert",
        help="Client certificate (PEM) for a server that asks for one (mutual TLS; default: $BASTION_CERT).",
        show_default=False,
    ),
]
ClientKey = Annotated[
    Path | None,
    typer.Option(
        "--key",
        help="Key of the client certificate (PEM; default: $BASTION_KEY, else the --cert file).",
        show_default=False,
    ),
]
Insecure = Annotated[
    bool, typer.Option("--insecure", help="Plaintext, no TLS (only for a server started with --insecure).")
]
LOCAL_DEV_CA = Path("bastion-data") / "tls" / "ca.pem"


def _own_dev_ca() -> bool:
    """Whether ``./bastion-data/tls/ca.pem`` may be trusted: it and the directories above it, up to the
    working directory, are this user's, writable by no one else, and no symbolic links. Another user's,
    planted in a shared working directory (``/tmp``), would let them pose as any server the command
    connects to; so would one in a directory others may write to, swapped after it was checked."""
    paths = (LOCAL_DEV_CA.parent.parent, LOCAL_DEV_CA.parent, LOCAL_DEV_CA)
    try:
        statuses = [path.lstat() for path in paths]
    except OSError:
        return False
    for path, status in zip(paths, statuses, strict=True):
        if status.st_uid != os.geteuid() or stat.S_ISLNK(status.st_mode) or status.st_mode & 0o022:
            print(f"note: not trusting {LOCAL_DEV_CA}: {path} is another user's, writable by others, or a link; "
                  "pass --ca", file=sys.stderr)  # fmt: skip
            return False
    return True


def _from_env(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


class _TLSOptions:
    def __init__(self, ca: Path | None, cert: Path | None, key: Path | None, insecure: bool) -> None:
        if ca is None and not insecure and not os.environ.get("BASTION_CA") and LOCAL_DEV_CA.exists() and _own_dev_ca():
            ca = LOCAL_DEV_CA
        if not insecure:  # like BASTION_CA, which the client reads itself: plaintext ignores them
            cert = cert if cert is not None else _from_env("BASTION_CERT")
            key = key if key is not None else _from_env("BASTION_KEY")
        self.ca = str(ca) if ca is not None else None
        self.cert = str(cert) if cert is not None else None
        self.key = str(key) if key is not None else None
        self.insecure = insecure


def _fail(message: str, code: int) -> NoReturn:
    """``error: MESSAGE`` on one line (``shown``: a server's error message is its text, often carrying what
    some user chose, and must neither drive the terminal nor forge a line), and exit with ``code``."""
    print(f"error: {shown(message)}", file=sys.stderr)
    raise typer.Exit(code)


def _client(address: str, token_file: Path | None, timeout: float | None, tls: _TLSOptions) -> SyncClient:
    return SyncClient(
        address,
        token_file=str(token_file) if token_file else None,
        timeout=timeout,
        ca=tls.ca,
        cert=tls.cert,
        key=tls.key,
        insecure=tls.insecure,
    )


def _run_guarded(func: Any) -> Any:
    try:
        return func()
    except UsageError as exc:
        _fail(str(exc), EXIT_USAGE)
    except CallError as exc:
        _fail(f"{exc.status.name}: {exc.message}", EXIT_CALL_ERROR)
    except TransportError as exc:
        _fail(str(exc), EXIT_UNAVAILABLE)
    except BastionError as exc:
        _fail(str(exc), EXIT_CALL_ERROR)
    except BrokenPipeError:  # the reader of the output has gone (``| head -1``): its choice, not an error
        raise  # click ends the command quietly, exit code 1, as when the printing follows the call
    except OSError as exc:  # a local file or directory the command cannot use
        where = f"{exc.filename}: " if exc.filename is not None else ""
        _fail(f"{where}{exc.strerror or exc}", EXIT_USAGE)


def _inert(text: str) -> str:
    """JSON ``text`` with every character a terminal could act on as a ``\\uXXXX`` escape: JSON escapes C0
    controls itself but may carry C1 controls (U+009B is CSI), bidi overrides and line separators raw. Only
    strings hold such characters, and there the escape is the same character to a parser."""
    if text.isascii() or text.isprintable():
        return text
    out = []
    for c in text:
        if c.isprintable() or c == "\n":
            out.append(c)
        else:
            units = c.encode("utf-16-be")
            out.extend(f"\\u{int.from_bytes(units[i : i + 2]):04x}" for i in range(0, len(units), 2))
    return "".join(out)


def _json(value: Any) -> str:
    return _inert(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


def json_line(value: Any) -> str:
    """``value`` as one line of JSON (a stream's event), inert on a terminal like ``print_json``'s."""
    return _inert(msgspec.json.encode(value).decode())


def session_address_file(token_path: Path) -> Path:
    """Where ``bastion login`` notes which server the session token in ``token_path`` is for."""
    return token_path.with_name(token_path.name + ".address")


def _same_server(a: str, b: str) -> bool:
    from bastion.client._common import parse_address

    try:
        (host_a, port_a), (host_b, port_b) = parse_address(a), parse_address(b)
    except UsageError:
        return False
    return (host_a.lower(), port_a) == (host_b.lower(), port_b)


def _saved_session(address: str) -> Path | None:
    """The session token ``bastion login`` saved, if it was made by the server at ``address``.

    A session is sent to the server that made it alone: any other could use it on that one, as the user.
    One saved without a note of its server (by an older bastion) is not sent anywhere.
    """
    if not LOGIN_TOKEN.exists():
        return None
    try:
        made_by = session_address_file(LOGIN_TOKEN).read_text().strip()
    except (OSError, UnicodeDecodeError):
        made_by = ""
    if made_by and _same_server(made_by, address):
        return LOGIN_TOKEN
    where = f"of {made_by}" if made_by else "of a server it does not name: log in again"
    print(
        f"note: the saved session ({shown(where)}) is not sent to {shown(address)}: log in there, or give --token-file",
        file=sys.stderr,
    )
    return None


def connect(
    address: str,
    token_file: Path | None,
    ca: Path | None,
    insecure: bool,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    timeout: float | None = 30.0,
    anonymous: bool = False,
) -> SyncClient:
    """A client for a command: TLS options resolved, credentials from file or environment.

    Without --token-file or BASTION_TOKEN(_FILE), the session token saved by
    ``bastion login`` is used if there is one and it was made by the server at
    ``address`` (not when ``anonymous``: logging in must not depend on an old
    session).
    """
    from_env = os.environ.get("BASTION_TOKEN") or os.environ.get("BASTION_TOKEN_FILE")
    if not anonymous and token_file is None and not from_env:
        token_file = _saved_session(address)
    return _client(address, token_file, timeout, _TLSOptions(ca, cert, key, insecure))


def call_guarded(
    address: str,
    token_file: Path | None,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    insecure: bool,
    method: str,
    /,
    **args: Any,
) -> Any:
    """One call over a connection of its own, its errors reported as every command reports them
    (``run_guarded``): what most commands do."""

    def run() -> Any:
        with connect(address, token_file, ca, insecure, cert=cert, key=key) as client:
            return client.call(method, **args)

    return run_guarded(run)


def print_json(value: Any) -> None:
    print(_json(value))


def shown(text: str) -> str:
    """``text`` from the server (a key, a file or user name, a job's error: untrusted) for one line of a
    terminal: a character that is not printable (newline, tab, an escape sequence's ESC, a bidi override)
    shown as its Python escape, so no stored string can forge lines of a listing or drive the terminal.
    ``--json`` output carries the text as it is."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def collect_pages(
    client: SyncClient, method: str, *, items: str, cursor: str, most: int | None = None, **args: Any
) -> list[dict[str, Any]]:
    """Every item of a paged listing (``items`` of each page; ``next`` is the next page's ``cursor``
    argument), or the first ``most``. Arguments that are None are left out."""
    found: list[dict[str, Any]] = []
    position = None
    while most is None or len(found) < most:
        given = {**args, cursor: position}
        page = client.call(method, **{k: v for k, v in given.items() if v is not None})
        found += page[items]
        position = page["next"]
        if position is None:
            break
    return found[:most] if most is not None else found


def store_flag(url: str) -> str:
    """``--store``'s value, refused if it carries a password (flags show up in ``ps`` and shell history).

    A password is what ``redact_dsn`` would hide -- a userinfo's, even one whose reserved characters were not
    percent-encoded, or a ``password``/``sslpassword`` parameter -- so the check and the redaction agree."""
    from bastion.store.postgres_dsn import redact_dsn

    if "://" not in url:
        return url
    try:
        urllib.parse.urlsplit(url).port  # noqa: B018 (parsing it is the check)
    except ValueError:
        if redact_dsn(url) == url:
            raise typer.BadParameter(f"{url!r} is not a valid URL (its host or port)", param_hint="--store") from None
    if redact_dsn(url) != url:
        raise typer.BadParameter(
            "--store must not contain a password (command lines are visible to other users): "
            "set BASTION_STORE in the environment, or use PGPASSWORD, ~/.pgpass or store_password_file",
            param_hint="--store",
        )
    return url


fail = _fail
run_guarded = _run_guarded


def resuming(run: Callable[[], None], note: Callable[[], str | None]) -> Callable[[], None]:
    """``run`` (a watch), printing ``note()`` -- how to watch again without missing anything -- when a drain,
    a lost connection or the server's limits end it; not when watching again could not help (OUT_OF_RANGE:
    the change history has moved on; PERMISSION_DENIED, UNAUTHENTICATED...: the server says why)."""

    def watch() -> None:
        try:
            run()
        except (Unavailable, ResourceExhausted, TransportError):
            if (text := note()) is not None:
                print(f"note: {text}", file=sys.stderr, flush=True)
            raise

    return watch
