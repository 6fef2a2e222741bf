"""The connections ``limits.reserved_connections`` keeps for authenticated clients, against real servers.

An attacker from many addresses (127.0.0.2 and up: all loopback on Linux)
fills ``max_connections`` with anonymous or still-handshaking connections;
the last ``reserved_connections`` of it stay open to clients that
authenticate -- a token or a client certificate -- while an anonymous
handshake there is refused GoAway(RESOURCE_EXHAUSTED) and counted.
"""

from __future__ import annotations

import json
import select
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bastion import ConnectError, ResourceExhausted, SyncClient
from bastion.security import tls
from bastion.security.tls import client_context
from bastion.status import Status
from tests.support.raw import CALL, GOAWAY, RESULT, WELCOME, RawPeer, frame
from tests.support.server import ServerProcess, wait_for

#: Server-wide effects (the whole server full of connections), and a wait for them to close:
#: runs alone under ``pytest -n`` (the "exclusive" marker, tests/conftest.py).
pytestmark = pytest.mark.exclusive

HTTP = ("--http-port", "0")
SOURCES = [f"127.0.0.{i}" for i in range(2, 18)]
#: Six connections in all, the last two reserved; a long handshake deadline keeps silent ones open.
LIMITS = {
    "BASTION_LIMITS__MAX_CONNECTIONS": "6",
    "BASTION_LIMITS__RESERVED_CONNECTIONS": "2",
    "BASTION_LIMITS__HANDSHAKE_TIMEOUT": "60",
}


def stats(server: ServerProcess) -> dict[str, Any] | None:
    """admin.stats once every connection but the one asking has closed (None until then: retry)."""
    try:
        with SyncClient(
            server.address, token_file=str(server.token_file), timeout=5, insecure=server.insecure
        ) as admin:
            counts: dict[str, Any] = admin.call("admin.stats")
    except ConnectError:  # no room yet: the server has not seen the hoard go
        return None
    return counts if counts["connections_open"] == 1 else None


def refused_anonymously(peer: RawPeer) -> list[Any]:
    """Send an anonymous Hello; the GoAway that refuses it (the server then closes)."""
    peer.send(frame([1, 1, "raw-test/1", None, 16, 1 << 20, {}]))
    goaway = peer.read_message()
    assert goaway[0] == GOAWAY, goaway
    peer.wait_closed(timeout=3)
    return goaway


def join(
    server: ServerProcess, source: str, token: str | None, retried: list[str], **kwargs: Any
) -> tuple[RawPeer, list[Any]]:
    """A connection from ``source`` past its Welcome, and that Welcome. A refused connection's slot is given back just
    after its peer sees the close: one closed at accept meanwhile is tried again (and noted in ``retried``)."""

    def attempt() -> tuple[RawPeer, list[Any]] | None:
        peer = RawPeer(server.host, server.port, source=source, **kwargs)
        try:
            return peer, peer.hello(token)
        except (OSError, AssertionError):
            peer.close()
            retried.append(source)
            return None

    joined: tuple[RawPeer, list[Any]] = wait_for(attempt, 5, interval=0.05, what=f"{source} to be admitted")
    return joined


def http(server: ServerProcess, path: str, body: Any = None) -> tuple[int, str]:
    """(status, body) of a plain-HTTP request to the gateway: a GET, or a POST of ``body`` as JSON."""
    assert server.gateway_url is not None
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.gateway_url + path, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read().decode()


def rejections(server: ServerProcess) -> dict[str, float]:
    """bastion_rejections_total by reason, from the gateway's /metrics."""
    text = server.scrape()
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "bastion_rejections_total"
    }


def answers(peer: RawPeer) -> bool:
    peer.send(frame([CALL, 1, "admin.health", {}]))
    return bool(peer.read_message()[0] == RESULT)


@pytest.fixture
def hoard() -> Iterator[list[RawPeer]]:
    peers: list[RawPeer] = []
    yield peers
    for peer in peers:
        peer.close()


