"""Both clients against servers that misbehave: real TCP, frames written by hand (tests/support/hostile_server.py).

Every piece of bad input from a server must reach the caller as a bastion
error that says what went wrong -- never a bare ValueError, never a hang --
and must not leave the client unable to make its next call.
"""

from __future__ import annotations

import asyncio
import select
import threading
import time
from typing import Any

import pytest

from bastion import Client, SyncClient
from bastion.client._connection import ClientClosed
from bastion.exceptions import ConnectError, ConnectionClosed, DeadlineExceeded, RemoteProtocolError
from bastion.status import Status
from tests.adversity.test_hostile_peers import poll
from tests.support.hostile_server import (
    BAD_UTF8,
    CALL,
    CANCEL,
    GOAWAY,
    RESULT,
    HostileServer,
    Peer,
    frame,
    result_frame,
    wait_for,
)


def run(coro: Any) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(20):
            return await coro

    return asyncio.run(guarded())


async def bad_utf8_then_echo(peer: Peer) -> None:
    """Answers call 1 with a str that is not UTF-8, later calls with their own id."""
    await peer.handshake()
    while True:
        call = await peer.read_call()
        if call[1] == 1:
            peer.send_raw(result_frame(1, BAD_UTF8))
        else:
            peer.send(RESULT, call[1], call[1])


@pytest.mark.parametrize("how", ["call", "invoke"])
def test_a_result_that_is_not_utf8_is_a_protocol_error_not_a_unicode_error(how: str) -> None:
    """The frame decoder skips over a Result's value; decoding it later raised a bare UnicodeDecodeError
    out of ``await client.call(...)`` -- not a BastionError, so code catching those missed it."""

    async def main(address: str) -> None:
        async with Client(address, insecure=True, timeout=5) as client:
            with pytest.raises(RemoteProtocolError, match="not valid MessagePack") as caught:
                if how == "call":
                    await client.call("x.y")
                else:
                    await client.invoke("x.y", {}, idempotent=True)
            assert caught.value.status is Status.INVALID_ARGUMENT
            assert await client.call("x.y") == 2  # the framing was intact: the connection serves on

    with HostileServer(bad_utf8_then_echo) as server:
        run(main(server.address))
        assert len(server.peers) == 1


def test_a_stream_item_that_is_not_utf8_is_a_protocol_error() -> None:
    async def script(peer: Peer) -> None:
        await peer.handshake()
        call = await peer.read_call()
        peer.send(7, call[1], "fine")
        peer.send_raw(frame(b"\x93\x07" + bytes([call[1]]) + BAD_UTF8))  # an Item
        peer.send(RESULT, call[1], None)
        await peer.until_closed()

    async def main(address: str) -> None:
        async with Client(address, insecure=True, timeout=5) as client:
            seen = []
            with pytest.raises(RemoteProtocolError, match="not valid MessagePack"):
                async for item in client.stream("x.items"):
                    seen.append(item)
            assert seen == ["fine"]

    with HostileServer(script) as server:
        run(main(server.address))


def test_the_sync_client_reports_a_result_that_is_not_utf8_as_a_protocol_error() -> None:
    with HostileServer(bad_utf8_then_echo) as server, SyncClient(server.address, insecure=True, timeout=5) as client:
        with pytest.raises(RemoteProtocolError, match="not valid MessagePack"):
            client.call("x.y")
        assert client.call("x.y") == 2


# -- GoAway and drain -----------------------------------------------------------------------------------------


def goaway_then(answer_after: float | None) -> Any:
    """A server that answers ``x.first`` on a connection it drains (GoAway, then the answer ``answer_after``
    seconds later, or never) and never closes that connection itself; other calls are answered at once."""

    async def script(peer: Peer) -> None:
        await peer.handshake()
        call = await peer.read_call()
        if call[2] == "x.first":
            peer.send(GOAWAY, call[1], 0, "draining")
            if answer_after is not None:
                await asyncio.sleep(answer_after)
                peer.send(RESULT, call[1], "old")
        else:
            peer.send(RESULT, call[1], "new")
        await peer.until_closed(30)

    return script


def test_a_drained_connection_is_closed_once_its_last_call_is_answered() -> None:
    """The client closed a connection the server had sent GoAway on only if it had no call left at the
    GoAway, or when a call was cancelled: once the last call in flight was answered it kept the socket
    open for as long as the server did -- and ``close`` did not close it either (it no longer held it)."""

    async def main(server: HostileServer) -> None:
        client = Client(server.address, insecure=True, timeout=5)
        first = asyncio.ensure_future(client.call("x.first"))
        await poll(lambda: server.peers and any(m[0] == CALL for m in server.peers[0].received), "the first call")
        assert await client.call("x.second") == "new"  # on a new connection: the first is draining
        assert await first == "old"
        await poll(lambda: server.peers[0].closed.is_set(), "the drained connection to close")
        await client.close()
        await poll(lambda: server.peers[1].closed.is_set(), "the new connection to close")

    with HostileServer(goaway_then(0.2)) as server:
        run(main(server))


