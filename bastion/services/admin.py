"""The built-in ``admin`` service: health, readiness, introspection, statistics, backups.

Written with the public service API only; it learns about the server through
the narrow ``ServerInfo`` on its ``Context``, never through server internals,
and about backups through the ``Backups`` component it is given.

``create_service(backups)`` builds the admin service of one server: with a
``Backups`` it also offers ``backup`` and ``backups``. The module-level
``service`` (no backups) is what ``bastion.testing`` users add to test
against the admin service.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec

from bastion.exceptions import FailedPrecondition
from bastion.security.principal import ADMIN_ROLE
from bastion.service import Context, Service
from bastion.store.archive import ArchiveInfo

if TYPE_CHECKING:
    from bastion.services.backup import Backups

__all__ = ["ArchiveInfo", "Health", "Readiness", "create_service", "service"]

DOC = "Server health, readiness, introspection, statistics and backups."


class Health(msgspec.Struct, frozen=True):
    status: str
    version: str
    uptime: float


class Readiness(msgspec.Struct, frozen=True):
    """``ready``: whether the server takes new work; ``status``: "ready" or "draining"."""

    ready: bool
    status: str


async def health(ctx: Context) -> Health:
    """Whether the server is up, its version and uptime in seconds."""
    return Health("ok", ctx.server.version, round(time.time() - ctx.server.started_at, 3))


async def ready(ctx: Context) -> Readiness:
    """Whether the server is accepting work: false once it is draining (shutting down).

    Load balancers and orchestrators should route to a server only while this
    is true; ``health`` stays "ok" while a draining server finishes its calls.
    """
    draining = ctx.server.draining
    return Readiness(not draining, "draining" if draining else "ready")


async def methods(ctx: Context) -> list[dict[str, Any]]:
    """The services and methods the caller may call, with argument and result schemas.

    Anonymous callers see only public methods; others see everything they hold
    the roles for.
    """
    principal = ctx.principal
    out = []
    for svc in ctx.server.describe():
        visible = [m for m in svc["methods"] if principal.may_call(m["public"], frozenset(m["roles"]))]
        if visible:
            out.append({**svc, "methods": visible})
    return out


def create_service(backups: Backups | None = None) -> Service:
    """The admin service of one server; ``backups`` adds ``backup`` and ``backups``."""
    svc = Service("admin", doc=DOC, refuse_nul=True)
    svc.method(public=True, idempotent=True, priority=10)(health)
    svc.method(public=True, idempotent=True, priority=10)(ready)
    svc.method(public=True, idempotent=True)(methods)

    @svc.method(idempotent=True, roles=[ADMIN_ROLE])
    async def stats(ctx: Context) -> dict[str, float]:
        """Server counters: connections, calls, errors, uptime (and backups, where the server takes them)."""
        out = dict(ctx.server.stats())
        if backups is not None:
            out.update(backups.stats)
        return out

    if backups is None:
        return svc

    @svc.method(roles=[ADMIN_ROLE])
    async def backup() -> ArchiveInfo:
        """Take a consistent backup now, while writes continue; the archive's name, size, SHA-256 and summary.

        UNAVAILABLE if a backup is already running; RESOURCE_EXHAUSTED if the backup directory's disk is full
        (nothing is kept); FAILED_PRECONDITION if the directory cannot be written.
        """
        return await backups.backup()

    @svc.method(name="backups", idempotent=True, roles=[ADMIN_ROLE])
    async def list_backups() -> list[ArchiveInfo]:
        """The archives in the server's backup directory, oldest first (name, size, time, encrypted)."""
        try:
            return backups.list()
        except OSError as exc:
            raise FailedPrecondition(f"cannot list the backup directory: {exc.strerror}") from None

    return svc


service = create_service()
