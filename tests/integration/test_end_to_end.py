"""End to end: real ``bastion serve`` processes driven over TCP by every client.

The async ``Client``, the blocking ``SyncClient`` and the ``bastion`` CLI (as a
subprocess) all talk to the same server process; nothing is faked.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

import bastion
from bastion import Client, SyncClient
from tests.support.server import ServerProcess, bastion_cli

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 30.0) -> T:
    """Run ``coro`` on a fresh event loop, bounded by ``timeout`` seconds."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def poll(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch: pytest.MonkeyPatch) -> None:
    # A token in the environment would silently authenticate the "anonymous" clients.
    monkeypatch.delenv("BASTION_TOKEN", raising=False)
    monkeypatch.delenv("BASTION_TOKEN_FILE", raising=False)


# -- the three clients against one server ---------------------------------------------


def test_async_client_health_echo_and_stream(server: ServerProcess) -> None:
    address, token_file, _ = server

    async def main() -> None:
        async with Client(address, token_file=str(token_file), timeout=10) as client:
            health = await client.call("admin.health")
            assert health["status"] == "ok"
            assert health["version"] == bastion.__version__
            assert client.welcome is not None and client.welcome.principal == "admin"
            value = {"text": "héllo", "n": [1, 2.5, None, True], "raw": b"\x00\xff"}
            assert await client.call("demo.echo", value=value) == value
            assert await client.demo.echo_str(value="007") == "str:007"
            assert await client.call("demo.count", n=5) == [0, 1, 2, 3, 4]
            assert [x async for x in client.stream("demo.count", n=40)] == list(range(40))

    run(main())


def test_sync_client_health_echo_and_stream(server: ServerProcess) -> None:
    address, token_file, _ = server
    with SyncClient(address, token_file=str(token_file), timeout=10) as client:
        assert client.call("admin.health")["status"] == "ok"
        assert client.call("demo.echo", value=[1, "two", {"three": 3}]) == [1, "two", {"three": 3}]
        assert client.demo.echo_int(value=7) == "int:7"
        assert list(client.stream("demo.count", n=40)) == list(range(40))
        with pytest.raises(bastion.InvalidArgument, match="value"):
            client.call("demo.echo_int", value="seven")


def test_cli_call_health_and_echo(server: ServerProcess) -> None:
    address, token_file, _ = server
    health = bastion_cli("call", address, "admin.health")
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["status"] == "ok"

    echo = bastion_cli("call", address, "demo.echo", 'value={"a": [1, 2]}', "--token-file", str(token_file))
    assert echo.returncode == 0, echo.stderr
    assert json.loads(echo.stdout) == {"a": [1, 2]}
    assert echo.stderr == ""

    from_env = bastion_cli("call", address, "demo.echo", "value=[1]", env={"BASTION_TOKEN_FILE": str(token_file)})
    assert from_env.returncode == 0, from_env.stderr
    assert json.loads(from_env.stdout) == [1]


def test_cli_converts_arguments_to_the_declared_types(server: ServerProcess) -> None:
    address, token_file, _ = server
    as_str = bastion_cli("call", address, "demo.echo_str", "value=007", "--token-file", str(token_file))
    assert as_str.returncode == 0, as_str.stderr
    assert json.loads(as_str.stdout) == "str:007"

    as_int = bastion_cli("call", address, "demo.echo_int", "value=007", "--token-file", str(token_file))
    assert as_int.returncode == 0, as_int.stderr
    assert json.loads(as_int.stdout) == "int:7"


def test_cli_collects_a_server_stream(server: ServerProcess) -> None:
    address, token_file, _ = server
    result = bastion_cli("call", address, "demo.count", "n=5", "--token-file", str(token_file))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [0, 1, 2, 3, 4]


def test_cli_reads_an_argument_from_a_file(server: ServerProcess, tmp_path: Path) -> None:
    address, token_file, _ = server
    text = "héllo\nwörld"
    source = tmp_path / "arg.txt"
    source.write_text(text, encoding="utf-8")
    result = bastion_cli("call", address, "demo.length", f"text=@{source}", "--token-file", str(token_file))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == len(text) == 11


