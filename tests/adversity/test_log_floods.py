"""An attacker cannot flood the server's logs: per-connection events it can cause at will are
written a bounded number of times per window, server-wide, against real ``bastion serve``
processes. Attackers connect from 127.0.0.2 and up, each address under its own per-source
budgets, as a host with many loopback (or IPv4) addresses could."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable

from bastion import SyncClient
from bastion.observability.loglimit import LOG_BURST, LOG_WINDOW, LogBudget
from bastion.security.authn import AUTH_FAILURES_AUDITED
from bastion.server.upkeep import DENIALS_AUDITED, DENIALS_AUDITED_SERVER_WIDE
from bastion.status import Status
from tests.support.raw import CALL, ERROR, GOAWAY, HELLO, RawPeer, frame
from tests.support.server import ServerProcess, wait_for

PING = 10
ATTACKERS = 40


def abuse_lines(server: ServerProcess) -> list[str]:
    return [line for line in server.log().splitlines() if "closing connection" in line and "ping flood" in line]


def audit_records(server: ServerProcess, event: str = "connection.abuse") -> list[dict[str, object]]:
    path = server.data_dir / "audit.log"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("event") == event]


def test_abuse_closes_from_many_addresses_write_a_bounded_number_of_log_lines(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(insecure=True)
    flood = b"".join(frame([PING, i]) for i in range(150))  # over max_pings_per_10s (100)
    for n in range(ATTACKERS):
        with RawPeer(server.host, server.port, source=f"127.0.{n // 200}.{2 + n % 200}") as peer:
            peer.hello()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                peer.send(flood)
            while (message := peer.read_message())[0] != GOAWAY:
                pass
            assert message[2] == Status.RESOURCE_EXHAUSTED and message[3] == "ping flood", message
            peer.wait_closed()
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10, insecure=True) as admin:
        assert admin.call("admin.stats")["closed_abuse"] == ATTACKERS  # every close is counted
    wait_for(lambda: abuse_lines(server), 5, what="the first abuse line")
    assert 1 <= len(abuse_lines(server)) <= LOG_BURST, abuse_lines(server)
    records = audit_records(server)
    assert 1 <= len(records) <= LOG_BURST, records


def test_the_log_budget_writes_a_burst_per_window_and_says_what_it_left_out() -> None:
    now = [0.0]
    budget = LogBudget(burst=2, window=10.0, clock=lambda: now[0])
    assert [budget.take("abuse") for _ in range(5)] == [0, 0, None, None, None]
    assert budget.take("slow_reader") == 0  # each kind has its own budget
    assert budget.suppressed("abuse") == 3
    now[0] = 10.0
    assert budget.take("abuse") == 3  # the first line of the next window says how many were left out
    assert budget.take("abuse") == 0
    assert budget.take("abuse") is None


def test_denied_calls_from_many_connections_write_a_bounded_number_of_audit_records(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """Each connection may write DENIALS_AUDITED denials per 10 s; a new connection (from a new
    address) per batch made that no bound at all: the server-wide budget is."""
    server = server_factory(insecure=True)
    connections, per_connection = 8, DENIALS_AUDITED + 5
    for n in range(connections):
        with RawPeer(server.host, server.port, source=f"127.0.1.{2 + n}") as peer:
            peer.hello()  # anonymous: admin.stats needs a credential
            peer.send(b"".join(frame([CALL, i, "admin.stats", {}]) for i in range(1, per_connection + 1)))
            for _ in range(per_connection):
                message = peer.read_message()
                assert message[0] == ERROR and message[2] == Status.UNAUTHENTICATED, message
    denials = [r for r in audit_records(server, "call.denied") if r.get("method") == "admin.stats"]
    assert DENIALS_AUDITED <= len(denials) <= DENIALS_AUDITED_SERVER_WIDE, len(denials)


def test_bad_tokens_from_many_addresses_write_a_bounded_number_of_audit_records(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """The login throttle lets each address fail 20 times at once (then 5 a second); a bad token costs
    the attacker one small Hello, so many addresses wrote 20 auth.failure records each."""
    server = server_factory(insecure=True)
    addresses, per_address = 8, 20
    start = time.monotonic()
    for n in range(addresses):
        for _ in range(per_address):
            with RawPeer(server.host, server.port, source=f"127.0.2.{2 + n}") as peer:
                peer.send(frame([HELLO, 1, "raw-test/1", "bst_not-a-real-token", 16, 1 << 20, {}]))
                message = peer.read_message()
                assert message[0] == GOAWAY and message[2] == Status.UNAUTHENTICATED, message
    windows = 1 + int((time.monotonic() - start) // LOG_WINDOW)  # each 10 s window has its budget
    failures = audit_records(server, "auth.failure")
    assert AUTH_FAILURES_AUDITED <= len(failures) <= windows * AUTH_FAILURES_AUDITED, (len(failures), windows)
