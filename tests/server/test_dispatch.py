"""Dispatch (bastion/server/dispatch.py and the call path in session.py).

Every call passes the same checks before a handler runs: the method exists,
the caller may call it, the arguments match the hints. Then what a handler
raises becomes the call's status: a ``CallError`` travels as raised, anything
else is INTERNAL with a request id and no detail. All through
``bastion.testing``: real server, real client, no sockets.
"""

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import msgspec
import pytest
from msgspec import Meta

import bastion.testing
from bastion import (
    CallError,
    Context,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    PermissionDenied,
    Principal,
    Service,
    Unauthenticated,
    Unimplemented,
)
from bastion.exceptions import error_for_status
from bastion.server.dispatch import GROWTH_WORST, args_growth
from bastion.service import OpaqueText, brief_error
from bastion.status import Status
from bastion.testing import ANONYMOUS

SECRET = "hunter2-do-not-leak"

service = Service("calc")


@service.method
async def add(a: int, b: int) -> int:
    return a + b


@service.method
async def greet(name: str, times: int = 1, tags: list[str] | None = None) -> str:
    return name * times


@service.method
async def page(size: Annotated[int, Meta(ge=1, le=100)] = 10) -> int:
    return size


@service.method
async def total(xs: AsyncIterator[int]) -> int:
    return sum([x async for x in xs])


@service.method(public=True)
async def ping() -> str:
    return "pong"


@service.method(public=True, roles=["ops"])
async def public_ops() -> str:
    return "ops"


@service.method(roles=["ops"])
async def restart(ctx: Context) -> str:
    return f"restarted by {ctx.principal.name}"


@service.method
async def explode() -> None:
    raise RuntimeError(f"database password is {SECRET}")


@service.method
def explode_in_thread() -> None:
    raise ValueError(SECRET)


@service.method
async def fail(code: int, message: str, details: dict[str, Any], retry_after: float | None = None) -> None:
    raise error_for_status(code, message, details=details, retry_after=retry_after)


@service.method
def fail_in_thread(code: int) -> None:
    raise error_for_status(code, "from a thread", details={"where": "thread"})


def run(coro: Any) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(10):
            return await coro

    return asyncio.run(guarded())


async def _error(client: Any, method: str, **args: Any) -> CallError:
    with pytest.raises(CallError) as info:
        await client.call(method, **args)
    return info.value


# -- arguments --------------------------------------------------------------------------------


def test_valid_arguments_reach_the_handler() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            assert await client.calc.add(a=2, b=3) == 5
            assert await client.calc.greet(name="ab", times=2) == "abab"

    run(main())


@pytest.mark.parametrize(
    ("args", "field", "problem"),
    [
        ({"a": "one", "b": 2}, "a", "Expected `int`, got `str`"),
        ({"a": 1, "b": 2.5}, "b", "Expected `int`, got `float`"),
        ({"a": 1}, "b", "missing argument"),
        ({}, "a", "missing argument"),
        ({"a": 1, "b": 2, "c": 3}, "c", "unknown field"),
    ],
    ids=["wrong-type", "float-for-int", "missing", "none-given", "unknown"],
)
def test_bad_arguments_are_invalid_argument_naming_the_field(args: dict[str, Any], field: str, problem: str) -> None:
    async def main() -> CallError:
        async with bastion.testing.connect(service) as client:
            return await _error(client, "calc.add", **args)

    error = run(main())
    assert isinstance(error, InvalidArgument)
    assert error.status is Status.INVALID_ARGUMENT
    assert error.message.startswith("calc.add: ")
    assert f"`{field}`" in error.message
    assert problem in error.message


def test_bad_arguments_name_an_oversized_field_or_value_briefly_instead_of_echoing_it() -> None:
    # msgspec quotes an unknown field's name, or a value no Literal allows, in full: a 500 KB field name
    # came back as a 500 KB error (and may have been logged).
    modes = Service("modes")

    @modes.method
    async def pick(mode: Literal["fast", "slow"]) -> str:
        return mode

    huge = "x" * 500_000

    async def main() -> list[CallError]:
        async with bastion.testing.connect(modes) as client:
            return [
                await _error(client, "modes.pick", mode="fast", **{huge: 1}),
                await _error(client, "modes.pick", mode=huge),
                await _error(client, "modes.pick", mode="medium"),
            ]

    unknown, bad_value, short = run(main())
    for error in (unknown, bad_value):
        assert isinstance(error, InvalidArgument)
        assert len(error.message) < 300 and "characters)" in error.message, error.message[:300]
    assert unknown.message.startswith("modes.pick: Object contains unknown field `xxx"), unknown.message[:300]
    assert bad_value.message.endswith("- at argument `mode`"), bad_value.message[:300]
    assert short.message == "modes.pick: Invalid enum value 'medium' - at argument `mode`"  # short: unchanged


