"""``bastion files put|get|ls|rm|share|unshare|usage``.

``put`` hashes the source, begins an upload and streams the file in chunks;
it keeps the upload id in a 0600 state file under
``~/.config/bastion/uploads/`` before sending a byte, so running the same
``put`` again after an interruption asks the server where the upload stands
and continues from there. ``get`` streams into a new temporary file (of a
random name, never a planted one) beside the destination, verifies the SHA-256 the server reported, fsyncs and renames:
the destination is either the whole, verified file or untouched.

Progress bars (rich) go to standard error when it is a terminal, or always
with ``--progress``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

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
    collect_pages,
    connect,
    print_json,
    run_guarded,
    shown,
)
from bastion.client.sync import SyncClient
from bastion.exceptions import DataLoss, NotFound, UsageError

if TYPE_CHECKING:
    from rich.progress import Progress  # loaded by the commands that show one: other commands start faster

__all__ = ["files_app"]

files_app = typer.Typer(help="Store, fetch, list and share files (the files service).", no_args_is_help=True)

STATE_DIR = common.LOGIN_TOKEN.parent / "uploads"
_READ_BLOCK = 1024 * 1024

ShowProgress = Annotated[
    bool | None,
    typer.Option("--progress/--no-progress", help="Show a progress bar (default: when stderr is a terminal)."),
]
Owner = Annotated[str | None, typer.Option("--owner", help="The file belongs to this user (a file shared with you).")]


def _progress(show: bool | None) -> Progress:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True, force_terminal=True if show else None)
    enabled = show if show is not None else console.is_terminal
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        refresh_per_second=5,
    )


def _sha256_of(path: Path, progress: Progress) -> str:
    hasher = hashlib.sha256()
    task = progress.add_task(f"hashing {path.name}", total=path.stat().st_size)
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            hasher.update(block)
            progress.advance(task, len(block))
    progress.remove_task(task)
    return hasher.hexdigest()


def _state_path(address: str, source: Path, name: str) -> Path:
    key = hashlib.sha256(f"{address}\0{source.resolve()}\0{name}".encode()).hexdigest()[:32]
    return STATE_DIR / f"{key}.json"


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _chunks(path: Path, offset: int, size: int, progress: Progress, task: Any, rate: float | None) -> Iterator[bytes]:
    started = time.monotonic()
    sent = 0
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            chunk = f.read(size)
            if not chunk:
                return
            if rate:  # --limit-rate: never run ahead of rate bytes/s
                ahead = (sent + len(chunk)) / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            sent += len(chunk)
            yield chunk
            progress.advance(task, len(chunk))


def _resume_or_begin(
    client: SyncClient, state_path: Path, state: dict[str, Any], name: str, overwrite: bool, expected: str | None
) -> dict[str, Any]:
    """The upload to send to: the one a previous run left (if the server still has it), or a new one."""
    old = _read_state(state_path)
    keys = ("size", "mtime_ns", "sha256", "if_sha256")  # another --if-sha256 is another upload
    if old and all(old.get(k) == state[k] for k in keys) and isinstance(old.get("upload_id"), str):
        try:
            info: dict[str, Any] = client.call("files.upload_status", upload_id=old["upload_id"])
            print(f"resuming upload {info['upload_id']} at offset {info['offset']}", file=sys.stderr)
            return info
        except NotFound:
            pass
    args: dict[str, Any] = {"name": name, "size": state["size"], "sha256": state["sha256"], "overwrite": overwrite}
    if expected is not None:
        args["expected_sha256"] = expected
    info = client.call("files.begin_upload", **args)
    _write_state(state_path, {**state, "upload_id": info["upload_id"]})
    return info


@files_app.command()
def put(
    address: Address,
    source: Annotated[Path, typer.Argument(help="The local file to upload.", exists=True, dir_okay=False)],
    name: Annotated[str | None, typer.Argument(help="Its name on the server (default: the file's name).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace your file of that name.")] = False,
    if_sha256: Annotated[
        str | None,
        typer.Option(
            "--if-sha256",
            help="Replace your file of that name only if its contents still have this SHA-256 when the upload "
            "finishes (implies --overwrite; ABORTED otherwise).",
        ),
    ] = None,
    limit_rate: Annotated[
        float | None, typer.Option("--limit-rate", help="Send at most this many bytes per second.")
    ] = None,
    progress: ShowProgress = None,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
    as_json: AsJson = False,
) -> None:
    """Upload a file; run it again after an interruption and it continues where the server stopped."""
    target = name or source.name
    stat = source.stat()
    state_path = _state_path(address, source, target)

    def run() -> Any:
        with _progress(progress) as bar:
            old = _read_state(state_path)
            if old and old.get("size") == stat.st_size and old.get("mtime_ns") == stat.st_mtime_ns:
                digest = str(old.get("sha256"))  # unchanged since the interrupted run: no need to hash again
            else:
                digest = _sha256_of(source, bar)
            state = {"address": address, "name": target, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            state["sha256"], state["if_sha256"] = digest, if_sha256
            with connect(address, token_file, ca, insecure, cert=client_cert, key=client_key, timeout=None) as client:
                info = _resume_or_begin(client, state_path, state, target, overwrite or bool(if_sha256), if_sha256)
                task = bar.add_task(f"put {target}", total=info["size"], completed=info["offset"])
                chunks = _chunks(source, info["offset"], info["chunk_bytes"], bar, task, limit_rate)
                result = client.upload("files.upload", chunks, upload_id=info["upload_id"], offset=info["offset"])
            if not result["complete"]:
                common.fail(f"{source} changed during the upload (the server holds {result['offset']} bytes)", 1)
            with contextlib.suppress(FileNotFoundError):
                state_path.unlink()
            return result["file"]

    file = run_guarded(run)
    if as_json:
        print_json(file)
    else:
        print(f"{shown(file['name'])}  {file['size']} bytes  sha256 {file['sha256']}  id {file['id']}")


def _ref(name: str, owner: str | None) -> dict[str, Any]:
    """A file reference: an id (``f-…``) or a name."""
    if name.startswith("f-") and owner is None and len(name) == 34:
        return {"file_id": name}
    return {"name": name, "owner": owner}


@files_app.command()
def get(
    address: Address,
    name: Annotated[str, typer.Argument(help="The file's name (or id) on the server.")],
    dest: Annotated[Path | None, typer.Argument(help="Where to write it (default: its base name here).")] = None,
    owner: Owner = None,
    progress: ShowProgress = None,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Download a file, verify its SHA-256, and write it atomically."""
    ref = _ref(name, owner)

    def run() -> Any:
        with connect(address, token_file, ca, insecure, cert=client_cert, key=client_key, timeout=None) as client:
            info = client.call("files.stat", **ref)
            path = dest or Path(info["name"].rsplit("/", 1)[-1])
            if path.is_dir():
                path = path / info["name"].rsplit("/", 1)[-1]
            # A name the file's owner chose (no DEST, or DEST a directory) never replaces a local file
            # (like curl -J): a shared ".bashrc" must not land on the reader's own.
            chosen = dest is not None and path == dest
            if not chosen and os.path.lexists(path):
                raise UsageError(f"will not overwrite {path} with the server's file: give DEST to replace it")
            _download(client, info, path, _progress(progress), overwrite=chosen)
            return info, path

    info, path = run_guarded(run)
    print(f"{shown(str(path))}  {info['size']} bytes  sha256 {info['sha256']} (verified)", file=sys.stderr)


