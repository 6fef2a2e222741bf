"""A keyed unary call whose connection is lost runs to its end, and its repeat gets the first answer.

A real server (in-process, loopback TCP) with an SQLite idempotency store. The
first attempt comes over a raw connection that is reset mid-call, as a client's
connection is in a failover; the repeat comes from a ``Client`` on a new
connection. An explicit Cancel still cancels, the call's deadline still bounds
it, ``limits.max_detached_calls`` (and its per-principal twin) cap the calls
run on this way, and a drain waits for them within its grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import msgspec
import pytest

import bastion
from bastion import Principal, Server, Service
from bastion.config import ServerLimits
from bastion.security.authn import Authenticator, PeerInfo, StaticTokens
from bastion.server.dispatch import IdempotencyKeys
from bastion.store import open_store
from tests.support.stores import store_location

HELLO, WELCOME, CALL, CANCEL = 1, 2, 3, 6
TOKEN = "bst_detached-keyed-token-0123456789abcdef"
ADA = Principal("ada", frozenset({"user"}))
REVOCABLE_ADA = Principal("ada", frozenset({"user"}), mechanism="token", token_id="t1")  # revalidated


class Revocable:
    """ada's token, revalidated (a revocable credential) until ``revoked`` is set."""

    def __init__(self) -> None:
        self.revoked = False
        self.revalidations = 0

    async def authenticate(self, token: str | None, peer: PeerInfo) -> Principal:
        return REVOCABLE_ADA

    async def revalidate(self, principal: Principal) -> Principal | None:
        self.revalidations += 1
        return None if self.revoked else principal


class Handler:
    """The slow method's runs: entered, ended (its answer) or cancelled, by tag."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.runs: list[str] = []
        self.ended: list[str] = []
        self.cancelled: list[str] = []


def make_service(handler: Handler) -> Service:
    svc = Service("slow")

    @svc.method
    async def apply(tag: str) -> str:
        handler.runs.append(tag)  # the effect happens first...
        try:
            await handler.release.wait()  # ...then the connection is lost before the answer
        except asyncio.CancelledError:
            handler.cancelled.append(tag)
            raise
        handler.ended.append(tag)
        return f"applied {tag}"

    return svc


def frame(message: object) -> bytes:
    body = msgspec.msgpack.encode(message)
    return len(body).to_bytes(4, "big") + body


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def first_attempt(port: int, tag: str, key: str, timeout_ms: int | None = None) -> asyncio.StreamWriter:
    """A raw connection that has made the keyed call ``slow.apply(tag)``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(frame([HELLO, 1, "detach-test/1", TOKEN, 16, 1 << 20, {}]))
    length = int.from_bytes(await reader.readexactly(4), "big")
    assert msgspec.msgpack.decode(await reader.readexactly(length))[0] == WELCOME
    writer.write(frame([CALL, 1, "slow.apply", {"tag": tag}, timeout_ms, None, False, {"idempotency-key": key}]))
    return writer


def reset(writer: asyncio.StreamWriter) -> None:
    """Lose the connection as a network does: no Cancel, no close handshake."""
    writer.transport.abort()


async def lose_first_attempt(
    server: Server, handler: Handler, tag: str, key: str, timeout_ms: int | None = None
) -> None:
    """The keyed call ``slow.apply(tag)`` started on a raw connection, which is then lost (``reset``)."""
    writer = await first_attempt(server.port, tag, key, timeout_ms)
    await until(lambda: handler.runs == [tag], "the first attempt to start")
    reset(writer)
    await until(lambda: server.stats()["connections"] == 1, "the server to see the connection lost")


@contextlib.asynccontextmanager
async def keys_table_held(location: str) -> AsyncIterator[None]:
    """Another client holds the idempotency keys' table (PostgreSQL): recording an answer waits on it."""
    other = await asyncpg.connect(location)
    try:
        async with other.transaction():
            await other.execute("LOCK TABLE idempotency_keys IN EXCLUSIVE MODE")
            yield
    finally:
        await other.close()


def run(
    tmp_path: Path,
    body: Callable[[Server, Handler, bastion.Client], Awaitable[None]],
    limits: ServerLimits | None = None,
    lease: float = 30.0,
    authenticator: Authenticator | None = None,
    store_at: str | None = None,
) -> None:
    async def main() -> None:
        handler = Handler()
        server = Server(
            [make_service(handler)],
            authenticator=authenticator or StaticTokens({TOKEN: ADA}),
            limits=limits,
            revalidate_interval=0.05,
        )
        await server.start("127.0.0.1", 0)
        try:
            async with open_store(store_at or tmp_path / "keys.db") as store:
                server.idempotency = IdempotencyKeys(store, lease=lease, wait=2.0)
                client = bastion.Client(f"127.0.0.1:{server.port}", token=TOKEN, insecure=True, timeout=5)
                async with client:
                    await client.connect()  # the one connection open besides the first attempts'
                    await body(server, handler, client)
                await server.shutdown(grace=1)
        finally:
            handler.release.set()
            await server.shutdown(grace=1)

    async def guarded() -> None:
        async with asyncio.timeout(30):
            await main()

    asyncio.run(guarded())


