"""``GET /metrics`` on a real ``bastion serve`` (one process, and ``--workers 2``).

Calls are made through the native protocol and through the gateway, then
the scrape is parsed with prometheus-client's own parser (and checked with
``promtool check metrics`` where Debian's ``prometheus`` package is
installed) and the counts compared with what was done.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bastion import SyncClient
from bastion.exceptions import CallError, InternalError, PermissionDenied, ResourceExhausted, Unauthenticated
from bastion.security.tls import client_context
from bastion.status import Status
from tests.support.raw import CALL, ERROR, RawPeer, frame
from tests.support.server import ServerProcess, start_server, wait_for

HTTP = ("--http-port", "0")
GRACE = {"BASTION_LIMITS__GRACE_PERIOD": "3"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("metrics"), env=GRACE, http=True)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()


def _context(server: ServerProcess) -> ssl.SSLContext:
    assert server.ca_file is not None
    return ssl.create_default_context(cafile=str(server.ca_file))


def _get(server: ServerProcess, path: str) -> tuple[int, str, str]:
    """GET ``path`` as the server's admin (/metrics needs a credential by default: test_metrics_access.py)."""
    assert server.gateway_url is not None
    request = urllib.request.Request(server.gateway_url + path, headers={"Authorization": f"Bearer {server.token}"})
    with urllib.request.urlopen(request, context=_context(server), timeout=10) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


def _rpc(server: ServerProcess, method: str, params: dict[str, Any]) -> Any:
    assert server.gateway_url is not None
    body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1}).encode()
    request = urllib.request.Request(
        server.gateway_url + "/rpc",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {server.token}"},
    )
    with urllib.request.urlopen(request, context=_context(server), timeout=10) as response:
        return json.loads(response.read())


def scrape(server: ServerProcess) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}} of one scrape."""
    status, content_type, text = _get(server, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def test_metrics_count_calls_by_method_and_status(served: ServerProcess) -> None:
    before = scrape(served)
    with SyncClient(served.address, token=served.token, timeout=10, retry=None) as client:
        for i in range(5):
            assert client.call("demo.echo", value=i) == i
        for _ in range(2):
            with pytest.raises(InternalError):
                client.call("demo.fail", message="boom")
        with pytest.raises(CallError):
            client.call("nosuch.method-" + "x" * 40)
        client.call("kv.put", key="metrics/k", value=b"v")
    assert _rpc(served, "demo.echo", {"value": "via http"})["result"] == "via http"
    with pytest.raises(Unauthenticated):
        SyncClient(served.address, token="not-a-token", timeout=10, retry=None).connect()

    after = scrape(served)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("bastion_calls_total", method="demo.echo", status="OK") == 6  # 5 native + 1 over /rpc
    assert delta("bastion_calls_total", method="demo.fail", status="INTERNAL") == 2
    assert delta("bastion_calls_total", method="other", status="UNIMPLEMENTED") == 1
    assert delta("bastion_calls_total", method="kv.put", status="OK") == 1
    assert delta("bastion_call_duration_seconds_count", method="demo.echo") == 6
    assert delta("bastion_call_duration_seconds_bucket", method="demo.echo", le="+Inf") == 6
    assert delta("bastion_call_duration_seconds_sum", method="demo.echo") > 0
    assert delta("bastion_auth_failures_total", reason="credentials") >= 1
    assert delta("bastion_connections_total") >= 2
    assert delta("bastion_store_operation_duration_seconds_count", operation="write") >= 1
    assert value(after, "bastion_calls_in_flight") == 0
    assert value(after, "bastion_workers") == 1
    assert value(after, "bastion_scheduler_queue_length", priority="interactive") == 0
    assert "bastion_rejections_total" in after and "bastion_connections_open" in after
    (build,) = after["bastion_build_info"]
    assert dict(build)["version"] and dict(build)["python"]

    # Low cardinality: method labels are the server's own methods (plus "other"), whatever was asked.
    methods = {dict(labels)["method"] for labels in after["bastion_calls_total"]}
    assert methods <= {"other", *_served_methods(served)}
    assert not any("nosuch" in method for method in methods)


def _served_methods(server: ServerProcess) -> set[str]:
    with SyncClient(server.address, token=server.token, timeout=10, retry=None) as client:
        services = client.call("admin.methods")
    names = {(service["name"], method["name"]) for service in services for method in service["methods"]}
    return {name if "." in name else f"{service}.{name}" for service, name in names}


def test_a_call_its_handler_denies_is_counted_and_audited_as_denied(served: ServerProcess) -> None:
    """PERMISSION_DENIED from a service's own access check (kv's namespaces, files' shares, topics' ACLs) is a
    denied call as much as a missing role is: bastion_auth_failures_total{reason="denied"} and the audit log's
    call.denied must show it, or probing other users' data goes unseen."""
    with SyncClient(served.address, token=served.token, timeout=10, retry=None) as admin:
        admin.call("auth.create_user", name="prober", password=None, roles=[])
        token = admin.call("auth.create_token", user="prober")["token"]
    before = scrape(served)
    with SyncClient(served.address, token=token, timeout=10, retry=None) as prober:
        with pytest.raises(PermissionDenied):
            prober.call("kv.get", key="secret", namespace="~admin")
        with pytest.raises(PermissionDenied):
            prober.call("files.list", all=True)
    after = scrape(served)
    denied = value(after, "bastion_auth_failures_total", reason="denied")
    assert denied - value(before, "bastion_auth_failures_total", reason="denied") == 2
    audit = [json.loads(line) for line in (served.data_dir / "audit.log").read_text().splitlines()]
    mine = [(r["method"], r["status"]) for r in audit if r["event"] == "call.denied" and r["principal"] == "prober"]
    assert mine == [("kv.get", "PERMISSION_DENIED"), ("files.list", "PERMISSION_DENIED")]


