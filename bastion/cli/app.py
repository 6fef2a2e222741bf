"""Command definitions. Each command parses, calls the package, prints."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from bastion import allocator
from bastion._version import __version__
from bastion.cli.accounts import login, token_app, user_app
from bastion.cli.backup import backup, restore
from bastion.cli.cert import cert_app
from bastion.cli.common import (
    CA,
    Address,
    AsJson,
    ClientCert,
    ClientKey,
    Insecure,
    Timeout,
    TokenFile,
    _json,
    _run_guarded,
    connect,
    store_flag,
)
from bastion.cli.files import files_app
from bastion.cli.jobs import jobs_app
from bastion.cli.kv import kv_app
from bastion.cli.messages import messages_app
from bastion.cli.topics import topics_app
from bastion.client.sync import SyncClient
from bastion.exceptions import CallError
from bastion.status import Status

__all__ = ["app", "main"]

app = typer.Typer(
    name="bastion",
    help="A fast, secure-by-default client-server framework and server.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Exit status: 0 success, 1 refused (the server's status on standard error), 2 usage error, "
    "3 unreachable (docs/operations.md, Exit status).",
    # A traceback must never print local variables: they hold passwords and tokens. typer's own default was
    # True in releases that pyproject's typer>=0.15 allows.
    pretty_exceptions_show_locals=False,
)


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        print(f"bastion {__version__}")
        raise typer.Exit(0)
    allocator.tune()  # servers and file transfers move large frames (bastion/allocator.py)


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
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            help="Where data lives: a SQLite path or sqlite:///path (default <data-dir>/bastion.db), or "
            "postgresql://user@host/db (no password here: use PGPASSWORD, ~/.pgpass or store_password_file).",
        ),
    ] = None,
    jobs: Annotated[
        list[str] | None,
        typer.Option("--jobs", help="Offer the jobs of MODULE:ATTRIBUTE (a bastion.jobs.JobRegistry)."),
    ] = None,
    log_level: Annotated[str | None, typer.Option("--log-level", help="debug, info, warning or error.")] = None,
    log_format: Annotated[
        str | None, typer.Option("--log-format", help="text (default) or json: one object per line.")
    ] = None,
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
    workers: Annotated[
        str | None,
        typer.Option("--workers", help="Worker processes sharing the port: a number (default 1) or auto (per core)."),
    ] = None,
    http_port: Annotated[
        int | None,
        typer.Option("--http-port", help="Port of the HTTP/JSON-RPC gateway; 0 picks a free one (default 7401)."),
    ] = None,
    no_http: Annotated[bool, typer.Option("--no-http", help="Do not serve the HTTP gateway.")] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Validate the configuration (TLS files, services, data directory, store, Redis, ports) and exit: "
            "0 when it passes, 2 when it is wrong, 1 when the store or Redis is unreachable. Starts, writes "
            "and migrates nothing.",
        ),
    ] = False,
) -> None:
    """Start a server (the admin service plus any --service given). TLS is on unless --insecure."""
    from bastion.cli.cert import ConfigSource
    from bastion.cli.serve import run

    overrides: dict[str, Any] = {"host": host, "port": port, "log_level": log_level, "log_format": log_format}
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
    if store is not None:
        overrides["store"] = store_flag(store)
    if jobs:
        overrides["jobs"] = {"modules": list(jobs)}
    if workers is not None:
        overrides["workers"] = int(workers) if workers.strip().isdigit() else workers.strip()
    gateway: dict[str, Any] = {"http_port": http_port}
    if no_http:
        gateway["enabled"] = False
    overrides["gateway"] = {k: v for k, v in gateway.items() if v is not None}

    source = ConfigSource(str(config) if config is not None else None, overrides)
    if check:
        from bastion.cli.check import check_config

        raise typer.Exit(check_config(source))

    def start() -> int:
        return run(source.load(), echo=lambda line: print(line, flush=True), source=source)

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
    ca: CA = None,
    cert: ClientCert = None,
    key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Call a method and print its result as JSON."""
    from bastion.cli.values import parse_arguments

    def run() -> Any:
        with connect(address, token_file, ca, insecure, cert=cert, key=key, timeout=timeout) as client:
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
    for alternatives in ("anyOf", "oneOf"):
        if alternatives in schema:
            return " | ".join(_type_name(s) for s in schema[alternatives])
    if "enum" in schema:
        return " | ".join(json.dumps(value) for value in schema["enum"])
    kind = schema.get("type")
    if kind is None:  # only annotations ({"default": null}, a title): any value
        return "any"
    if kind == "array":
        return f"list[{_type_name(schema.get('items', {}))}]"
    if kind == "string" and schema.get("contentEncoding") == "base64":
        return "bytes"
    names = {"string": "str", "integer": "int", "number": "float", "boolean": "bool", "null": "None", "object": "dict"}
    return names.get(str(kind), str(kind))


@app.command()
def methods(
    address: Address,
    token_file: TokenFile = None,
    as_json: AsJson = False,
    timeout: Timeout = 30.0,
    ca: CA = None,
    cert: ClientCert = None,
    key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """List the services and methods a server offers you, with signatures."""

    def run() -> Any:
        with connect(address, token_file, ca, insecure, cert=cert, key=key, timeout=timeout) as client:
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
app.add_typer(user_app, name="user")
app.add_typer(token_app, name="token")
app.command()(login)
app.add_typer(kv_app, name="kv")
app.add_typer(files_app, name="files")
app.add_typer(jobs_app, name="jobs")
app.add_typer(messages_app, name="messages")
app.add_typer(topics_app, name="topics")
app.command()(backup)
app.command()(restore)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("NO_COLOR", "1") if not sys.stdout.isatty() else None
    app()
