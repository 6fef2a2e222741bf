"""The examples (examples/): the greeter service through ``bastion.testing``; the clients' settings."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import bastion.testing
from bastion import InvalidArgument, MethodKind, Unauthenticated
from bastion.testing import ANONYMOUS
from examples import client_async, client_sync, greeter


def run(coro: Any) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(10):
            return await coro

    return asyncio.run(guarded())


def test_greeter_declares_the_four_shapes() -> None:
    methods = greeter.service.methods
    assert greeter.service.name == "greeter"
    assert {name: spec.kind for name, spec in methods.items()} == {
        "hello": MethodKind.UNARY,
        "add": MethodKind.UNARY,
        "count": MethodKind.SERVER_STREAM,
        "total": MethodKind.CLIENT_STREAM,
    }
    assert not methods["add"].is_async  # runs in the thread pool
    assert methods["hello"].public


def test_hello() -> None:
    async def main() -> None:
        async with bastion.testing.connect(greeter.service) as client:
            assert await client.greeter.hello(name="Ada") == "Hello, Ada!"
            assert await client.greeter.hello(name="Ada", times=2) == "Hello, Ada! Hello, Ada!"
            with pytest.raises(InvalidArgument, match="`times`"):
                await client.greeter.hello(name="Ada", times=0)

    run(main())


def test_anonymous_callers_may_only_say_hello() -> None:
    async def main() -> None:
        async with bastion.testing.connect(greeter.service, principal=ANONYMOUS) as client:
            assert await client.greeter.hello(name="guest") == "Hello, guest!"
            with pytest.raises(Unauthenticated):
                await client.greeter.add(a=1, b=2)

    run(main())


def test_add() -> None:
    async def main() -> None:
        async with bastion.testing.connect(greeter.service) as client:
            assert await client.greeter.add(a=2, b=3) == 5
            assert await client.greeter.add(a=-(2**40), b=1) == -(2**40) + 1
            with pytest.raises(InvalidArgument, match="`b`"):
                await client.greeter.add(a=2, b="3")

    run(main())


def test_count() -> None:
    async def main() -> None:
        async with bastion.testing.connect(greeter.service) as client:
            assert [i async for i in client.stream("greeter.count", n=5)] == [0, 1, 2, 3, 4]
            assert await client.greeter.count(n=300) == list(range(300))
            assert [i async for i in client.stream("greeter.count", n=0)] == []
            with pytest.raises(InvalidArgument, match="`n`"):
                await client.greeter.count(n=-1)

    run(main())


def test_total() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(100):
            yield bytes(i)

    async def main() -> None:
        async with bastion.testing.connect(greeter.service) as client:
            assert await client.greeter.total.upload(chunks()) == sum(range(100))
            assert await client.greeter.total.upload([]) == 0
            with pytest.raises(InvalidArgument):
                await client.greeter.total.upload([b"ok", 5])

    run(main())


@pytest.mark.parametrize("module", [client_async, client_sync], ids=["async", "sync"])
def test_client_settings(module: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BASTION_ADDRESS", raising=False)
    monkeypatch.delenv("BASTION_TOKEN_FILE", raising=False)
    assert module.settings(["prog"]) == ("127.0.0.1:7400", None)  # no token file yet: anonymous
    (tmp_path / "bastion-data").mkdir()
    (tmp_path / "bastion-data" / "admin.token").write_text("bst_x\n")
    assert module.settings(["prog"]) == ("127.0.0.1:7400", "bastion-data/admin.token")
    monkeypatch.setenv("BASTION_ADDRESS", "example.org:9000")
    monkeypatch.setenv("BASTION_TOKEN_FILE", "/etc/token")
    assert module.settings(["prog"]) == ("example.org:9000", "/etc/token")
    assert module.settings(["prog", "10.0.0.1:1", "my.token"]) == ("10.0.0.1:1", "my.token")
