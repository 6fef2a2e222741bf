"""``bastion topics pub|sub``: the messages service's topics from the shell.

``pub`` sends the payload as bytes: its argument as UTF-8 text, ``@FILE``
(the file's bytes) or ``-`` (standard input's bytes); ``--data`` sends a
structured JSON value instead. It prints the offset a durable topic gave the
message (nothing for a live topic). ``sub`` prints one line per message --
topic, offset (``-`` for a live topic), publisher, payload -- until
interrupted; ``--json`` prints each message as one line of JSON (bytes in
base64, msgspec's JSON encoding of bytes).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from bastion.cli.common import (
    CA,
    Address,
    AsJson,
    ClientCert,
    ClientKey,
    Insecure,
    TokenFile,
    connect,
    fail,
    json_line,
    print_json,
    run_guarded,
    shown,
)

__all__ = ["topics_app"]

topics_app = typer.Typer(
    help="The messages service's topics: publish, and subscribe live or from a durable topic's offset.",
    no_args_is_help=True,
)


def _headers(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            fail(f"--header {pair!r}: give NAME=VALUE", 2)
        out[name] = value
    return out


def _payload(text: str, data: bool) -> Any:
    if data:
        try:
            return msgspec.json.decode(text)
        except msgspec.DecodeError as exc:
            fail(f"--data: the payload is not valid JSON ({exc})", 2)
    if text == "-":
        return sys.stdin.buffer.read()
    if text.startswith("@"):
        try:
            return Path(text[1:]).read_bytes()
        except OSError as exc:
            fail(f"cannot read {text[1:]}: {exc.strerror}", 2)
    return text.encode()


def _show(payload: Any) -> str:
    if isinstance(payload, bytes):
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            return f"<{len(payload)} bytes>"
        return text if text.isprintable() and len(text) <= 200 else f"<{len(payload)} bytes>"
    return shown(msgspec.json.encode(payload).decode())  # JSON escapes C0 controls, not C1 or bidi overrides


@topics_app.command("pub")
def pub(
    address: Address,
    topic: Annotated[str, typer.Argument(help="The topic, e.g. user.YOURNAME.notes or orders.eu.")],
    payload: Annotated[str, typer.Argument(help="The payload: text, @FILE for a file's bytes, or - for stdin.")],
    data: Annotated[bool, typer.Option("--data", help="The payload is a JSON value, sent structured.")] = False,
    header: Annotated[list[str] | None, typer.Option("--header", help="A header NAME=VALUE (repeatable).")] = None,
    as_json: AsJson = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Publish one message; print its offset if the topic is durable."""
    value, headers = _payload(payload, data), _headers(header or [])

    def run() -> Any:
        with connect(address, token_file, ca, insecure, cert=client_cert, key=client_key) as client:
            return client.call("messages.publish", topic=topic, payload=value, headers=headers)

    offset = run_guarded(run)
    if as_json:
        print_json({"topic": topic, "offset": offset})
    elif offset is not None:
        print(offset)


@topics_app.command("sub")
def sub(
    address: Address,
    pattern: Annotated[str, typer.Argument(help="A topic or pattern: '*' matches one token, a final '>' the rest.")],
    from_offset: Annotated[
        int | None,
        typer.Option("--from-offset", help="Replay a durable topic from this offset first (0: the earliest kept)."),
    ] = None,
    as_json: AsJson = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Print the messages published to matching topics (one line each) until interrupted."""
    args: dict[str, Any] = {"pattern": pattern}
    if from_offset is not None:
        args["from_offset"] = from_offset

    def run() -> None:
        with connect(address, token_file, ca, insecure, cert=client_cert, key=client_key, timeout=None) as client:
            for event in client.stream("messages.subscribe", **args):
                if as_json:
                    print(json_line(event), flush=True)
                elif event["type"] == "start":
                    print(f"# subscribed to {pattern}", file=sys.stderr, flush=True)
                else:
                    offset = "-" if event["offset"] is None else event["offset"]
                    line = f"{event['topic']}\t{offset}\t{event['publisher']}\t{_show(event['payload'])}"
                    print(line, flush=True)

    try:
        run_guarded(run)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
