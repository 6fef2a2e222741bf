"""``bastion login``, ``bastion user …`` and ``bastion token …``.

Secrets never travel as command-line flags: passwords are prompted for (or
read from standard input with ``--password-stdin``: its first line, without the
LF or CRLF that ends it), and tokens are written
to files with mode 0600, never printed unless asked for with ``--show``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from bastion.cli import common
from bastion.cli.common import (
    CA,
    Address,
    AsJson,
    ClientCert,
    ClientKey,
    Insecure,
    TokenFile,
    call_guarded,
    connect,
    print_json,
    run_guarded,
    shown,
)
from bastion.exceptions import RemoteProtocolError, UsageError
from bastion.security.secret_files import open_secret_file, write_secret_file

__all__ = ["login", "token_app", "user_app"]

user_app = typer.Typer(help="Manage users (admin).", no_args_is_help=True)
token_app = typer.Typer(help="Manage API tokens (admin).", no_args_is_help=True)


def _password(prompt: str, from_stdin: bool, confirm: bool = False) -> str:
    if from_stdin:
        value = sys.stdin.readline().removesuffix("\n").removesuffix("\r")  # its first line; LF or CRLF ends it
    elif sys.stdin.isatty():
        value = typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm)
    else:
        common.fail("no terminal to ask for the password on; use --password-stdin", common.EXIT_USAGE)
    if not value:
        common.fail("empty password", common.EXIT_USAGE)
    return value


@contextlib.contextmanager
def _secret_file(path: Path) -> Iterator[Callable[[str], None]]:
    """The 0600 file a secret the server is about to make will be written to, opened first.

    Never through a symbolic link, and only a file of this user's own
    (bastion/security/secret_files.py): ``--out`` may name a shared directory.
    A path that cannot be written fails here, before the call: otherwise the
    server would hold a live token (or session) whose secret nobody ever saw.
    Nothing is truncated until the secret is there to write, and a file made
    here is removed again if the call fails.
    """
    existed = os.path.lexists(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = open_secret_file(path, os.O_WRONLY | os.O_CREAT)
        if not os.access(path.parent, os.W_OK | os.X_OK):  # the secret goes into a new file made beside it
            os.close(fd)
            common.fail(f"cannot write {path}: its directory is not writable", common.EXIT_USAGE)
    except OSError as exc:
        common.fail(f"cannot write {path}: {exc.strerror}", common.EXIT_USAGE)
    except UsageError as exc:
        common.fail(str(exc), common.EXIT_USAGE)

    def write(secret: str) -> None:
        write_secret_file(path, (secret + "\n").encode())

    written = False
    try:
        yield write
        written = True
    finally:
        os.close(fd)
        if not written and not existed:
            with contextlib.suppress(OSError):
                path.unlink()


def _with_token(answer: Any, method: str) -> dict[str, Any]:
    """``answer`` (to ``method``), checked to hold the secret a command writes or prints: a server that is not
    bastion, or a broken one, may answer anything, and a traceback here would end the command (under a typer
    that shows local variables, printing the password it had just sent)."""
    if not isinstance(answer, dict) or not isinstance(answer.get("token"), str) or not answer["token"]:
        raise RemoteProtocolError(f"the server's answer to {method} holds no token")
    return answer


def _said(answer: dict[str, Any], key: str) -> str:
    """What ``answer`` says under ``key``, for one line of a terminal ("?" if it says nothing)."""
    return shown(str(answer.get(key, "?")))


PasswordStdin = Annotated[bool, typer.Option("--password-stdin", help="Read the password from standard input.")]


def login(
    address: Address,
    user: Annotated[str, typer.Option("--user", "-u", help="Username.")],
    save: Annotated[
        Path | None, typer.Option("--save", help=f"Where to keep the session token (default {common.LOGIN_TOKEN}).")
    ] = None,
    password_stdin: PasswordStdin = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Log in with a username and password; keep the session token in a 0600 file."""
    password = _password("Password", password_stdin)

    def run() -> Any:
        with connect(address, None, ca, insecure, cert=client_cert, key=client_key, anonymous=True) as client:
            return _with_token(client.call("auth.login", username=user, password=password), "auth.login")

    path = save or common.LOGIN_TOKEN
    made_by = common.session_address_file(path)
    with _secret_file(path) as write:
        result = run_guarded(run)
        with contextlib.suppress(FileNotFoundError):
            made_by.unlink()  # the old session's server: gone before the new token is there
        write(result["token"])
    try:  # the commands that follow send the session to this server alone (common.connect)
        write_secret_file(made_by, (address + "\n").encode())
    except OSError as exc:
        common.fail(f"session saved, but cannot write {made_by}: {exc.strerror}", common.EXIT_USAGE)
    except UsageError as exc:
        common.fail(f"session saved, but {exc}", common.EXIT_USAGE)
    print(f"logged in as {_said(result, 'user')}; session token saved to {path} (mode 0600)", file=sys.stderr)