def detached(server: Server) -> int:
    assert server.idempotency is not None
    return server.idempotency.stats()["detached_calls"]


def test_a_keyed_call_whose_connection_drops_runs_on_and_its_repeat_gets_the_first_answer(tmp_path: Path) -> None:
    async def body(server: Server, handler: Handler, client: bastion.Client) -> None:
        await lose_first_attempt(server, handler, "a", "k1")
        assert handler.cancelled == [] and detached(server) == 1  # it runs on
        # The repeat arrives while it runs, on a new connection: it waits for the first answer.
        repeat = asyncio.ensure_future(client.invoke("slow.apply", {"tag": "a"}, idempotency_key="k1"))
        await until(lambda: server.stats()["calls_in_flight"] == 2, "the repeat to wait")
        handler.release.set()
        assert await repeat == "applied a"
        assert detached(server) == 0
        # Once recorded, any repeat gets it at once; the handler ran once.
        assert await client.invoke("slow.apply", {"tag": "a"}, idempotency_key="k1") == "applied a"
        assert handler.runs == ["a"] and handler.ended == ["a"] and handler.cancelled == []
        assert server.idempotency is not None and server.idempotency.stats()["detached_calls_total"] == 1

    run(tmp_path, body)


def test_an_explicit_cancel_still_cancels_a_keyed_call(tmp_path: Path) -> None:
    async def body(server: Server, handler: Handler, client: bastion.Client) -> None:
        writer = await first_attempt(server.port, "c", "k2")
        await until(lambda: handler.runs == ["c"], "the first attempt to start")
        writer.write(frame([CANCEL, 1]))
        await until(lambda: handler.cancelled == ["c"], "the Cancel to cancel it")
        reset(writer)
        await until(lambda: server.stats()["connections"] == 1, "the server to see the connection lost")
        assert detached(server) == 0
        # It may have taken effect: its claim is kept, as before, and it never runs twice.
        client.retry = None  # the UNAVAILABLE itself, not the client's retries of it
        with pytest.raises(bastion.Unavailable, match="still running"):
            await client.invoke("slow.apply", {"tag": "c"}, idempotency_key="k2")
        assert handler.runs == ["c"]

    run(tmp_path, body)


def test_a_detached_call_is_still_bounded_by_its_deadline(tmp_path: Path) -> None:
    async def body(server: Server, handler: Handler, client: bastion.Client) -> None:
        await lose_first_attempt(server, handler, "d", "k3", timeout_ms=500)
        await until(lambda: handler.cancelled == ["d"], "its deadline to cancel it")
        await until(lambda: detached(server) == 0, "the detached call to end")
        assert handler.ended == []

    run(tmp_path, body)


def test_a_detached_call_without_a_deadline_is_bounded_by_its_claims_lease(tmp_path: Path) -> None:
    async def body(server: Server, handler: Handler, client: bastion.Client) -> None:
        await lose_first_attempt(server, handler, "e", "k8")
        assert detached(server) == 1
        await until(lambda: handler.cancelled == ["e"], "its lease to run out")
        await until(lambda: detached(server) == 0, "the detached call to end")
        client.retry = None  # its lease is over: abandoned, outcome unknown
        with pytest.raises(bastion.Aborted):
            await client.invoke("slow.apply", {"tag": "e"}, idempotency_key="k8")
        assert handler.runs == ["e"] and handler.ended == []

    run(tmp_path, body, lease=1.0)


@pytest.mark.parametrize(
    "limits",
    [ServerLimits(max_detached_calls=1), ServerLimits(max_detached_calls_per_principal=1)],
    ids=["server-wide", "per-principal"],
)
def test_the_detached_calls_are_capped(tmp_path: Path, limits: ServerLimits) -> None:
    async def body(server: Server, handler: Handler, client: bastion.Client) -> None:
        first = await first_attempt(server.port, "x", "k4")
        second = await first_attempt(server.port, "y", "k5")
        await until(lambda: sorted(handler.runs) == ["x", "y"], "both attempts to start")
        reset(first)
        await until(lambda: detached(server) == 1, "the first to run on")
        reset(second)
        await until(lambda: handler.cancelled == ["y"], "the second, past the cap, to be cancelled as before")
        assert server.idempotency is not None and server.idempotency.stats()["detached_calls_refused"] == 1
        handler.release.set()
        await until(lambda: detached(server) == 0, "the detached call to end")
        assert await client.invoke("slow.apply", {"tag": "x"}, idempotency_key="k4") == "applied x"
        client.retry = None  # the UNAVAILABLE itself, not the client's retries of it
        with pytest.raises(bastion.Unavailable, match="still running"):  # cancelled: outcome unknown, as before
            await client.invoke("slow.apply", {"tag": "y"}, idempotency_key="k5")
        assert sorted(handler.runs) == ["x", "y"]

    run(tmp_path, body, limits)