def _download(client: SyncClient, info: dict[str, Any], path: Path, progress: Progress, *, overwrite: bool) -> None:
    hasher = hashlib.sha256()
    try:
        # A new file (O_EXCL, 0600) of a name nobody can plant beforehand: in a shared directory a fixed
        # name could be another user's symlink to one of the reader's own files. Not derived from the
        # destination's name, which may already be as long as the file system allows.
        fd, made = tempfile.mkstemp(prefix=".bastion-part-", dir=path.parent)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    tmp = Path(made)
    try:
        with os.fdopen(fd, "wb") as f, progress as bar:
            task = bar.add_task(f"get {shown(info['name'])}", total=info["size"])
            for chunk in client.stream("files.download", file_id=info["id"], sha256=info["sha256"]):
                f.write(chunk)
                hasher.update(chunk)
                bar.advance(task, len(chunk))
            f.flush()
            os.fsync(f.fileno())
        if hasher.hexdigest() != info["sha256"]:
            raise DataLoss(f"downloaded SHA-256 {hasher.hexdigest()} differs from the server's {info['sha256']}")
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _place_new(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless something is there (atomically where the file system has hard links)."""
    refusal = UsageError(f"will not overwrite {path} with the server's file: give DEST to replace it")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise refusal from None
    except OSError:  # no hard links here (FAT, some network shares): check, then move
        if os.path.lexists(path):
            raise refusal from None
        os.replace(tmp, path)
        return
    tmp.unlink()


@files_app.command("ls")
def ls(
    address: Address,
    prefix: Annotated[str, typer.Argument(help="Only names starting with this.")] = "",
    owner: Owner = None,
    all_users: Annotated[bool, typer.Option("--all", help="Every user's files (admin).")] = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
    as_json: AsJson = False,
) -> None:
    """List your files and those shared with you."""

    def run() -> list[dict[str, Any]]:
        with connect(address, token_file, ca, insecure, cert=client_cert, key=client_key) as client:
            return collect_pages(
                client, "files.list", items="files", cursor="after",
                prefix=prefix, owner=owner, all=all_users, limit=1000,
            )  # fmt: skip

    files = run_guarded(run)
    if as_json:
        print_json(files)
        return
    for f in files:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(f["updated_at"]))
        print(f"{f['size']:>14}  {when}  {shown(f['owner']):<16} {f['access']:<6} {shown(f['name'])}")


@files_app.command()
def rm(
    address: Address,
    name: Annotated[str, typer.Argument(help="The file's name (or id).")],
    owner: Owner = None,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Delete a file (yours, or one shared with you read-write)."""
    info = call_guarded(address, token_file, ca, client_cert, client_key, insecure, "files.delete", **_ref(name, owner))
    print(f"deleted {shown(info['owner'])}:{shown(info['name'])}", file=sys.stderr)


@files_app.command()
def share(
    address: Address,
    name: Annotated[str, typer.Argument(help="Your file's name (or id).")],
    user: Annotated[str | None, typer.Option("--user", help="Share with this user.")] = None,
    role: Annotated[str | None, typer.Option("--role", help="Share with everyone holding this role.")] = None,
    write: Annotated[bool, typer.Option("--write", help="Read-write (replace contents, delete).")] = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Share a file read-only (or --write) with a user or a role."""
    mode = "write" if write else "read"
    info = call_guarded(
        address,
        token_file,
        ca,
        client_cert,
        client_key,
        insecure,
        "files.share",
        user=user,
        role=role,
        mode=mode,
        **_ref(name, None),
    )
    print(f"shared with {info['kind']} {info['grantee']} ({info['mode']})", file=sys.stderr)


@files_app.command()
def unshare(
    address: Address,
    name: Annotated[str, typer.Argument(help="Your file's name (or id).")],
    user: Annotated[str | None, typer.Option("--user", help="The user to withdraw the share from.")] = None,
    role: Annotated[str | None, typer.Option("--role", help="The role to withdraw the share from.")] = None,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Withdraw a share."""
    done = call_guarded(
        address,
        token_file,
        ca,
        client_cert,
        client_key,
        insecure,
        "files.unshare",
        user=user,
        role=role,
        **_ref(name, None),
    )
    print("share withdrawn" if done else "there was no such share", file=sys.stderr)


@files_app.command()
def usage(
    address: Address,
    user: Annotated[str | None, typer.Option("--user", help="Another user's usage (admin).")] = None,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Bytes you hold (files and open uploads) against your quota."""
    print_json(call_guarded(address, token_file, ca, client_cert, client_key, insecure, "files.usage", user=user))
