"""``bastion jobs submit|status|watch|cancel|result|ls|registered``.

Arguments of ``submit`` are ``key=value`` words, converted to the types the
job declares (from ``jobs.registered``), exactly as ``bastion call`` does.
``watch`` (and ``submit --watch``) draws a progress bar on standard error
and ends with the job: exit code 0 if it succeeded, 1 otherwise, with the
result printed as JSON on standard output.

A job's progress message and failure reason are its own words, often built
from what a user submitted (a file name), and an admin sees everyone's: they
are shown with unprintable characters escaped (``\\n``, ``\\x1b``) and, in
the progress bar, as plain text rather than markup, so no job can forge
lines, send escape sequences to a terminal or break the bar.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from bastion.cli.common import (
    CA,
    EXIT_CALL_ERROR,
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
from bastion.cli.values import parse_arguments
from bastion.exceptions import UsageError

__all__ = ["jobs_app"]

jobs_app = typer.Typer(help="Computation jobs: submit, watch, cancel, fetch results.", no_args_is_help=True)

JobId = Annotated[str, typer.Argument(help="The job's id (printed by submit).")]


def _line(status: dict[str, Any]) -> str:
    detail = shown(status.get("error") or status.get("message") or "")
    progress = f"{status['progress'] * 100:5.1f}%"
    return f"{status['id']}\t{status['name']}\t{status['state']}\t{progress}\t{detail}".rstrip()


@jobs_app.command("submit")
def submit(
    address: Address,
    name: Annotated[str, typer.Argument(help="The registered job to run (see `bastion jobs registered`).")],
    arguments: Annotated[
        list[str] | None,
        typer.Argument(help="key=value pairs, converted to the job's declared types; key=@file reads a file."),
    ] = None,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Follow the job with a progress bar until it ends.")
    ] = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Queue a job; print its id (and, with --watch, follow it and print its result)."""

    def run() -> str:
        with connect(address, token_file, ca, insecure, cert=client_cert, key=client_key) as client:
            offered = {job["name"]: job for job in client.call("jobs.registered")}
            if name not in offered:
                known = ", ".join(sorted(offered)) or "none"
                raise UsageError(f"no job named {name!r} on this server (it offers: {known})")
            args = parse_arguments(list(arguments or []), offered[name].get("params") or {})
            job_id: str = client.call("jobs.submit", name=name, args=args)
            return job_id

    job_id = run_guarded(run)
    print(job_id)
    if watch:
        _follow(address, token_file, ca, client_cert, client_key, insecure, job_id)


@jobs_app.command("status")
def status(
    address: Address,
    job_id: JobId,
    as_json: AsJson = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Show a job's state and progress."""
    found = call_guarded(address, token_file, ca, client_cert, client_key, insecure, "jobs.status", id=job_id)
    if as_json:
        print_json(found)
    else:
        print(_line(found))


@jobs_app.command("watch")
def watch(
    address: Address,
    job_id: JobId,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Follow a job with a progress bar until it ends; print its result (exit 1 unless it succeeded)."""
    _follow(address, token_file, ca, client_cert, client_key, insecure, job_id)


@jobs_app.command("cancel")
def cancel(
    address: Address,
    job_id: JobId,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Cancel a job: a queued one at once, a running one by killing its process."""
    found = call_guarded(address, token_file, ca, client_cert, client_key, insecure, "jobs.cancel", id=job_id)
    pending = found["state"] == "running"
    print(_line(found) + ("\t(cancelling)" if pending else ""))


@jobs_app.command("result")
def result(
    address: Address,
    job_id: JobId,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Print a finished job's result as JSON (exit 1 with the reason if it did not succeed)."""
    _print_result(call_guarded(address, token_file, ca, client_cert, client_key, insecure, "jobs.result", id=job_id))


@jobs_app.command("ls")
def ls(
    address: Address,
    state: Annotated[
        str | None, typer.Option("--state", help="Only jobs in this state (queued, running, succeeded, …).")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many jobs.")] = 100,
    after: Annotated[
        str | None, typer.Option("--after", help="Only jobs after this id in the listing's order (paging).")
    ] = None,
    newest: Annotated[bool, typer.Option("--newest", help="Newest first (--after then pages back).")] = False,
    as_json: AsJson = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """List your jobs (an admin sees everyone's), oldest first (--newest: newest first)."""
    found = call_guarded(
        address, token_file, ca, client_cert, client_key, insecure, "jobs.list",
        state=state, limit=limit, after=after, **({"newest_first": True} if newest else {}),
    )  # fmt: skip
    if as_json:
        print_json(found)
        return
    for job in found:
        print(_line(job))


@jobs_app.command("registered")
def registered(
    address: Address,
    as_json: AsJson = False,
    token_file: TokenFile = None,
    ca: CA = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """List the jobs this server runs and their arguments."""
    found = call_guarded(address, token_file, ca, client_cert, client_key, insecure, "jobs.registered")
    if as_json:
        print_json(found)
        return
    for job in found:
        params = job["params"].get("properties", {})
        print(f"{job['name']}({', '.join(params)})" + (f"  — {job['doc'].splitlines()[0]}" if job["doc"] else ""))


def _follow(
    address: str,
    token_file: Path | None,
    ca: Path | None,
    client_cert: Path | None,
    client_key: Path | None,
    insecure: bool,
    job_id: str,
) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())

    def run() -> Any:
        with (
            connect(address, token_file, ca, insecure, cert=client_cert, key=client_key, timeout=None) as client,
            Progress(*columns, console=console) as bar,
        ):
            task = bar.add_task(job_id, total=1.0)
            for update in client.stream("jobs.watch", id=job_id):
                label = f"{job_id} {update['state']}" + (f": {shown(update['message'])}" if update["message"] else "")
                bar.update(task, completed=update["progress"], description=escape(label))
            return client.call("jobs.result", id=job_id)

    _print_result(run_guarded(run))


def _print_result(outcome: dict[str, Any]) -> None:
    if outcome["state"] == "succeeded":
        print_json(outcome["result"])
        return
    print(f"error: job {outcome['id']} {outcome['state']}: {shown(outcome['error'] or '')}", file=sys.stderr)
    raise typer.Exit(EXIT_CALL_ERROR)
