"""docs/services.md must agree with the built-in services and the CLI.

* every method of every built-in service is documented (as ``service.method``),
  and every ``service.method`` the document names exists;
* every sub-command of the service CLIs (``bastion kv|files|jobs|user|token``,
  ``bastion backup``/``restore``) is documented, and every one the document
  names exists, with the options it shows.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer.main

from bastion.cli.app import app
from bastion.config import Config
from bastion.security.audit import AuditLog
from bastion.security.passwords import PasswordHasher
from bastion.security.throttle import LoginThrottle
from bastion.service import Service
from bastion.services.admin import create_service as create_admin
from bastion.services.auth import create_service as create_auth
from bastion.services.backup import Backups
from bastion.services.files import Files
from bastion.services.jobs import Jobs
from bastion.services.kv import KV
from bastion.services.messages import Messages
from bastion.store.sqlite import SQLiteStore

DOC = Path(__file__).parents[2] / "docs" / "services.md"
SERVICES = ("admin", "auth", "kv", "files", "jobs", "messages")
CLI_GROUPS = ("kv", "files", "jobs", "messages", "topics", "user", "token")
CLI_COMMANDS = ("backup", "restore")


def builtin_services(tmp_path: Path) -> list[Service]:
    store = SQLiteStore(tmp_path / "never-opened.db")
    backups = Backups(store, data_dir=tmp_path, files_dir=tmp_path / "files")
    throttle = LoginThrottle(store)
    auth = create_auth(store, hasher=PasswordHasher(fast=True), throttle=throttle, audit=AuditLog(None))
    hosted = [
        KV(store).service, Files(store, tmp_path / "files").service, Jobs(store, []).service, Messages(store).service,
    ]  # fmt: skip
    return [create_admin(backups), auth, *hosted]


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


def _config_keys() -> set[str]:
    """``kv.max_batch`` and the like: configuration keys look like method names."""
    return {f"{section}.{key}" for section in SERVICES if section in Config.__struct_fields__
            for key in getattr(Config(), section).__struct_fields__}  # fmt: skip


def test_every_builtin_method_is_documented_and_nothing_else(doc: str, tmp_path: Path) -> None:
    methods = {f"{s.name}.{name}" for s in builtin_services(tmp_path) for name in s.methods}
    assert {m.split(".")[0] for m in methods} == set(SERVICES)
    named = set(re.findall(rf"`((?:{'|'.join(SERVICES)})\.[a-z_]+)[`(]", doc)) - _config_keys()
    assert sorted(methods - named) == [], "methods missing from docs/services.md"
    assert sorted(named - methods) == [], "docs/services.md names methods that do not exist"


def _cli() -> dict[str, Any]:
    """``"files put"`` -> its click command (typer bundles its own click)."""
    root: Any = typer.main.get_command(app)
    commands: dict[str, Any] = {}
    for group in CLI_GROUPS:
        for name, command in root.commands[group].commands.items():
            commands[f"{group} {name}"] = command
    for name in CLI_COMMANDS:
        commands[name] = root.commands[name]
    return commands


def _command_lines(doc: str) -> list[str]:
    """Every ``bastion …`` command shown: inline code, and lines of code blocks (fenced or indented)."""
    shown = [span.strip("`") for span in re.findall(r"`bastion [^`\n]+`", doc)]
    fenced = False
    for line in doc.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):
            command = line.strip().removeprefix("$ ").split("#")[0].strip()
            if command.startswith("bastion "):
                shown.append(command)
    return shown


def test_every_service_cli_command_is_documented_and_nothing_else(doc: str) -> None:
    commands = _cli()
    words = "|".join((*CLI_GROUPS, *CLI_COMMANDS))
    mentioned: set[str] = set()
    lines = "\n".join(_command_lines(doc))
    for group, sub in re.findall(rf"^bastion ({words})(?: ([a-z][a-z-]*(?:\|[a-z][a-z-]*)*))?", lines, flags=re.M):
        if group in CLI_COMMANDS:
            mentioned.add(group)
        elif sub:
            mentioned.update(f"{group} {name}" for name in sub.split("|"))
    assert sorted(set(commands) - mentioned) == [], "CLI commands missing from docs/services.md"
    assert sorted(mentioned - set(commands)) == [], "docs/services.md names CLI commands that do not exist"


def test_documented_cli_options_exist(doc: str) -> None:
    commands = _cli()
    checked = 0
    for line in _command_lines(doc):
        words = line.split()[1:]
        key = words[0] if words[0] in CLI_COMMANDS else " ".join(words[:2])
        command = commands.get(key)
        if command is None:
            continue
        known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for word in words:
            flag = word.split("=", 1)[0].rstrip(",;.)]")
            if flag.startswith("--") and flag != "--":
                assert flag in known, f"{line}: bastion {key} has no option {flag}"
                checked += 1
    assert checked > 0
