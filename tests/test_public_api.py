"""The public surface and the layering rule (ARCHITECTURE.md, "Layers").

``bastion.__all__`` is sorted and complete; every module imports on its own
(no import cycles hidden by import order); and the package's layers import
only downward, checked on the source with ``ast``.
"""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bastion
from tests.support.server import ServerProcess, shared_ca

PACKAGE = Path(bastion.__file__).parent
ROOT = PACKAGE.parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = sorted(
    _module_name(path)
    for path in PACKAGE.rglob("*.py")
    if path.name != "__main__.py"  # __main__ runs the CLI
)


def test_all_is_sorted_and_every_name_is_there() -> None:
    assert bastion.__all__ == sorted(bastion.__all__)
    assert len(set(bastion.__all__)) == len(bastion.__all__)
    for name in bastion.__all__:
        assert getattr(bastion, name, None) is not None, name


def test_public_classes_are_defined_in_bastion() -> None:
    for name in bastion.__all__:
        value = getattr(bastion, name)
        if isinstance(value, type):
            assert value.__module__.startswith("bastion."), name


def test_testing_is_a_submodule_not_a_root_export() -> None:
    import bastion.testing

    assert "testing" not in bastion.__all__
    assert callable(bastion.testing.connect)


def test_every_module_imports_on_its_own() -> None:
    # One interpreter, but each module is imported with no bastion module
    # loaded before it, so a cycle that only import order hides still fails.
    script = textwrap.dedent(
        """
        import importlib, sys, traceback
        failed = []
        for name in sys.argv[1:]:
            for loaded in [m for m in sys.modules if m == "bastion" or m.startswith("bastion.")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except Exception:
                failed.append(name + ":\\n" + traceback.format_exc())
        print("\\n".join(failed))
        sys.exit(1 if failed else 0)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *MODULES], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bastion.testing" in MODULES and "bastion.transport.memory" in MODULES


#: What a client needs no part of to speak TLS (the standard ssl module does it): the cryptography package,
#: and the development CA and certificate file code that use it.
SERVER_ONLY_TLS = ["cryptography", "bastion.security.tls_devca", "bastion.security.tls_files"]


@pytest.mark.parametrize("module", ["bastion", "bastion.client.sync", "bastion.client.aio"])
def test_a_client_does_not_load_the_server_or_the_store_drivers(module: str) -> None:
    # A client program (and a short CLI command) should not pay for the server, its stores and their
    # drivers: importing them cost about twice the client's own import time.
    script = textwrap.dedent(
        f"""
        import sys
        import {module}
        heavy = ["asyncpg", "sqlite3", "bastion.server.server", "bastion.store.sqlite", "bastion.store.postgres",
                 "bastion.config", *{SERVER_ONLY_TLS!r}]
        print(" ".join(name for name in heavy if name in sys.modules))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []


@pytest.mark.parametrize("call", ["asyncio.run(aio())", "sync()"])
def test_a_client_connected_over_tls_has_not_loaded_cryptography(server: ServerProcess, call: str) -> None:
    # A real TLS connection (the server's certificate checked against the test CA, given as ca=) and a call,
    # by a Client and by a SyncClient, then a look at what the client process has loaded.
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        import bastion

        async def aio():
            async with bastion.Client({server.address!r}, ca={str(shared_ca())!r}, token={server.token!r}) as c:
                assert await c.call("demo.echo", value="tls") == "tls"

        def sync():
            with bastion.SyncClient({server.address!r}, ca={str(shared_ca())!r}, token={server.token!r}) as c:
                assert c.call("demo.echo", value="tls") == "tls"

        {call}
        assert "ssl" in sys.modules
        print(" ".join(name for name in {SERVER_ONLY_TLS!r} if name in sys.modules))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []


def test_a_cli_client_command_over_tls_does_not_load_cryptography(server: ServerProcess) -> None:
    # `bastion call` (the CLI's app, with `bastion cert` and `bastion serve` in it) connects and calls over TLS;
    # as it exits, the process writes what it loaded to stderr.
    script = textwrap.dedent(
        f"""
        import atexit, sys
        loaded = lambda: [name for name in {SERVER_ONLY_TLS!r} if name in sys.modules]
        atexit.register(lambda: print("loaded:", *loaded(), file=sys.stderr))
        sys.argv = ["bastion", "call", {server.address!r}, "demo.echo", "value=1", "--ca", {str(shared_ca())!r},
                    "--token-file", {str(server.token_file)!r}]
        from bastion.cli import main
        main()
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "1"
    assert result.stderr.splitlines()[-1].split() == ["loaded:"]


#: What no client command of the CLI loads: the server, the stores and their drivers, the configuration (a
#: client reads none), the server-side TLS code, and rich (progress bars: file transfers and job watches only).
CLI_CLIENT_MUST_NOT_LOAD = [
    "asyncpg",
    "sqlite3",
    "_sqlite3",
    "rich",
    "bastion.config",
    "bastion.cli.serve",
    "bastion.cli.check",
    "bastion.cli.loading",
    *SERVER_ONLY_TLS,
]
CLI_CLIENT_MUST_NOT_LOAD_UNDER = ["bastion.server", "bastion.store", "bastion.services", "bastion.gateway"]


def test_the_cli_client_commands_do_not_load_the_server_or_the_stores(server: ServerProcess) -> None:
    # A client command is run in shells loops and scripts: its start-up pays for nothing it does not use.
    # Each runs the CLI's own entry point against a real TLS server and, as the process exits, writes to
    # stderr what it has loaded of the list.
    script = textwrap.dedent(
        f"""
        import atexit, sys
        def loaded():
            return [name for name in sys.modules if name in {CLI_CLIENT_MUST_NOT_LOAD!r}
                    or any(name.startswith(top + ".") or name == top for top in {CLI_CLIENT_MUST_NOT_LOAD_UNDER!r})]
        atexit.register(lambda: print("loaded:", *loaded(), file=sys.stderr))
        sys.argv = ["bastion", *sys.argv[1:]]
        from bastion.cli import main
        main()
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    tls = ["--ca", str(shared_ca()), "--token-file", str(server.token_file)]
    commands = [
        ["call", server.address, "demo.echo", "value=1"],
        ["methods", server.address],
        ["kv", "put", server.address, "greeting", "hello"],
        ["kv", "get", server.address, "greeting"],
        ["kv", "ls", server.address],
        ["files", "ls", server.address],
        ["messages", "inbox", server.address],
        ["jobs", "ls", server.address],
        ["user", "ls", server.address],
        ["token", "ls", server.address],
    ]
    for command in commands:
        result = subprocess.run(
            [sys.executable, "-c", script, *command, *tls],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env=env,
        )
        assert result.returncode == 0, (command, result.stdout + result.stderr)
        assert result.stderr.splitlines()[-1].split()[1:] == [], command


def test_a_cli_client_command_starts_no_other_process(server: ServerProcess) -> None:
    # Finding the C library with ctypes.util.find_library runs `ldconfig -p`: a fork and an exec on every
    # command, for the allocator settings the CLI applies at start. The audit hook sees any process started.
    script = textwrap.dedent(
        """
        import sys
        started = []
        sys.addaudithook(lambda event, args: started.append(repr(args[:2])) if event in (
            "subprocess.Popen", "os.posix_spawn", "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.system"
        ) else None)
        sys.argv = ["bastion", *sys.argv[1:]]
        from bastion.cli import main
        try:
            main()
        finally:
            print("started:", *started, file=sys.stderr)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    command = ["call", server.address, "demo.echo", "value=1", "--ca", str(shared_ca())]
    result = subprocess.run(
        [sys.executable, "-c", script, *command, "--token-file", str(server.token_file)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "1"
    assert result.stderr.splitlines()[-1] == "started:"


def test_the_tls_modules_names_are_still_found_in_tls() -> None:
    # The dev CA's and the certificate files' names, loaded on first use, are the real ones (and listed).
    from bastion.security import tls, tls_devca, tls_files

    for name in tls._LAZY:
        assert getattr(tls, name) is getattr(tls_devca if tls._LAZY[name].endswith("devca") else tls_files, name)
        assert name in tls.__all__ and name in dir(tls)
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        tls.Nope  # noqa: B018


def test_the_lazy_names_are_the_real_ones() -> None:
    from bastion.client.aio import Client
    from bastion.config import load_config
    from bastion.server.server import Server
    from bastion.store import LATEST_SCHEMA_VERSION, SQLiteStore
    from bastion.store.migrations import LATEST
    from bastion.store.sqlite import SQLiteStore as Direct

    assert (bastion.Client, bastion.Server, bastion.load_config) == (Client, Server, load_config)
    assert (SQLiteStore, LATEST_SCHEMA_VERSION) == (Direct, LATEST)
    assert set(bastion.__all__) <= set(dir(bastion))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        bastion.Nope  # noqa: B018


# -- layering ---------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved, at any depth in the file."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            # ``from bastion import exceptions`` imports bastion.exceptions
            if module == "bastion" or module.startswith("bastion."):
                found.update(f"{module}.{alias.name}" for alias in node.names)
    found.discard("__future__")
    return found


def _files(layer: str) -> list[Path]:
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"no modules under bastion/{layer}"
    return files


def _within(module: str, allowed: tuple[str, ...]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


def _bastion_imports(path: Path) -> set[str]:
    # Drop the names a ``from bastion.x import name`` adds when they are not modules.
    out = set()
    for module in _imports(path):
        if module == "bastion" or module.startswith("bastion."):
            parent = module.rpartition(".")[0]
            if (ROOT / Path(*module.split("."))).with_suffix(".py").exists() or (
                ROOT / Path(*module.split("."))
            ).is_dir():
                out.add(module)
            elif parent:
                out.add(parent)
    return out


def _third_party(path: Path) -> set[str]:
    tops = {module.split(".")[0] for module in _imports(path)}
    return {top for top in tops if top and top != "bastion" and top not in sys.stdlib_module_names}


@pytest.mark.parametrize("path", _files("protocol"), ids=lambda p: p.name)
def test_protocol_imports_only_exceptions_status_and_msgspec(path: Path) -> None:
    allowed = ("bastion.protocol", "bastion.exceptions", "bastion.status")
    assert {m for m in _bastion_imports(path) if not _within(m, allowed)} == set()
    assert _third_party(path) <= {"msgspec"}
    # Sans-IO: no event loop, sockets, TLS, threads or clocks.
    forbidden = {"asyncio", "socket", "ssl", "selectors", "threading", "time", "concurrent"}
    assert {m.split(".")[0] for m in _imports(path)} & forbidden == set()


@pytest.mark.parametrize("path", _files("transport"), ids=lambda p: p.name)
def test_transport_imports_only_protocol_and_below(path: Path) -> None:
    allowed = (
        "bastion.transport",
        "bastion.protocol",
        "bastion.exceptions",
        "bastion.status",
        "bastion.config",
        "bastion.observability",
    )
    assert {m for m in _bastion_imports(path) if not _within(m, allowed)} == set()


@pytest.mark.parametrize("path", _files("services"), ids=lambda p: p.name)
def test_services_do_not_reach_into_the_server_or_client(path: Path) -> None:
    forbidden = ("bastion.server", "bastion.client", "bastion.transport", "bastion.protocol")
    assert {m for m in _bastion_imports(path) if _within(m, forbidden)} == set()


def test_the_import_checker_sees_imports() -> None:
    # Guard the guard: a file that imports upward must be caught.
    session = PACKAGE / "server" / "session.py"
    assert "bastion.transport.aio" in _bastion_imports(session)
    assert "bastion.protocol.messages" in _bastion_imports(session)
    assert "asyncio" in _imports(session)