def test_a_drain_waits_for_detached_calls(tmp_path: Path) -> None:
    async def body(server: Server, handler: Handler, client: bastion.Client) -> None:
        await lose_first_attempt(server, handler, "g", "k6")
        draining = asyncio.ensure_future(server.shutdown(grace=10))
        await until(lambda: server.draining, "the drain to begin")
        done, _ = await asyncio.wait([draining], timeout=0.3)
        assert not done and handler.cancelled == []  # the drain waits for the detached call
        handler.release.set()
        await draining
        assert handler.ended == ["g"]
        assert server.idempotency is not None
        record = await server.idempotency.store.idempotency_get("ada", "k6")
        assert record is not None and record.state == "done"  # its answer was recorded

    run(tmp_path, body)


def test_a_drain_cancels_detached_calls_when_its_grace_runs_out(tmp_path: Path) -> None:
    async def body(server: Server, handler: Handler, client: bastion.Client) -> None:
        await lose_first_attempt(server, handler, "h", "k7")
        assert handler.cancelled == []
        await asyncio.wait_for(server.shutdown(grace=0.3), 5)
        assert handler.cancelled == ["h"] and handler.ended == []
        assert detached(server) == 0

    run(tmp_path, body)


def test_a_revoked_credential_still_cancels_a_detached_call(tmp_path: Path) -> None:
    authenticator = Revocable()

    async def body(server: Server, handler: Handler, client: bastion.Client) -> None:
        await lose_first_attempt(server, handler, "r", "k9")
        assert detached(server) == 1 and handler.cancelled == []
        seen = authenticator.revalidations
        await until(lambda: authenticator.revalidations > seen, "revalidation to go on for the detached call")
        assert handler.cancelled == []  # still good: it runs on
        authenticator.revoked = True
        await until(lambda: handler.cancelled == ["r"], "revalidation to cancel the detached call")
        await until(lambda: detached(server) == 0, "the detached call to end")
        assert handler.ended == [] and not [s for s in server.sessions if s.lost]

    run(tmp_path, body, authenticator=authenticator)


def test_revalidation_of_a_detached_session_stops_with_its_last_call(tmp_path: Path) -> None:
    authenticator = Revocable()

    async def body(server: Server, handler: Handler, client: bastion.Client) -> None:
        await lose_first_attempt(server, handler, "s", "k10")
        (gone,) = [s for s in server.sessions if s.lost]
        assert gone._revalidation is not None and not gone._revalidation.done()
        handler.release.set()
        await until(lambda: detached(server) == 0, "the detached call to end")
        await until(lambda: gone._revalidation is None or gone._revalidation.done(), "its revalidation to stop")
        assert handler.ended == ["s"]

    run(tmp_path, body, authenticator=authenticator)


def test_a_connection_closed_for_abuse_leaves_no_keyed_call_running_on(tmp_path: Path) -> None:
    async def body(server: Server, handler: Handler, client: bastion.Client) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(frame([HELLO, 1, "detach-test/1", TOKEN, 16, 1 << 20, {}]))
        length = int.from_bytes(await reader.readexactly(4), "big")
        assert msgspec.msgpack.decode(await reader.readexactly(length))[0] == WELCOME
        # One read: a keyed call (its task starts after the read), then Cancels past the cap: the abuse
        # close comes before the keyed call has claimed its key, and the connection is gone after it has.
        writer.write(
            frame([CALL, 1, "slow.apply", {"tag": "q"}, None, None, False, {"idempotency-key": "k11"}])
            + frame([CALL, 3, "slow.apply", {"tag": "p1"}, None, None, False, None])
            + frame([CALL, 5, "slow.apply", {"tag": "p2"}, None, None, False, None])
            + frame([CANCEL, 3])
            + frame([CANCEL, 5])
        )
        await until(lambda: server.counters["closed_abuse"] == 1, "the abuse close")
        await until(lambda: server.stats()["connections"] == 1, "the server to see the connection closed")
        assert detached(server) == 0
        await until(lambda: not [s for s in server.sessions if s.lost], "the closed session to go")
        assert "q" not in handler.ended
        writer.close()

    run(tmp_path, body, ServerLimits(max_cancels_per_10s=1))