def test_constraints_in_annotated_hints_are_enforced() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            assert await client.calc.page() == 10
            assert await client.calc.page(size=100) == 100
            with pytest.raises(InvalidArgument, match=r"Expected `int` <= 100 - at argument `size`"):
                await client.calc.page(size=101)
            with pytest.raises(InvalidArgument, match=r"Expected `int` >= 1 - at argument `size`"):
                await client.calc.page(size=0)

    run(main())


def test_nested_argument_errors_name_the_path() -> None:
    async def main() -> CallError:
        async with bastion.testing.connect(service) as client:
            return await _error(client, "calc.greet", name="x", tags=["ok", 7])

    error = run(main())
    assert isinstance(error, InvalidArgument)
    assert "Expected `str`, got `int`" in error.message
    assert "`tags[1]`" in error.message


class Tree(msgspec.Struct):
    label: str
    kids: list["Tree"] = []
    weight: int | str = 0


plain = Service("plain")
strict = Service("strict", refuse_nul=True)
for svc in (plain, strict):

    @svc.method(name="take")
    async def take(
        text: str = "",
        maybe: str | None = None,
        names: list[str] | None = None,
        labels: dict[str, str] | None = None,
        pair: tuple[int, str] | None = None,
        tree: Tree | None = None,
        secret: OpaqueText = "",
        secrets: list[OpaqueText] | None = None,
        anything: Any = None,
        raw: bytes = b"",
    ) -> int:
        return 1


@pytest.mark.parametrize(
    ("args", "where"),
    [
        ({"text": "a\x00"}, "text"),
        ({"maybe": "\x00"}, "maybe"),
        ({"names": ["ok", "n\x00"]}, "names[1]"),
        ({"labels": {"k": "v\x00"}}, "labels['k']"),
        ({"labels": {"k\x00": "v"}}, "labels['k\\x00'] (its key)"),
        ({"pair": [1, "\x00"]}, "pair[1]"),
        ({"tree": {"label": "root", "kids": [{"label": "x", "weight": "w\x00"}]}}, "tree.kids[0].weight"),
        ({"tree": {"label": "r", "kids": [{"label": "a", "kids": [{"label": "\x00"}]}]}}, "tree.kids[0].kids[0].label"),
    ],
)
def test_a_refuse_nul_service_refuses_text_holding_nul_anywhere_in_its_arguments(
    args: dict[str, Any], where: str
) -> None:
    async def main() -> None:
        async with bastion.testing.connect([strict, plain]) as client:
            with pytest.raises(InvalidArgument) as refused:
                await client.call("strict.take", **args)
            assert refused.value.message == f"strict.take: argument {where} must not contain NUL characters"
            assert await client.call("plain.take", **args) == 1  # a user's service: its text is its own

    run(main())


def test_a_refused_nul_under_a_huge_key_does_not_echo_the_key() -> None:
    """The path named a dict key or set item in full: a 400,000-character key in front of a NUL came back
    in a 400 KB error."""

    async def main() -> None:
        async with bastion.testing.connect(strict) as client:
            for args in ({"labels": {"k" * 400_000: "v\x00"}}, {"labels": {"k" * 400_000 + "\x00": "v"}}):
                with pytest.raises(InvalidArgument) as refused:
                    await client.call("strict.take", **args)
                assert len(refused.value.message) < 300 and "characters)" in refused.value.message

    run(main())


def test_an_unknown_field_spelled_like_a_path_is_still_cut() -> None:
    """An error's ``- at `$...``` path is kept whole; an unknown field name holding that marker was taken
    for a path and came back whole."""
    cut = brief_error("Object contains unknown field `" + " - at `" + "A" * 500_000 + "`")
    assert len(cut) < 300
    assert brief_error("Expected `int`, got `str` - at `$.args[0]`") == "Expected `int`, got `str` - at `$.args[0]`"