def test_cli_methods_json_and_text(server: ServerProcess) -> None:
    address, token_file, _ = server
    listing = bastion_cli("methods", address, "--json", "--token-file", str(token_file))
    assert listing.returncode == 0, listing.stderr
    services = {svc["name"]: svc for svc in json.loads(listing.stdout)}
    assert set(services) == {"admin", "auth", "demo", "files", "jobs", "kv", "messages"}
    demo = {m["name"]: m for m in services["demo"]["methods"]}
    assert {"demo.echo", "demo.slow", "demo.sleep_then_return", "demo.count", "demo.watched"} <= set(demo)
    assert demo["demo.echo_int"]["params"]["properties"]["value"]["type"] == "integer"
    assert demo["demo.count"]["kind"] == "server_stream"

    text = bastion_cli("methods", address, "--token-file", str(token_file))
    assert text.returncode == 0, text.stderr
    assert "demo.echo_int(value: int) -> str" in text.stdout
    assert "demo.count(n: int) -> stream[int]" in text.stdout

    anonymous = bastion_cli("methods", address, "--json")
    assert anonymous.returncode == 0, anonymous.stderr
    visible = {m["name"] for svc in json.loads(anonymous.stdout) for m in svc["methods"]}
    assert visible == {"admin.health", "admin.methods", "admin.ready", "auth.login", "auth.whoami"}


def test_cli_call_error_exits_1_with_one_line(server: ServerProcess) -> None:
    address, token_file, _ = server
    failed = bastion_cli("call", address, "demo.fail", "message=boom", "--token-file", str(token_file))
    assert failed.returncode == 1
    assert failed.stdout == ""
    lines = failed.stderr.splitlines()
    assert len(lines) == 1, failed.stderr
    assert lines[0].startswith("error: INTERNAL: internal error (request id ")
    assert "boom" not in failed.stderr  # the handler's exception text stays on the server

    anonymous = bastion_cli("call", address, "demo.echo", "value=1")
    assert anonymous.returncode == 1
    assert anonymous.stderr.splitlines() == ["error: UNAUTHENTICATED: demo.echo requires authentication"]


def test_cli_unreachable_address_exits_3() -> None:
    # A bound socket that never listens: connecting to it is refused, and no
    # other process can take the port while we hold it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        for command in (("call", f"127.0.0.1:{port}", "admin.health"), ("methods", f"127.0.0.1:{port}")):
            result = bastion_cli(*command)
            assert result.returncode == 3, (command, result.stdout, result.stderr)
            assert result.stdout == ""
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
            assert str(port) in lines[0]


# -- concurrency on one connection ------------------------------------------------------


def test_200_concurrent_calls_on_one_connection(server: ServerProcess) -> None:
    address, token_file, _ = server
    rng = random.Random(1234)
    delays = [rng.uniform(0.0, 0.3) for _ in range(200)]

    async def main() -> tuple[list[Any], list[int], dict[str, Any]]:
        finished: list[int] = []
        async with Client(address, token_file=str(token_file), timeout=20) as client:

            async def one(i: int) -> Any:
                if i % 2:
                    result = await client.call("demo.sleep_then_return", seconds=delays[i], tag=i)
                else:
                    await asyncio.sleep(delays[i])
                    result = await client.call("demo.echo", value={"call": i, "pad": "x" * i})
                finished.append(i)
                return result

            results = await asyncio.gather(*(one(i) for i in range(200)))
            stats = await client.call("admin.stats")
        return results, finished, stats

    results, finished, stats = run(main())
    for i, result in enumerate(results):
        assert result == (i if i % 2 else {"call": i, "pad": "x" * i}), i
    assert sorted(finished) == list(range(200))
    assert finished != list(range(200)), "replies should have come back out of order"
    # Everything went over the one connection this client opened.
    assert stats["connections_total"] == 1
    assert stats["calls_total"] == 201


# -- deadlines and cancellation ------------------------------------------------------------


def test_deadline_exceeded_quickly_and_handler_is_stopped(server: ServerProcess) -> None:
    address, token_file, _ = server

    async def main() -> None:
        async with Client(address, token_file=str(token_file), timeout=10) as client:
            start = time.monotonic()
            with pytest.raises(bastion.DeadlineExceeded):
                await client.invoke("demo.slow", {"seconds": 5}, timeout=0.3)
            assert time.monotonic() - start < 2.0
            # The connection is still good, and the server is no longer running the handler.
            assert await client.call("demo.echo", value="after") == "after"

            async def server_idle() -> bool:
                stats = await client.call("admin.stats")
                return stats["calls_in_flight"] == 1  # the stats call itself

            deadline = time.monotonic() + 3
            while not await server_idle():
                assert time.monotonic() < deadline, "slow(5) is still running on the server"
                await asyncio.sleep(0.02)

    run(main())


def test_server_deadline_cancels_the_handler(server: ServerProcess) -> None:
    address, token_file, _ = server

    async def main() -> None:
        async with Client(address, token_file=str(token_file)) as client:
            with pytest.raises(bastion.DeadlineExceeded):
                await client.invoke("demo.watched", {"tag": "deadline"}, timeout=0.3)
        await poll(server.marker("cancelled-deadline").exists, 5, "the handler to see its cancellation")
        assert server.marker("started-deadline").exists()
        assert not server.marker("finished-deadline").exists()

    run(main())


