"""The first start's admin credential (``bootstrap_admin``), over a real SQLite store."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from bastion.cli.bootstrap import bootstrap_admin
from bastion.security.audit import AuditLog
from bastion.security.authn import PeerInfo, StoreAuthenticator
from bastion.security.throttle import LoginThrottle
from bastion.store import open_store

PEER = PeerInfo("127.0.0.1:5000", "127.0.0.1")


def test_a_first_start_that_failed_to_write_the_token_can_be_retried(tmp_path: Path) -> None:
    """A bootstrap that failed half way (the token file could not be written) must not leave an
    ``admin`` user nobody can ever authenticate as: the next start finishes it."""

    async def main() -> None:
        token_path = tmp_path / "admin.token"
        token_path.mkdir()  # in the way: the token cannot be written
        async with open_store(tmp_path / "store.db") as store:
            with pytest.raises(OSError):
                await bootstrap_admin(store, token_path)
            token_path.rmdir()  # the operator clears the way and starts again
            assert await bootstrap_admin(store, token_path) == "written to"
            assert stat.S_IMODE(os.stat(token_path).st_mode) == 0o600
            token = token_path.read_text().strip()
            audit = AuditLog(tmp_path / "audit.log")
            authenticator = StoreAuthenticator(store, LoginThrottle(store), audit)
            principal = await authenticator.authenticate(token, PEER)
            assert (principal.name, principal.roles) == ("admin", frozenset({"admin"}))
            assert await bootstrap_admin(store, token_path) == "in"  # done: never again
            assert token_path.read_text().strip() == token
            audit.close()

    asyncio.run(main())