def test_anonymous_connections_leave_the_reserved_ones_to_authenticated_clients(
    server_factory: Callable[..., ServerProcess], hoard: list[RawPeer]
) -> None:
    server = server_factory(env=LIMITS, insecure=True, args=HTTP)
    for source in SOURCES[:4]:  # max_connections - reserved_connections: still admitted anonymously
        hoard.append(RawPeer(server.host, server.port, source=source))
        assert hoard[-1].hello()[3] == "anonymous"

    # Past them, an anonymous handshake is refused with a coded reason, and the slot comes back ...
    with RawPeer(server.host, server.port, source=SOURCES[4]) as anonymous:
        goaway = refused_anonymously(anonymous)
    assert goaway[2] == Status.RESOURCE_EXHAUSTED and "reserved_connections" in goaway[3], goaway
    # ... and a bad token is still refused as a bad token.
    with RawPeer(server.host, server.port, source=SOURCES[4]) as forged:
        forged.send(frame([1, 1, "raw-test/1", "bst_" + "x" * 43, 16, 1 << 20, {}]))
        assert forged.read_message()[2] == Status.UNAUTHENTICATED

    # The reserved connections are the authenticated clients'.
    retried: list[str] = []
    for source in SOURCES[5:7]:
        peer, welcome = join(server, source, server.token, retried)
        hoard.append(peer)
        assert welcome[3] == "admin" and answers(peer)
    # Anonymous ones admitted earlier keep working; past max_connections, closed at accept as before.
    assert answers(hoard[0])
    with RawPeer(server.host, server.port, source=SOURCES[7]) as extra:
        assert extra.wait_closed(timeout=3) < 2
    # The gateway counts its own connections (gateway.max_connections): its anonymous callers still get in.
    assert http(server, "/livez")[0] == 200
    assert json.loads(http(server, "/v1/admin/health", {})[1])["status"] == "ok"

    for peer in hoard:
        peer.close()
    counts = wait_for(lambda: stats(server), 10, interval=0.1, what="the hoard's connections to close")
    assert counts["rejected_connections_reserved"] == 1
    # The reserved one, the one at max_connections (and any closed at accept while a refused one's slot was busy).
    assert counts["rejected_connections_total"] == 2 + len(retried)
    assert counts["rejected_connections_per_source"] == 0
    by_reason = rejections(server)
    assert by_reason["reserved_connections"] == 1
    assert by_reason["connection_limit"] == 1 + len(retried)
    assert "Traceback" not in server.log()


def test_silent_handshakes_from_many_addresses_cannot_lock_out_a_token(
    server_factory: Callable[..., ServerProcess], hoard: list[RawPeer]
) -> None:
    server = server_factory(env=LIMITS, insecure=True)
    for source in SOURCES[:4]:  # connect, never say Hello
        hoard.append(RawPeer(server.host, server.port, source=source))
    with RawPeer(server.host, server.port) as probe:  # accepted: the four are counted by now
        assert probe.hello(server.token)[0] == WELCOME
    with RawPeer(server.host, server.port, source=SOURCES[4]) as anonymous:
        assert refused_anonymously(anonymous)[2] == Status.RESOURCE_EXHAUSTED
    # The client library raises it as what it is.
    with (
        pytest.raises(ResourceExhausted, match="reserved_connections"),
        SyncClient(server.address, timeout=5, insecure=True) as client,
    ):
        client.call("admin.health")
    with SyncClient(server.address, token_file=str(server.token_file), timeout=5, insecure=True) as admin:
        assert admin.call("admin.health")["status"] == "ok"
        assert admin.call("admin.stats")["rejected_connections_reserved"] == 2


