"""The service API (bastion/service.py): signatures become MethodSpecs, bad ones UsageErrors.

The declarations are checked directly; what a handler receives when it runs
(its Context, the thread a plain function runs in) is checked through
``bastion.testing``, over the real server and client.
"""

import asyncio
import threading
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterator
from typing import Annotated, Any

import msgspec
import pytest

import bastion.testing
from bastion import Context, MethodKind, Principal, Service, UsageError
from bastion.server.server import Server


def run(coro: Any) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(10):
            return await coro

    return asyncio.run(guarded())


# -- shapes ---------------------------------------------------------------------------


def test_unary_async() -> None:
    svc = Service("shapes")

    @svc.method
    async def greet(name: str, times: int = 1) -> str:
        """Say hello."""
        return name * times

    spec = svc.methods["greet"]
    assert spec.kind is MethodKind.UNARY
    assert spec.full_name == "shapes.greet"
    assert spec.is_async
    assert spec.result_type is str
    assert spec.input_param is None and spec.input_type is None
    assert spec.context_param is None
    assert spec.args_type.__struct_fields__ == ("name", "times")
    assert spec.doc == "Say hello."


def test_unary_sync() -> None:
    svc = Service("shapes")

    @svc.method
    def add(a: int, b: int) -> int:
        return a + b

    spec = svc.methods["add"]
    assert spec.kind is MethodKind.UNARY
    assert not spec.is_async


def test_the_decorator_returns_the_function_unchanged() -> None:
    svc = Service("shapes")

    def add(a: int, b: int) -> int:
        return a + b

    assert svc.method(add) is add
    assert svc.method(name="plus")(add) is add
    assert add(2, 3) == 5
    assert set(svc.methods) == {"add", "plus"}


@pytest.mark.parametrize("iterator", [AsyncIterator[int], AsyncIterable[int], AsyncGenerator[int, None]])
def test_server_stream(iterator: Any) -> None:
    svc = Service("shapes")

    async def count(n: int) -> iterator:  # type: ignore[valid-type]
        for i in range(n):
            yield i

    svc.method(count)
    spec = svc.methods["count"]
    assert spec.kind is MethodKind.SERVER_STREAM
    assert spec.result_type is int
    assert spec.input_param is None


def test_server_stream_without_a_return_hint_yields_any() -> None:
    svc = Service("shapes")

    @svc.method
    async def count(n: int):  # type: ignore[no-untyped-def]
        yield n

    assert svc.methods["count"].kind is MethodKind.SERVER_STREAM
    assert svc.methods["count"].result_type is Any


def test_client_stream() -> None:
    svc = Service("shapes")

    @svc.method
    async def total(chunks: AsyncIterator[bytes], label: str = "") -> int:
        return 0

    spec = svc.methods["total"]
    assert spec.kind is MethodKind.CLIENT_STREAM
    assert spec.input_param == "chunks"
    assert spec.input_type is bytes
    assert spec.result_type is int
    assert spec.args_type.__struct_fields__ == ("label",)  # the stream is not an argument


def test_bidi_stream() -> None:
    svc = Service("shapes")

    @svc.method
    async def double(xs: AsyncIterator[int]) -> AsyncIterator[int]:
        async for x in xs:
            yield 2 * x

    spec = svc.methods["double"]
    assert spec.kind is MethodKind.BIDI_STREAM
    assert spec.input_type is int
    assert spec.result_type is int


def test_context_parameter_is_recognised_and_not_an_argument() -> None:
    svc = Service("shapes")

    @svc.method
    async def who(ctx: Context, loud: bool = False) -> str:
        return ctx.principal.name

    spec = svc.methods["who"]
    assert spec.context_param == "ctx"
    assert spec.args_type.__struct_fields__ == ("loud",)


def test_options_are_recorded() -> None:
    svc = Service("shapes")

    @svc.method(name="ping", public=True, idempotent=True, priority=5, roles=["ops", "audit"])
    async def _ping() -> None:
        return None

    spec = svc.methods["ping"]
    assert (spec.public, spec.idempotent, spec.priority) == (True, True, 5)
    assert spec.roles == frozenset({"ops", "audit"})