def test_client_cancel_cancels_the_handler_on_the_server(server: ServerProcess) -> None:
    address, token_file, _ = server

    async def main() -> None:
        async with Client(address, token_file=str(token_file), timeout=30) as client:
            task = asyncio.ensure_future(client.call("demo.watched", tag="cancel"))
            await poll(server.marker("started-cancel").exists, 5, "the handler to start")
            assert not server.marker("cancelled-cancel").exists()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await poll(server.marker("cancelled-cancel").exists, 5, "the handler to see its cancellation")
            assert not server.marker("finished-cancel").exists()
            # Cancelling one call leaves the connection usable.
            assert await client.call("demo.echo", value=1) == 1

    run(main())


# -- graceful shutdown ------------------------------------------------------------------------


def test_sigterm_drains_100_in_flight_calls_then_exits_0(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(env={"BASTION_LIMITS__GRACE_PERIOD": "30"})
    address, token_file, process = server

    async def main() -> list[Any]:
        async with (
            Client(address, token_file=str(token_file), timeout=30) as worker,
            Client(address, token_file=str(token_file), timeout=5) as watcher,
        ):
            calls = [
                asyncio.ensure_future(worker.call("demo.sleep_then_return", seconds=1.0, tag=i)) for i in range(100)
            ]

            async def all_in_flight() -> bool:
                stats = await watcher.call("admin.stats")
                return stats["calls_in_flight"] - 1 >= 100  # minus the stats call itself

            deadline = time.monotonic() + 5
            while not await all_in_flight():
                assert time.monotonic() < deadline, "the server never had the 100 calls in flight"
                await asyncio.sleep(0.01)
            assert not any(call.done() for call in calls), "calls finished before SIGTERM: too slow a machine?"
            process.send_signal(signal.SIGTERM)
            # A draining server takes no new connections.
            await poll(lambda: not _accepts(server.host, server.port), 2, "the listener to close")
            return await asyncio.gather(*calls)

    results = run(main())
    assert results == list(range(100))
    code = process.wait(timeout=10)
    assert code == 0, server.log()
    log = server.log()
    assert "received SIGTERM: draining" in log
    assert "grace period over" not in log


def test_sigterm_cancels_calls_still_running_after_the_grace_period(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(env={"BASTION_LIMITS__GRACE_PERIOD": "1"})
    address, token_file, process = server

    async def main() -> float:
        async with Client(address, token_file=str(token_file), timeout=30) as client:
            call = asyncio.ensure_future(client.call("demo.watched", tag="grace", seconds=30))
            await poll(server.marker("started-grace").exists, 5, "the handler to start")
            start = time.monotonic()
            process.send_signal(signal.SIGTERM)
            with pytest.raises(bastion.Unavailable, match="shutting down"):
                await call
            return time.monotonic() - start

    elapsed = run(main())
    assert 0.9 <= elapsed < 4, elapsed
    assert process.wait(timeout=5) == 0, server.log()
    assert server.marker("cancelled-grace").exists()
    assert not server.marker("finished-grace").exists()
    assert "grace period over" in server.log()


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# -- authentication ----------------------------------------------------------------------------


def test_anonymous_calls_need_authentication(server: ServerProcess) -> None:
    address, token_file, _ = server

    async def main() -> None:
        async with Client(address, timeout=10) as anon:
            assert (await anon.call("admin.health"))["status"] == "ok"
            assert anon.welcome is not None and anon.welcome.principal != "admin"
            with pytest.raises(bastion.Unauthenticated, match=r"demo\.echo requires authentication"):
                await anon.call("demo.echo", value=1)
            with pytest.raises(bastion.Unauthenticated):
                await anon.call("admin.stats")
            # Unknown methods look the same to an anonymous caller: nothing is revealed.
            with pytest.raises(bastion.Unauthenticated):
                await anon.call("demo.no_such_method")
            # The refusals did not cost the connection.
            assert (await anon.call("admin.health"))["status"] == "ok"

    run(main())

    with SyncClient(address, timeout=10) as anon:
        assert anon.call("admin.health")["status"] == "ok"
        with pytest.raises(bastion.Unauthenticated):
            anon.call("demo.echo", value=1)

    with SyncClient(address, token_file=str(token_file), timeout=10) as admin:
        assert admin.call("demo.echo", value=1) == 1
        with pytest.raises(bastion.Unimplemented):
            admin.call("demo.no_such_method")


def test_wrong_token_is_refused_at_the_handshake(server: ServerProcess) -> None:
    address, _, _ = server
    with pytest.raises(bastion.Unauthenticated), SyncClient(address, token="bst_not-the-token") as client:
        client.call("admin.health")

    async def main() -> None:
        with pytest.raises(bastion.Unauthenticated):
            async with Client(address, token="bst_not-the-token") as client:
                await client.call("admin.health")

    run(main())