def test_a_refuse_nul_service_takes_nul_in_opaque_text_values_of_any_type_and_bytes() -> None:
    async def main() -> None:
        async with bastion.testing.connect(strict) as client:
            args = {"secret": "p\x00w", "secrets": ["\x00"], "anything": ["\x00", {"k\x00": "\x00"}], "raw": b"\x00"}
            assert await client.call("strict.take", **args) == 1
            assert await client.call("strict.take", text="no nul", tree={"label": "t", "weight": 5}) == 1

    run(main())


def test_a_bad_stream_item_is_invalid_argument() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            assert await client.calc.total.upload([1, 2, 3]) == 6
            with pytest.raises(InvalidArgument, match="stream item"):
                await client.calc.total.upload([1, "two", 3])

    run(main())


class Entry(msgspec.Struct, forbid_unknown_fields=True):
    n: int


entries = Service("entries")


@entries.method
async def tally(items: AsyncIterator[Entry]) -> int:
    return sum([entry.n async for entry in items])


def test_a_bad_stream_item_is_refused_without_echoing_it_whole() -> None:
    """msgspec names an unknown field in full: a stream item with a 300,000-character field name came back
    whole in the error (argument errors were cut; stream items were not)."""

    async def main() -> None:
        async with bastion.testing.connect(entries) as client:
            assert await client.entries.tally.upload([{"n": 1}, {"n": 2}]) == 3
            with pytest.raises(InvalidArgument, match="stream item") as refused:
                await client.entries.tally.upload([{"n": 1, "x" * 300_000: 1}])
            assert len(refused.value.message) < 400, len(refused.value.message)

    run(main())


def test_the_connection_survives_bad_calls() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            for _ in range(3):
                with pytest.raises(InvalidArgument):
                    await client.calc.add(a="x", b=1)
                with pytest.raises(Unimplemented):
                    await client.calc.nope()
            assert await client.calc.add(a=1, b=1) == 2

    run(main())


# -- methods -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["calc.nope", "nosuch.add", "calc", "calc.add.more", ""])
def test_unknown_methods_are_unimplemented(method: str) -> None:
    async def main() -> CallError:
        async with bastion.testing.connect(service) as client:
            return await _error(client, method)

    error = run(main())
    assert isinstance(error, Unimplemented)
    assert error.status is Status.UNIMPLEMENTED


# -- who may call --------------------------------------------------------------------------------


def test_anonymous_callers_get_unauthenticated_for_non_public_methods() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service, principal=ANONYMOUS) as client:
            assert client.welcome is not None and client.welcome.principal == "anonymous"
            with pytest.raises(Unauthenticated, match=r"calc\.add requires authentication"):
                await client.calc.add(a=1, b=2)
            # Unknown methods look the same, so an anonymous caller cannot probe for names.
            with pytest.raises(Unauthenticated):
                await client.calc.nope()
            assert await client.calc.ping() == "pong"

    run(main())


def test_a_principal_without_the_role_gets_permission_denied() -> None:
    async def main() -> None:
        nobody = Principal("dave", frozenset({"viewer"}))
        async with bastion.testing.MemoryServer(service) as memory:
            with pytest.raises(PermissionDenied, match=r"calc\.restart requires role ops"):
                await memory.client(principal=nobody).calc.restart()
            with pytest.raises(PermissionDenied):
                await memory.client(principal=ANONYMOUS).calc.public_ops()
            ops = memory.client(principal=Principal("erin", frozenset({"ops"})))
            assert await ops.calc.restart() == "restarted by erin"
            assert await ops.calc.public_ops() == "ops"
            assert await memory.client().calc.restart() == "restarted by tester"  # admin passes

    run(main())


