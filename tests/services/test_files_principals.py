"""The files service with principals no credential store row stands behind (``bastion.testing``'s, or a custom
``Authenticator``'s), and with the session's revalidated principal deciding access at an upload's commit."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import pytest

import bastion
from bastion.client.aio import Client
from bastion.config import FilesConfig
from bastion.security.authn import PeerInfo
from bastion.security.credentials import User
from bastion.security.principal import Principal
from bastion.server.server import Server
from bastion.services.files import Files
from bastion.store import open_store
from bastion.transport.aio import Link
from tests.services.test_files import CHUNK, World, chunks, offset_reaches, run, sha
from tests.support.stores import service_store

pytestmark = pytest.mark.usefixtures("service_backend")


def test_non_store_principals_may_replace_contents_and_be_shared_with(tmp_path: Path) -> None:
    """The commit of new contents re-read the uploader's roles from the credential store, and ``share``
    refused grantees without a row there: ``bastion.testing``'s principals (and any custom authenticator's)
    have none, so the admin's upload of alice's file failed NOT_FOUND after all its bytes had come, and
    a share to ``tester`` was refused."""
    data = os.urandom(2 * CHUNK)

    async def test(w: World) -> None:
        doc = await w.put(w.alice, "doc", b"original")
        info = await w.admin.files.begin_upload(file_id=doc["id"], size=len(data), sha256=sha(data))
        result = await w.admin.upload("files.upload", chunks(data), upload_id=info["upload_id"])
        assert result["complete"] and result["file"]["id"] == doc["id"]
        assert await w.get(w.alice, file_id=doc["id"]) == data
        await w.alice.files.share(file_id=doc["id"], user="tester", mode="read")
        await w.alice.files.share(file_id=doc["id"], user="bob", mode="write")
        assert await w.get(w.bob, file_id=doc["id"]) == data

    run(test, tmp_path)


class Revalidating:
    """An ``Authenticator`` outside the credential store: the token is the user's name; revalidation gives
    the roles ``roles`` holds now (``changed`` is set when it hands out new ones)."""

    def __init__(self, roles: dict[str, frozenset[str]]) -> None:
        self.roles = roles
        self.changed = asyncio.Event()

    async def authenticate(self, token: str | None, peer: PeerInfo) -> Principal:
        assert token is not None
        return Principal(token, self.roles[token], token_id=f"t-{token}")  # a token id: revalidated

    async def revalidate(self, principal: Principal) -> Principal | None:
        roles = self.roles[principal.name]
        if roles == principal.roles:
            return principal
        self.changed.set()  # the session replaces its principal as soon as this returns
        return msgspec.structs.replace(principal, roles=roles)


def _client(server: Server, name: str) -> Client:
    async def connect(protocol: Callable[[], Link]) -> None:
        server.connect_memory(protocol())

    client = Client("memory", token=name)
    client._connector = connect
    return client


class _Scene(NamedTuple):
    store: Any
    alice: Client
    carol: Client
    doc: dict[str, Any]


ORIGINAL = b"original"


@asynccontextmanager
async def _carol_may_write_alices_doc(
    tmp_path: Path, auth: Revalidating, *, rows: bool, **server_options: Any
) -> AsyncIterator[_Scene]:
    """A real ``Server`` with the files service: alice's file ``doc`` (``ORIGINAL``), shared for writing with
    role ``team``, which carol holds; ``rows``: alice and carol have credential-store rows too."""
    async with open_store(service_store(tmp_path)) as store:
        if rows:
            await store.create_user(User("alice"))
            await store.create_user(User("carol", frozenset({"team"})))
        files = Files(store, tmp_path / "files", FilesConfig(chunk_bytes=CHUNK), leader=False)
        await files.start()
        server = Server([files.service], authenticator=auth, **server_options)
        alice, carol = _client(server, "alice"), _client(server, "carol")
        try:
            info0 = await alice.files.begin_upload(name="doc", size=len(ORIGINAL), sha256=sha(ORIGINAL))
            doc = (await alice.upload("files.upload", [ORIGINAL], upload_id=info0["upload_id"]))["file"]
            await alice.files.share(file_id=doc["id"], role="team", mode="write")
            yield _Scene(store, alice, carol, doc)
        finally:
            await alice.close()
            await carol.close()
            await server.shutdown(grace=1.0)
            await files.aclose()


async def _upload_paused(client: Client, file_id: str, data: bytes) -> tuple[asyncio.Task[Any], asyncio.Event]:
    """New contents ``data`` for ``file_id``, paused once the server holds the first chunk: the upload's task,
    and the event that lets the rest go."""
    info = await client.files.begin_upload(file_id=file_id, size=len(data), sha256=sha(data))
    go_on = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield data[:CHUNK]
        await go_on.wait()
        for chunk in chunks(data[CHUNK:]):
            yield chunk

    upload = asyncio.create_task(client.upload("files.upload", slow(), upload_id=info["upload_id"]))
    await offset_reaches(client, info["upload_id"], CHUNK)
    return upload, go_on


def test_an_upload_commits_with_the_uploaders_revalidated_roles(tmp_path: Path) -> None:
    """A grantee who lost write access while a long upload's bytes arrived (the role that granted it taken
    away, as the session's revalidation sees it) does not replace the file; its authenticator keeps no
    credential store rows, so the roles come from the session, not from the store."""
    data = os.urandom(3 * CHUNK)
    auth = Revalidating({"alice": frozenset(), "carol": frozenset({"team"})})

    async def main() -> None:
        async with _carol_may_write_alices_doc(tmp_path, auth, rows=False, revalidate_interval=0.05) as scene:
            alice, carol, doc, data0 = scene.alice, scene.carol, scene.doc, ORIGINAL
            upload, go_on = await _upload_paused(carol, doc["id"], data)
            auth.roles["carol"] = frozenset()  # no longer in "team"
            await asyncio.wait_for(auth.changed.wait(), 10)
            go_on.set()
            with pytest.raises(bastion.NotFound, match="no file"):
                await upload
            got = b"".join([c async for c in alice.stream("files.download", file_id=doc["id"])])
            assert got == data0 and (await alice.files.usage())["reserved_bytes"] == 0

    asyncio.run(asyncio.wait_for(main(), 30))


def test_an_upload_commits_with_the_roles_the_credential_store_holds_now(tmp_path: Path) -> None:
    """For a principal with a credential-store row, the commit reads the row's roles of now: the session's
    revalidated principal can lag by seconds, or stay as it was for good while revalidation fails, and a
    role taken away must not leave its holder able to replace a file it could no longer write."""
    data = os.urandom(3 * CHUNK)
    auth = Revalidating({"alice": frozenset(), "carol": frozenset({"team"})})  # never told of the change

    async def main() -> None:
        async with _carol_may_write_alices_doc(tmp_path, auth, rows=True) as scene:
            store, alice, carol, doc, data0 = scene.store, scene.alice, scene.carol, scene.doc, ORIGINAL
            upload, go_on = await _upload_paused(carol, doc["id"], data)
            assert await store.set_access("carol", frozenset(), False)  # an admin takes "team" away
            go_on.set()
            with pytest.raises(bastion.NotFound, match="no file"):
                await upload
            got = b"".join([c async for c in alice.stream("files.download", file_id=doc["id"])])
            assert got == data0

    asyncio.run(asyncio.wait_for(main(), 30))
