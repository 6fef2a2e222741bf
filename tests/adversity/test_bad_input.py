"""Hostile bytes on raw sockets against a real ``bastion serve`` process.

Each attack must end in a GoAway naming the protocol error (docs/protocol.md
5.4) and a closed connection, without disturbing anyone else: a client
connected before the attacks keeps getting correct answers, and new clients
can still connect afterwards.

The raw sockets speak plaintext, so these servers run ``--insecure`` (the
attacks are on the bastion framing, which is the same inside TLS); one
variant runs over TLS to show the same answer comes back through it.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable

import msgspec
import pytest

from bastion import SyncClient
from bastion.security.tls import client_context
from bastion.status import Status
from tests.support.raw import CALL, GOAWAY, RESULT, RawPeer, frame
from tests.support.server import ServerProcess, read_rss_kib

MB = 1 << 20
FOUR_GB_LENGTH = b"\xff\xff\xff\xff"
#: Bodies that are not a valid client message: not MessagePack at all, an
#: unknown type code, not an array, and a valid Call followed by stray bytes.
GARBAGE_BODIES = {
    "not-msgpack": b"\xc1\xc1\xc1\xc1\xc1",
    "unknown-type": msgspec.msgpack.encode([99, 1, 2]),
    "not-an-array": msgspec.msgpack.encode("hello"),
    "trailing-bytes": msgspec.msgpack.encode([CALL, 2, "admin.health", {}]) + b"\x00",
}


def random_megabyte() -> bytes:
    return random.Random(20240611).randbytes(MB)


def read_goaway(peer: RawPeer) -> list[object]:
    message = peer.read_message()
    assert isinstance(message, list) and message, message
    assert message[0] == GOAWAY, f"expected a GoAway, got {message!r}"
    return message


def send_ignoring_reset(peer: RawPeer, data: bytes) -> None:
    """Send ``data``; the server may close (and reset) before it has read it all."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        peer.send(data)


@pytest.fixture
def server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """A plaintext (--insecure) server: the raw peers below write bytes straight onto TCP."""
    return server_factory(insecure=True)


def health_then(peer: RawPeer) -> None:
    """Hello, then one good call (id 1) answered, so a later GoAway must say last_id 1."""
    peer.hello()
    peer.send(frame([CALL, 1, "admin.health", {}]))
    result = peer.read_message()
    assert result[0] == RESULT and result[1] == 1 and result[2]["status"] == "ok", result


# -- one attack at a time --------------------------------------------------------------


@pytest.mark.parametrize("body", GARBAGE_BODIES.values(), ids=GARBAGE_BODIES.keys())
def test_malformed_frame_after_hello_gets_goaway_and_close(server: ServerProcess, body: bytes) -> None:
    with RawPeer(server.host, server.port) as peer:
        health_then(peer)
        peer.send(len(body).to_bytes(4, "big") + body)
        goaway = read_goaway(peer)
        assert goaway[1] == 1  # last_id: the one call it processed
        assert goaway[2] == Status.INVALID_ARGUMENT
        assert isinstance(goaway[3], str) and 0 < len(goaway[3]) <= 512
        assert peer.wait_closed(timeout=5) < 5


def test_malformed_frame_inside_tls_gets_goaway_and_close(server_factory: Callable[..., ServerProcess]) -> None:
    tls_server = server_factory(name="tls")
    assert tls_server.ca_file is not None
    context = client_context(tls_server.ca_file)
    body = GARBAGE_BODIES["not-msgpack"]
    with RawPeer(tls_server.host, tls_server.port, ssl_context=context) as peer:
        health_then(peer)
        peer.send(len(body).to_bytes(4, "big") + body)
        goaway = read_goaway(peer)
        assert goaway[1:3] == [1, Status.INVALID_ARGUMENT]
        assert peer.wait_closed(timeout=5) < 5
    with SyncClient(tls_server.address, timeout=5) as client:
        assert client.call("admin.health")["status"] == "ok"


def test_a_first_frame_that_is_not_a_hello_is_refused(server: ServerProcess) -> None:
    with RawPeer(server.host, server.port) as peer:
        peer.send(frame([CALL, 1, "admin.health", {}]))
        goaway = read_goaway(peer)
        assert goaway[1:3] == [0, Status.INVALID_ARGUMENT]
        peer.wait_closed(timeout=5)


