"""Principals with no user row (``bastion.testing``'s ``TESTER``, ``StaticTokens``, a custom authenticator) keep
writing their own ``~NAME`` and uploading their files once the store holds user rows: the stores' check that a
write's owner has a row is ``bastion serve``'s (``userless_owners`` False), not the library's default. And a
principal whose own row is gone, where the check is on, is told so in its own words (not an admin's)."""

from __future__ import annotations

from pathlib import Path

import pytest

import bastion
from bastion.security.credentials import User
from bastion.store.files import FileStore
from bastion.store.kv import KVStore
from tests.services import test_files, test_kv

pytestmark = pytest.mark.usefixtures("service_backend")


def test_the_library_default_takes_writes_of_principals_with_no_user_row() -> None:
    assert KVStore.userless_owners is True and FileStore.userless_owners is True


def test_the_testing_principal_writes_its_namespace_after_a_user_is_created(tmp_path: Path) -> None:
    async def test(w: test_kv.World) -> None:
        assert await w.store.get_user("tester") is None  # TESTER has no row; ada, bob and eve have
        assert await w.admin.kv.put(key="a", value=b"1") > 0
        await w.store.create_user(User("alice"))
        assert await w.admin.kv.put(key="b", value=b"2") > 0
        assert await w.admin.kv.put_many(items=[{"key": "c", "value": b"3"}])
        assert await w.admin.kv.delete(key="a") is True
        assert [i["key"] for i in (await w.admin.kv.list())["items"]] == ["b", "c"]

    test_kv.run(test, tmp_path)


def test_the_testing_principal_uploads_after_a_user_is_created(tmp_path: Path) -> None:
    async def test(w: test_files.World) -> None:
        await w.put(w.admin, "one", b"1")
        store = w.files.store
        await store.create_user(User("alice"))
        assert (await w.put(w.admin, "two", b"2"))["owner"] == "tester"

    test_files.run(test, tmp_path)


def test_a_principal_whose_own_row_is_gone_is_refused_in_its_own_words(tmp_path: Path) -> None:
    """``bastion serve``'s setting (the check on): ada's row deleted while ada is still connected."""

    async def test(w: test_kv.World) -> None:
        w.store.userless_owners = False
        assert await w.ada.kv.put(key="a", value=b"1") > 0
        assert await w.store.delete_user("ada")
        for write in (
            w.ada.kv.put(key="a", value=b"2"),
            w.ada.kv.put_many(items=[{"key": "b", "value": b"2"}]),
            w.ada.kv.delete(key="a"),
        ):
            with pytest.raises(bastion.NotFound, match="no user 'ada'") as refused:
                await write
            assert "admin" not in str(refused.value)
        assert await w.store.delete_user("eve")
        with pytest.raises(bastion.NotFound, match="no user 'eve': an admin writes only"):  # an admin's: as ever
            await w.admin.kv.put(key="k", value=b"", namespace="~eve")

    test_kv.run(test, tmp_path)
