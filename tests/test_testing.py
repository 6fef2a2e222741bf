"""bastion.testing: a real server and client connected in memory."""

import asyncio
from typing import Any

import pytest

import bastion.testing
from bastion import (
    Client,
    ConnectionClosed,
    Context,
    DeadlineExceeded,
    Principal,
    ServerLimits,
    Service,
    Unauthenticated,
)
from bastion.testing import ANONYMOUS, TESTER, MemoryServer

service = Service("probe")
state: dict[str, Any] = {}


@service.method(public=True)
async def whoami(ctx: Context) -> dict[str, Any]:
    p = ctx.principal
    return {"name": p.name, "roles": sorted(p.roles), "authenticated": p.authenticated}


@service.method
async def hang() -> None:
    state["started"].set()
    try:
        await asyncio.sleep(30)
    finally:
        state["stopped"].set()


def run(coro: Any) -> Any:
    async def guarded() -> Any:
        state.update(started=asyncio.Event(), stopped=asyncio.Event())
        async with asyncio.timeout(10):
            return await coro

    return asyncio.run(guarded())


def test_the_default_principal_is_an_admin_tester() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            assert isinstance(client, Client)
            assert client.welcome is not None and client.welcome.principal == "tester"
            assert await client.probe.whoami() == {"name": "tester", "roles": ["admin"], "authenticated": True}

    assert TESTER.authenticated and "admin" in TESTER.roles
    run(main())


@pytest.mark.parametrize(
    ("principal", "expected"),
    [
        (Principal("carol", frozenset({"ops", "audit"})), {"name": "carol", "roles": ["audit", "ops"]}),
        (Principal("dave"), {"name": "dave", "roles": []}),
        (ANONYMOUS, {"name": "anonymous", "roles": [], "authenticated": False}),
    ],
    ids=["roles", "no-roles", "anonymous"],
)
def test_a_test_can_act_as_anyone(principal: Principal, expected: dict[str, Any]) -> None:
    async def main() -> dict[str, Any]:
        async with bastion.testing.connect([service], principal=principal) as client:
            return await client.probe.whoami()

    assert run(main()) == {"authenticated": True, **expected}


def test_one_server_many_identities() -> None:
    async def main() -> None:
        async with MemoryServer(service) as memory:
            alice = memory.client(principal=Principal("alice"))
            guest = memory.client(principal=ANONYMOUS)
            results = await asyncio.gather(alice.probe.whoami(), guest.probe.whoami(), memory.client().probe.whoami())
            assert [r["name"] for r in results] == ["alice", "anonymous", "tester"]
            assert memory.server.stats()["connections"] == 3

    run(main())


def test_no_sockets_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("bastion.testing must not open sockets")

    monkeypatch.setattr(asyncio.BaseEventLoop, "create_connection", refuse)
    monkeypatch.setattr(asyncio.BaseEventLoop, "create_server", refuse)

    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            assert (await client.probe.whoami())["name"] == "tester"

    run(main())


def test_options_reach_the_server_and_client() -> None:
    async def main() -> None:
        limits = ServerLimits(max_inflight=7, window=4)
        async with bastion.testing.connect(service, limits=limits, timeout=0.1) as client:
            assert client.welcome is not None
            assert (client.welcome.max_inflight, client.welcome.window) == (7, 4)
            with pytest.raises(DeadlineExceeded):
                await client.probe.hang()  # the client's default timeout applies

    run(main())


def test_an_unknown_token_is_refused() -> None:
    async def main() -> None:
        async with MemoryServer(service) as memory:
            client = memory.client()
            client._token = "bst_not-a-token"
            with pytest.raises(Unauthenticated, match="invalid token"):
                await client.connect()

    run(main())


def test_the_client_reconnects_in_memory_after_goaway() -> None:
    async def main() -> None:
        async with MemoryServer(service) as memory:
            client = memory.client()
            await client.probe.whoami()
            for session in list(memory.server.sessions):
                session.drain()  # GoAway: the client must open a new connection
            for _ in range(10):
                await asyncio.sleep(0)
            assert not memory.server.sessions
            assert (await client.probe.whoami())["name"] == "tester"
            assert memory.server.stats()["connections_total"] == 2

    run(main())


def test_leaving_the_block_stops_running_handlers_and_the_server() -> None:
    async def main() -> None:
        async with MemoryServer(service) as memory:
            client = memory.client()
            call = asyncio.ensure_future(client.probe.hang())
            await state["started"].wait()
        assert state["stopped"].is_set()
        assert not memory.server.sessions
        assert memory.server.draining
        with pytest.raises(ConnectionClosed, match="the client was closed"):
            await call

    run(main())
