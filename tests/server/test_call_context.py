"""The Context the session makes for each call (``Context._make``).

It is made without the class call and its eight keywords; its
``request_id`` is formatted on first use (the session's id and the call's, in
hex, as the internal-error answer names it), and the metadata of a call that
carries none is an empty dict of its own, which the handler may return (it
encodes like any dict) or change without touching another call's. Over a
real server on loopback TCP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

import pytest

import bastion
from bastion import Principal, Server, Service
from bastion.security.authn import StaticTokens
from bastion.service import Context

TOKEN = "bst_call-context-token-0123456789abcdef"
ADA = Principal("ada", frozenset({"user"}))


def make_service() -> Service:
    svc = Service("ctx")

    @svc.method
    async def ids(ctx: Context) -> list[str]:
        await asyncio.sleep(0)  # in a task, as kv.put
        return [ctx.request_id, ctx.request_id]

    @svc.method
    async def inline_ids(ctx: Context) -> str:
        return ctx.request_id

    @svc.method
    async def meta(ctx: Context, write: bool = False) -> Mapping[str, str]:
        await asyncio.sleep(0)
        if write:
            ctx.metadata["x"] = "y"  # type: ignore[index]
        return ctx.metadata  # as it is: a mapping the answer encodes

    @svc.method
    async def fail(ctx: Context) -> str:
        await asyncio.sleep(0)
        raise ValueError(f"failed in {ctx.request_id}")

    return svc


def run(body: Callable[[bastion.Client, Server], Awaitable[None]]) -> None:
    async def main() -> None:
        server = Server([make_service()], authenticator=StaticTokens({TOKEN: ADA}))
        await server.start("127.0.0.1", 0)
        try:
            async with bastion.Client(f"127.0.0.1:{server.port}", token=TOKEN, insecure=True, timeout=5) as client:
                await body(client, server)
        finally:
            await server.shutdown(grace=1)

    async def guarded() -> None:
        async with asyncio.timeout(20):
            await main()

    asyncio.run(guarded())


def test_the_request_id_is_made_on_first_use_the_same_each_time_and_names_session_and_call() -> None:
    async def body(client: bastion.Client, server: Server) -> None:
        first, second = await client.call("ctx.ids"), await client.call("ctx.ids")
        assert first[0] == first[1] and second[0] == second[1] and first[0] != second[0]
        session, call = first[0].split("-")
        assert int(session, 16) > 0 and int(call, 16) > 0
        assert second[0].startswith(f"{session}-")
        assert (await client.call("ctx.inline_ids")).startswith(f"{session}-")
        with pytest.raises(bastion.InternalError) as failed:
            await client.call("ctx.fail")
        assert f"request id {session}-" in failed.value.message  # the one the handler's Context had

    run(body)


def test_metadata_of_a_call_without_any_is_its_own_empty_dict() -> None:
    async def body(client: bastion.Client, server: Server) -> None:
        assert await client.call("ctx.meta") == {}  # returned as it is: it encodes
        assert await client.call("ctx.meta", write=True) == {"x": "y"}
        assert await client.call("ctx.meta") == {}  # nothing written into another call's
        assert await client.invoke("ctx.meta", {}, metadata={"k": "v"}) == {"k": "v"}

    run(body)


def test_the_public_constructor_still_takes_a_request_id() -> None:
    async def body(client: bastion.Client, server: Server) -> None:
        made = Context(
            method=server.table.entries["ctx.ids"].spec,
            principal=ADA,
            request_id="given",
            peer="?",
            deadline=None,
            metadata={},
            server=server.info,
        )
        assert made.request_id == "given" and made.principal is ADA and made.time_remaining() is None

    run(body)
