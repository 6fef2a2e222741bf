"""kv namespaces: which names a call may give, and which exist to be written to (both backends)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import bastion
from bastion.security.credentials import User
from tests.services.test_kv import World, run

pytestmark = pytest.mark.usefixtures("service_backend")


def test_admins_write_only_to_personal_namespaces_of_users_that_exist(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        # An admin's put to ~ghost used to succeed: the keys then waited there for whoever was
        # later created as "ghost" to find them, as keys of a deleted shared namespace once did.
        with pytest.raises(bastion.NotFound, match="no user 'ghost'"):
            await w.admin.kv.put(key="k", value=b"planted", namespace="~ghost")
        with pytest.raises(bastion.NotFound, match="no user 'ghost'"):
            await w.admin.kv.put_many(items=[{"key": "k", "value": b"planted"}], namespace="~ghost")
        with pytest.raises(bastion.NotFound, match="no user 'ghost'"):
            await w.admin.kv.delete(key="k", namespace="~ghost")
        assert (await w.admin.kv.list(namespace="~ghost"))["items"] == []  # reading one: nothing, as before
        assert await w.admin.kv.put(key="note", value=b"", namespace="~ada")  # a user's that exists
        assert await w.admin.kv.put(key="mine", value=b"", namespace="~tester")  # the admin's own
        assert await w.eve.kv.put(key="mine", value=b"", namespace="~eve")
        with pytest.raises(bastion.PermissionDenied):  # a name a user may have: refused as ever
            await w.eve.kv.put(key="k", value=b"", namespace="~ghost")
        await w.store.create_user(User("ghost"))
        ghost = w.server.client(principal=bastion.Principal("ghost", frozenset()))
        assert (await ghost.kv.list())["items"] == []  # nothing was planted for them

    run(test, tmp_path)


def test_a_personal_namespace_is_a_user_name_after_the_tilde(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        # "~Jane Doe" and "~*" used to be accepted from an admin (and refused as PERMISSION_DENIED
        # to others): no user can have those names, so they are INVALID_ARGUMENT for everyone.
        for bad in ("~Jane Doe", "~*", "~.ada", "~-", "~" + "a" * 65, "~ada\n", "~ada/x"):
            for client in (w.admin, w.ada):
                with pytest.raises(bastion.InvalidArgument, match="user's name"):
                    await client.kv.put(key="k", value=b"", namespace=bad)
                with pytest.raises(bastion.InvalidArgument, match="user's name"):
                    await client.kv.get(key="k", namespace=bad)
        with pytest.raises(bastion.NotFound):  # the longest name a user may have: a name, but no such user
            await w.admin.kv.put(key="k", value=b"", namespace="~" + "a" * 64)

    run(test, tmp_path)


def test_a_put_racing_delete_namespace_leaves_no_key_behind(tmp_path: Path) -> None:
    async def test(w: World) -> None:
        store = w.store
        real = store.kv_get_namespace

        async def deleted_right_after(name: str) -> object:
            record = await real(name)  # the caller's access checked, then the namespace deleted before the put
            await store.kv_delete_namespace(name, time.time())
            return record

        calls = [
            (w.ada, {"key": "k", "value": b"late"}),
            (w.ada, {"key": "k", "value": b"late", "expected_version": 0}),
            (w.ada, {"items": [{"key": "k", "value": b"late"}]}),
            (w.admin, {"key": "k", "value": b"late"}),
        ]
        for client, args in calls:
            await w.admin.kv.create_namespace(name="team", writers=["user:ada"])
            store.kv_get_namespace = deleted_right_after  # type: ignore[method-assign]
            try:
                method = client.kv.put_many if "items" in args else client.kv.put
                # What the call would be told now: ada no access (as for any namespace she may not
                # write), the admin that the namespace does not exist.
                with pytest.raises(bastion.NotFound if client is w.admin else bastion.PermissionDenied):
                    await method(namespace="team", **args)
            finally:
                store.kv_get_namespace = real  # type: ignore[method-assign]
            await w.admin.kv.create_namespace(name="team", readers=["user:eve"])
            assert (await w.eve.kv.list(namespace="team"))["items"] == []  # no key was left for eve to find
            assert await w.admin.kv.delete_namespace(name="team") == 0

    run(test, tmp_path)


def test_a_namespace_name_holding_nul_is_refused_alike_on_every_backend(tmp_path: Path) -> None:
    """No namespace name holds NUL: SQLite answered NOT_FOUND, but PostgreSQL (whose text cannot hold NUL) failed
    the call with the store's own error ("store: value rejected: CharacterNotInRepertoireError"); kv.set_access
    still did after a guard was added here. The dispatcher's rule (refuse_nul) now answers INVALID_ARGUMENT for both."""

    async def test(w: World) -> None:
        with pytest.raises(bastion.InvalidArgument, match=r"kv\.delete_namespace: argument name must not contain NUL"):
            await w.admin.kv.delete_namespace(name="team\x00")
        with pytest.raises(bastion.InvalidArgument, match=r"kv\.set_access: argument name must not contain NUL"):
            await w.admin.kv.set_access(name="team\x00", readers=[], writers=[])

    run(test, tmp_path)
