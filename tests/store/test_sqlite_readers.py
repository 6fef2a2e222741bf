"""The SQLite store's readers (bastion/store/sqlite_readers.py): the reads of a loop turn, handed to the
reader threads together. Real SQLite files in tmp_path, real threads."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from bastion.exceptions import Unavailable
from bastion.security.credentials import User
from bastion.store import SQLiteStore
from bastion.store.sqlite_readers import Readers


def translate(exc: Exception) -> Exception:
    return Unavailable(f"store: {exc}") if isinstance(exc, sqlite3.OperationalError) else exc


def connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "a.db"
    conn = connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"v{i}") for i in range(100)])
    conn.close()
    return path


def value_of(k: int) -> Callable[[sqlite3.Connection], str]:
    return lambda c: str(c.execute("SELECT v FROM t WHERE k = ?", (k,)).fetchone()[0])


async def test_every_read_of_a_turn_gets_its_own_answer(db: Path) -> None:
    conns = [connect(db) for _ in range(4)]
    readers = Readers(conns, asyncio.get_running_loop(), translate, batch_size=16)
    threads: list[str] = []

    def read(k: int) -> Callable[[sqlite3.Connection], str]:
        def fn(c: sqlite3.Connection) -> str:
            threads.append(threading.current_thread().name)
            return value_of(k)(c)

        return fn

    futures = [readers.read(read(k)) for k in range(64)]  # one loop turn
    assert await asyncio.gather(*futures) == [f"v{k}" for k in range(64)]
    assert len(threads) == 64 and len(set(threads)) <= 4  # each ran once, on the reader threads
    await readers.stop()


async def test_reads_of_one_turn_run_at_once_on_as_many_threads(db: Path) -> None:
    readers = Readers([connect(db) for _ in range(3)], asyncio.get_running_loop(), translate)
    barrier = threading.Barrier(3, timeout=5)  # only passes if all three run at the same time
    assert await asyncio.gather(*(readers.read(lambda c: barrier.wait() >= 0) for _ in range(3))) == [True] * 3
    await readers.stop()


async def test_a_read_that_raises_fails_alone_and_sqlite_errors_are_translated(db: Path) -> None:
    readers = Readers([connect(db)], asyncio.get_running_loop(), translate)

    def broken(c: sqlite3.Connection) -> str:
        return str(c.execute("SELECT nope FROM t").fetchone())

    def bug(c: sqlite3.Connection) -> str:
        raise KeyError("a bug in the read function")

    outcomes = await asyncio.gather(
        readers.read(value_of(1)),
        readers.read(broken),
        readers.read(bug),
        readers.read(value_of(2)),
        return_exceptions=True,
    )
    assert outcomes[0] == "v1" and outcomes[3] == "v2"
    assert isinstance(outcomes[1], Unavailable) and "no such column" in str(outcomes[1])
    assert isinstance(outcomes[2], KeyError)
    await readers.stop()


async def test_a_cancelled_read_leaves_the_rest_of_its_batch_answered(db: Path) -> None:
    readers = Readers([connect(db)], asyncio.get_running_loop(), translate)
    release = threading.Event()
    slow = readers.read(lambda c: release.wait(5))
    await asyncio.sleep(0)  # the slow read is handed over: the next ones queue behind it
    first, cancelled, last = readers.read(value_of(1)), readers.read(value_of(2)), readers.read(value_of(3))
    cancelled.cancel()
    release.set()
    assert await asyncio.gather(slow, first, last) == [True, "v1", "v3"]
    assert cancelled.cancelled()
    await readers.stop()


def loop_errors() -> list[dict[str, object]]:
    """What reaches the running loop's exception handler from now on."""
    seen: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: seen.append(context))
    return seen


async def test_stop_runs_every_read_queued_before_it(db: Path) -> None:
    errors = loop_errors()
    readers = Readers([connect(db), connect(db)], asyncio.get_running_loop(), translate, batch_size=3)
    futures = [readers.read(value_of(k)) for k in range(20)]  # not yet handed over: stop does it
    await readers.stop()  # the threads have ended: every read ran, its answer is on its way to the loop
    assert await asyncio.wait_for(asyncio.gather(*futures), 5) == [f"v{k}" for k in range(20)]
    await asyncio.sleep(0)  # the end-of-turn hand-off read() scheduled has run: it found nothing to do
    assert errors == []


