"""An admin's ``auth.delete_user`` and ``auth.set_password`` when lifting the user's throttle state fails with
something other than Redis's UNAVAILABLE (a store error): the change is made already, so the call still
finishes -- the second hand-over pass, the audit record (``unlocked`` absent) -- and answers as ever. And
which of them refill the per-user allowance."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from bastion.security.audit import AuditLog
from bastion.security.passwords import PasswordHasher
from bastion.security.throttle import LoginThrottle
from bastion.services.auth import create_service
from bastion.store import open_store
from bastion.testing import TESTER, MemoryServer
from tests.security.test_throttle_redis import refused
from tests.support.stores import service_store

PASSWORD = "correct horse battery"


class FailingUnlock(LoginThrottle):
    """A throttle whose store fails while lifting the lockouts (as a dropped PostgreSQL connection would)."""

    async def unlock(self, username: str) -> int:
        raise OSError("the store failed while lifting the lockouts")


def test_delete_user_and_set_password_finish_and_audit_when_the_unlock_fails(tmp_path: Path) -> None:
    async def main() -> None:
        async with open_store(service_store(tmp_path)) as store:
            audit = AuditLog(tmp_path / "audit.log")
            passes: list[str] = []

            async def reassign(name: str, heir: str | None) -> int:
                passes.append(name)
                return 0

            service = create_service(
                store, hasher=PasswordHasher(fast=True), throttle=FailingUnlock(store), audit=audit,
                owned_data={"kv": reassign},
            )  # fmt: skip
            async with MemoryServer([service]) as server:
                admin = server.client(principal=TESTER)
                await admin.auth.create_user(name="eve", password=PASSWORD)
                assert await admin.auth.set_password(name="eve", password=PASSWORD + "!") is True
                deleted = await admin.auth.delete_user(name="eve")
                assert deleted["name"] == "eve" and passes == ["eve", "eve"]
            audit.close()
        records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
        done = {r["event"]: r for r in records if r["event"] in ("admin.set_password", "admin.delete_user")}
        assert set(done) == {"admin.set_password", "admin.delete_user"}
        assert all(r.get("unlocked") is None for r in done.values())

    asyncio.run(main())


def test_unlock_user_keeps_the_allowance_spent_and_set_password_refills_it(tmp_path: Path) -> None:
    """``auth.unlock_user`` lifts the lockouts and failure counts, not the per-user allowance (the password
    is the same: a guessing campaign that spent it gets no fresh one); ``auth.set_password`` refills it."""

    async def main() -> None:
        async with open_store(service_store(tmp_path)) as store:
            audit = AuditLog(tmp_path / "audit.log")
            throttle = LoginThrottle(store, max_failures=2, global_per_hour=2)
            service = create_service(store, hasher=PasswordHasher(fast=True), throttle=throttle, audit=audit)
            async with MemoryServer([service]) as server:
                admin = server.client(principal=TESTER)
                await admin.auth.create_user(name="eve", password=PASSWORD)
                for _ in range(2):
                    await throttle.failed("eve", "10.0.1.1")
                assert (await admin.auth.unlock_user(name="eve"))["lifted"] == 1
                assert "for this user" in (await refused(throttle, "eve", "10.0.2.1") or "")
                await admin.auth.set_password(name="eve", password=PASSWORD + "!")
                assert await refused(throttle, "eve", "10.0.2.1") is None
            audit.close()

    asyncio.run(main())
