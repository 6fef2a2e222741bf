"""Every ``bastion …`` command the docs show names a command that exists, with options it has.

README.md and docs/*.md: inline code and the lines of code blocks (``VAR=value bastion serve …`` too).
test_services_doc.py also checks the other way round for the service CLIs (every command documented).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer.main

from bastion.cli.app import app
from tests.docs.test_services_doc import _command_lines

ROOT = Path(__file__).parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _command(root: Any, words: list[str]) -> tuple[Any, int]:
    """The deepest (sub)command ``words`` name, and how many words that took."""
    command, used = root, 0
    for word in words:
        sub = getattr(command, "commands", {}).get(word)
        if sub is None:
            break
        command, used = sub, used + 1
    return command, used


def _shown(doc: str) -> list[str]:
    lines = [re.sub(r"^(?:[A-Z_][A-Z0-9_]*=\S+\s+)+", "", line) for line in _command_lines(doc)]
    # inline code broken over two lines of text (_command_lines takes one line's only)
    lines += [" ".join(span.split()) for span in re.findall(r"`(bastion [^`]+\n[^`]+)`", doc)]
    fenced = False
    for line in doc.splitlines():  # _command_lines skips a line that starts with an environment variable
        if line.startswith("```"):
            fenced = not fenced
        elif fenced and re.match(r"^\s*(?:[A-Z_][A-Z0-9_]*=\S+\s+)+bastion ", line):
            lines.append(re.sub(r"^\s*(?:[A-Z_][A-Z0-9_]*=\S+\s+)+", "", line.split("#")[0]).strip())
    return [line for line in lines if line.startswith("bastion ")]


def test_every_command_and_option_the_docs_show_exists() -> None:
    root: Any = typer.main.get_command(app)
    problems, checked = [], 0
    for path in DOCS:
        for line in _shown(path.read_text()):
            words = line.split()[1:]
            command, used = _command(root, words)
            if used == 0:
                problems.append(f"{path.name}: {line}: no command {words[0]!r}")
                continue
            known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
            for word in words[used:]:
                flag = word.split("=", 1)[0].rstrip(",;.)]`")
                if flag.startswith("-") and flag not in ("-", "--", "--help", "-h") and flag not in known:
                    problems.append(f"{path.name}: {line}: {' '.join(words[:used])} has no option {flag}")
                checked += 1
    assert problems == []
    assert checked > 100  # the walk found the commands


def test_the_exit_statuses_are_documented() -> None:
    """Scripts branch on a command's exit status -- 1 the server refused, 2 a usage error, 3 the server could
    not be reached -- and nothing said which was which: ``bastion --help`` and docs/operations.md now do."""
    from bastion.cli.common import EXIT_CALL_ERROR, EXIT_UNAVAILABLE, EXIT_USAGE
    from tests.support.server import bastion_cli

    doc = (ROOT / "docs" / "operations.md").read_text()
    section = doc.split("### Exit status", 1)[1].split("\n#", 1)[0] if "### Exit status" in doc else ""
    assert [int(code) for code in re.findall(r"^\| `(\d)` \|", section, re.M)] == [
        0,
        EXIT_CALL_ERROR,
        EXIT_USAGE,
        EXIT_UNAVAILABLE,
    ]
    shown = " ".join(bastion_cli("--help").stdout.replace("│", " ").split())
    assert re.search(r"Exit status: 0 success, 1 refused \(.*\), 2 usage error, 3 unreachable", shown), shown