@pytest.mark.parametrize("handshake", [False, True], ids=["before-hello", "after-hello"])
def test_4gb_length_prefix_gets_resource_exhausted_without_allocating(server: ServerProcess, handshake: bool) -> None:
    rss_before = read_rss_kib(server.pid)
    with RawPeer(server.host, server.port) as peer:
        if handshake:
            peer.hello()
        peer.send(FOUR_GB_LENGTH + b"\x00" * 64)
        goaway = read_goaway(peer)
        assert goaway[1] == 0
        assert goaway[2] == Status.RESOURCE_EXHAUSTED
        assert "4294967295" in goaway[3]
        peer.wait_closed(timeout=5)
    growth_mb = (read_rss_kib(server.pid) - rss_before) / 1024
    assert growth_mb < 50, f"server RSS grew by {growth_mb:.1f} MB after a 4 GB length claim"
    with SyncClient(server.address, timeout=5, insecure=True) as client:
        assert client.call("admin.health")["status"] == "ok"


@pytest.mark.parametrize("handshake", [False, True], ids=["before-hello", "after-hello"])
def test_a_megabyte_of_random_bytes_is_a_protocol_error(server: ServerProcess, handshake: bool) -> None:
    with RawPeer(server.host, server.port) as peer:
        if handshake:
            peer.hello()
        send_ignoring_reset(peer, random_megabyte())
        try:
            goaway = read_goaway(peer)
        except ConnectionResetError:
            pytest.fail("the connection was reset before the GoAway could be read")
        # The first four random bytes claim a frame far over either limit.
        assert goaway[2] == Status.RESOURCE_EXHAUSTED
        assert goaway[1] == 0
        peer.wait_closed(timeout=5)


# -- the bystanders ----------------------------------------------------------------------------


def test_good_clients_are_unaffected_by_all_attacks(server: ServerProcess) -> None:
    address, token_file, _ = server
    rss_before = read_rss_kib(server.pid)
    attacks: list[tuple[str, Callable[[RawPeer], None], int]] = [
        ("malformed frame", lambda p: (p.hello(), p.send(b"\x00\x00\x00\x05" + b"\xc1" * 5)), 3),
        ("4 GB length", lambda p: (p.hello(), p.send(FOUR_GB_LENGTH)), 8),
        ("1 MB random", lambda p: send_ignoring_reset(p, random_megabyte()), 8),
    ]
    with SyncClient(address, token_file=str(token_file), timeout=5, insecure=True) as good:
        assert good.call("demo.echo", value="before") == "before"
        for i, (name, attack, code) in enumerate(attacks):
            with RawPeer(server.host, server.port) as peer:
                attack(peer)
                goaway = read_goaway(peer)
                assert goaway[2] == code, (name, goaway)
                peer.wait_closed(timeout=5)
            value = {"after": name, "n": i, "blob": bytes(range(256))}
            assert good.call("demo.echo", value=value) == value, name
            assert good.call("demo.count", n=20) == list(range(20)), name
        stats = good.call("admin.stats")
    assert stats["internal_errors_total"] == 0
    with SyncClient(address, token_file=str(token_file), timeout=5, insecure=True) as fresh:
        assert fresh.call("demo.echo", value="new client") == "new client"
    assert (read_rss_kib(server.pid) - rss_before) / 1024 < 50
    assert server.process.poll() is None
    assert "Traceback" not in server.log()


# -- slow loris ------------------------------------------------------------------------------


@pytest.fixture
def impatient_server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return server_factory(env={"BASTION_LIMITS__HANDSHAKE_TIMEOUT": "1"}, insecure=True)


def test_silent_connection_is_closed_after_the_handshake_timeout(impatient_server: ServerProcess) -> None:
    server = impatient_server
    with SyncClient(server.address, token_file=str(server.token_file), timeout=5, insecure=True) as good:
        assert good.call("demo.echo", value=1) == 1
        start = time.monotonic()
        with RawPeer(server.host, server.port) as peer:
            peer.wait_closed(timeout=3)
        elapsed = time.monotonic() - start
        assert 0.8 <= elapsed < 3, elapsed
        # A connection that finished its handshake is not subject to the timeout.
        assert good.call("demo.echo", value=2) == 2


def test_trickled_hello_is_closed_after_the_handshake_timeout(impatient_server: ServerProcess) -> None:
    server = impatient_server
    hello = frame([1, 1, "slow-loris/1", None, 16, MB, {}])
    start = time.monotonic()
    with RawPeer(server.host, server.port) as peer:
        closed = False
        for byte in hello:  # a byte every half second: activity must not extend the deadline
            try:
                peer.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if peer.is_closed_now():  # waits up to 0.5 s for the close
                closed = True
                break
            assert time.monotonic() - start < 3, "still open after 3 s"
        assert closed, "the whole Hello went through before the timeout: make it longer"
    elapsed = time.monotonic() - start
    assert 0.8 <= elapsed < 3, elapsed
    with SyncClient(server.address, timeout=5, insecure=True) as client:
        assert client.call("admin.health")["status"] == "ok"
