"""Rolling upgrades: replicas of bastion N and N+1 side by side on one PostgreSQL schema.

"N+1" is a copy of the current source tree with one more migration -- a
compatible one: a new table and a new nullable column on ``kv_keys`` --
started with ``PYTHONPATH`` pointing at the copy; "N" is the current tree.
N+1 starts first and migrates the shared schema; N then starts on the newer
schema (logging a warning that names both versions) instead of refusing it,
and one client's kv calls go through either replica and see each other's
writes. When the schema declares it needs code newer than N, N refuses to
start with the clear error.

Protocol: the handshake negotiates the version (docs/protocol.md 4.2): the
client sends the highest version it speaks, the server answers the highest
both speak. A future client offering version 2 -- with a Hello field version
1 does not know -- gets version 1 from a real server and then talks version
1; the sans-IO pair shows the same without sockets (tests/protocol/
test_connection.py checks the rest: a server refuses versions below its own,
a client refuses a Welcome naming a version it does not speak).

Needs BASTION_TEST_POSTGRES_DSN (skips without it), except the sans-IO test.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import asyncpg
import msgspec
import pytest

import bastion
from bastion.client.aio import Client
from bastion.protocol.messages import PROTOCOL_VERSION, Call, Hello, Result
from bastion.protocol.state import ConnectionState
from bastion.store.migrations import LATEST
from tests.protocol.helpers import ConnectionPair, frame, hello_for, welcome_for
from tests.support.raw import CALL, HELLO, RESULT, WELCOME, RawPeer
from tests.support.raw import frame as raw_frame
from tests.support.server import ServerProcess, start_server
from tests.support.stores import postgres_dsn, store_location

#: The migration release N+1 adds, appended to both of the copy's lists (SQLite's and PostgreSQL's).
NEXT_MIGRATION = """Migration(
    LATEST + 1,
    "rolling upgrade test: notes on keys",
    ("CREATE TABLE upgrade_notes (id INTEGER PRIMARY KEY, body TEXT)", "ALTER TABLE kv_keys ADD COLUMN note TEXT"),
    compatible=True,
)"""


def make_next_release(root: Path) -> Path:
    """A copy of the current ``bastion`` package whose schema is one (compatible) migration newer."""
    source = Path(bastion.__file__).parent
    shutil.copytree(source, root / "bastion", ignore=shutil.ignore_patterns("__pycache__"))
    for module, name in (("migrations.py", "MIGRATIONS"), ("postgres_migrations.py", "POSTGRES_MIGRATIONS")):
        path = root / "bastion" / "store" / module
        text = path.read_text()
        line = f"\nLATEST = {name}[-1].version\n"
        assert text.count(line) == 1, f"{path}: cannot find {line.strip()!r} to patch"
        patched = f"\n{name} = (*{name}, {NEXT_MIGRATION.replace('LATEST + 1', f'{name}[-1].version + 1')})" + line
        path.write_text(text.replace(line, patched))
    probe = subprocess.run(
        [sys.executable, "-c", "import bastion.store.postgres as p, bastion.store.migrations as m; "
         "print(p.__file__, p.LATEST, m.LATEST)"],
        env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, check=True, cwd=root,
    )  # fmt: skip
    file, pg_latest, sqlite_latest = probe.stdout.split()
    assert Path(file).is_relative_to(root) and int(pg_latest) == int(sqlite_latest) == LATEST + 1, probe.stdout
    return root


async def schema_state(schema: str) -> tuple[int, int]:
    """(the schema's version, its recorded lowest compatible version), read beside bastion."""
    conn = await asyncpg.connect(postgres_dsn())
    try:
        version = await conn.fetchval(f'SELECT max(version) FROM "{schema}".schema_version')
        floor = await conn.fetchval(f'SELECT min_version FROM "{schema}".schema_compat')
        return int(version), int(floor)
    finally:
        await conn.close()


async def set_floor(schema: str, floor: int) -> None:
    conn = await asyncpg.connect(postgres_dsn())
    try:
        await conn.execute(f'UPDATE "{schema}".schema_compat SET min_version = $1', floor)
    finally:
        await conn.close()


def tls_context(server: ServerProcess) -> ssl.SSLContext:
    assert server.ca_file is not None
    context = ssl.create_default_context(cafile=str(server.ca_file))
    context.set_alpn_protocols(["bastion/1"])
    return context


def test_replicas_of_n_and_n_plus_1_serve_one_schema_side_by_side(tmp_path: Path) -> None:
    location = store_location("postgresql", tmp_path, "shared")
    schema = location.rpartition("search_path=")[2]
    release = make_next_release(tmp_path / "next")
    started: list[ServerProcess] = []
    try:
        # The first N+1 replica migrates the shared schema.
        new = start_server(tmp_path / "new", env={"BASTION_STORE": location, "PYTHONPATH": str(release)})
        started.append(new)
        assert asyncio.run(schema_state(schema)) == (LATEST + 1, 1)
        # An N replica (re)starts on it: allowed, with a warning naming both versions.
        old = start_server(tmp_path / "old", env={"BASTION_STORE": location})
        started.append(old)
        assert f"has schema version {LATEST + 1}, newer than this bastion knows ({LATEST})" in old.log()
        assert "newer than this bastion knows" not in new.log()
        token = new.token

        async def main() -> None:
            async with (
                Client(old.address, token=token, timeout=10) as on_old,
                Client(new.address, token=token) as on_new,
            ):
                v1 = await on_old.kv.put(key="upgrade/a", value=b"written by N")
                v2 = await on_new.kv.put(key="upgrade/b", value=b"written by N+1")
                a = await on_new.kv.get(key="upgrade/a")
                b = await on_old.kv.get(key="upgrade/b")
                assert (a["value"], a["version"]) == (b"written by N", v1)
                assert (b["value"], b["version"]) == (b"written by N+1", v2)
                # Compare-and-swap across versions: N+1 updates what N wrote, N then sees the new version.
                v3 = await on_new.kv.put(key="upgrade/a", value=b"updated by N+1", expected_version=v1)
                assert (await on_old.kv.get(key="upgrade/a"))["version"] == v3
            async with Client([old.address, new.address], token=token, timeout=10) as both:
                versions = [await both.kv.put(key=f"upgrade/many/{i}", value=b"x") for i in range(20)]
                assert versions == sorted(versions) and len(set(versions)) == 20
                listed = await both.kv.list(prefix="upgrade/many/")
                assert len(listed["items"]) == 20

        asyncio.run(main())

        # A future client: Hello version 2 with a field version 1 does not know gets version 1 and talks it.
        with RawPeer(old.host, old.port, ssl_context=tls_context(old)) as peer:
            peer.send(raw_frame([HELLO, 2, "future/2", token, 16, 1 << 20, {}, ["a-version-2-field"]]))
            welcome = peer.read_message()
            assert welcome[:2] == [WELCOME, 1], welcome
            peer.send(raw_frame([CALL, 1, "kv.get", {"key": "upgrade/b"}]))
            result = peer.read_message()
            assert result[:2] == [RESULT, 1] and result[2]["value"] == b"written by N+1", result

        # A release whose schema needs code newer than N: N refuses to start, naming both versions.
        old.stop()
        asyncio.run(set_floor(schema, LATEST + 1))
        with pytest.raises(AssertionError, match=rf"needs code of schema version {LATEST + 1} or later"):
            started.append(start_server(tmp_path / "old-again", env={"BASTION_STORE": location}))
    finally:
        for server in started:
            server.stop()


def test_sans_io_a_version_2_hello_gets_version_1_and_a_call_goes_through() -> None:
    class HelloV2(msgspec.Struct, array_like=True, frozen=True, tag_field="type", tag=1):
        """What a version-2 client might send: version 1's Hello plus a field at the end."""

        version: int
        client: str
        token: str | None
        window: int
        max_frame: int
        metadata: dict[str, str]
        features: list[str]

    pair = ConnectionPair()
    # The client end stands for a version-2 client: its Hello goes out as a HelloV2 on the wire.
    pair.client.send_hello(hello_for(pair.client.limits, version=2))
    pair.client.data_to_send()  # replaced by the bytes below
    [received] = pair.server.receive_data(frame(HelloV2(2, "future/2", None, 16, 1 << 20, {}, ["streams-v2"])))
    assert isinstance(received, Hello) and received.version == 2  # the extra field is ignored (3.1)
    # The server answers the highest version both speak (4.2): 1; the client then speaks version 1.
    pair.server.send_welcome(welcome_for(pair.server.limits, version=min(received.version, PROTOCOL_VERSION)))
    pair.to_client()
    assert pair.client.state is ConnectionState.OPEN and pair.server.state is ConnectionState.OPEN
    call_id = pair.client.send_call("kv.get", {"key": "k"})
    [call] = pair.to_server()
    assert isinstance(call, Call)
    pair.server.send_result(call.id, "v")
    [result] = pair.to_client()
    assert isinstance(result, Result) and result.id == call_id
