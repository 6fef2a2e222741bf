"""The gateway's bridged calls in flight at once are capped (``gateway.max_calls_in_flight``), on a real server.

A bridged call's result is held by the server's direct session, decoded and as MessagePack, from the moment the
call ends until the gateway's task picks it up; each session could have ``limits.max_inflight`` (1024) calls of up
to ``limits.max_frame`` each in flight, and every caller has a session of its own: nothing bounded the whole. Past
the cap a call is refused RESOURCE_EXHAUSTED (HTTP 429, Retry-After) before it reaches the server, and is served
again once calls in flight have ended.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from bastion.gateway import GatewayConfig
from tests.gateway.conftest import Reply, World, bearer, http, start_world
from tests.support.server import wait_for

CAP = 3


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = start_world(tmp_path_factory.mktemp("capped"), GatewayConfig(http_port=0, max_calls_in_flight=CAP))
    yield w
    w.stop()


def _slow(world: World, seconds: float) -> Reply:
    return http(world, "POST", "/v1/demo/slow", {"seconds": seconds}, headers=bearer(world, "ada"))


def test_the_call_past_the_cap_is_refused_and_served_once_others_end(capped: World) -> None:
    assert capped.gateway is not None
    bridge = capped.gateway.gateway.bridge
    replies: list[Reply] = []
    threads = [threading.Thread(target=lambda: replies.append(_slow(capped, 2.0))) for _ in range(CAP)]
    for thread in threads:
        thread.start()
    wait_for(lambda: bridge.calls == CAP, 10, what=f"{CAP} bridged calls in flight")
    refused = _slow(capped, 0)  # the N+1th, from another caller too
    assert refused.status == 429, refused
    assert refused.headers["retry-after"] == "1"
    assert "max_calls_in_flight" in refused.json()["error"]["message"], refused.json()
    rpc = {"jsonrpc": "2.0", "method": "demo.slow", "params": {"seconds": 0}, "id": 7}
    batch = http(capped, "POST", "/rpc", rpc, headers=bearer(capped, "carol"))
    assert batch.json()["error"]["data"]["status"] == "RESOURCE_EXHAUSTED", batch.json()
    for thread in threads:
        thread.join(20)
    assert [reply.status for reply in replies] == [200] * CAP, replies
    assert bridge.calls == 0
    assert _slow(capped, 0).status == 200  # room again
