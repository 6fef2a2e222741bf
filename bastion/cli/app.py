"""Command definitions. Each command parses, calls the package, prints."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import msgspec
import typer

from bastion._version import __version__
from bastion.cli.cert import cert_app
from bastion.client.sync import SyncClient
from bastion.config import load_config
from bastion.exceptions import BastionError, CallError, TransportError, UsageError
from bastion.status import Status

__all__ = ["app", "main"]

app = typer.Typer(
    name="bastion",
    help="A fast, secure-by-default client-server framework and server.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

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
Timeout = Annotated[float | None, typer.Option("--timeout", help="Seconds to wait for an answer.")]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
CaFile = Annotated[
    Path | None,
    typer.Option(
        "--ca",
        help="CA certificate to verify the server with (default: $BASTION_CA, else ./bastion-data/tls/ca.pem "
        "if present, else the system trust store).",
        show_default=False,
    ),
]
ClientCert = Annotated[
    Path | None, typer.Option("--cert", help="Client certificate (PEM) for mutual TLS.", show_default=False)
]
ClientKey = Annotated[
    Path | None, typer.Option("--key", help="Key of the client certificate (PEM).", show_default=False)
]
Insecure = Annotated[
    bool, typer.Option("--insecure", help="Plaintext, no TLS (only for a server started with --insecure).")
]
LOCAL_DEV_CA = Path("bastion-data") / "tls" / "ca.pem"


class _TLSOptions:
    def __init__(self, ca: Path | None, cert: Path | None, key: Path | None, insecure: bool) -> None:
        if ca is None and not insecure and not os.environ.get("BASTION_CA") and LOCAL_DEV_CA.exists():
            ca = LOCAL_DEV_CA
        self.ca = str(ca) if ca is not None else None
        self.cert = str(cert) if cert is not None else None
        self.key = str(key) if key is not None else None
        self.insecure = insecure


def _fail(message: str, code: int) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _client(address: str, token_file: Path | None, timeout: float | None, tls: _TLSOptions) -> SyncClient:
    return SyncClient(
        address, token_file=str(token_file) if token_file else None, timeout=timeout,
        ca=tls.ca, cert=tls.cert, key=tls.key, insecure=tls.insecure,
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


def _json(value: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        print(f"bastion {__version__}")
        raise typer.Exit(0)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port; 0 picks a free one and prints it (default 7400).")] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Where bastion keeps its data (default ./bastion-data).")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML configuration file.")] = None,
    service: Annotated[
        list[str] | None, typer.Option("--service", help="Also host MODULE:ATTRIBUTE (a bastion.Service).")
    ] = None,
    log_level: Annotated[str | None, typer.Option("--log-level", help="debug, info, warning or error.")] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Serve plaintext without TLS (loopback only; prints a warning).")
    ] = False,
    force_insecure: Annotated[
        bool, typer.Option("--force-insecure", help="Allow --insecure on a non-loopback address.")
    ] = False,
    cert: Annotated[
        Path | None, typer.Option("--cert", help="Server certificate chain (PEM); reloaded on SIGHUP.")
    ] = None,
    key: Annotated[Path | None, typer.Option("--key", help="Private key of --cert (PEM).")] = None,
    client_auth: Annotated[
        str | None, typer.Option("--client-auth", help="Client certificates: none, optional or required.")
    ] = None,
    client_ca: Annotated[
        Path | None, typer.Option("--client-ca", help="CA bundle for client certificates (default: the dev CA).")
    ] = None,
    crl: Annotated[Path | None, typer.Option("--crl", help="Certificate revocation list (PEM) for clients.")] = None,
    tls_min_version: Annotated[
        str | None, typer.Option("--tls-min-version", help='Lowest TLS version: "1.3" (default) or "1.2".')
    ] = None,
) -> None:
    """Start a server (the admin service plus any --service given). TLS is on unless --insecure."""
    from bastion.cli.serve import run

    overrides: dict[str, Any] = {"host": host, "port": port, "log_level": log_level}
    tls: dict[str, Any] = {
        "cert": str(cert) if cert else None,
        "key": str(key) if key else None,
        "client_auth": client_auth,
        "client_ca": str(client_ca) if client_ca else None,
        "crl": str(crl) if crl else None,
        "min_version": tls_min_version,
    }
    if insecure:
        tls["insecure"] = True
    if force_insecure:
        tls["force_insecure"] = True
    overrides["tls"] = {k: v for k, v in tls.items() if v is not None}
    if data_dir is not None:
        overrides["data_dir"] = str(data_dir)
    if service:
        overrides["services"] = list(service)

    def start() -> int:
        cfg = load_config(config, overrides=overrides)
        return run(cfg, echo=lambda line: print(line, flush=True))

    raise typer.Exit(_run_guarded(start))


@app.command()
def call(
    address: Address,
    method: Annotated[str, typer.Argument(help="SERVICE.METHOD to call.")],
    arguments: Annotated[
        list[str] | None,
        typer.Argument(help="key=value pairs, converted to the method's declared types; key=@file reads a file."),
    ] = None,
    token_file: TokenFile = None,
    timeout: Timeout = 30.0,
    ca: CaFile = None,
    cert: ClientCert = None,
    key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Call a method and print its result as JSON."""
    from bastion.cli.values import parse_arguments

    tls = _TLSOptions(ca, cert, key, insecure)

    def run() -> Any:
        with _client(address, token_file, timeout, tls) as client:
            params = _params_schema(client, method)
            args = parse_arguments(list(arguments or []), params)
            return client.call(method, **args)

    print(_json(_run_guarded(run)))