def test_close_closes_a_draining_connection_and_fails_its_call() -> None:
    async def main(server: HostileServer) -> None:
        client = Client(server.address, insecure=True, timeout=10)
        first = asyncio.ensure_future(client.call("x.first"))
        await poll(lambda: server.peers and any(m[0] == CALL for m in server.peers[0].received), "the first call")
        assert await client.call("x.second") == "new"
        await client.close()
        with pytest.raises(ClientClosed):
            await asyncio.wait_for(first, 2)  # not the 10 s timeout: close ends it
        await poll(lambda: all(peer.closed.is_set() for peer in server.peers), "both connections to close")

    with HostileServer(goaway_then(None)) as server:
        run(main(server))


# -- a server that accepts TCP but never answers the handshake ----------------------------------------------


async def never_welcome(peer: Peer) -> None:
    await peer.until_closed(60)


def test_calls_waiting_for_a_connection_keep_their_own_deadline() -> None:
    """A call's timeout did not cover connecting: with ``timeout=0.5`` a call to a server that never
    answers the handshake failed after ``connect_timeout`` (3 s), and calls made meanwhile each waited for
    the one before to fail, then made their own attempt: the third failed after 9 s."""

    async def main(server: HostileServer) -> None:
        client = Client(server.address, insecure=True, timeout=0.5, connect_timeout=3)
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def one() -> float:
            with pytest.raises(DeadlineExceeded, match="no connection"):
                await client.call("x.y")
            return loop.time() - start

        took = await asyncio.gather(one(), one(), one())
        assert max(took) < 2.0, took
        assert len(server.peers) == 1  # one attempt, shared
        await client.close()
        await poll(lambda: server.peers[0].closed.is_set(), "the half-open connection to close")

    with HostileServer(never_welcome) as server:
        run(main(server))


def test_a_call_cancelled_while_connecting_leaves_no_connection_behind() -> None:
    async def main(server: HostileServer) -> None:
        client = Client(server.address, insecure=True, connect_timeout=30)
        call = asyncio.ensure_future(client.call("x.y"))
        await poll(lambda: server.peers, "the connection")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await client.close()
        await poll(lambda: server.peers[0].closed.is_set(), "the half-open connection to close")

    with HostileServer(never_welcome) as server:
        run(main(server))


def close_while_connecting(*servers: HostileServer) -> None:
    async def main() -> None:
        addresses = [server.address for server in servers]
        client = Client(addresses, insecure=True, timeout=5, connect_timeout=5, health_interval=None)
        calls = [asyncio.ensure_future(client.call("x.y")) for _ in range(3)]
        await poll(lambda: all(server.peers for server in servers), "the calls to be connecting")
        await client.close()
        for call in calls:
            with pytest.raises(ClientClosed):
                await asyncio.wait_for(call, 2)

    run(main())


def test_close_fails_the_calls_waiting_for_a_connection_with_client_closed() -> None:
    """close() cancels the shared connect attempt: its waiters must see ClientClosed, not a CancelledError
    that looks like their own."""
    with HostileServer(never_welcome) as server:
        close_while_connecting(server)
    with HostileServer(never_welcome) as one, HostileServer(never_welcome) as other:
        close_while_connecting(one, other)  # balanced: each endpoint's attempt


def test_the_sync_clients_call_timeout_covers_connecting() -> None:
    with HostileServer(never_welcome) as server:
        client = SyncClient(server.address, insecure=True, timeout=0.5, connect_timeout=3)
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="no connection"):
            client.call("x.y")
        assert time.monotonic() - start < 2.0
        client.close()


# -- a connection dropped while the sync client was idle ----------------------------------------------------


def test_the_sync_client_does_not_fail_a_call_on_a_connection_dropped_while_idle() -> None:
    """The sync client reads only during a call. A connection closed while it was idle -- a proxy's or
    NAT's idle timeout, a server restart -- was found dead only after the next call had been written to
    it: ConnectionClosed, and a call that is not idempotent is not retried, though it never reached a
    server. (urllib3 checks a pooled connection the same way before reusing it.)"""

    async def script(peer: Peer) -> None:
        await peer.handshake()
        if len(server.peers) == 1:
            peer.writer.close()  # dropped without a word, as an idle timeout in between does
            return
        while True:
            call = await peer.read_call()
            peer.send(RESULT, call[1], "fresh")

    with HostileServer(script) as server, SyncClient(server.address, insecure=True, timeout=5) as client:
        link = client._link
        assert link is not None
        wait_for(lambda: select.select([link.sock], [], [], 0)[0], "the drop to reach the client")
        assert client.invoke("x.write", {}, idempotent=False) == "fresh"
        assert len(server.peers) == 2


