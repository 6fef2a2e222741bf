"""Connection-level limits against real ``bastion serve`` processes.

Slow handshakes (TLS and plaintext) by the hundred while a legitimate
client's latency is measured; the per-source connection cap; a client that
sends calls and never reads the answers; rapid reset (call, cancel, repeat),
ping floods and calls over ``max_inflight``; idle connections; and a server
that runs out of file descriptors. Attackers connect from 127.0.0.2 and up,
so the legitimate client on 127.0.0.1 shares no per-source budget with them.
"""

from __future__ import annotations

import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bastion import ConnectError, SyncClient
from bastion.security.tls import client_context
from bastion.status import Status
from tests.support.raw import CALL, ERROR, GOAWAY, HELLO, RESULT, RawPeer, frame
from tests.support.server import LineReader, ServerProcess, read_rss_kib, wait_for

#: Timing assertions, or effects on the whole PostgreSQL server: runs alone under
#: ``pytest -n`` (the "exclusive" marker, tests/conftest.py).
pytestmark = pytest.mark.exclusive

CANCEL, PING, PONG = 6, 10, 11
KIB = 1 << 10
SLOWLORIS = Path(__file__).parents[1] / "support" / "slowloris.py"
#: Where attackers connect from (127.0.0.0/8 is all loopback on Linux).
SOURCES = [f"127.0.0.{i}" for i in range(2, 18)]
#: A TLS record header announcing a 512-byte handshake record, the start of a
#: ClientHello, then filler: the server's TLS layer waits for all 512 bytes.
TLS_RECORD_START = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03])
STALLED_CLIENT_HELLO = TLS_RECORD_START + bytes(range(256)) * 2
TRICKLED_HELLO = frame([HELLO, 1, "slow-loris/1", None, 16, 1 << 20, {}])


