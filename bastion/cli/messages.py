"""``bastion messages send|inbox|read|watch``: your mailbox from the shell.

``send`` takes the body as text (``--body``), a file's bytes
(``--body-file FILE``, ``-`` for standard input) or a structured JSON value
(``--data``). ``read`` writes the body's bytes (or the JSON of a structured
body) to standard output unchanged and the message's header lines to
standard error, so ``bastion messages read … > file`` saves the body alone.
``--json`` output encodes bytes in base64 (msgspec's JSON encoding of bytes).
In the other output, the text a sender chose (subject, headers, names) shows
its unprintable characters escaped (``\\n``, ``\\x1b``): a message cannot
add lines of its own to an inbox listing or a forged ``From:``.
"""

from __future__ import annotations

import sys
import time
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
    call_guarded,
    collect_pages,
    connect,
    fail,
    json_line,
    print_json,
    resuming,
    run_guarded,
)
from bastion.cli.common import shown as _shown

__all__ = ["messages_app"]

messages_app = typer.Typer(
    help="The messages service's mailboxes: send mail to users and roles, read your inbox, watch for new mail.",
    no_args_is_help=True,
)

MessageId = Annotated[int, typer.Argument(help="The message's id in your mailbox.")]


def _call(*where: Any, **args: Any) -> Any:
    """``call_guarded`` (``where``: the connection's options, then the method) without the options not given."""
    return call_guarded(*where, **{k: v for k, v in args.items() if v is not None})


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _headers(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            fail(f"--header {pair!r}: give NAME=VALUE", 2)
        out[name] = value
    return out


def _body(body: str | None, body_file: Path | None, data: str | None) -> tuple[bytes | None, Any]:
    if sum(x is not None for x in (body, body_file, data)) > 1:
        fail("give at most one of --body, --body-file and --data", 2)
    if data is not None:
        try:
            return None, msgspec.json.decode(data)
        except msgspec.DecodeError as exc:
            fail(f"--data is not valid JSON: {exc}", 2)
    if body_file is not None:
        if str(body_file) == "-":
            return sys.stdin.buffer.read(), None
        try:
            return body_file.read_bytes(), None
        except OSError as exc:
            fail(f"cannot read {body_file}: {exc.strerror}", 2)
    return (None if body is None else body.encode()), None


@messages_app.command("send")
def send(
    address: Address,
    to: Annotated[list[str], typer.Option("--to", help="A recipient: a user, or role:NAME (repeat for more).")],
    subject: Annotated[str, typer.Option("--subject", "-s", help="The subject line.")] = "",
    body: Annotated[str | None, typer.Option("--body", help="The body, as text.")] = None,
    body_file: Annotated[
        Path | None, typer.Option("--body-file", help="The body: this file's bytes (- for standard input).")
    ] = None,
    data: Annotated[str | None, typer.Option("--data", help="A structured body: a JSON value.")] = None,
    header: Annotated[list[str] | None, typer.Option("--header", help="A header NAME=VALUE (repeat for more).")] = None,
    attach: Annotated[
        list[str] | None, typer.Option("--attach", help="One of your files (by name) to share with the recipients.")
    ] = None,
    client_id: Annotated[
        str | None, typer.Option("--client-id", help="Your id for this message: a retry with it is stored once.")
    ] = None,
    as_json: AsJson = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Send a message; print its send id and the users it was delivered to."""
    raw, structured = _body(body, body_file, data)
    sent = _call(
        address, token_file, ca, client_cert, client_key, insecure, "messages.send",
        to=to, subject=subject, body=raw, data=structured, headers=_headers(header or []), attachments=attach,
        client_id=client_id,
    )  # fmt: skip
    if as_json:
        print_json(sent)
        return
    again = " (already sent with this client id)" if sent["duplicate"] else ""
    print(f"sent {sent['id']} to {', '.join(sent['recipients'])}{again}")


@messages_app.command("inbox")
def inbox(
    address: Address,
    unread: Annotated[bool, typer.Option("--unread", help="Only unread messages.")] = False,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="At most this many messages (default: all).")
    ] = None,
    oldest_first: Annotated[bool, typer.Option("--oldest-first", help="Oldest first (default: newest).")] = False,
    as_json: AsJson = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """List your messages, newest first: id, a * if unread, date, sender, subject."""

    def run() -> list[dict[str, Any]]:
        with connect(address, token_file, ca, insecure, cert=client_cert, key=client_key) as client:
            return collect_pages(
                client, "messages.inbox", items="messages", cursor="cursor", most=limit,
                unread_only=unread, oldest_first=oldest_first,
            )  # fmt: skip

    messages = run_guarded(run)
    if as_json:
        print_json(messages)
        return
    for m in messages:
        clip = " [+{}]".format(m["attachments"]) if m["attachments"] else ""
        flag = " " if m["read"] else "*"
        print(f"{m['id']}\t{flag}\t{_when(m['sent_at'])}\t{_shown(m['sender'])}\t{_shown(m['subject'])}{clip}")


@messages_app.command("read")
def read(
    address: Address,
    message_id: MessageId,
    as_json: AsJson = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Print one message (header lines to standard error, the body to standard output) and mark it read."""
    message = _call(address, token_file, ca, client_cert, client_key, insecure, "messages.read", id=message_id)
    if as_json:
        print_json(message)
        return
    lines = [
        f"From: {_shown(message['sender'])}", f"To: {_shown(', '.join(message['to']))}",
        f"Subject: {_shown(message['subject'])}", f"Date: {_when(message['sent_at'])}",
        *(f"{_shown(k)}: {_shown(v)}" for k, v in message["headers"].items()),
        *(f"Attachment: {_shown(a['name'])} ({a['size']} bytes, file_id {_shown(a['file_id'])})"
          for a in message["attachments"]),
    ]  # fmt: skip
    print("\n".join(lines), file=sys.stderr, flush=True)
    if message["data"] is not None:
        print(msgspec.json.encode(message["data"]).decode())
    else:
        sys.stdout.buffer.write(message["body"])
    sys.stdout.flush()


@messages_app.command("watch")
def watch(
    address: Address,
    from_id: Annotated[
        int | None, typer.Option("--from-id", help="Replay your messages from this id on first.")
    ] = None,
    as_json: AsJson = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Print new mail as it arrives (one line each: id, sender, subject) until interrupted."""

    resume: int | None = None  # once watching: the --from-id that would miss nothing not shown yet

    def run() -> None:
        nonlocal resume
        with connect(address, token_file, ca, insecure, cert=client_cert, key=client_key, timeout=None) as client:
            args = {} if from_id is None else {"from_id": from_id}
            for event in client.stream("messages.watch", **args):
                if event["type"] == "start":
                    resume = event["id"] + 1 if from_id is None else from_id  # replayed mail comes next
                else:
                    resume = event["id"] + 1
                if as_json:
                    print(json_line(event), flush=True)
                elif event["type"] == "start":
                    print(f"# watching; the newest message now is {event['id']}", file=sys.stderr, flush=True)
                else:
                    m = event["message"]
                    print(f"{m['id']}\t{_shown(m['sender'])}\t{_shown(m['subject'])}", flush=True)

    def note() -> str | None:
        return None if resume is None else f"to go on without missing a message, watch again with --from-id {resume}"

    try:
        run_guarded(resuming(run, note))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