def test_a_detached_session_keeps_no_partial_frame(tmp_path: Path) -> None:
    async def body(server: Server, handler: Handler, client: bastion.Client) -> None:
        writer = await first_attempt(server.port, "f", "k12")
        await until(lambda: handler.runs == ["f"], "the first attempt to start")
        writer.write((900_000).to_bytes(4, "big") + b"\x00" * 450_000)  # half a frame, then the connection is lost
        await until(lambda: any(s.core.reader.buffered for s in server.sessions), "the half frame to arrive")
        (session,) = [s for s in server.sessions if s.core.reader.buffered]
        reset(writer)
        await until(lambda: session.lost, "the server to see the connection lost")
        assert detached(server) == 1  # it lives on for its call...
        assert session.core.reader.buffered == 0 and session.core.reader._parts == []  # ...without the bytes
        assert session.core.pending_output == 0
        handler.release.set()
        await until(lambda: detached(server) == 0, "the detached call to end")

    run(tmp_path, body)


def test_a_detached_calls_lease_does_not_cut_off_the_recording_of_its_answer(tmp_path: Path) -> None:
    location = store_location("postgresql", tmp_path, "keys")

    async def body(server: Server, handler: Handler, client: bastion.Client) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await lose_first_attempt(server, handler, "z", "k13")
        assert detached(server) == 1
        # Another client holds the keys' table: recording the answer waits on it past the claim's lease.
        async with keys_table_held(location):
            handler.release.set()
            await until(lambda: handler.ended == ["z"], "the handler to end")
            await until(lambda: loop.time() > started + 1.5, "the lease (1 s) to pass while the answer waits")
        await until(lambda: detached(server) == 0, "the detached call to end")
        assert handler.cancelled == []
        client.retry = None
        assert await client.invoke("slow.apply", {"tag": "z"}, idempotency_key="k13") == "applied z"

    run(tmp_path, body, lease=1.0, store_at=location)


def test_a_revocation_does_not_cut_off_the_recording_of_an_answer_whose_handler_ended(tmp_path: Path) -> None:
    """Revocation cancels a detached call's handler (above), but once the handler has ended the call acts for
    nobody: cancelling the recording of its answer left the claim "running", and the retry got outcome-unknown
    for a call that had taken effect (review). PostgreSQL: the keys' table held past the revocation."""
    location = store_location("postgresql", tmp_path, "keys")
    authenticator = Revocable()

    async def body(server: Server, handler: Handler, client: bastion.Client) -> None:
        await lose_first_attempt(server, handler, "v", "k14")
        assert detached(server) == 1
        async with keys_table_held(location):
            handler.release.set()
            await until(lambda: handler.ended == ["v"], "the handler to end")
            authenticator.revoked = True
            seen = authenticator.revalidations
            await until(lambda: authenticator.revalidations > seen + 1, "revalidation to find it revoked")
        await until(lambda: detached(server) == 0, "the detached call to end")
        assert handler.cancelled == []
        authenticator.revoked = False  # ada is let back in, and retries
        client.retry = None
        assert await client.invoke("slow.apply", {"tag": "v"}, idempotency_key="k14") == "applied v"
        assert handler.runs == ["v"]

    run(tmp_path, body, authenticator=authenticator, store_at=location)


def test_a_revocation_on_a_live_connection_does_not_cut_off_the_recording_of_an_answer(tmp_path: Path) -> None:
    """As above, with the connection still open when revalidation finds the credential revoked: the calls it
    cancels are those still running, not one whose handler ended and whose answer is being recorded (review)."""
    location = store_location("postgresql", tmp_path, "keys")
    authenticator = Revocable()

    async def body(server: Server, handler: Handler, client: bastion.Client) -> None:
        writer = await first_attempt(server.port, "w", "k15")
        await until(lambda: handler.runs == ["w"], "the first attempt to start")
        async with keys_table_held(location):  # the answer's record waits on the keys' table, the connection open
            handler.release.set()
            await until(lambda: handler.ended == ["w"], "the handler to end")
            authenticator.revoked = True
            await until(lambda: server.stats()["connections"] <= 1, "revalidation to close the connection")
        writer.close()
        await until(lambda: detached(server) == 0, "the recording to end")
        assert handler.cancelled == []
        authenticator.revoked = False
        client.retry = None
        assert await client.invoke("slow.apply", {"tag": "w"}, idempotency_key="k15") == "applied w"
        assert handler.runs == ["w"]

    run(tmp_path, body, authenticator=authenticator, store_at=location)
