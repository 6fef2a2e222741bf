"""No module in bastion/ can turn bytes or text into code or arbitrary objects.

Scans the syntax tree of every module for pickle and marshal (imports or
use), shelve (pickle underneath), the eval/exec builtins, and yaml's unsafe
loaders. The scanner is itself tested on snippets that must be caught.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bastion

PACKAGE = Path(bastion.__file__).parent
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle"}
UNSAFE_BUILTINS = {"eval", "exec"}
UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}


def find_unsafe(source: str, filename: str = "<snippet>") -> list[str]:
    """Every unsafe import, reference or call in ``source``, as "file:line: what"."""
    tree = ast.parse(source, filename)
    found: list[str] = []

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', '?')}: {what}")

    yaml_names = {"yaml"}  # names bound to the yaml module (import yaml as y)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                if root in UNSAFE_MODULES:
                    report(node, f"import {alias.name}")
                if root == "yaml":
                    yaml_names.add(alias.asname or "yaml")
        elif isinstance(node, ast.ImportFrom):
            root = (node.module or "").split(".")[0]
            if root in UNSAFE_MODULES:
                report(node, f"from {node.module} import ...")
            if root == "yaml":
                for alias in node.names:
                    if alias.name in UNSAFE_YAML:
                        report(node, f"from yaml import {alias.name}")
            if root == "builtins":
                for alias in node.names:
                    if alias.name in UNSAFE_BUILTINS:
                        report(node, f"from builtins import {alias.name}")
        elif isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in UNSAFE_BUILTINS | {"__import__"}:
                if node.func.id == "__import__":
                    arg = node.args[0] if node.args else None
                    if isinstance(arg, ast.Constant) and str(arg.value).split(".")[0] in UNSAFE_MODULES:
                        report(node, f"__import__({arg.value!r})")
                else:
                    report(node, f"{node.func.id}(...)")
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name):
                if node.value.id == "builtins" and node.attr in UNSAFE_BUILTINS:
                    report(node, f"builtins.{node.attr}")
                if node.value.id in UNSAFE_MODULES:
                    report(node, f"{node.value.id}.{node.attr}")
        elif isinstance(node, ast.Name) and node.id in UNSAFE_BUILTINS and isinstance(node.ctx, ast.Load):
            # eval/exec passed around rather than called (f = eval)
            report(node, f"reference to {node.id}")
    # yaml.load & co. through whatever name the module was imported as.
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in yaml_names
            and node.attr in UNSAFE_YAML
        ):
            report(node, f"{node.value.id}.{node.attr}")
    return sorted(set(found))


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_scan_covers_the_whole_package() -> None:
    names = {p.relative_to(PACKAGE).as_posix() for p in package_modules()}
    assert {"__init__.py", "protocol/frames.py", "server/session.py", "cli/app.py", "config.py"} <= names
    assert len(names) >= 20


def test_no_module_uses_pickle_marshal_eval_exec_or_yaml_load() -> None:
    problems: list[str] = []
    for path in package_modules():
        problems += find_unsafe(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))
    assert problems == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import pickle as p",
        "from pickle import loads",
        "import marshal\nmarshal.loads(b'')",
        "import shelve",
        "x = eval('1 + 1')",
        "exec('print(1)')",
        "f = eval",
        "import builtins\nbuiltins.exec('x')",
        "import yaml\nyaml.load(text)",
        "import yaml as y\ny.unsafe_load(text)",
        "from yaml import load",
        "m = __import__('pickle')",
    ],
)
def test_the_scanner_catches(snippet: str) -> None:
    assert find_unsafe(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import json\njson.loads('1')",
        "import msgspec\nmsgspec.msgpack.decode(b'')",
        "loop.run_in_executor(None, f)",
        "await asyncio.create_subprocess_exec('ls')",
        "import yaml\nyaml.safe_load(text)",
        "evaluation = 1",
    ],
)
def test_the_scanner_allows(snippet: str) -> None:
    assert find_unsafe(snippet) == [], snippet
