"""``bastion kv get|put|rm|ls|watch|usage``: the kv service from the shell.

Values are bytes. ``put`` takes the value as its argument (UTF-8 text),
``@FILE`` (the file's bytes) or ``-`` (standard input's bytes); ``get``
writes the value's bytes to standard output unchanged, so
``bastion kv get … > file`` round-trips any value. ``--json`` output encodes
values in base64 (msgspec's JSON encoding of bytes).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from bastion.cli.common import (
    CA,
    Address,
    AsJson,
    ClientCert,
    ClientKey,
    Insecure,
    TokenFile,
    call_guarded,
    collect_pages,
    connect,
    fail,
    json_line,
    print_json,
    resuming,
    run_guarded,
    seconds,
    shown,
)

__all__ = ["kv_app"]

kv_app = typer.Typer(
    help="The kv service: keys with versions, compare-and-swap, TTLs and watches.", no_args_is_help=True
)

Key = Annotated[str, typer.Argument(help="The key.")]
Namespace = Annotated[
    str | None,
    typer.Option("--namespace", "-n", help="A shared namespace, or ~USER (default: your own, ~YOURNAME)."),
]
IfVersion = Annotated[
    int | None,
    typer.Option("--if-version", help="Only if the key's version is this (0: only if it does not exist)."),
]


def _call(*where: Any, **args: Any) -> Any:
    """``call_guarded`` (``where``: the connection's options, then the method) without the options not given."""
    return call_guarded(*where, **{k: v for k, v in args.items() if v is not None})


def _value(text: str) -> bytes:
    if text == "-":
        return sys.stdin.buffer.read()
    if text.startswith("@"):
        try:
            return Path(text[1:]).read_bytes()
        except OSError as exc:
            fail(f"cannot read {text[1:]}: {exc.strerror}", 2)
    return text.encode()


def _show(value: bytes | None) -> str:
    if value is None:
        return ""
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return f"<{len(value)} bytes>"
    return text if text.isprintable() and len(text) <= 80 else f"<{len(value)} bytes>"


@kv_app.command("get")
def get(
    address: Address,
    key: Key,
    namespace: Namespace = None,
    as_json: AsJson = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Write a key's value to standard output (its version goes to standard error)."""
    item = _call(address, token_file, ca, client_cert, client_key, insecure, "kv.get", key=key, namespace=namespace)
    if as_json:
        print_json(item)
        return
    sys.stdout.buffer.write(item["value"])
    sys.stdout.flush()
    print(f"version {item['version']}", file=sys.stderr)


@kv_app.command("put")
def put(
    address: Address,
    key: Key,
    value: Annotated[str, typer.Argument(help="The value: text, @FILE for a file's bytes, or - for stdin.")],
    namespace: Namespace = None,
    ttl: Annotated[float | None, typer.Option("--ttl", help="Seconds until the key expires.", callback=seconds)] = None,
    if_version: IfVersion = None,
    content_type: Annotated[str, typer.Option("--content-type", help="A media type kept with the value.")] = "",
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Set a key; print its new version."""
    data = _value(value)
    version = _call(
        address, token_file, ca, client_cert, client_key, insecure, "kv.put", key=key, value=data, namespace=namespace,
        expected_version=if_version, ttl=ttl, content_type=content_type,
    )  # fmt: skip
    print(version)


@kv_app.command("rm")
def rm(
    address: Address,
    key: Key,
    namespace: Namespace = None,
    if_version: IfVersion = None,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Delete a key (exit status 1 if there was none)."""
    deleted = _call(
        address,
        token_file,
        ca,
        client_cert,
        client_key,
        insecure,
        "kv.delete",
        key=key,
        namespace=namespace,
        expected_version=if_version,
    )
    if not deleted:
        fail(f"no key {key!r}", 1)


@kv_app.command("ls")
def ls(
    address: Address,
    prefix: Annotated[str, typer.Argument(help="Only keys starting with this.")] = "",
    namespace: Namespace = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most this many keys (default: all).")] = None,
    as_json: AsJson = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """List keys by prefix, in byte order, one line each: key<TAB>version (every page, or up to --limit)."""

    def run() -> list[dict[str, Any]]:
        with connect(address, token_file, ca, insecure, cert=client_cert, key=client_key) as client:
            return collect_pages(
                client, "kv.list", items="items", cursor="after", most=limit,
                prefix=prefix, namespace=namespace, keys_only=not as_json,
            )  # fmt: skip

    items = run_guarded(run)
    if as_json:
        print_json(items)
        return
    for item in items:
        print(f"{shown(item['key'])}\t{item['version']}")


@kv_app.command("usage")
def usage(
    address: Address,
    namespace: Namespace = None,
    as_json: AsJson = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Show the keys and bytes a namespace holds against its quota."""
    held = _call(address, token_file, ca, client_cert, client_key, insecure, "kv.usage", namespace=namespace)
    if as_json:
        print_json(held)
        return
    print(
        f"{shown(held['namespace'])}\t{held['keys']} of {held['quota_keys']} keys\t"
        f"{held['bytes']} of {held['quota_bytes']} bytes"
    )


@kv_app.command("watch")
def watch(
    address: Address,
    prefix: Annotated[str, typer.Argument(help="Only keys starting with this.")] = "",
    namespace: Namespace = None,
    from_version: Annotated[
        int | None, typer.Option("--from-version", help="Replay the changes since this version first.")
    ] = None,
    as_json: AsJson = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Print changes to keys under a prefix as they happen (one line each) until interrupted."""
    args = {"prefix": prefix, "namespace": namespace, "from_version": from_version}

    resume: int | None = None  # once watching: the --from-version that would miss nothing not shown yet

    def run() -> None:
        nonlocal resume
        with connect(address, token_file, ca, insecure, cert=client_cert, key=client_key, timeout=None) as client:
            for event in client.stream("kv.watch", **{k: v for k, v in args.items() if v is not None}):
                if event["type"] == "start":
                    resume = event["version"] + 1 if from_version is None else from_version  # replays come next
                else:
                    resume = event["version"] + 1
                if as_json:
                    print(json_line(event), flush=True)
                elif event["type"] == "start":
                    print(f"# watching from version {event['version']}", file=sys.stderr, flush=True)
                else:
                    key, value = shown(event["key"]), _show(event["value"])
                    print(f"{event['version']}\t{event['type']}\t{key}\t{value}", flush=True)

    def note() -> str | None:
        return (
            None if resume is None else f"to go on without missing a change, watch again with --from-version {resume}"
        )

    try:
        run_guarded(resuming(run, note))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