def _params_schema(client: SyncClient, method: str) -> dict[str, Any] | None:
    """The method's argument schema, if the server shows it to this caller."""
    try:
        listing = client.call("admin.methods")
    except CallError as exc:
        if exc.status in (Status.UNIMPLEMENTED, Status.UNAUTHENTICATED, Status.PERMISSION_DENIED):
            return None
        raise
    for svc in listing:
        for m in svc.get("methods", []):
            if m.get("name") == method:
                params: dict[str, Any] = m.get("params", {})
                return params
    return None


def _signature(m: dict[str, Any]) -> str:
    props = m.get("params", {}).get("properties", {})
    required = set(m.get("params", {}).get("required", []))
    parts = []
    for name, schema in props.items():
        text = f"{name}: {_type_name(schema)}"
        if name not in required:
            text += f" = {json.dumps(schema.get('default'))}" if "default" in schema else " = ..."
        parts.append(text)
    result = _type_name(m.get("result", {}))
    if m.get("kind") in ("server_stream", "bidi_stream"):
        result = f"stream[{result}]"
    if m.get("kind") in ("client_stream", "bidi_stream"):
        parts.append(f"<stream of {_type_name(m.get('input', {}))}>")
    return f"{m['name']}({', '.join(parts)}) -> {result}"


def _type_name(schema: dict[str, Any]) -> str:
    if not schema:
        return "any"
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_type_name(s) for s in schema["anyOf"])
    kind = schema.get("type")
    if kind == "array":
        return f"list[{_type_name(schema.get('items', {}))}]"
    if kind == "string" and schema.get("contentEncoding") == "base64":
        return "bytes"
    names = {"string": "str", "integer": "int", "number": "float", "boolean": "bool", "null": "None",
             "object": "dict"}
    return names.get(str(kind), str(kind))


@app.command()
def methods(
    address: Address,
    token_file: TokenFile = None,
    as_json: AsJson = False,
    timeout: Timeout = 30.0,
    ca: CaFile = None,
    cert: ClientCert = None,
    key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """List the services and methods a server offers you, with signatures."""
    tls = _TLSOptions(ca, cert, key, insecure)

    def run() -> Any:
        with _client(address, token_file, timeout, tls) as client:
            return client.call("admin.methods")

    listing = _run_guarded(run)
    if as_json:
        print(_json(listing))
        return
    for svc in listing:
        print(f"{svc['name']}" + (f"  — {svc['doc']}" if svc.get("doc") else ""))
        for m in svc["methods"]:
            flags = [f for f in ("public", "idempotent") if m.get(f)]
            if m.get("roles"):
                flags.append("roles: " + ",".join(m["roles"]))
            suffix = f"  [{'; '.join(flags)}]" if flags else ""
            print(f"  {_signature(m)}{suffix}")
            if m.get("doc"):
                print(f"      {m['doc'].splitlines()[0]}")


app.add_typer(cert_app, name="cert")


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("NO_COLOR", "1") if not sys.stdout.isatty() else None
    app()