def test_a_sync_call_waiting_for_another_threads_call_keeps_its_deadline() -> None:
    """A SyncClient makes one call at a time; a call from a second thread waited for the first without
    limit, its own timeout ignored: with the first call stuck on a server that never answers, the second
    never returned."""

    async def script(peer: Peer) -> None:
        await peer.handshake()
        while True:
            call = await peer.read_call()
            if call[2] != "x.hang":
                peer.send(RESULT, call[1], "quick")

    with HostileServer(script) as server, SyncClient(server.address, insecure=True) as client:

        def hang() -> None:
            with pytest.raises(ClientClosed):
                client.call("x.hang")

        stuck = threading.Thread(target=hang, daemon=True)
        stuck.start()
        wait_for(lambda: any(m[2] == "x.hang" for m in server.peers[0].received if m[0] == CALL), "the stuck call")
        outcome: list[BaseException | str] = []

        def second() -> None:
            try:
                outcome.append(client.invoke("x.quick", {}, timeout=0.5))
            except BaseException as exc:
                outcome.append(exc)

        start = time.monotonic()
        waiting = threading.Thread(target=second, daemon=True)
        waiting.start()
        waiting.join(5)
        try:
            assert not waiting.is_alive(), "the second call ignored its timeout"
            assert isinstance(outcome[0], DeadlineExceeded), outcome
            assert "turn" in str(outcome[0])
            assert time.monotonic() - start < 2.0
        finally:
            client.close()  # fails the stuck call (ClientClosed), freeing both threads
            stuck.join(5)
            waiting.join(5)


# -- a balanced client with one endpoint that accepts TCP but never answers -----------------------------------


async def echo_ok(peer: Peer) -> None:
    await peer.handshake()
    while True:
        call = await peer.read_call()
        peer.send(RESULT, call[1], "ok")


def test_a_balanced_client_fails_over_from_an_endpoint_that_never_answers_the_handshake() -> None:
    """An endpoint that accepts TCP but never answers the handshake (a hung process, a blackhole) held up
    every call that picked it until the connect attempt failed -- and calls waiting for a connection count
    as none outstanding, so power-of-two-choices kept picking it. Each such call waited its own deadline
    (DeadlineExceeded, though the other endpoint was healthy) or connect_timeout, and calls made meanwhile
    queued behind it. Now a call waits CONNECT_ATTEMPT_DELAY for one endpoint, then tries the next
    alongside; the connected one takes it, and endpoints still connecting are picked only if none is
    connected."""

    async def main(hung: HostileServer, good: HostileServer) -> None:
        client = Client([hung.address, good.address], insecure=True, timeout=2, connect_timeout=3, health_interval=None)
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert [await client.call("x.y") for _ in range(5)] == ["ok"] * 5
        assert await asyncio.gather(*(client.call("x.y") for _ in range(10))) == ["ok"] * 10
        assert loop.time() - start < 3.0
        await client.close()

    with HostileServer(never_welcome) as hung, HostileServer(echo_ok) as good:
        run(main(hung, good))


def test_closing_a_sync_client_from_another_thread_ends_a_call_stuck_in_the_handshake() -> None:
    """``close`` fails a call in progress in another thread at once by aborting its connection -- but not
    while that call was still waiting for the server's Welcome: the link was not the client's yet, so
    close waited for connect_timeout (here 30 s)."""
    with HostileServer(never_welcome) as server:
        client = SyncClient(server.address, insecure=True, connect_timeout=30)
        outcome: list[BaseException] = []

        def call() -> None:
            try:
                client.call("x.y")
            except BaseException as exc:
                outcome.append(exc)

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        wait_for(lambda: server.peers and server.peers[0].received, "the Hello")
        start = time.monotonic()
        closer = threading.Thread(target=client.close, daemon=True)
        closer.start()
        closer.join(5)
        caller.join(5)
        assert not closer.is_alive() and not caller.is_alive(), "close waited for the handshake"
        assert time.monotonic() - start < 2.0
        assert isinstance(outcome[0], ClientClosed), outcome


# -- a server that would grow the client's memory without bound ---------------------------------------------

ITEM, CREDIT, PING = 7, 9, 10


