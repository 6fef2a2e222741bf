"""The built-in admin service (bastion/services/admin.py), through ``bastion.testing``."""

import asyncio
from typing import Any

import pytest

import bastion
import bastion.testing
from bastion import InternalError, PermissionDenied, Principal, Service, Unauthenticated
from bastion.services import admin
from bastion.testing import ANONYMOUS

app = Service("app")


@app.method
async def open_to_users() -> str:
    return "ok"


@app.method(public=True)
async def open_to_all() -> str:
    return "ok"


@app.method(roles=["ops"])
async def for_ops() -> str:
    return "ok"


@app.method
async def broken() -> None:
    raise RuntimeError("boom")


SERVICES = [admin.service, app]
OPS = Principal("olga", frozenset({"ops"}))


def run(coro: Any) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(10):
            return await coro

    return asyncio.run(guarded())


def names(listing: list[dict[str, Any]]) -> set[str]:
    return {method["name"] for service in listing for method in service["methods"]}


# -- health -----------------------------------------------------------------------------------------


def test_health_declaration() -> None:
    spec = admin.service.methods["health"]
    assert spec.public and spec.idempotent
    assert spec.priority > 0  # answered first under load


@pytest.mark.parametrize("principal", [None, ANONYMOUS, OPS], ids=["admin", "anonymous", "ops"])
def test_health_answers_everyone(principal: Principal | None) -> None:
    async def main() -> dict[str, Any]:
        async with bastion.testing.connect(SERVICES, principal=principal) as client:
            return await client.admin.health()

    health = run(main())
    assert health["status"] == "ok"
    assert health["version"] == bastion.__version__
    assert isinstance(health["uptime"], float) and 0 <= health["uptime"] < 60


# -- methods --------------------------------------------------------------------------------------------


def test_methods_lists_everything_for_an_admin() -> None:
    async def main() -> list[dict[str, Any]]:
        async with bastion.testing.connect(SERVICES) as client:
            return await client.admin.methods()

    listing = run(main())
    assert [service["name"] for service in listing] == ["admin", "app"]
    assert listing[0]["doc"] == admin.service.doc
    assert names(listing) == {
        "admin.health",
        "admin.ready",
        "admin.methods",
        "admin.stats",
        "app.open_to_users",
        "app.open_to_all",
        "app.for_ops",
        "app.broken",
    }
    stats = next(m for m in listing[0]["methods"] if m["name"] == "admin.stats")
    assert stats["roles"] == ["admin"]
    assert stats["kind"] == "unary"


def test_methods_shows_anonymous_callers_only_public_methods() -> None:
    async def main() -> list[dict[str, Any]]:
        async with bastion.testing.connect(SERVICES, principal=ANONYMOUS) as client:
            return await client.admin.methods()

    assert names(run(main())) == {"admin.health", "admin.ready", "admin.methods", "app.open_to_all"}


def test_methods_shows_a_user_what_their_roles_allow() -> None:
    async def main() -> list[dict[str, Any]]:
        async with bastion.testing.connect(SERVICES, principal=OPS) as client:
            return await client.admin.methods()

    visible = names(run(main()))
    assert {"app.for_ops", "app.open_to_users", "admin.health"} <= visible
    assert "admin.stats" not in visible


# -- stats ------------------------------------------------------------------------------------------------


def test_stats_counts_connections_calls_and_errors() -> None:
    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with bastion.testing.connect(SERVICES) as client:
            before = await client.admin.stats()
            await client.app.open_to_users()
            with pytest.raises(InternalError):
                await client.app.broken()
            return before, await client.admin.stats()

    before, after = run(main())
    scheduler = {key for key in before if key.startswith("scheduler_")}
    assert {"scheduler_running", "scheduler_queued", "scheduler_rejected_shed"} <= scheduler
    assert set(before) - scheduler == {
        "connections",
        "connections_open",
        "connections_total",
        "calls_total",
        "calls_in_flight",
        "internal_errors_total",
        "rejected_connections_total",
        "rejected_connections_per_source",
        "rejected_handshakes_per_source",
        "rejected_connections_reserved",
        "closed_idle",
        "closed_abuse",
        "closed_slow_reader",
        "closed_slow_sender",
        "accept_errors_total",
        "rejected_rate_limited",
        "rejected_args_memory",
        "stream_buffer_bytes",
        "stream_buffer_paused",
        "proxied_connections_total",
        "rejected_proxy_header_total",
        "memory_trims_total",
        "memory_trimmed_bytes_total",
        "memory_trim_seconds_total",
        "uptime_seconds",
        "pid",
    }
    assert before["connections"] == 1 and before["connections_total"] == 1
    assert before["calls_in_flight"] == 1  # the stats call itself
    assert before["internal_errors_total"] == 0
    assert after["calls_total"] == before["calls_total"] + 3
    assert after["internal_errors_total"] == 1
    assert after["uptime_seconds"] >= before["uptime_seconds"]


def test_stats_needs_the_admin_role() -> None:
    async def main() -> None:
        async with bastion.testing.MemoryServer(SERVICES) as memory:
            with pytest.raises(Unauthenticated):
                await memory.client(principal=ANONYMOUS).admin.stats()
            with pytest.raises(PermissionDenied, match="requires role admin"):
                await memory.client(principal=OPS).admin.stats()
            assert (await memory.client().admin.stats())["connections"] == 3

    run(main())