def test_denied_calls_are_audited(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with bastion.testing.connect(service, principal=Principal("dave")) as client:
            with pytest.raises(PermissionDenied):
                await client.calc.restart()

    with caplog.at_level(logging.INFO, logger="bastion.audit"):
        run(main())
    audits = [r.getMessage() for r in caplog.records if r.name == "bastion.audit"]
    assert len(audits) == 1
    assert '"event": "call.denied"' in audits[0]
    assert '"method": "calc.restart"' in audits[0]
    assert '"principal": "dave"' in audits[0]


# -- what handlers raise -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["calc.explode", "calc.explode_in_thread"])
def test_a_handler_exception_is_internal_and_its_text_stays_on_the_server(
    method: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> CallError:
        async with bastion.testing.connect(service) as client:
            error = await _error(client, method)
            assert await client.calc.add(a=1, b=1) == 2  # the connection is fine
            return error

    with caplog.at_level(logging.ERROR, logger="bastion.server"):
        error = run(main())
    assert isinstance(error, InternalError)
    assert SECRET not in repr(error) and SECRET not in str(error.details)
    found = re.fullmatch(r"internal error \(request id ([0-9a-f]+-[0-9a-f]+)\)", error.message)
    assert found is not None, error.message
    request_id = found.group(1)
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert len(logged) == 1
    assert method in logged[0].getMessage()
    assert logged[0].exc_info is not None and SECRET in str(logged[0].exc_info[1])


def test_request_ids_differ_per_call() -> None:
    async def main() -> list[str]:
        async with bastion.testing.connect(service) as client:
            return [(await _error(client, "calc.explode")).message for _ in range(3)]

    assert len(set(run(main()))) == 3


STATUSES = [status for status in Status if status is not Status.OK]


def test_call_errors_travel_with_status_message_details_and_retry_after() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            for status in STATUSES:
                args = {"code": int(status), "message": f"{status.name} happened", "details": {"n": int(status)}}
                error = await _error(client, "calc.fail", **args, retry_after=1.5)
                assert type(error) is type(error_for_status(status, "")), status
                assert error.status is status
                assert error.message == f"{status.name} happened"
                assert error.details == {"n": int(status)}
                assert error.retry_after == 1.5
            error = await _error(client, "calc.fail", code=int(Status.NOT_FOUND), message="gone", details={})
            assert error.retry_after is None and error.details == {}

    run(main())


def test_a_handler_raising_deadline_exceeded_is_not_an_internal_error() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            with pytest.raises(DeadlineExceeded) as info:
                await client.invoke(
                    "calc.fail",
                    {"code": int(Status.DEADLINE_EXCEEDED), "message": "upstream slow", "details": {"up": "db"}},
                    timeout=5,
                )
            assert info.value.message == "upstream slow"
            assert info.value.details == {"up": "db"}

    run(main())


def test_call_errors_from_sync_handlers_travel_too() -> None:
    async def main() -> None:
        async with bastion.testing.connect(service) as client:
            error = await _error(client, "calc.fail_in_thread", code=int(Status.FAILED_PRECONDITION))
            assert error.status is Status.FAILED_PRECONDITION
            assert error.message == "from a thread"
            assert error.details == {"where": "thread"}

    run(main())


def test_a_denial_flood_does_not_flood_the_audit_log(caplog: pytest.LogCaptureFixture) -> None:
    from bastion.server.session import DENIALS_AUDITED

    async def main() -> None:
        async with bastion.testing.connect([_audit_flood_service()], principal=bastion.testing.ANONYMOUS) as client:
            for _ in range(DENIALS_AUDITED + 30):
                with pytest.raises(bastion.Unauthenticated):
                    await client.call("flood.private")

    with caplog.at_level(logging.INFO, logger="bastion.audit"):
        asyncio.run(main())
    denials = [r for r in caplog.records if r.name == "bastion.audit" and "call.denied" in r.getMessage()]
    assert len(denials) == DENIALS_AUDITED


def _audit_flood_service() -> bastion.Service:
    svc = bastion.Service("flood")

    @svc.method
    async def private() -> None:
        return None

    return svc


class _Point(msgspec.Struct):
    x: int
    label: str
    data: bytes
    weight: float | None = None


class _Tree(msgspec.Struct):
    child: "_Tree | None" = None


class _Nested(msgspec.Struct):
    point: _Point
    pair: tuple[int, str]


class _Listed(msgspec.Struct):
    points: list[_Point]


class _Mapped(msgspec.Struct):
    meta: dict[str, str]


class _Deep(msgspec.Struct):
    rows: list[list[int]]


class _Anything(msgspec.Struct):
    value: Any


@pytest.mark.parametrize(
    ("args_type", "growth"),
    [(_Point, 2), (_Nested, 2), (_Listed, 24), (_Mapped, 24), (_Deep, GROWTH_WORST), (_Anything, GROWTH_WORST),
     (_Tree, GROWTH_WORST)],
)  # fmt: skip
def test_arguments_count_their_growth_by_how_deeply_they_may_nest_containers(args_type: type, growth: int) -> None:
    assert args_growth(args_type) == growth
