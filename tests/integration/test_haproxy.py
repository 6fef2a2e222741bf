"""Three replicas on one PostgreSQL store behind HAProxy (TCP mode, TLS passed through, PROXY v2).

The HAProxy configuration is the one docs/operations.md ("Behind HAProxy")
shows, with loopback ports filled in: ``mode tcp``, ``balance leastconn``,
a TCP connect health check every 300 ms, ``send-proxy-v2`` to servers that
trust 127.0.0.1 (HAProxy's address) as a proxy. The client connects to
HAProxy from 127.0.0.5, so the replicas can tell it from HAProxy: their
audit logs must show 127.0.0.5. Then one replica is killed (SIGKILL): the
health check marks it DOWN and the calls go on through the other two.

Needs ``haproxy`` (Debian package; .ci/run installs it) and
BASTION_TEST_POSTGRES_DSN; skips with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import bastion
from bastion import Client
from tests.support.server import ServerProcess, start_server, wait_for
from tests.support.stores import store_location

CLIENT_ADDRESS = "127.0.0.5"  # where the client connects from; HAProxy connects to the replicas from 127.0.0.1
DIRECT_ADDRESS = "127.0.0.9"  # where the test talks to a replica directly from (127.0.0.1 must send a PROXY header)

#: docs/operations.md, "Behind HAProxy", with the addresses and ports of this test.
HAPROXY_CONFIG = """\
global
    stats socket {stats_socket} mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    retries 2
    option redispatch

frontend bastion
    bind 127.0.0.1:{port}
    default_backend bastion_replicas

backend bastion_replicas
    balance leastconn
    default-server check inter 300ms fall 2 rise 2 send-proxy-v2
{servers}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def haproxy_servers(stats_socket: Path) -> dict[str, str]:
    """``{server name: status}`` of the backend, from HAProxy's stats socket ("UP", "DOWN", ...)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(stats_socket))
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    fields = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(fields, line.split(","), strict=False)) for line in lines[1:] if line]
    return {row["svname"]: row["status"] for row in rows if row["pxname"] == "bastion_replicas"}


@contextlib.contextmanager
def run_haproxy(workdir: Path, replicas: list[ServerProcess]) -> Iterator[tuple[str, Path]]:
    """HAProxy in front of ``replicas``; yields (its address, its stats socket) once every replica is UP."""
    port = free_port()
    stats_socket = workdir / "haproxy.sock"
    servers = "\n".join(f"    server r{i} {r.address}" for i, r in enumerate(replicas))
    config = workdir / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(port=port, stats_socket=stats_socket, servers=servers))
    check = subprocess.run(["haproxy", "-c", "-q", "-f", str(config)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    log = open(workdir / "haproxy.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: stats_socket.exists() and set(haproxy_servers(stats_socket).values()) == {"UP"},
            10,
            what=f"HAProxy up with every replica UP ({workdir / 'haproxy.log'})",
        )
        yield f"127.0.0.1:{port}", stats_socket
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


def audit_peers(replica: ServerProcess) -> list[str]:
    path = replica.data_dir / "audit.log"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [record["peer"] for record in records if record["event"] == "auth.login_failure"]


async def proxied_connections(replica: ServerProcess, token: str) -> int:
    async with Client(replica.address, token=token, timeout=10, source_address=DIRECT_ADDRESS) as client:
        return int((await client.admin.stats())["proxied_connections_total"])


def test_calls_through_haproxy_spread_over_replicas_and_survive_one_dying(tmp_path: Path) -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (Debian: apt-get install haproxy; .ci/run does)")
    env = {
        "BASTION_STORE": store_location("postgresql", tmp_path, "shared"),
        "BASTION_TRUSTED_PROXIES": "127.0.0.1",
        "BASTION_LIMITS__GRACE_PERIOD": "2",
    }
    replicas: list[ServerProcess] = []
    try:
        replicas.append(start_server(tmp_path / "r0", env=env))  # the first creates the admin user and token
        token = replicas[0].token
        replicas += [start_server(tmp_path / f"r{i}", env=env) for i in (1, 2)]
        with run_haproxy(tmp_path, replicas) as (address, stats_socket):

            async def calls(n: int, tag: str) -> None:
                """``n`` connections through HAProxy, one after another: a call and a failed login on each."""
                for i in range(n):
                    async with Client(address, token=token, timeout=10, source_address=CLIENT_ADDRESS) as client:
                        assert (await client.demo.echo(value=f"{tag}{i}")) == f"{tag}{i}"
                        with pytest.raises(bastion.Unauthenticated):
                            await client.auth.login(username=f"{tag}{i}", password="wrong")

            asyncio.run(calls(6, "a"))
            # Each replica took connections (health checks send LOCAL headers, which are not counted),
            # and saw the client's address, not HAProxy's 127.0.0.1.
            counts = [asyncio.run(proxied_connections(r, token)) for r in replicas]
            assert sum(counts) == 6 and all(count >= 1 for count in counts), counts
            peers = [audit_peers(r) for r in replicas]
            assert [len(p) for p in peers] == counts
            assert all(peer.startswith(f"{CLIENT_ADDRESS}:") for p in peers for peer in p), peers

            # One replica dies: the health check takes it out; calls carry on through the other two.
            # Before the check notices, a connect to it fails and HAProxy redispatches it (option redispatch).
            replicas[1].signal(signal.SIGKILL)
            replicas[1].process.wait(5)
            asyncio.run(calls(3, "b"))
            wait_for(lambda: haproxy_servers(stats_socket)["r1"].startswith("DOWN"), 5, what="r1 marked DOWN")
            started = time.monotonic()
            asyncio.run(calls(6, "c"))
            assert time.monotonic() - started < 10
            assert haproxy_servers(stats_socket) == {"r0": "UP", "r1": "DOWN", "r2": "UP", "BACKEND": "UP"}
            survivors = [peer for r in (replicas[0], replicas[2]) for peer in audit_peers(r)]
            assert len(survivors) == 15 - len(peers[1])
    finally:
        codes = {r.pid: r.stop() for r in replicas}
    assert all(code == 0 for pid, code in codes.items() if pid != replicas[1].pid), codes