def test_calls_over_max_inflight_are_counted_as_rejections(tmp_path: Path) -> None:
    """A client with more calls open than limits.max_inflight gets RESOURCE_EXHAUSTED for the rest from the
    protocol core, before the server's call path sees them: /metrics must still show them refused."""
    server = start_server(tmp_path / "inflight", env={"BASTION_LIMITS__MAX_INFLIGHT": "2"}, http=True)
    try:
        before = value(scrape(server), "bastion_rejections_total", reason="inflight")
        assert server.ca_file is not None
        with RawPeer(server.host, server.port, ssl_context=client_context(server.ca_file)) as peer:
            peer.hello(server.token)
            peer.send(b"".join(frame([CALL, i, "demo.slow", {"seconds": 0.5}]) for i in range(1, 6)))
            answers = [peer.read_message(timeout=10) for _ in range(5)]
        refused = [a for a in answers if a[0] == ERROR and a[2] == Status.RESOURCE_EXHAUSTED]
        assert len(refused) == 3, answers
        wait_for(
            lambda: value(scrape(server), "bastion_rejections_total", reason="inflight") - before == 3,
            10,
            what="the 3 refused calls in bastion_rejections_total",
        )
    finally:
        assert server.stop() == 0, server.log()


def test_a_connection_that_never_says_hello_is_counted_when_closed(tmp_path: Path) -> None:
    """A connection through TLS that sends no Hello is closed at limits.handshake_timeout (a slowloris
    holding connection slots): bastion_connections_closed_total must say so, as it does for idle ones."""
    server = start_server(tmp_path / "silent", env={"BASTION_LIMITS__HANDSHAKE_TIMEOUT": "1"}, http=True)
    try:
        before = value(scrape(server), "bastion_connections_closed_total", reason="handshake_timeout")
        assert server.ca_file is not None
        with RawPeer(server.host, server.port, ssl_context=client_context(server.ca_file)) as peer:
            assert peer.wait_closed(timeout=10) < 10
        wait_for(
            lambda: value(scrape(server), "bastion_connections_closed_total", reason="handshake_timeout") - before == 1,
            10,
            what="the silent connection in bastion_connections_closed_total",
        )
    finally:
        assert server.stop() == 0, server.log()


def test_calls_a_shared_redis_limiter_refuses_are_counted_as_rate_limited(tmp_path: Path) -> None:
    """With rate_limits.redis_url the limit is checked as the call runs, not at admission; a refusal there is
    as much a rate-limited call as one the in-process limiter refuses."""
    redis_url = os.environ.get("BASTION_TEST_REDIS_URL")
    if not redis_url:
        pytest.skip("BASTION_TEST_REDIS_URL is not set")
    config = tmp_path / "bastion.toml"
    config.write_text(
        f'[rate_limits]\nredis_url = "{redis_url}"\nredis_prefix = "metrics-test-{uuid.uuid4().hex}:"\n'
        "per_principal = {rate = 0.001, burst = 3}\n"
    )
    server = start_server(tmp_path / "redis", args=("--config", str(config)), http=True)
    try:
        before = value(scrape(server), "bastion_rejections_total", reason="rate_limited")
        refused = 0
        with SyncClient(server.address, token=server.token, timeout=10, retry=None) as client:
            for i in range(6):
                try:
                    client.call("demo.echo", value=i)
                except ResourceExhausted:
                    refused += 1
        assert refused >= 3
        after = value(scrape(server), "bastion_rejections_total", reason="rate_limited")
        assert after - before == refused
    finally:
        assert server.stop() == 0, server.log()


def test_logins_the_login_throttle_refuses_are_counted_as_throttled(tmp_path: Path) -> None:
    """auth.login (the console's and ``bastion login``'s way in) meets the same login throttle as a handshake
    with a password: its refusals are bastion_auth_failures_total{reason="throttled"} too."""
    server = start_server(tmp_path / "throttle", http=True)
    try:
        before = value(scrape(server), "bastion_auth_failures_total", reason="throttled")
        throttled = 0
        with SyncClient(server.address, timeout=10, retry=None) as anonymous:
            for _ in range(8):
                try:
                    anonymous.call("auth.login", username="admin", password="wrong")
                except ResourceExhausted:
                    throttled += 1
                except Unauthenticated:
                    pass
        assert throttled >= 1
        after = value(scrape(server), "bastion_auth_failures_total", reason="throttled")
        assert after - before == throttled
    finally:
        assert server.stop() == 0, server.log()