def test_a_client_certificate_is_admitted_to_the_reserved_connections(
    server_factory: Callable[..., ServerProcess], hoard: list[RawPeer]
) -> None:
    # A certificate need not name a user here (tls.client_subjects = "any"): what is tested is its slot.
    server = server_factory(
        env={**LIMITS, "BASTION_TLS__CLIENT_AUTH": "optional", "BASTION_TLS__CLIENT_SUBJECTS": "any"}
    )
    assert server.ca_file is not None
    anonymous_tls = client_context(server.ca_file)
    alice = client_context(server.ca_file, *tls.issue_client_cert(server.data_dir, "alice"))
    for source in SOURCES[:4]:
        hoard.append(RawPeer(server.host, server.port, ssl_context=anonymous_tls, source=source))
        assert hoard[-1].hello()[3] == "anonymous"
    with RawPeer(server.host, server.port, ssl_context=anonymous_tls, source=SOURCES[4]) as anonymous:
        assert refused_anonymously(anonymous)[2] == Status.RESOURCE_EXHAUSTED
    peer, welcome = join(server, SOURCES[5], None, [], ssl_context=alice)
    hoard.append(peer)
    assert welcome[3] == "alice" and answers(peer)


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "tls"])
def test_silent_handshakes_holding_the_reserved_connections_are_closed_at_a_quarter_of_the_deadline(
    server_factory: Callable[..., ServerProcess], hoard: list[RawPeer], secure: bool
) -> None:
    """``handshake_timeout`` 8 s: the four silent connections below the threshold keep their 8 s, the two
    admitted past it (into the reserved ones) are closed after 2 s -- a quarter, at least 1 s -- and a token
    gets in then, not once the slow handshakes' full deadline has run out. Over TLS the silent ones never
    even start TLS (the TLS handshake's timeout is the same deadline)."""
    server = server_factory(env={**LIMITS, "BASTION_LIMITS__HANDSHAKE_TIMEOUT": "8"}, insecure=not secure)
    context = {"ssl_context": client_context(server.ca_file)} if secure and server.ca_file is not None else {}
    started = time.monotonic()
    for source in SOURCES[:6]:  # connect, never say Hello: max_connections, the last two reserved
        hoard.append(RawPeer(server.host, server.port, source=source))
    with RawPeer(server.host, server.port, source=SOURCES[6]) as extra:  # full: closed at accept
        assert extra.wait_closed(timeout=3) < 2
    for peer in hoard[4:]:  # a connection that never said Hello is closed without a word
        peer.wait_closed(timeout=7)
    cut = time.monotonic() - started
    assert 1.5 < cut < 6, f"the reserved ones' silent handshakes closed after {cut:.1f} s"
    assert not any(select.select([peer.sock], [], [], 0)[0] for peer in hoard[:4]), "the first four were cut"
    peer, welcome = join(server, SOURCES[7], server.token, [], **context)
    hoard.append(peer)
    assert welcome[3] == "admin" and answers(peer)
    assert time.monotonic() - started < 7.5, "the token got in only once the full deadline had run out"
    for peer in hoard[:4]:  # below the reserve the full deadline holds
        peer.wait_closed(timeout=9)
        assert time.monotonic() - started > 7.5


def test_one_address_cannot_hold_more_than_its_share_of_silent_handshakes(
    server_factory: Callable[..., ServerProcess], hoard: list[RawPeer]
) -> None:
    """``max_handshakes_per_source`` 2 of the four connections anyone may open: an attacker's silent
    connections past two are closed at accept, and other addresses' anonymous clients take the rest."""
    env = {**LIMITS, "BASTION_LIMITS__MAX_HANDSHAKES_PER_SOURCE": "2"}
    server = server_factory(env=env, insecure=True, args=HTTP)
    attacker = SOURCES[0]
    for _ in range(2):  # connect, never say Hello
        hoard.append(RawPeer(server.host, server.port, source=attacker))
    for _ in range(2):  # past its share: closed at once, before a byte
        with RawPeer(server.host, server.port, source=attacker) as extra:
            assert extra.wait_closed(timeout=3) < 2

    # The other two are left to other addresses' clients, anonymous ones too.
    for source in SOURCES[1:3]:
        hoard.append(RawPeer(server.host, server.port, source=source))
        assert hoard[-1].hello()[3] == "anonymous" and answers(hoard[-1])

    # A connection whose handshake ended counts no more: the attacker may open another (a token's, here).
    assert hoard[0].hello(server.token)[3] == "admin"
    peer, welcome = join(server, attacker, server.token, [])
    hoard.append(peer)
    assert welcome[3] == "admin" and answers(peer)

    assert rejections(server)["source_handshake_limit"] == 2
    for peer in hoard:
        peer.close()
    counts = wait_for(lambda: stats(server), 10, interval=0.1, what="the hoard's connections to close")
    assert counts["rejected_handshakes_per_source"] == 2
    assert counts["rejected_connections_total"] == 2
    assert counts["rejected_connections_per_source"] == counts["rejected_connections_reserved"] == 0