def test_describe_gives_json_schemas() -> None:
    svc = Service("shapes")

    @svc.method
    async def pick(items: list[int], limit: int = 3) -> list[int]:
        """Pick some."""
        return items[:limit]

    @svc.method
    async def total(chunks: AsyncIterator[bytes]) -> int:
        return 0

    pick_info = svc.methods["pick"].describe()
    assert pick_info["name"] == "shapes.pick"
    assert pick_info["kind"] == "unary"
    assert pick_info["doc"] == "Pick some."
    assert pick_info["params"]["properties"] == {
        "items": {"type": "array", "items": {"type": "integer"}},
        "limit": {"type": "integer", "default": 3},
    }
    assert pick_info["params"]["required"] == ["items"]
    assert pick_info["result"] == {"type": "array", "items": {"type": "integer"}}
    total_info = svc.methods["total"].describe()
    assert total_info["kind"] == "client_stream"
    assert total_info["input"] == {"type": "string", "contentEncoding": "base64"}


def test_annotated_constraints_are_kept() -> None:
    svc = Service("shapes")

    @svc.method
    async def page(size: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10) -> int:
        return size

    properties = svc.methods["page"].describe()["params"]["properties"]
    assert properties["size"] == {"type": "integer", "minimum": 1, "maximum": 100, "default": 10}


def test_describe_survives_types_json_schema_cannot_express() -> None:
    svc = Service("shapes")

    @svc.method
    async def raw(value: msgspec.msgpack.Ext) -> msgspec.msgpack.Ext:
        return value

    info = svc.methods["raw"].describe()
    assert info["params"] == {} and info["result"] == {}


# -- what handlers receive ----------------------------------------------------------------

ctx_service = Service("ctx")


@ctx_service.method
async def facts(ctx: Context, x: int = 0) -> dict[str, Any]:
    return {
        "principal": ctx.principal.name,
        "roles": sorted(ctx.principal.roles),
        "request_id": ctx.request_id,
        "method": ctx.method.full_name,
        "metadata": dict(ctx.metadata),
        "has_deadline": ctx.deadline is not None,
        "remaining": ctx.time_remaining(),
        "version": ctx.server.version,
        "peer": ctx.peer,
        "x": x,
    }


@ctx_service.method
def thread_facts(ctx: Context) -> dict[str, Any]:
    return {"thread": threading.get_ident(), "principal": ctx.principal.name}


def test_context_is_injected() -> None:
    async def main() -> None:
        who = Principal("carol", frozenset({"ops"}))
        async with bastion.testing.connect([ctx_service], principal=who) as client:
            plain = await client.ctx.facts(x=7)
            timed = await client.invoke("ctx.facts", {}, timeout=5, metadata={"trace": "abc"})
        assert plain["principal"] == "carol" and plain["roles"] == ["ops"]
        assert plain["method"] == "ctx.facts"
        assert plain["x"] == 7
        assert plain["version"] == bastion.__version__
        assert plain["peer"].startswith("memory:")
        assert plain["has_deadline"] is False and plain["remaining"] is None
        assert plain["metadata"] == {}
        assert timed["has_deadline"] is True and 0 < timed["remaining"] <= 5
        assert timed["metadata"] == {"trace": "abc"}
        assert plain["request_id"] != timed["request_id"]

    run(main())


def test_sync_handlers_run_in_a_worker_thread_with_their_context() -> None:
    async def main() -> None:
        async with bastion.testing.connect(ctx_service) as client:
            facts = await client.ctx.thread_facts()
        assert facts["thread"] != threading.get_ident()
        assert facts["principal"] == "tester"

    run(main())


def test_a_slow_sync_handler_does_not_block_the_loop() -> None:
    svc = Service("slow")
    release = threading.Event()

    @svc.method
    def wait() -> bool:
        return release.wait(5)

    @svc.method
    async def quick() -> str:
        return "quick"

    async def main() -> None:
        async with bastion.testing.connect(svc) as client:
            waiting = asyncio.ensure_future(client.slow.wait())
            assert await client.slow.quick() == "quick"  # answered while wait() blocks its thread
            assert not waiting.done()
            release.set()
            assert await waiting is True

    run(main())


