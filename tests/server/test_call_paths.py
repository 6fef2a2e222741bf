"""The session's paths for a call run in a task (``ServerSession._run``).

* A handler whose parameters are all plain, its Context first, is called
  with its arguments by position (``Entry.positional``), without a dict of
  them to build and match by name; any other handler, and any call carrying
  metadata (an idempotency key's path), by name. The answers must not tell
  the two apart.
* A call whose task ends with no other call of its connection running has
  its answer written at once (``_forget(..., ran=True)``); with others running,
  at the end of the loop turn, with theirs.

Over a real server on loopback TCP.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import bastion
from bastion import Principal, Server, Service
from bastion.security.authn import StaticTokens
from bastion.server.dispatch import IdempotencyKeys, MethodTable, takes_positionally
from bastion.service import Context
from bastion.store import open_store

TOKEN = "bst_call-paths-token-0123456789abcdef"
ADA = Principal("ada", frozenset({"user"}))
ran: list[str] = []
gate = asyncio.Event()  # replaced per test (an Event binds to its first loop)


def wrapped(func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return await func(*args, **kwargs)

    return wrapper


def declared(func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A wrapper taking keywords only that declares the wrapped function's signature as its own."""

    async def wrapper(**kwargs: Any) -> Any:
        return await func(**kwargs)

    wrapper.__signature__ = inspect.signature(func)  # type: ignore[attr-defined]
    wrapper.__annotations__ = func.__annotations__
    wrapper.__name__ = func.__name__
    return wrapper


def make_service() -> Service:
    svc = Service("paths")

    @svc.method
    async def first(ctx: Context, a: int, b: str = "b", c: bytes | None = None) -> list[Any]:
        await asyncio.sleep(0)
        return [ctx.principal.name, a, b, c]

    @svc.method
    async def middle(a: int, ctx: Context, b: str = "b") -> list[Any]:
        await asyncio.sleep(0)
        return [a, ctx.principal.name, b]

    @svc.method
    async def keywords(a: int, *, b: str = "b") -> list[Any]:
        await asyncio.sleep(0)
        return [a, b]

    @svc.method
    @wrapped
    async def through(a: int, b: str = "b") -> list[Any]:
        await asyncio.sleep(0)
        return [a, b]

    @svc.method
    @declared
    async def told(a: int, b: str = "b") -> list[Any]:
        await asyncio.sleep(0)
        return [a, b]

    @svc.method
    async def effect(tag: str) -> str:
        ran.append(tag)
        await asyncio.sleep(0)
        return tag

    @svc.method
    async def wait(tag: str) -> str:
        await gate.wait()
        return tag

    @svc.method
    async def quick(tag: str) -> str:
        await asyncio.sleep(0)
        return tag

    return svc


def run(body: Callable[[bastion.Client, Server], Awaitable[None]], store: Path | None = None) -> None:
    async def main() -> None:
        global gate
        gate = asyncio.Event()
        server = Server([make_service()], authenticator=StaticTokens({TOKEN: ADA}))
        await server.start("127.0.0.1", 0)
        try:
            client = bastion.Client(f"127.0.0.1:{server.port}", token=TOKEN, insecure=True, timeout=5)
            async with client:
                if store is None:
                    await body(client, server)
                else:
                    async with open_store(store) as opened:
                        server.idempotency = IdempotencyKeys(opened)
                        await body(client, server)
        finally:
            gate.set()
            await server.shutdown(grace=1)

    async def guarded() -> None:
        async with asyncio.timeout(20):
            await main()

    asyncio.run(guarded())


def test_only_plain_parameters_in_order_with_the_context_first_are_passed_by_position() -> None:
    entries = MethodTable([make_service()]).entries
    positional = {name for name, entry in entries.items() if entry.positional}
    assert positional == {"paths.first", "paths.effect", "paths.wait", "paths.quick"}
    assert not takes_positionally(entries["paths.through"].spec)  # the wrapper's (*args, **kwargs) is read
    assert not takes_positionally(entries["paths.told"].spec)  # a declared __signature__ may not be its own


def test_handlers_get_the_same_arguments_by_position_or_by_name() -> None:
    async def body(client: bastion.Client, server: Server) -> None:
        assert await client.call("paths.first", a=1) == ["ada", 1, "b", None]
        assert await client.call("paths.first", c=b"c", a=2, b="x") == ["ada", 2, "x", b"c"]
        assert await client.call("paths.middle", b="x", a=3) == [3, "ada", "x"]
        assert await client.call("paths.keywords", a=4) == [4, "b"]
        assert await client.call("paths.through", b="y", a=5) == [5, "y"]
        assert await client.call("paths.told", a=7) == [7, "b"]  # its declared signature is not its own
        # Metadata takes the by-name path; the answer is the same.
        assert await client.invoke("paths.first", {"a": 6}, metadata={"trace": "t"}) == ["ada", 6, "b", None]
        with pytest.raises(bastion.InvalidArgument, match="a"):
            await client.call("paths.first", b="no a")

    run(body)


def test_a_positional_handler_under_an_idempotency_key_runs_once(tmp_path: Path) -> None:
    async def body(client: bastion.Client, server: Server) -> None:
        ran.clear()
        assert await client.invoke("paths.effect", {"tag": "t"}, idempotency_key="k1") == "t"
        assert await client.invoke("paths.effect", {"tag": "t"}, idempotency_key="k1") == "t"  # replayed
        assert ran == ["t"]

    run(body, tmp_path / "keys.db")


def test_answers_of_calls_ending_alone_or_together_on_one_connection_all_arrive() -> None:
    async def body(client: bastion.Client, server: Server) -> None:
        waiting = [asyncio.ensure_future(client.call("paths.wait", tag=f"w{i}")) for i in range(5)]
        await asyncio.sleep(0.05)
        # Others of the connection are running: this answer leaves at the end of its loop turn.
        assert await client.call("paths.quick", tag="q") == "q"
        assert not any(w.done() for w in waiting)
        gate.set()  # five end in one turn, the last of them alone
        assert await asyncio.gather(*waiting) == [f"w{i}" for i in range(5)]
        # Alone on the connection: written at once.
        assert await asyncio.gather(*(client.call("paths.quick", tag=str(i)) for i in range(20))) == [
            str(i) for i in range(20)
        ]
        assert server.stats()["calls_in_flight"] == 0

    run(body)
