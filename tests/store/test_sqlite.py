"""What only the SQLite backend promises: its pragmas, file modes, group
commit, savepoint isolation, concurrent readers, and that an acknowledged
write survives the process being SIGKILLed. All on real files in tmp_path.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bastion.exceptions import InternalError, Unavailable, UsageError
from bastion.security.credentials import User
from bastion.store import SQLiteStore, open_store
from tests.support.fsync import Synced, fsynced

__all__ = ["fsynced"]  # the fixture, used here

ROOT = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- open_store --------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["path", "pathlib", "url"])
def test_open_store_picks_sqlite_for_a_path_or_sqlite_url(tmp_path: Path, form: str) -> None:
    db = tmp_path / "a.db"
    locations: dict[str, str | Path] = {"path": str(db), "pathlib": db, "url": f"sqlite:///{db}"}
    location = locations[form]
    store = open_store(location)
    assert isinstance(store, SQLiteStore) and store.path == db


def test_a_relative_sqlite_url_is_a_relative_path() -> None:
    store = open_store("sqlite:///data/bastion.db")
    assert isinstance(store, SQLiteStore) and store.path == Path("data/bastion.db")


@pytest.mark.parametrize("bad", ["", "  ", "mysql://db/x", "sqlite://relative.db", "sqlite:///", "sqlite:///:memory:"])
def test_open_store_refuses_what_it_cannot_store_durably(bad: str) -> None:
    with pytest.raises(UsageError):
        open_store(bad)


async def test_a_file_that_is_not_a_database_is_a_usage_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not an SQLite database, not even close" * 100)
    with pytest.raises(UsageError, match="cannot open store"):
        await SQLiteStore(junk).open()


# -- pragmas and files --------------------------------------------------------------------------


async def test_connections_use_wal_full_sync_and_foreign_keys(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "a.db") as store:
        writer = await store._write(
            lambda c: [c.execute(f"PRAGMA {p}").fetchone()[0] for p in ("journal_mode", "synchronous", "foreign_keys")]
        )
        assert writer == ["wal", 2, 1]  # synchronous 2 = FULL
        reader = await store._read(
            lambda c: [c.execute(f"PRAGMA {p}").fetchone()[0] for p in ("synchronous", "foreign_keys", "query_only")]
        )
        assert reader == [2, 1, 1]
        with pytest.raises(Exception, match="readonly"):
            await store._read(lambda c: c.execute("DELETE FROM users"))


async def test_the_database_and_its_side_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0)  # even a careless umask must not expose password hashes
    try:
        async with SQLiteStore(tmp_path / "new" / "a.db") as store:
            assert await store.create_user(User("ada"))
            files = [tmp_path / "new" / f"a.db{suffix}" for suffix in ("", "-wal", "-shm")]
            assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
    finally:
        os.umask(old)


async def test_opening_tightens_a_database_left_readable(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    async with SQLiteStore(db):
        pass
    db.chmod(0o644)
    async with SQLiteStore(db) as store:
        assert mode(db) == 0o600
        assert await store.create_user(User("ada"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """``tmp_path`` as /proc/self/fd names it (no symlinks)."""
    return tmp_path.resolve()


async def test_a_new_database_and_the_directories_made_for_it_are_fsynced_into_their_parents(
    root: Path, fsynced: Synced
) -> None:
    """The database file (and the data directory, made if missing) was created and never fsynced into its
    directory: a power cut right after the first start could lose its name, and so the data. SQLite fsyncs
    the directory of a -wal or -journal it creates, not of the database. Each directory made, and the
    directory of the new file, is now fsynced once the entry is in it."""
    db = root / "data" / "sub" / "a.db"
    async with SQLiteStore(db) as store:
        assert await store.create_user(User("ada"))
    assert fsynced == [(root, ["data"]), (root / "data", ["sub"]), (root / "data" / "sub", ["a.db"])]

    fsynced.clear()
    async with SQLiteStore(db) as store:  # nothing new: no directory to sync
        assert await store.get_user("ada") is not None
    assert fsynced == []

    os.close(os.open(root / "data" / "sub" / "b.db", os.O_CREAT | os.O_WRONLY, 0o600))  # an existing (empty) file
    async with SQLiteStore(root / "data" / "sub" / "b.db"):
        pass
    assert fsynced == []


# -- group commit -------------------------------------------------------------------------------


async def test_concurrent_writes_share_transactions(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "a.db") as store:
        results = await asyncio.gather(*(store.create_user(User(f"u{i:03}")) for i in range(200)))
        assert results == [True] * 200
        assert store.stats["writes"] == 200
        assert store.stats["commits"] <= 10, store.stats  # typically 2: the first write, then the rest
        assert len(await store.list_users()) == 200


async def test_sequential_writes_each_commit_before_returning(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "a.db") as store:
        for i in range(5):
            assert await store.create_user(User(f"u{i}"))
            assert store.stats["commits"] == i + 1


async def test_a_write_that_raises_is_rolled_back_alone_within_the_group(tmp_path: Path) -> None:
    def half_done_then_fails(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO users (name) VALUES ('half')")
        raise ValueError("changed my mind")

    async with SQLiteStore(tmp_path / "a.db") as store:
        before = store.stats["commits"]
        results = await asyncio.gather(
            store.create_user(User("a")),
            store._write(half_done_then_fails),
            store.create_user(User("b")),
            return_exceptions=True,
        )
        assert results[0] is True and results[2] is True
        assert isinstance(results[1], ValueError)
        assert store.stats["commits"] == before + 1  # all three shared one transaction
        assert store.stats["rerun_groups"] == 1  # tried without savepoints, then again with them
        assert [u.name for u in await store.list_users()] == ["a", "b"]  # no trace of 'half'


async def test_a_group_that_runs_again_runs_every_write_again_in_a_new_transaction(tmp_path: Path) -> None:
    calls: list[tuple[str, int]] = []

    async with SQLiteStore(tmp_path / "a.db") as store:

        def counted(name: str) -> Callable[[sqlite3.Connection], int]:
            def insert(conn: sqlite3.Connection) -> int:
                calls.append((name, store._tx_serial))
                conn.execute("INSERT INTO users (name) VALUES (?)", (name,))
                return len(calls)

            return insert

        def fails(conn: sqlite3.Connection) -> None:
            calls.append(("fails", store._tx_serial))
            conn.execute("INSERT INTO users (name) VALUES ('partial')")
            raise ValueError("no")

        results = await asyncio.gather(
            store._write(counted("a")), store._write(fails), store._write(counted("b")), return_exceptions=True
        )
        # First run: a, then fails (b never ran); the rerun, one transaction later, runs all three.
        first, again = calls[0][1], calls[0][1] + 1
        assert calls == [("a", first), ("fails", first), ("a", again), ("fails", again), ("b", again)]
        assert results[0] == 3 and results[2] == 5  # each write returns its last run's result
        assert isinstance(results[1], ValueError)
        assert [u.name for u in await store.list_users()] == ["a", "b"]  # once each, nothing partial


async def test_after_a_rerun_groups_run_isolated_for_a_while(tmp_path: Path) -> None:
    # A steady stream of failing writes must not run every group twice.
    def fails(conn: sqlite3.Connection) -> None:
        raise ValueError("no")

    async with SQLiteStore(tmp_path / "a.db") as store:
        for i in range(40):
            ok, failed = await asyncio.gather(
                store.create_user(User(f"u{i:02}")), store._write(fails), return_exceptions=True
            )
            assert ok is True and isinstance(failed, ValueError)
        assert store.stats["commits"] == 40
        assert 1 <= store.stats["rerun_groups"] <= 3, store.stats  # one rerun per 17 groups at most
        assert len(await store.list_users()) == 40


async def test_a_write_that_ends_the_transaction_fails_its_group(tmp_path: Path) -> None:
    # Against the contract, but must not let later writes run outside a transaction.
    async with SQLiteStore(tmp_path / "a.db") as store:
        results = await asyncio.gather(
            store.create_user(User("a")),
            store._write(lambda c: c.execute("ROLLBACK")),
            store.create_user(User("b")),
            return_exceptions=True,
        )
        assert [type(r) for r in results] == [Unavailable] * 3
        assert await store.list_users() == []
        assert await store.create_user(User("c"))
        assert [u.name for u in await store.list_users()] == ["c"]


# -- before-commit hooks ------------------------------------------------------------------------


async def test_before_commit_hooks_run_once_per_group_after_the_last_write(tmp_path: Path) -> None:
    seen: list[list[str]] = []

    async with SQLiteStore(tmp_path / "a.db") as store:

        def hook(conn: sqlite3.Connection) -> None:
            seen.append([row[0] for row in conn.execute("SELECT name FROM users ORDER BY name")])

        def insert_and_hook(name: str) -> Callable[[sqlite3.Connection], None]:
            def insert(conn: sqlite3.Connection) -> None:
                conn.execute("INSERT INTO users (name) VALUES (?)", (name,))
                store._before_commit["test"] = hook

            return insert

        await asyncio.gather(*(store._write(insert_and_hook(f"u{i}")) for i in range(5)), store.create_user(User("z")))
        assert seen == [["u0", "u1", "u2", "u3", "u4", "z"]]  # once, seeing every write of the group
        assert store._before_commit == {}
        await store.create_user(User("later"))
        assert len(seen) == 1  # not carried into the next transaction


async def test_a_failing_hook_fails_its_group_and_is_dropped(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "a.db") as store:

        def broken_hook(conn: sqlite3.Connection) -> None:
            raise RuntimeError("hook bug")

        def registers(conn: sqlite3.Connection) -> None:
            store._before_commit["test"] = broken_hook

        results = await asyncio.gather(store.create_user(User("a")), store._write(registers), return_exceptions=True)
        assert [type(r) for r in results] == [InternalError, InternalError]
        assert store.stats["failed_commits"] == 1
        assert await store.list_users() == []
        assert await store.create_user(User("b"))  # the hook is gone with its transaction
        assert [u.name for u in await store.list_users()] == ["b"]


async def test_a_failed_commit_fails_the_whole_group_and_the_store_carries_on(tmp_path: Path) -> None:
    def breaks_the_commit(conn: sqlite3.Connection) -> None:
        # A deferred foreign-key violation passes the statement and fails only at COMMIT.
        conn.execute("PRAGMA defer_foreign_keys=ON")
        conn.execute("INSERT INTO tokens (id, digest, username) VALUES ('t', 'd', 'ghost')")

    async with SQLiteStore(tmp_path / "a.db") as store:
        results = await asyncio.gather(
            store.create_user(User("a")), store._write(breaks_the_commit), return_exceptions=True
        )
        assert [type(r) for r in results] == [Unavailable, Unavailable]
        assert store.stats["failed_commits"] == 1
        assert await store.list_users() == []  # nothing of the group was saved
        assert await store.create_user(User("a"))  # and the next group commits normally
        assert [u.name for u in await store.list_users()] == ["a"]


async def test_max_batch_bounds_a_group(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "a.db", max_batch=10) as store:
        assert all(await asyncio.gather(*(store.create_user(User(f"u{i:02}")) for i in range(50))))
        assert store.stats["largest_batch"] == 10
        assert store.stats["commits"] >= 5


# -- batched writes -----------------------------------------------------------------------------


async def test_neighbouring_batched_writes_run_in_one_call_of_their_batch(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def batch(conn: sqlite3.Connection, items: list[Any]) -> list[Any]:
        calls.append(list(items))
        conn.executemany("INSERT INTO users (name) VALUES (?)", [(item,) for item in items])
        return [f"{item}!" for item in items]

    async with SQLiteStore(tmp_path / "a.db") as store:
        results = await asyncio.gather(
            store._write_batched(batch, "a"),
            store._write_batched(batch, "b"),
            store.create_user(User("plain")),
            store._write_batched(batch, "c"),
            store._write_batched(batch, "d"),
            store._write_batched(batch, "e"),
        )
        assert results == ["a!", "b!", True, "c!", "d!", "e!"]  # each item its own result
        assert calls == [["a", "b"], ["c", "d", "e"]]  # a plain write in between cuts the run
        assert store.stats["commits"] == 1
        assert [u.name for u in await store.list_users()] == ["a", "b", "c", "d", "e", "plain"]


async def test_a_batched_write_is_queued_when_awaited_and_only_once(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def batch(conn: sqlite3.Connection, items: list[Any]) -> list[Any]:
        calls.append(list(items))
        return [f"{item}!" for item in items]

    async with SQLiteStore(tmp_path / "a.db") as store:
        later = store._write_batched(batch, "later")  # not queued yet: nothing awaits it
        assert await store._write_batched(batch, "now") == "now!"
        assert calls == [["now"]]
        assert await later == "later!"
        assert calls == [["now"], ["later"]]
        with pytest.raises(RuntimeError, match="only once"):
            await later
        assert store.stats["writes"] == 2


async def test_a_batch_that_raises_runs_again_one_item_at_a_time(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def batch(conn: sqlite3.Connection, items: list[Any]) -> list[Any]:
        calls.append(list(items))
        for item in items:
            conn.execute("INSERT INTO users (name) VALUES (?)", (item,))
            if item == "bad":
                raise ValueError("bad item")
        return [len(calls)] * len(items)

    async with SQLiteStore(tmp_path / "a.db") as store:
        results = await asyncio.gather(
            *(store._write_batched(batch, item) for item in ("a", "bad", "b")), return_exceptions=True
        )
        assert calls == [["a", "bad", "b"], ["a"], ["bad"], ["b"]]  # together, then isolated
        assert results[0] == 2 and results[2] == 4 and isinstance(results[1], ValueError)
        assert store.stats["rerun_groups"] == 1
        assert [u.name for u in await store.list_users()] == ["a", "b"]  # nothing of the bad item


async def test_a_batch_must_give_one_result_per_item(tmp_path: Path) -> None:
    def short(conn: sqlite3.Connection, items: list[Any]) -> list[Any]:
        return [None]

    async with SQLiteStore(tmp_path / "a.db") as store:
        results = await asyncio.gather(*(store._write_batched(short, i) for i in range(3)), return_exceptions=True)
        # Together the batch breaks its contract (the group runs again, isolated); alone it keeps it.
        assert results == [None, None, None]
        assert store.stats["rerun_groups"] == 1


# -- concurrent readers -------------------------------------------------------------------------


async def test_puts_of_large_values_go_out_in_chunks_capped_by_their_bytes(tmp_path: Path) -> None:
    # A commit's puts go out as multi-row statements (kv_rows.py), each with its statement journal in
    # memory (temp_store=MEMORY): one overwriting 64 large values would hold tens of MiB of it. So a
    # chunk also stops at MAX_CHUNK_BYTES of values; a chunk of small values is still up to 64 rows.
    from bastion.store.kv import KVWrite
    from bastion.store.kv_rows import MAX_CHUNK_BYTES

    size, n, now = 1536 * 1024, 6, 1_000_000.0
    assert 2 * size <= MAX_CHUNK_BYTES < 4 * size  # the batch is cut, yet not into single rows
    chunks: list[int] = []  # rows of each chunk's kv_log insert, read from the SQL SQLite ran (the upsert's
    # is traced again for each run of its trigger)

    def traced(sql: str) -> None:
        if sql.startswith("INSERT INTO kv_log"):
            chunks.append(max(1, sql.count(" + ")))  # a row's revision: "?1 + i", here "FIRST + i"

    async with SQLiteStore(tmp_path / "a.db") as store:
        for round in range(2):  # new keys, then each overwritten (traced: SQLite expands each value in hex)
            if round:
                await store._write(lambda c: c.set_trace_callback(traced))
            value = [bytes([round * n + i]) * size for i in range(n)]
            results = await asyncio.gather(*(store.kv_put("~ada", [KVWrite(f"k{i}", value[i])], now) for i in range(n)))
            assert results == [[round * n + i + 1] for i in range(n)]  # as one statement per row gives
        await store._write(lambda c: c.set_trace_callback(None))
        for i in range(n):
            (entry,) = await store.kv_get_many("~ada", [f"k{i}"], now)
            assert entry is not None and (entry.value, entry.version) == (value[i], n + i + 1)
        changes = await store.kv_changes(0, None, 100)
        assert [(c.revision, c.key, c.value) for c in changes] == [
            (r * n + i + 1, f"k{i}", bytes([r * n + i]) * size) for r in range(2) for i in range(n)
        ]
    assert sum(chunks) == n
    assert max(chunks) * size <= MAX_CHUNK_BYTES, chunks
    assert max(chunks) > 1, chunks  # the later puts were gathered: still several rows a statement


async def test_reads_run_in_parallel_and_are_not_held_up_by_a_commit(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "a.db", readers=4) as store:
        assert await store.create_user(User("ada"))
        # Four reads that each wait for the other three: only possible if they run at once.
        barrier = threading.Barrier(4, timeout=5)
        assert await asyncio.gather(*(store._read(lambda c: barrier.wait() >= 0) for _ in range(4))) == [True] * 4
        # A write holding the writer does not hold up reads, which see the last commit.
        release = threading.Event()
        slow = asyncio.create_task(store._write(lambda c: (c.execute("DELETE FROM users"), release.wait(5))))
        await asyncio.sleep(0.05)
        assert [u.name for u in await store.list_users()] == ["ada"]
        assert not slow.done()
        release.set()
        await slow
        assert await store.list_users() == []


# -- durability across a crash ------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from bastion.security.credentials import User
    from bastion.store import open_store

    async def main(path):
        async with open_store(path) as store:
            async def writer(k):
                i = 0
                while True:
                    name = f"w{k}-{i}"
                    assert await store.create_user(User(name))
                    print(name, flush=True)  # acknowledged: committed
                    i += 1
            await asyncio.gather(*(writer(k) for k in range(8)))

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_every_acknowledged_write_survives_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, str(db), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    acknowledged: list[str] = []
    try:
        while len(acknowledged) < 400:  # kill it mid-stream, with writes in flight
            line = await asyncio.wait_for(proc.stdout.readline(), 5)
            assert line.endswith(b"\n"), (line, await proc.stderr.read() if proc.stderr else b"")
            acknowledged.append(line.decode().strip())
    finally:
        proc.kill()  # SIGKILL: no close(), no atexit, no checkpoint
    rest = await proc.stdout.read()
    assert await proc.wait() == -9
    acknowledged += [line.decode() for line in rest.split(b"\n")[:-1]]  # only complete lines were acknowledged
    assert (tmp_path / "crash.db-wal").exists()  # the writes were still in the WAL, not checkpointed away
    async with SQLiteStore(db) as store:
        present = {u.name for u in await store.list_users()}
    missing = set(acknowledged) - present
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {sorted(missing)[:5]}"


async def test_a_roles_holders_are_read_through_an_index_not_a_scan_of_users(tmp_path: Path) -> None:
    from bastion.store.credentials_sqlite import _USERS_WITH_ROLE

    async with SQLiteStore(tmp_path / "a.db") as store:
        plan = await store._read(lambda c: c.execute(f"EXPLAIN QUERY PLAN {_USERS_WITH_ROLE}", ("ops", 10)).fetchall())
    details = " | ".join(str(row[-1]) for row in plan)
    assert "SEARCH user_roles USING PRIMARY KEY (role=?)" in details and "users" not in details.replace(
        "user_roles", ""
    )