# -- declarations refused -------------------------------------------------------------------


def _declare(func: Any, **options: Any) -> None:
    Service("bad").method(**options)(func)


def test_missing_hint_is_refused() -> None:
    async def f(a, b: int) -> int:  # type: ignore[no-untyped-def]
        return b

    with pytest.raises(UsageError, match="'a' needs a type hint"):
        _declare(f)


def test_unresolvable_hint_is_refused() -> None:
    async def f(a: "NoSuchType") -> int:  # type: ignore[name-defined]  # noqa: F821
        return 0

    with pytest.raises(UsageError, match="cannot resolve type hints"):
        _declare(f)


@pytest.mark.parametrize(
    "source",
    [
        "async def f(*args: int) -> int: ...",
        "async def f(**kwargs: int) -> int: ...",
        "async def f(a: int, /) -> int: ...",
    ],
    ids=["star-args", "star-kwargs", "positional-only"],
)
def test_unnamed_parameters_are_refused(source: str) -> None:
    namespace: dict[str, Any] = {}
    exec(source, namespace)
    with pytest.raises(UsageError, match="must be an ordinary named parameter"):
        _declare(namespace["f"])


def test_sync_generator_is_refused() -> None:
    def count(n: int) -> Iterator[int]:
        yield from range(n)

    with pytest.raises(UsageError, match="streaming methods must be async"):
        _declare(count)


def test_sync_client_stream_is_refused() -> None:
    def total(chunks: AsyncIterator[bytes]) -> int:
        return 0

    with pytest.raises(UsageError, match="streaming methods must be async"):
        _declare(total)


def test_server_stream_must_be_an_async_generator() -> None:
    async def count(n: int) -> AsyncIterator[int]:
        raise NotImplementedError

    with pytest.raises(UsageError, match="must be an async generator function"):
        _declare(count)


def test_two_client_streams_are_refused() -> None:
    async def merge(a: AsyncIterator[int], b: AsyncIterator[int]) -> int:
        return 0

    with pytest.raises(UsageError, match="only one parameter may be a client stream"):
        _declare(merge)


def test_duplicate_names_are_refused() -> None:
    svc = Service("dup")

    @svc.method
    async def hello() -> str:
        return "a"

    with pytest.raises(UsageError, match=r"dup\.hello is declared twice"):

        @svc.method(name="hello")
        async def other() -> str:
            return "b"

    assert svc.methods["hello"].handler is hello


def test_a_service_registered_twice_is_refused() -> None:
    with pytest.raises(UsageError, match="registered twice"):
        Server([Service("twin"), Service("twin")])


@pytest.mark.parametrize("name", ["Hello", "1st", "say-hi", "say.hi", "héllo"])
def test_bad_method_names_are_refused(name: str) -> None:
    async def f() -> None:
        return None

    with pytest.raises(UsageError, match="method name"):
        _declare(f, name=name)


@pytest.mark.parametrize("name", ["Greeter", "my-service", "a.b", "", "9lives"])
def test_bad_service_names_are_refused(name: str) -> None:
    with pytest.raises(UsageError, match="service name"):
        Service(name)


def test_unsupported_argument_types_are_refused() -> None:
    async def f(a: list[int] | tuple[int, ...]) -> int:  # msgspec: one array-like type per union
        return 0

    with pytest.raises(UsageError, match="argument types are not supported"):
        _declare(f)


def test_only_a_server_stream_can_be_resumable() -> None:
    svc = Service("s")

    @svc.method(resumable=True)
    async def follow(n: int) -> AsyncIterator[int]:
        yield n

    assert svc.methods["follow"].resumable
    with pytest.raises(UsageError, match="only a server stream can be resumable"):

        @svc.method(resumable=True)
        async def once(n: int) -> int:
            return n