def test_failed_tls_handshakes_are_counted_as_tls_rejections(served: ServerProcess) -> None:
    """A client that never gets through TLS -- plaintext to the TLS port, or one that does not trust the
    server's certificate -- is a connection refused at TLS: /metrics must show it, not only a debug log."""
    before = scrape(served)
    host, port = served.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as plain:
        plain.sendall(b"\x00\x00\x00\x10not a TLS hello")
        plain.recv(100)  # a TLS alert, or the close
    distrusting = ssl.create_default_context()  # the system's roots: not the test CA that signed the server
    with socket.create_connection((host, int(port)), timeout=10) as raw, pytest.raises(ssl.SSLError):
        distrusting.wrap_socket(raw, server_hostname="localhost")

    def tls_refusals() -> float:
        delta = value(scrape(served), "bastion_rejections_total", reason="tls")
        return delta - value(before, "bastion_rejections_total", reason="tls")

    wait_for(lambda: tls_refusals() >= 2, 10, what="both failed TLS handshakes in bastion_rejections_total")
    assert tls_refusals() == 2
    wait_for(
        lambda: value(scrape(served), "bastion_connections_open") <= value(before, "bastion_connections_open"),
        10,
        what="the refused connections to leave bastion_connections_open",
    )


def test_metrics_pass_promtool(served: ServerProcess) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    _, _, text = _get(served, "/metrics")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_metrics_add_up_every_worker(tmp_path: Path) -> None:
    server = start_server(tmp_path / "workers", env=GRACE, args=("--workers", "2", *HTTP))
    try:
        assert server.gateway_url is not None
        calls_by_pid: dict[int, int] = {}
        made = 0
        for _ in range(60):  # new connections until both workers have answered some calls
            with SyncClient(server.address, token=server.token, timeout=10, retry=None) as client:
                pid = int(client.call("admin.stats")["pid"])
                for i in range(3):
                    client.call("demo.echo", value=i)
                made += 3
                calls_by_pid[pid] = calls_by_pid.get(pid, 0) + 3
            if len(calls_by_pid) == 2 and made >= 12:
                break
        assert len(calls_by_pid) == 2, f"only workers {sorted(calls_by_pid)} answered"

        # Whichever worker answers the scrape, it adds the other's published counts (at most ~1 s old).
        def complete() -> dict[str, Any] | None:
            samples = scrape(server)
            echoed = value(samples, "bastion_calls_total", method="demo.echo", status="OK")
            return samples if echoed == made else None

        samples = wait_for(complete, timeout=10, interval=0.2, what=f"{made} demo.echo calls in /metrics")
        assert value(samples, "bastion_workers") == 2
        assert value(samples, "bastion_call_duration_seconds_count", method="demo.echo") == made
        # Counters never go backwards from one scrape to the next, whichever worker answers.
        for _ in range(5):
            again = scrape(server)
            assert value(again, "bastion_calls_total", method="demo.echo", status="OK") == made

        # A worker killed outright is replaced; the replacement carries on from its last published counts.
        victim = min(calls_by_pid)
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            with SyncClient(server.address, token=server.token, timeout=10, retry=None) as client:
                return int(client.call("admin.stats")["pid"]) not in calls_by_pid

        wait_for(replaced, timeout=20, interval=0.1, what="a replacement worker to answer")
        for _ in range(5):
            samples = scrape(server)
            assert value(samples, "bastion_calls_total", method="demo.echo", status="OK") == made
            assert value(samples, "bastion_workers") == 2
    finally:
        assert server.stop() == 0, server.log()


def test_stream_buffer_gauges_show_the_items_handlers_have_not_taken(tmp_path: Path) -> None:
    limits = {"BASTION_LIMITS__MAX_STREAM_BUFFER_TOTAL": str(512 * 1024**2)}
    server = start_server(tmp_path / "streams", env={**GRACE, **limits}, insecure=True, http=True)
    try:
        assert server.gateway_url is not None

        def gauges() -> tuple[float, float, float]:
            samples = {s.name: s.value for f in text_string_to_metric_families(server.scrape()) for s in f.samples}
            return (
                samples["bastion_stream_buffer_bytes"],
                samples["bastion_stream_buffer_limit_bytes"],
                samples["bastion_stream_buffer_paused_connections"],
            )

        assert gauges() == (0, 512 * 1024**2, 0)
        with RawPeer(server.host, server.port) as peer:
            peer.hello(server.token)
            # A call whose handler waits 30 s before it reads, sent 3 items of 1000 bytes.
            peer.send(frame([CALL, 1, "demo.take", {"hold": 30}, None, None, True]))
            peer.send(b"".join(frame([7, 1, bytes(1000)]) for _ in range(3)))
            # Each item counts its encoded value: 1000 bytes and a 3-byte MessagePack header.
            wait_for(lambda: gauges()[0] == 3009, 10, interval=0.1, what="3009 bytes in bastion_stream_buffer_bytes")
        wait_for(lambda: gauges()[0] == 0, 10, interval=0.1, what="the items dropped with their connection")
    finally:
        assert server.stop() == 0, server.log()