def endless_stream(items: int) -> Any:
    """Answers a call with ``items`` stream items (credit permitting) -- its argument ``n`` if given --
    of 1000 bytes (``tiny=True``: nil), then a Result; ``echo`` with "fine"."""

    async def script(peer: Peer) -> None:
        await peer.handshake()
        while True:
            call = await peer.read_call()
            if call[2] == "echo":
                peer.send(RESULT, call[1], "fine")
                continue
            wanted, value = call[3].get("n", items), None if call[3].get("tiny") else b"x" * 1000
            credit, sent = 16, 0  # the client's window
            while sent < wanted:
                while credit and sent < wanted:
                    peer.send(ITEM, call[1], value)
                    credit, sent = credit - 1, sent + 1
                message = await peer.read()
                if message[0] == CREDIT:
                    credit += message[2]
                elif message[0] == CANCEL:
                    break
            else:
                peer.send(RESULT, call[1], None)

    return script


def test_a_unary_call_to_an_endless_stream_is_cut_off_at_max_collected_bytes() -> None:
    """A unary call collects a server stream's items, granting credit back as each comes: a stream that
    never ended grew the client's memory for as long as it ran. Past ``max_collected_bytes`` the call is
    cancelled and fails, coded; the connection serves on."""

    async def main(address: str) -> None:
        async with Client(address, insecure=True, timeout=10, max_collected_bytes=256 * 1024) as client:
            for how in ("call", "invoke"):
                with pytest.raises(RemoteProtocolError, match="max_collected_bytes") as caught:
                    if how == "call":
                        await client.call("x.y")
                    else:
                        await client.invoke("x.y", {}, idempotent=True)
                assert caught.value.status is Status.RESOURCE_EXHAUSTED
                assert await client.call("echo") == "fine"

    with HostileServer(endless_stream(5000)) as server:
        run(main(server.address))
        assert len(server.peers) == 1
        assert [m[1] for m in server.peers[0].received if m[0] == CANCEL] == [1, 3]


def test_the_sync_client_cuts_off_an_endless_stream_at_max_collected_bytes() -> None:
    with HostileServer(endless_stream(5000)) as server:
        with SyncClient(server.address, insecure=True, timeout=10, max_collected_bytes=256 * 1024) as client:
            with pytest.raises(RemoteProtocolError, match="max_collected_bytes") as caught:
                client.call("x.y")
            assert caught.value.status is Status.RESOURCE_EXHAUSTED
            assert client.call("echo") == "fine"
            assert list(client.stream("x.y")) == [b"x" * 1000] * 5000  # read as it comes: no limit
        assert len(server.peers) == 1
        assert [m[1] for m in server.peers[0].received if m[0] == CANCEL] == [1]


def test_a_stream_of_tiny_items_counts_their_overhead_too() -> None:
    """An item of one byte (nil) still costs the client an object and a place in a list: each counts 64
    bytes more than its own, or a stream of nils could take max_collected_bytes times 60 in memory."""

    async def main(address: str) -> None:
        async with Client(address, insecure=True, timeout=10, max_collected_bytes=6500) as client:
            assert await client.call("x.y", n=100, tiny=True) == [None] * 100  # 100 * (1 + 64) bytes
            with pytest.raises(RemoteProtocolError, match="max_collected_bytes"):
                await client.call("x.y", n=101, tiny=True)

    with HostileServer(endless_stream(0)) as server:
        run(main(server.address))


async def ping_flood(peer: Peer) -> None:
    """Pings without end, never reading the Pongs."""
    await peer.handshake()
    await peer.read_call()
    for i in range(1000):
        peer.send(PING, i)
    await asyncio.Event().wait()  # holds the connection, reading nothing


def test_a_server_flooding_pings_is_dropped_with_a_clear_error() -> None:
    """Every Ping costs the client a Pong; a server that floods them and never reads grew the client's
    write buffer without bound, and its calls waited for their deadline. Past 100 in 10 s the client drops
    the connection: the call fails at once, saying why."""

    async def main(address: str) -> None:
        client = Client(address, insecure=True, timeout=5, retry=None)
        start = time.monotonic()
        with pytest.raises(ConnectionClosed, match="ping flood"):
            await client.call("x.y")
        assert time.monotonic() - start < 3
        await client.close()

    with HostileServer(ping_flood) as server:
        run(main(server.address))


