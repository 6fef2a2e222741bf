"""The built-in ``admin`` service: health, introspection and statistics.

Written with the public service API only; it learns about the server through
the narrow ``ServerInfo`` on its ``Context``, never through server internals.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from bastion.service import Context, Service

__all__ = ["Health", "create_service", "service"]

service = Service("admin", doc="Server health, introspection and statistics.")


class Health(msgspec.Struct, frozen=True):
    status: str
    version: str
    uptime: float


@service.method(public=True, idempotent=True, priority=10)
async def health(ctx: Context) -> Health:
    """Whether the server is up, its version and uptime in seconds."""
    return Health("ok", ctx.server.version, round(time.time() - ctx.server.started_at, 3))


@service.method(public=True, idempotent=True)
async def methods(ctx: Context) -> list[dict[str, Any]]:
    """The services and methods the caller may call, with argument and result schemas.

    Anonymous callers see only public methods; others see everything they hold
    the roles for.
    """
    principal = ctx.principal
    out = []
    for svc in ctx.server.describe():
        visible = [
            m
            for m in svc["methods"]
            if (m["public"] or principal.authenticated)
            and (not m["roles"] or principal.has_roles(frozenset(m["roles"])))
        ]
        if visible:
            out.append({**svc, "methods": visible})
    return out


@service.method(idempotent=True, roles=["admin"])
async def stats(ctx: Context) -> dict[str, float]:
    """Server counters: connections, calls, errors, uptime."""
    return dict(ctx.server.stats())


def create_service(backups: object | None = None) -> Service:
    """The admin service of one server (being written: issue 5 adds ``backup`` here)."""
    return service