@user_app.command("add")
def user_add(
    address: Address,
    name: Annotated[str, typer.Argument(help="Username.")],
    role: Annotated[list[str] | None, typer.Option("--role", "-r", help="A role to grant (repeatable).")] = None,
    no_password: Annotated[bool, typer.Option("--no-password", help="A token-only user.")] = False,
    password_stdin: PasswordStdin = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Create a user; asks for the password unless --no-password."""
    password = None if no_password else _password("Password", password_stdin, confirm=not password_stdin)
    user = call_guarded(
        address,
        token_file,
        ca,
        client_cert,
        client_key,
        insecure,
        "auth.create_user",
        name=name,
        password=password,
        roles=role or [],
    )
    print_json(user)


@user_app.command("ls")
def user_ls(
    address: Address,
    as_json: AsJson = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """List users."""
    users = call_guarded(address, token_file, ca, client_cert, client_key, insecure, "auth.list_users")
    if as_json:
        print_json(users)
        return
    for u in users:
        flags = " (disabled)" if u["disabled"] else ""
        print(f"{u['name']}\troles={','.join(u['roles']) or '-'}{flags}")


@user_app.command("rm")
def user_rm(
    address: Address,
    name: str,
    transfer_to: Annotated[
        str | None,
        typer.Option(
            "--transfer-to", help="Hand the user's keys, files and jobs to this user instead of deleting them."
        ),
    ] = None,
    delete_data: Annotated[
        bool,
        typer.Option("--delete-data", help="Delete the user's keys, files and jobs (required without --transfer-to)."),
    ] = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Delete a user, revoke their tokens, and hand over (--transfer-to) or delete (--delete-data) their data."""
    if (transfer_to is None) == (not delete_data):
        raise typer.BadParameter("choose what happens to the user's data: --transfer-to USER or --delete-data")
    result = call_guarded(
        address,
        token_file,
        ca,
        client_cert,
        client_key,
        insecure,
        "auth.delete_user",
        name=name,
        transfer_to=transfer_to,
    )
    moved = ", ".join(f"{n} {domain}" for domain, n in sorted(result["items"].items())) or "no data"
    fate = f"handed to {transfer_to}" if transfer_to else "deleted"
    print(f"deleted {name}; {result['tokens_revoked']} token(s) revoked; {moved} {fate}", file=sys.stderr)


@user_app.command("passwd")
def user_passwd(
    address: Address,
    name: str,
    password_stdin: PasswordStdin = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Set a user's password."""
    password = _password("New password", password_stdin, confirm=not password_stdin)
    call_guarded(
        address, token_file, ca, client_cert, client_key, insecure, "auth.set_password", name=name, password=password
    )
    print(f"password of {name} set", file=sys.stderr)


@user_app.command("unlock")
def user_unlock(
    address: Address,
    name: str,
    as_json: AsJson = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Lift a user's login lockouts (from every address) and forget their failed attempts."""
    result = call_guarded(address, token_file, ca, client_cert, client_key, insecure, "auth.unlock_user", name=name)
    if as_json:
        print_json(result)
        return
    print(f"unlocked {name}; {_said(result, 'lifted')} lockout(s) lifted", file=sys.stderr)


@user_app.command("roles")
def user_roles(
    address: Address,
    name: str,
    role: Annotated[list[str] | None, typer.Option("--role", "-r", help="The complete new set (repeatable).")] = None,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Replace a user's roles."""
    print_json(
        call_guarded(
            address, token_file, ca, client_cert, client_key, insecure, "auth.set_roles", name=name, roles=role or []
        )
    )


@token_app.command("create")
def token_create(
    address: Address,
    user: Annotated[str | None, typer.Option("--user", "-u", help="Owner (default: yourself).")] = None,
    label: Annotated[str, typer.Option("--label", help="A note to recognise it by.")] = "",
    ttl: Annotated[float | None, typer.Option("--ttl", help="Lifetime in seconds.", callback=common.seconds)] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the token to this file (mode 0600).")] = None,
    show: Annotated[bool, typer.Option("--show", help="Print the token on stdout instead.")] = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Create an API token; it is shown once (written to --out, or printed with --show)."""
    if (out is None) == (not show):
        common.fail("give exactly one of --out FILE or --show", common.EXIT_USAGE)

    def create() -> dict[str, Any]:
        answer = call_guarded(
            address,
            token_file,
            ca,
            client_cert,
            client_key,
            insecure,
            "auth.create_token",
            user=user,
            label=label,
            ttl=ttl,
        )
        checked: dict[str, Any] = run_guarded(lambda: _with_token(answer, "auth.create_token"))
        return checked

    if out is None:
        print(create()["token"])
        return
    with _secret_file(out) as write:
        result = create()
        write(result["token"])
    print(f"token {_said(result, 'id')} for {_said(result, 'user')} written to {out} (mode 0600)", file=sys.stderr)


@token_app.command("ls")
def token_ls(
    address: Address,
    user: Annotated[str | None, typer.Option("--user", "-u")] = None,
    as_json: AsJson = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """List tokens (never the secrets)."""
    tokens = call_guarded(address, token_file, ca, client_cert, client_key, insecure, "auth.list_tokens", user=user)
    if as_json:
        print_json(tokens)
        return
    for t in tokens:
        state = "revoked" if t["revoked_at"] else "live"
        print(f"{t['id']}\t{t['user']}\t{t['kind']}\t{state}\t{shown(t['label'])}")


@token_app.command("revoke")
def token_revoke(
    address: Address,
    token_id: Annotated[str, typer.Argument(help="The token's id.")],
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Revoke a token; connections using it close within seconds."""
    call_guarded(address, token_file, ca, client_cert, client_key, insecure, "auth.revoke_token", id=token_id)
    print(f"revoked {token_id}", file=sys.stderr)