def test_the_sync_client_drops_a_server_flooding_pings_too() -> None:
    """The sync client answered every Ping, without limit: a flood cost it a Pong each (written with
    ``sendall``, which blocks once a server that does not read has filled the socket's buffers) and its
    call waited for its deadline. It drops the connection past the async client's cap, before the Pongs."""
    with HostileServer(ping_flood) as server, SyncClient(server.address, insecure=True, timeout=5, retry=None) as c:
        start = time.monotonic()
        with pytest.raises(ConnectionClosed, match="ping flood"):
            c.call("x.y")
        assert time.monotonic() - start < 3
        assert c._link is None or c._link.closed


def test_a_stream_the_caller_does_not_read_holds_no_more_than_its_window() -> None:
    """``stream()`` grants credit only as its caller reads: a server sending past it is cut off (protocol
    error, connection closed), so an unread stream holds at most ``window`` items."""

    async def script(peer: Peer) -> None:
        await peer.handshake()
        call = await peer.read_call()
        for _ in range(1000):
            peer.send(ITEM, call[1], b"x" * 1000)
        await peer.until_closed()

    async def main(server: HostileServer) -> None:
        client = Client(server.address, insecure=True, timeout=5)
        stream = client.stream("x.y")
        got: list[Any] = []
        with pytest.raises(ConnectionClosed, match="without credit"):
            got.append(await anext(stream))  # then the caller stops reading...
            await poll(lambda: server.peers[0].closed.is_set(), "the client to close the connection")
            async for item in stream:  # ... and finds what was kept, then why the rest was not
                got.append(item)
        assert len(got) <= 16  # (the items of the read that broke the rules are dropped with it)
        await client.close()

    with HostileServer(script) as server:
        run(main(server))


def test_a_storm_of_goaways_does_not_pile_up_for_a_sync_stream_in_progress() -> None:
    """A call made while a sync stream is read keeps what it reads for the stream until the stream reads
    on -- each GoAway too, once per GoAway: a server repeating GoAway grew that backlog without bound."""

    async def script(peer: Peer) -> None:
        await peer.handshake()
        stream = await peer.read_call()
        peer.send(ITEM, stream[1], "first")
        inner = await peer.read_call()
        for _ in range(10_000):
            peer.send(GOAWAY, 100, 0, "draining")
        peer.send(RESULT, inner[1], "inner")
        peer.send(ITEM, stream[1], "second")
        peer.send(RESULT, stream[1], None)
        await peer.until_closed()

    with HostileServer(script) as server, SyncClient(server.address, insecure=True, timeout=5) as client:
        stream = client.stream("s")
        assert next(stream) == "first"
        assert client.call("x") == "inner"
        assert len(client._backlog[1]) <= 3  # one GoAway (the lowest last_id), the item, the result
        assert list(stream) == ["second"]


def test_a_tls_handshake_that_never_completes_is_reported_as_timed_out() -> None:
    """A server that accepts TCP but never answers the TLS ClientHello (a hung process, a port that swallows
    bytes) fails the attempt at connect_timeout -- and the sync client said the connection was *closed*
    during the TLS handshake and asked whether it speaks TLS, where the async client says it timed out."""

    async def connect() -> None:
        client = Client(server.address, connect_timeout=0.5)
        try:
            await client.connect()
        finally:
            await client.close()

    with HostileServer(never_welcome) as server:
        for attempt in (lambda: SyncClient(server.address, connect_timeout=0.5).connect(), lambda: run(connect())):
            start = time.monotonic()
            with pytest.raises(ConnectError) as failed:
                attempt()
            assert time.monotonic() - start < 3.0
            assert "timed out" in str(failed.value) and "closed" not in str(failed.value), failed.value


async def refuse_alpn(peer: Peer) -> None:
    """A TLS server that speaks no bastion/1 (a Go or Envoy service, say): its answer to the ClientHello is the
    fatal alert no_application_protocol (120)."""
    await peer.reader.read(4096)  # the ClientHello
    peer.send_raw(bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 120]))
    await peer.writer.drain()


def test_a_tls_server_that_refuses_the_bastion_alpn_is_named_so() -> None:
    """OpenSSL 3 names alerts that the ssl module of Python 3.11 has no code for: ``exc.reason`` is None and
    only the message ("[SSL] tlsv1 alert no application protocol") says which, so the table of plain reasons
    was never consulted and the error was the raw OpenSSL text. The name is now read from the message too."""

    async def connect() -> None:
        client = Client(server.address, connect_timeout=5)
        try:
            await client.connect()
        finally:
            await client.close()

    with HostileServer(refuse_alpn) as server:
        for attempt in (lambda: SyncClient(server.address, connect_timeout=5).connect(), lambda: run(connect())):
            with pytest.raises(ConnectError) as failed:
                attempt()
            assert "does not speak bastion/1 (ALPN)" in str(failed.value), failed.value