@pytest.fixture(autouse=True, scope="module")
def _many_descriptors() -> Iterator[None]:
    """Raise this process's fd limit to the hard limit (servers started here inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def client(server: ServerProcess, **kwargs: Any) -> SyncClient:
    return SyncClient(server.address, token_file=str(server.token_file), timeout=10, insecure=server.insecure, **kwargs)


def stats(server: ServerProcess) -> dict[str, Any]:
    with client(server) as admin:
        result: dict[str, Any] = admin.call("admin.stats")
        return result


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def call_latencies(server: ServerProcess, n: int = 500) -> list[float]:
    """Seconds each of ``n`` sequential calls to a handler costing 2 ms of CPU took."""
    with client(server) as good:
        for _ in range(20):  # warm up
            good.call("demo.spin", ms=2)
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            assert good.call("demo.spin", ms=2) == 2
            samples.append(time.perf_counter() - start)
    return samples


def read_until(peer: RawPeer, code: int, timeout: float = 5.0) -> tuple[list[Any], list[Any]]:
    """Messages up to the first of type ``code``: (that one, the ones before it)."""
    deadline = time.monotonic() + timeout
    before = []
    while True:
        message = peer.read_message(timeout=max(deadline - time.monotonic(), 0.01))
        if message[0] == code:
            return message, before
        before.append(message)


def goaway_seen(peer: RawPeer) -> list[Any] | None:
    """A GoAway, if one has arrived by now (other messages are read and dropped)."""
    while True:
        try:
            message = peer.read_message(timeout=0.05)
        except TimeoutError:
            return None
        except ConnectionResetError:
            return [GOAWAY, None, None, "reset without a GoAway"]
        if message[0] == GOAWAY:
            return message


# -- slowloris -------------------------------------------------------------------------------


@contextlib.contextmanager
def slowloris(plan: dict[str, Any]) -> Iterator[tuple[subprocess.Popen[str], LineReader]]:
    """Run tests/support/slowloris.py with ``plan`` until it says it is ready; stop it (stdin EOF) after."""
    attacker = subprocess.Popen(
        [sys.executable, str(SLOWLORIS), json.dumps(plan)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    reader = LineReader(attacker.stdout)
    try:
        assert reader.next_line(30) == "ready"
        yield attacker, reader
    finally:
        if attacker.poll() is None and attacker.stdin is not None:
            attacker.stdin.close()
        try:
            attacker.wait(40)
        except subprocess.TimeoutExpired:
            attacker.kill()
            attacker.wait(5)


@pytest.mark.parametrize("attackers", [1000, pytest.param(4000, marks=pytest.mark.slow)])
def test_slowloris_connections_are_closed_at_the_deadline_and_bystanders_keep_their_latency(
    server_factory: Callable[..., ServerProcess], attackers: int
) -> None:
    deadline = 2.0
    # Up to 250 silent connections per address (4000 over 16), held until the deadline: all admitted.
    env = {"BASTION_LIMITS__HANDSHAKE_TIMEOUT": str(deadline), "BASTION_LIMITS__MAX_HANDSHAKES_PER_SOURCE": "256"}
    tls = server_factory(env=env, name="tls")
    plain = server_factory(env=env, name="plain", insecure=True)
    baseline = {name: p99(call_latencies(s)) for name, s in (("tls", tls), ("plain", plain))}

    half = attackers // 2
    plan = {
        "duration": 60,
        "targets": [
            {
                "host": tls.host,
                "port": tls.port,
                "count": half,
                "sources": SOURCES[:8],
                "payload": STALLED_CLIENT_HELLO.hex(),
                "first": len(TLS_RECORD_START),
            },
            {
                "host": plain.host,
                "port": plain.port,
                "count": attackers - half,
                "sources": SOURCES[8:],
                "payload": TRICKLED_HELLO.hex(),
                "first": 1,
            },
        ],
    }
    with slowloris(plan) as (attacker, reader):
        during_attack = stats(tls)["connections_open"], stats(plain)["connections_open"]
        under = {name: p99(call_latencies(s)) for name, s in (("tls", tls), ("plain", plain))}
        assert attacker.poll() is None, "the attack ended before the measurement did"
        assert attacker.stdin is not None
        attacker.stdin.close()  # stop: each slot waits for its last connection to be closed
        results = [json.loads(line) for line in (reader.next_line(40), reader.next_line(5)) if line]

    report = {
        "baseline_p99_ms": {k: round(v * 1000, 2) for k, v in baseline.items()},
        "attack_p99_ms": {k: round(v * 1000, 2) for k, v in under.items()},
        "open_during_attack": during_attack,
        "attackers": results,
    }
    print(json.dumps(report))
    assert len(results) == 2, report
    for result in results:
        assert result["connect_failures"] == 0, report
        assert result["never_closed"] == 0, report
        assert result["closed_by_server"] == result["connections"] >= attackers // 2, report
        # Closed at the deadline, counted from accept: not before, and not long after.
        assert deadline - 0.5 <= result["median_close_s"] and result["max_close_s"] <= deadline + 1.5, report
    assert min(during_attack) >= 0.8 * half, report
    for name, base in baseline.items():
        assert under[name] <= max(2 * base, base + 0.050), report
    for server in (tls, plain):
        wait_for(lambda s=server: stats(s)["connections_open"] <= 1, 10, what="the attack's connections to close")
        assert server.process.poll() is None
        assert "Traceback" not in server.log()


# -- per-source connection limit ------------------------------------------------------------------


def test_the_257th_connection_from_one_address_is_closed_before_tls(
    server_factory: Callable[..., ServerProcess],
) -> None:
    # A long handshake deadline: the 256 bare TCP connections must stay open meanwhile (all of them: past
    # limits.max_handshakes_per_source, which test_reserved_connections.py tests).
    env = {"BASTION_LIMITS__HANDSHAKE_TIMEOUT": "60", "BASTION_LIMITS__MAX_HANDSHAKES_PER_SOURCE": "256"}
    server = server_factory(env=env)
    assert server.ca_file is not None
    context = client_context(server.ca_file)
    hoard = []
    try:
        for _ in range(256):
            hoard.append(RawPeer(server.host, server.port, source="127.0.0.2"))
        wait_for(lambda: stats(server)["connections_open"] >= 257, 10, what="256 connections to be accepted")

        start = time.monotonic()
        with RawPeer(server.host, server.port, source="127.0.0.2") as extra:
            # Closed at once, before a TLS byte was exchanged.
            assert extra.wait_closed(timeout=3) < 2
        assert time.monotonic() - start < 2

        with RawPeer(server.host, server.port, ssl_context=context, source="127.0.0.3") as other:
            other.hello()
            other.send(frame([CALL, 1, "admin.health", {}]))
            assert other.read_message()[0] == RESULT

        counts = stats(server)
        assert counts["rejected_connections_per_source"] == 1
        assert counts["rejected_connections_total"] == 1

        # A slot given back is a slot usable again.
        hoard.pop().close()

        def admitted() -> bool:
            try:
                with RawPeer(server.host, server.port, ssl_context=context, source="127.0.0.2") as again:
                    again.hello()
                    return True
            except OSError:
                return False

        wait_for(admitted, 10, interval=0.2, what="the freed slot to be usable")
    finally:
        for peer in hoard:
            peer.close()


def test_connections_over_the_total_limit_are_closed(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(
        env={"BASTION_LIMITS__MAX_CONNECTIONS": "4", "BASTION_LIMITS__HANDSHAKE_TIMEOUT": "60"}, insecure=True
    )
    hoard = [RawPeer(server.host, server.port, source=source) for source in SOURCES[:4]]
    try:
        for peer in hoard:
            peer.hello()
        with RawPeer(server.host, server.port, source=SOURCES[4]) as extra:
            assert extra.wait_closed(timeout=3) < 2
    finally:
        for peer in hoard:
            peer.close()

    def settled() -> dict[str, Any] | None:
        try:  # refused itself until the server has seen the hoard go
            counts = stats(server)
        except ConnectError:
            return None
        return counts if counts["connections_open"] == 1 else None

    counts = wait_for(settled, 5, interval=0.1, what="the hoard's connections to close")
    assert counts["rejected_connections_total"] >= 1
    assert counts["rejected_connections_per_source"] == 0


# -- a client that never reads --------------------------------------------------------------------


def test_a_client_that_never_reads_is_dropped_and_server_memory_stays_bounded(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(env={"BASTION_LIMITS__WRITE_STALL_TIMEOUT": "2"}, insecure=True)
    with client(server) as good:
        assert good.call("demo.echo", value="before") == "before"
        rss_before = peak = read_rss_kib(server.pid)
        payload = bytes(range(256)) * (64 * KIB // 256)
        with RawPeer(server.host, server.port) as peer:
            peer.hello(server.token)
            peer.sock.settimeout(0.2)
            pending, call_id, calls_sent, dropped = b"", 0, 0, False
            give_up = time.monotonic() + 30
            while time.monotonic() < give_up:
                if not pending:
                    call_id += 1
                    pending = frame([CALL, call_id, "demo.echo", {"value": payload}])
                try:
                    pending = pending[peer.sock.send(pending) :]
                    if not pending:
                        calls_sent += 1
                    continue
                except TimeoutError:  # the server has stopped reading from us
                    peak = max(peak, read_rss_kib(server.pid))
                except (ConnectionResetError, BrokenPipeError):
                    dropped = True
                    break
        growth_mb = (peak - rss_before) / 1024
        report = f"sent {calls_sent} calls of 64 KiB; server RSS grew by {growth_mb:.1f} MB"
        print(report)
        assert dropped, f"the connection was not dropped within 30 s ({report})"
        assert calls_sent > 16, report  # it did get to fill the buffers
        assert growth_mb < 50, report
        assert good.call("demo.echo", value="after") == "after"
        assert good.call("admin.stats")["closed_slow_reader"] == 1
    assert "Traceback" not in server.log()


# -- protocol abuse ----------------------------------------------------------------------------------


def flood(
    peer: RawPeer, batch: Callable[[int], bytes], per_batch: int, limit: int, bystander: SyncClient
) -> tuple[int, list[Any]]:
    """Send batches until the server answers with a GoAway; (units sent by then, that GoAway).

    Each batch ends with a Ping whose Pong says the server has read the batch
    whole before the next one goes: the count is exact to the batch.
    """
    sent = 0
    marker = 1_000_000
    while sent <= 3 * limit:
        marker += 1
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            peer.send(batch(sent) + frame([PING, marker]))
        sent += per_batch
        try:
            while (message := peer.read_message())[0] != GOAWAY:
                if message[:2] == [PONG, marker]:
                    break
            else:
                return sent, message
        except ConnectionResetError:
            raise AssertionError(f"reset without a GoAway after {sent}") from None
        goaway = goaway_seen(peer)  # the GoAway may follow the marker's Pong
        if goaway is not None:
            return sent, goaway
        if sent % (10 * per_batch) == 0:
            assert bystander.call("demo.echo", value=sent) == sent
    raise AssertionError(f"no GoAway after {sent}")


def test_rapid_reset_is_closed_after_a_bounded_number_of_cancels(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(insecure=True)
    limit = 1000

    def pairs(start: int) -> bytes:
        return b"".join(
            frame([CALL, i, "demo.slow", {"seconds": 30}]) + frame([CANCEL, i]) for i in range(start + 1, start + 51)
        )

    with client(server) as bystander, RawPeer(server.host, server.port) as peer:
        peer.hello(server.token)
        # Under the cap: every call and its cancel are forgotten, nothing stays in flight.
        peer.send(pairs(0))
        wait_for(lambda: bystander.call("admin.stats")["calls_in_flight"] == 1, 5, what="cancelled calls to go")
        sent, goaway = flood(peer, lambda n: pairs(n + 50), 50, limit, bystander)
        assert goaway[2] == Status.RESOURCE_EXHAUSTED and goaway[3] == "too many cancellations", goaway
        assert limit < sent + 50 <= limit + 100  # the first 50 count too
        peer.wait_closed(timeout=5)
        counts = bystander.call("admin.stats")
        assert counts["closed_abuse"] == 1
        assert counts["calls_total"] <= limit + 10  # the server stopped at the cap, not at the end of a read
        assert bystander.call("demo.echo", value="after") == "after"


def test_a_ping_flood_is_closed_after_a_bounded_number_of_pings(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(insecure=True)
    limit = 100

    def pings(start: int) -> bytes:  # 9, and flood's marker makes 10
        return b"".join(frame([PING, i]) for i in range(start, start + 9))

    with client(server) as bystander, RawPeer(server.host, server.port) as peer:
        peer.hello(server.token)
        sent, goaway = flood(peer, pings, 10, limit, bystander)
        assert goaway[2] == Status.RESOURCE_EXHAUSTED and goaway[3] == "ping flood", goaway
        assert limit < sent <= limit + 20
        peer.wait_closed(timeout=5)
        assert bystander.call("admin.stats")["closed_abuse"] == 1
        assert bystander.call("demo.echo", value="after") == "after"


def test_calls_over_max_inflight_by_the_thousand_are_closed(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(env={"BASTION_LIMITS__MAX_INFLIGHT": "2"}, insecure=True)
    limit = 1000

    with client(server) as bystander, RawPeer(server.host, server.port) as peer:
        peer.hello(server.token)
        peer.send(frame([CALL, 1, "demo.slow", {"seconds": 30}]) + frame([CALL, 2, "demo.slow", {"seconds": 30}]))

        def calls(start: int) -> bytes:
            return b"".join(frame([CALL, i, "demo.echo", {"value": i}]) for i in range(start + 3, start + 53))

        sent, goaway = flood(peer, calls, 50, limit, bystander)
        assert goaway[2] == Status.RESOURCE_EXHAUSTED and "max_inflight" in goaway[3], goaway
        assert limit < sent <= limit + 100
        peer.wait_closed(timeout=5)
        assert bystander.call("admin.stats")["closed_abuse"] == 1


def test_refused_calls_under_the_cap_are_answered_and_the_connection_stays(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(env={"BASTION_LIMITS__MAX_INFLIGHT": "1"}, insecure=True)
    with RawPeer(server.host, server.port) as peer:
        peer.hello(server.token)
        peer.send(frame([CALL, 1, "demo.slow", {"seconds": 0.5}]))
        peer.send(b"".join(frame([CALL, i, "demo.echo", {"value": i}]) for i in range(2, 12)))
        refusals = [peer.read_message() for _ in range(10)]
        assert all(m[0] == ERROR and m[2] == Status.RESOURCE_EXHAUSTED for m in refusals), refusals
        assert peer.read_message()[:2] == [RESULT, 1]
        peer.send(frame([CALL, 12, "demo.echo", {"value": "still here"}]))
        assert peer.read_message() == [RESULT, 12, "still here"]


# -- idle connections ----------------------------------------------------------------------------------


def test_idle_connections_are_sent_goaway_and_closed(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(env={"BASTION_LIMITS__IDLE_TIMEOUT": "1"}, insecure=True)
    with (
        RawPeer(server.host, server.port) as idle,
        RawPeer(server.host, server.port) as pinging,
        RawPeer(server.host, server.port) as busy,
    ):
        for peer in (idle, pinging, busy):
            peer.hello(server.token)
        start = time.monotonic()
        busy.send(frame([CALL, 1, "demo.slow", {"seconds": 2}]))
        # Pings alone do not keep a connection from being idle.
        for i in range(4):
            pinging.send(frame([PING, i]))
            time.sleep(0.2)
        goaway, _ = read_until(idle, GOAWAY, timeout=3)
        assert goaway[1:] == [0, Status.OK, "idle timeout"]
        assert 0.9 <= time.monotonic() - start < 2.5
        idle.wait_closed(timeout=2)
        goaway, pongs = read_until(pinging, GOAWAY, timeout=3)
        assert goaway[2:] == [Status.OK, "idle timeout"] and {m[0] for m in pongs} == {PONG}
        # A call in flight is not idleness: the busy connection gets its answer, then is idle a second.
        assert busy.read_message(timeout=3) == [RESULT, 1, 2]
        assert time.monotonic() - start >= 1.9
        goaway, _ = read_until(busy, GOAWAY, timeout=3)
        assert goaway[1:] == [1, Status.OK, "idle timeout"]
        assert time.monotonic() - start >= 2.8
    with client(server) as returning:
        assert returning.call("admin.stats")["closed_idle"] == 3


# -- out of file descriptors -----------------------------------------------------------------------------


def _at_most_64_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def test_the_server_survives_running_out_of_file_descriptors(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(insecure=True, preexec_fn=_at_most_64_descriptors)

    def fill() -> int:
        """Open handshaken connections until the server refuses one; close them all; how many it took."""
        peers: list[RawPeer] = []
        try:
            while len(peers) < 100:
                try:
                    peer = RawPeer(server.host, server.port, timeout=3)
                except OSError:
                    break
                try:
                    peer.hello()
                except (OSError, AssertionError):  # closed unanswered, or left waiting in the backlog
                    peer.close()
                    break
                peers.append(peer)
            return len(peers)
        finally:
            for peer in peers:
                peer.close()

    def healthy() -> bool:
        try:
            with RawPeer(server.host, server.port, timeout=2) as peer:
                peer.hello()
                peer.send(frame([CALL, 1, "admin.health", {}]))
                return bool(peer.read_message()[0] == RESULT)
        except (OSError, AssertionError):
            return False

    first = fill()
    assert 10 <= first < 64, first
    wait_for(healthy, 10, interval=0.2, what="the server to accept again")
    second = fill()  # and again, to the same level: nothing leaked
    assert abs(second - first) <= 2, (first, second)
    wait_for(healthy, 10, interval=0.2, what="the server to accept again")
    counts = stats(server)
    assert counts["accept_errors_total"] >= 1
    assert server.process.poll() is None
    log = server.log()
    assert "cannot accept connections" in log and "file descriptor limit (64)" in log
    assert "Traceback" not in log
