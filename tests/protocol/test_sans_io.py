"""bastion/protocol/ stays sans-IO: no event loop, sockets, threads or clocks.

The core is driven only by bytes in and calls in, so the same code serves the
async server, both clients and the fuzzers (STYLE.md section 1). This reads the
imports from the source with ``ast`` rather than importing anything, so a
forbidden import is caught even inside a function body or a TYPE_CHECKING block.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bastion.protocol

PROTOCOL_DIR = Path(bastion.protocol.__file__).parent
MODULES = sorted(PROTOCOL_DIR.glob("*.py"))

FORBIDDEN = {"asyncio", "socket", "ssl", "threading", "selectors", "uvloop", "time"}
ALLOWED_BASTION = ("bastion.protocol", "bastion.exceptions", "bastion.status")


def imported_modules(path: Path) -> list[str]:
    """Every absolute module name ``path`` imports (relative imports resolved)."""
    package = "bastion.protocol"
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.append(module)
            # ``from bastion import server`` names a module in its alias.
            names += [f"{module}.{alias.name}" for alias in node.names if module == "bastion"]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            names += [a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return names


def test_modules_found() -> None:
    assert {p.name for p in MODULES} >= {"messages.py", "frames.py", "state.py", "connection.py"}


def allowed(name: str) -> bool:
    top = name.split(".")[0]
    if top == "bastion":
        return any(name == a or name.startswith(a + ".") for a in ALLOWED_BASTION)
    return top not in FORBIDDEN


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_protocol_module_is_sans_io(path: Path) -> None:
    bad = [name for name in imported_modules(path) if not allowed(name)]
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize(
    ("source", "ok"),
    [
        ("import asyncio", False),
        ("from time import monotonic", False),
        ("import socket as s", False),
        ("from bastion.server import app", False),
        ("from bastion import client", False),
        ("from .. import config", False),
        ("__import__('threading')", False),
        ("from . import frames", True),
        ("from .messages import Call", True),
        ("from bastion.status import Status", True),
        ("import msgspec", True),
        ("from typing import Any", True),
    ],
)
def test_checker_itself(source: str, ok: bool, tmp_path: Path) -> None:
    path = tmp_path / "mod.py"
    path.write_text(source)
    assert all(allowed(n) for n in imported_modules(path)) is ok
