"""The blocking client against a real server: calls made while a stream is read, close from another thread, fork."""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from bastion import Client, SyncClient, UsageError
from bastion.client._connection import ClientClosed
from bastion.exceptions import LocalProtocolError
from tests.support.hostile_server import HostileServer, Peer, wait_for
from tests.support.server import ServerProcess


def test_a_call_made_while_a_stream_is_read_leaves_the_streams_items_to_it(server: ServerProcess) -> None:
    with SyncClient(server.address, token_file=str(server.token_file), timeout=20) as client:
        seen = []
        for item in client.stream("demo.count", n=2000):
            seen.append(item)
            assert client.call("demo.echo", value=item) == item  # reads the socket while the stream waits
        assert seen == list(range(2000))
        assert client.call("demo.echo", value="after") == "after"


def test_close_from_another_thread_fails_the_call_in_progress_at_once(server: ServerProcess) -> None:
    client = SyncClient(server.address, token_file=str(server.token_file))  # no timeout: it would wait 30 s
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["result"] = client.invoke("demo.watched", {"tag": "t", "seconds": 30}, idempotent=True)
        except Exception as exc:
            outcome["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    server.wait_for_marker("started-t")
    started = time.monotonic()
    client.close()
    assert time.monotonic() - started < 2.0
    caller.join(5.0)
    assert not caller.is_alive()
    assert isinstance(outcome.get("error"), ClientClosed), outcome  # and not retried, idempotent as it is
    server.wait_for_marker("cancelled-t")  # the server saw the connection go and cancelled the call
    assert client.call("demo.echo", value=1) == 1  # a closed client connects again when used
    client.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_opens_its_own_connection_and_leaves_the_parents_alone(server: ServerProcess) -> None:
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as client:
        assert client.call("demo.echo", value="parent") == "parent"
        busy: dict[str, Any] = {}
        # A call in progress in another thread holds the client's lock across the fork.
        worker = threading.Thread(target=lambda: busy.update(result=client.call("demo.watched", tag="w", seconds=2)))
        worker.start()
        server.wait_for_marker("started-w")
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: answer through the pipe, whatever happens
            signal.alarm(10)
            try:
                answer = repr(client.call("demo.echo", value="child"))
            except BaseException as exc:
                answer = f"error {exc!r}"
            os.write(write_end, answer.encode())
            os._exit(0)
        os.close(write_end)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read_end, "rb") as pipe:
            assert (status, pipe.read().decode()) == (0, "'child'")
        worker.join(10)
        assert busy == {"result": "w"}
        assert client.call("demo.echo", value="parent again") == "parent again"


def test_a_handshake_failing_otherwise_than_expected_closes_its_socket_at_once() -> None:
    """The sync client's handshake closed the socket only on the failures it expected (deadline, connection
    closed): a Hello too large to send (a token over the 16 KiB handshake cap) left it open for as long as
    the error was held -- here by ``pytest.raises`` -- until the garbage collector found it."""

    async def script(peer: Peer) -> None:
        await peer.until_closed()

    with HostileServer(script) as server:
        client = SyncClient(server.address, insecure=True, timeout=5)
        client._token = "x" * 20_000  # past the check at construction (below): a failure the handshake did not expect
        with pytest.raises(LocalProtocolError, match="exceeds the peer's limit") as held:
            client.call("x.y")
        wait_for(lambda: server.peers and server.peers[0].closed.is_set(), "the server to see the socket closed")
        assert held.tb is not None  # held until now: its frames, the socket's among them, were not collected


@pytest.mark.parametrize("make", [Client, SyncClient])
def test_a_token_too_large_for_the_handshake_is_refused_at_construction(make: type[Client | SyncClient]) -> None:
    """A Hello over the handshake's 16 KiB cap cannot be sent: the sync client failed each call with a bare
    LocalProtocolError, the async client logged it from deep in the transport and failed each call with
    DeadlineExceeded ("still connecting") once ``connect_timeout`` had passed."""
    with pytest.raises(UsageError, match="too large for the handshake"):
        make("127.0.0.1:1", insecure=True, token="x" * 20_000)
    make("127.0.0.1:1", insecure=True, token="x" * 16_000)  # fits


def test_a_stream_left_open_by_a_thread_that_ended_frees_the_client_when_collected(server: ServerProcess) -> None:
    """A stream's turn is given back by whichever thread finalizes it (the garbage collector's, here the test's).

    A stream read in one thread and dropped elsewhere used to keep the
    client's turn for the ended thread: the finalizer's release raised
    "cannot release un-acquired lock", every later call waited out its
    timeout for a turn, and ``close`` never returned.
    """
    client = SyncClient(server.address, token_file=str(server.token_file), timeout=5)
    kept: list[Iterator[Any]] = []

    def read_one() -> None:
        stream = client.stream("demo.count", n=1000)
        assert next(stream) == 0
        kept.append(stream)  # open, its turn held, when the thread ends

    reader = threading.Thread(target=read_one)
    reader.start()
    reader.join(10)
    assert not reader.is_alive() and len(kept) == 1
    unraisable: list[Any] = []
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        kept.clear()  # the generator is finalized here, in this thread
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert [str(u.exc_value) for u in unraisable] == []
    assert client.call("demo.echo", value=1) == 1
    started = time.monotonic()
    client.close()
    assert time.monotonic() - started < 2.0


def test_a_client_nobody_closed_closes_its_socket_quietly_when_collected(server: ServerProcess) -> None:
    """A SyncClient dropped open -- with a stream left half read -- closes its socket as it is collected,
    as the async client does at its loop's end: the socket's own finalizer used to find it open and warn
    ("ResourceWarning: unclosed <ssl.SSLSocket ...>") in every program that forgot a ``close``."""
    fds = len(os.listdir("/proc/self/fd"))
    unraisable: list[Any] = []
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            client = SyncClient(server.address, token_file=str(server.token_file), timeout=5)
            assert client.call("demo.echo", value=1) == 1
            del client
            gc.collect()
            client = SyncClient(server.address, token_file=str(server.token_file), timeout=5)
            stream = client.stream("demo.count", n=1000)
            assert next(stream) == 0
            del client, stream
            gc.collect()
    finally:
        sys.unraisablehook = hook
    assert [str(u.exc_value) for u in unraisable] == []
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert len(os.listdir("/proc/self/fd")) == fds
