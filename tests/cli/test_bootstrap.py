"""The first start's admin credential (``bootstrap_admin``), over a real SQLite store."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from bastion.cli.bootstrap import bootstrap_admin
from bastion.exceptions import UsageError
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


def test_the_admin_token_is_never_written_through_a_symlink_or_into_another_users_file(tmp_path: Path) -> None:
    """A data directory others could write to may hold a planted ``admin.token``: a symlink to a file its planter
    can read, or a file of their own. The first start refuses it (nothing written, nothing chmod-ed) and makes
    no admin whose token went there."""
    target = tmp_path / "planted"
    target.write_text("planted\n")
    target.chmod(0o644)
    link = tmp_path / "admin.token.link"
    link.symlink_to(target)
    planted = [(link, "it is a symbolic link")]
    if os.geteuid() == 0:  # only root can give a file away
        theirs = tmp_path / "theirs.token"
        theirs.write_text("planted\n")
        theirs.chmod(0o644)
        os.chown(theirs, 65534, 65534)
        planted.append((theirs, "it belongs to another user (uid 65534)"))

    async def main() -> None:
        async with open_store(tmp_path / "store.db") as store:
            for path, reason in planted:
                with pytest.raises(UsageError) as refused:
                    await bootstrap_admin(store, path)
                assert str(refused.value) == f"cannot write {path}: {reason}"
                assert path.read_text() == "planted\n" and stat.S_IMODE(path.stat().st_mode) == 0o644
            assert await store.list_users() == []

    asyncio.run(main())


def test_a_later_start_leaves_an_admin_token_of_another_user_as_it_is(tmp_path: Path) -> None:
    """Once the admin exists the file is only made 0600, never written: another user's (a server run as root on
    a data directory its service user owns) is left alone, and the start goes on."""
    if os.geteuid() != 0:
        pytest.skip("only root can give a file away")

    async def main() -> None:
        token_path = tmp_path / "admin.token"
        async with open_store(tmp_path / "store.db") as store:
            assert await bootstrap_admin(store, token_path) == "written to"
            os.chown(token_path, 65534, 65534)
            assert await bootstrap_admin(store, token_path) == "in"
            assert token_path.stat().st_uid == 65534 and stat.S_IMODE(token_path.stat().st_mode) == 0o600

    asyncio.run(main())
