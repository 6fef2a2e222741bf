"""An admin's ``auth.delete_user`` and ``auth.set_password`` when lifting the user's throttle state fails with
something other than Redis's UNAVAILABLE (a store error): the change is made already, so the call still
finishes -- the second hand-over pass, the audit record (``unlocked`` absent) -- and answers as ever."""

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