async def test_a_read_raising_anything_fails_alone_and_its_thread_reads_on(db: Path) -> None:
    errors = loop_errors()
    readers = Readers([connect(db)], asyncio.get_running_loop(), translate)

    def exits(c: sqlite3.Connection) -> str:
        raise SystemExit(3)

    def stops(c: sqlite3.Connection) -> str:
        return str(next(iter(c.execute("SELECT v FROM t WHERE k = -1"))))  # no row: StopIteration

    def bad_translate(exc: Exception) -> Exception:
        raise ValueError("the translation failed")

    outcomes = await asyncio.gather(
        readers.read(value_of(1)), readers.read(exits), readers.read(stops), readers.read(value_of(2)),
        return_exceptions=True,
    )  # fmt: skip
    assert outcomes[0] == "v1" and outcomes[3] == "v2"
    assert isinstance(outcomes[1], SystemExit) and outcomes[1].code == 3
    assert isinstance(outcomes[2], RuntimeError) and isinstance(outcomes[2].__cause__, StopIteration)
    assert await readers.read(value_of(3)) == "v3"  # the one thread lives on
    await readers.stop()
    odd = Readers([connect(db)], asyncio.get_running_loop(), bad_translate)
    broken = odd.read(lambda c: c.execute("SELECT nope FROM t").fetchone())
    with pytest.raises(ValueError, match="the translation failed"):
        await broken
    assert await odd.read(value_of(4)) == "v4"
    await odd.stop()
    assert errors == []


async def test_no_read_waits_behind_a_slow_one_while_a_thread_is_free(db: Path) -> None:
    readers = Readers([connect(db), connect(db)], asyncio.get_running_loop(), translate)
    release = threading.Event()
    slow = readers.read(lambda c: release.wait(10))
    fast = [readers.read(value_of(k)) for k in range(8)]  # the same turn: the other thread takes them
    try:
        assert await asyncio.wait_for(asyncio.gather(*fast), 5) == [f"v{k}" for k in range(8)]
        assert not slow.done()
    finally:
        release.set()
    assert await slow is True
    await readers.stop()


async def test_a_read_cancelled_before_it_starts_is_skipped(db: Path) -> None:
    readers = Readers([connect(db)], asyncio.get_running_loop(), translate)
    release = threading.Event()
    ran: list[int] = []
    slow = readers.read(lambda c: release.wait(5))
    await asyncio.sleep(0)  # handed over: the one thread is busy with it
    skipped = readers.read(lambda c: ran.append(1))
    kept = readers.read(lambda c: ran.append(2))
    skipped.cancel()
    release.set()
    await asyncio.gather(slow, kept)
    assert ran == [2] and skipped.cancelled()
    await readers.stop()


async def test_the_store_answers_many_concurrent_reads_and_sees_each_acknowledged_write(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "a.db", readers=2) as store:
        for round_ in range(5):
            assert await store.create_user(User(f"u{round_}"))
            users = await asyncio.gather(*(store.get_user(f"u{i}") for i in range(round_ + 1)))
            assert [u.name for u in users if u is not None] == [f"u{i}" for i in range(round_ + 1)]
        assert await asyncio.gather(*(store.get_user("nobody") for _ in range(50))) == [None] * 50


async def test_store_functions_raising_stopiteration_fail_alone_and_the_writer_carries_on(tmp_path: Path) -> None:
    from bastion.exceptions import InternalError

    def no_row(c: sqlite3.Connection) -> object:
        return next(iter(c.execute("SELECT name FROM users WHERE name = 'nobody'")))

    async with SQLiteStore(tmp_path / "a.db") as store:
        with pytest.raises(InternalError, match="StopIteration"):
            await store._read(no_row)
        write, created = await asyncio.gather(
            store._write(no_row), store.create_user(User("ada")), return_exceptions=True
        )
        assert isinstance(write, InternalError) and created is True
        assert await store.create_user(User("bob"))  # the writer is still writing
        assert [u.name for u in await store.list_users()] == ["ada", "bob"]
