"""The server-wide budget for denied-call audit records says what it left out.

Each connection writes at most DENIALS_AUDITED ``call.denied`` records per
10 s, and the whole server at most DENIALS_AUDITED_SERVER_WIDE; past either,
denials are only counted and the next record written says how many were left
out before it (``suppressed_before``, docs/security.md section 6). The
server-wide count was dropped: a record written after a flood spread over many
connections said nothing of it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import bastion
import bastion.testing
from bastion.observability.loglimit import LogBudget
from bastion.security.audit import AuditLog
from bastion.server.upkeep import DENIALS_AUDITED, DENIALS_AUDITED_SERVER_WIDE


def _service() -> bastion.Service:
    svc = bastion.Service("flood")

    @svc.method
    async def private() -> None:
        return None

    return svc


async def _deny(client: bastion.Client, n: int) -> None:
    for _ in range(n):
        with pytest.raises(bastion.Unauthenticated):
            await client.call("flood.private")


def test_the_next_denial_record_counts_what_the_server_wide_budget_left_out(tmp_path: Path) -> None:
    per_connection = DENIALS_AUDITED - 5  # under the per-connection cap: only the server-wide one bites
    connections = DENIALS_AUDITED_SERVER_WIDE // per_connection + 2
    total = connections * per_connection
    left_out = total - DENIALS_AUDITED_SERVER_WIDE
    now = [1000.0]

    async def main() -> None:
        async with bastion.testing.MemoryServer(_service()) as memory:
            memory.server.audit = AuditLog(tmp_path / "audit.log")
            memory.server.log_budget = LogBudget(clock=lambda: now[0])
            clients = [memory.client(principal=bastion.testing.ANONYMOUS) for _ in range(connections + 1)]
            for client in clients[:connections]:
                await _deny(client, per_connection)
            now[0] += 10.0  # the next window
            await _deny(clients[-1], 1)  # a new connection's first denial: the first record written
            await _deny(clients[connections - 1], 1)  # its left-out denials were in that count: none again

    asyncio.run(asyncio.wait_for(main(), 30))
    lines = (tmp_path / "audit.log").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["event"] == "call.denied"]
    assert len(records) == DENIALS_AUDITED_SERVER_WIDE + 2
    assert records[-2].get("suppressed_before") == left_out
    assert records[-1].get("suppressed_before") is None  # each left-out denial is reported once
