"""Big answers are bounded: a JSON-RPC answer holds at most ``gateway.max_answer_bytes`` of results, and all the
answers in progress at once at most ``gateway.max_answer_memory`` (a real ``bastion serve``; its memory read from
/proc).

A batch of 100 ``kv.get`` calls on a 512 KiB value answers about 70 MB of JSON, and a WebSocket may have 64
messages in progress at once: the gateway built each answer whole, so one authenticated client could make it hold
gigabytes. Results past the budget are answered RESOURCE_EXHAUSTED (-32008) instead, item by item.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.test_ws_abuse import open_ws
from tests.support.server import ServerProcess, start_server

VALUE = 512 * 1024  # kv.max_value_bytes: the largest value there is
ANSWER = 800 << 10  # gateway.max_answer_bytes here: one value's JSON (base64) fits, not two
MEMORY = 4 << 20  # gateway.max_answer_memory here
ENCODED = VALUE * 4 // 3  # a value's size in JSON (base64), about
BATCH = 100
#: What the gateway's peak memory may grow by: the answers' budget is 4 MiB, but the calls' values, decoded as they
#: come (by the server too: 1600 calls at once) before they are counted or refused, are not the gateway's answers
#: (grown by 60 to 180 MiB here). Unbounded, it grew by over 550 MiB.
PEAK_GROWTH = 320 << 20
#: A service whose result MessagePack carries (a map keyed by arrays) and JSON cannot: an INTERNAL error over /v1,
#: so not in the demo service every gateway test (schemathesis's "no server errors" among them) serves.
JSON_POISON = """
from typing import Any
from bastion import Service
service = Service("poison")

@service.method
async def pairs() -> Any:
    return {(1, 2): 3}

@service.method
async def refuses() -> None:
    from bastion.exceptions import InvalidArgument
    raise InvalidArgument("nope", details={"pairs": {(1, 2): 3}})
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"BASTION_GATEWAY__MAX_ANSWER_BYTES": str(ANSWER), "BASTION_GATEWAY__MAX_ANSWER_MEMORY": str(MEMORY)}
    workdir = tmp_path_factory.mktemp("answers")
    (workdir / "json_poison.py").write_text(JSON_POISON)
    args = ("--service", "json_poison:service")
    server = start_server(workdir, insecure=True, http=True, env=env, args=args)
    try:
        value = base64.b64encode(os.urandom(VALUE)).decode()
        _rpc(server, {"jsonrpc": "2.0", "method": "kv.put", "params": {"key": "big", "value": value}, "id": 0})
        yield server
    finally:
        assert server.stop() == 0, server.log()


def _rpc(server: ServerProcess, body: Any) -> Any:
    assert server.gateway_url is not None
    request = urllib.request.Request(
        server.gateway_url + "/rpc",
        json.dumps(body).encode(),
        {"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        return json.loads(response.read())


def _status(pid: int, field: str) -> int:
    """A memory figure of ``pid`` from /proc (``VmRSS``, ``VmHWM``: its peak), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


def _peak_from_now(pid: int) -> int:
    """Restart ``pid``'s peak resident memory from what it holds now (where Linux lets us: else its peak so far,
    which is never less); that figure."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return _status(pid, "VmHWM")
    return _status(pid, "VmRSS")


def _peak(pid: int) -> int:
    return _status(pid, "VmHWM")


def _gets(first_id: int) -> list[dict[str, Any]]:
    return [{"jsonrpc": "2.0", "method": "kv.get", "params": {"key": "big"}, "id": first_id + i} for i in range(BATCH)]


def _check_batch(answer: list[dict[str, Any]], ids: range, shed: bool = False) -> int:
    """How many of the batch's items carry the value (at most what the answer's budget holds); the others must be
    RESOURCE_EXHAUSTED (or, with ``shed``, UNAVAILABLE: a server given many calls at once may shed some)."""
    assert sorted(item["id"] for item in answer) == list(ids)
    served = [item for item in answer if "result" in item]
    for item in served:
        assert len(base64.b64decode(item["result"]["value"])) == VALUE
    for item in answer:
        if "error" in item:
            if shed and item["error"]["data"]["status"] == "UNAVAILABLE":
                continue
            assert item["error"]["code"] == -32008, item
            assert item["error"]["data"]["status"] == "RESOURCE_EXHAUSTED", item
    assert len(served) <= ANSWER // ENCODED, len(served)
    return len(served)


def test_a_batch_past_the_answer_budget_gets_errors_for_the_items_past_it(served: ServerProcess) -> None:
    for round in range(2):
        answer = _rpc(served, _gets(round * BATCH))
        assert _check_batch(answer, range(round * BATCH, (round + 1) * BATCH)) == ANSWER // ENCODED  # (1)
        errors = [item["error"] for item in answer if "error" in item]
        assert len(errors) == BATCH - ANSWER // ENCODED
        assert all("max_answer_bytes" in error["message"] for error in errors), errors[0]


def test_a_single_answer_past_the_budget_gets_the_error(served: ServerProcess) -> None:
    text = "x" * (ANSWER + 1024)  # (a body under max_body, 1 MiB)
    call = {"jsonrpc": "2.0", "method": "demo.echo", "params": [text], "id": 1}
    answer = _rpc(served, call)
    assert answer["id"] == 1 and answer["error"]["code"] == -32008, str(answer)[:300]
    assert "max_answer_bytes" in answer["error"]["message"]
    small = _rpc(served, {"jsonrpc": "2.0", "method": "kv.get", "params": {"key": "big"}, "id": 2})
    assert len(base64.b64decode(small["result"]["value"])) == VALUE


def test_a_result_json_cannot_carry_is_that_items_error_and_leaks_no_budget(served: ServerProcess) -> None:
    """A result MessagePack carries and JSON cannot (a map keyed by arrays) raised out of the answer: the batch
    was a 500, its other calls ran on after the answer's budget was closed and counted their results into the
    gateway's for good -- a few such batches and every caller's results were refused until a restart."""
    for round in range(4 * MEMORY // ENCODED):  # more than the gateway's budget holds, were it to leak
        batch = [
            {"jsonrpc": "2.0", "method": "poison.pairs", "id": 0},
            {"jsonrpc": "2.0", "method": "kv.get", "params": {"key": "big"}, "id": 1},
        ]
        answer = sorted(_rpc(served, batch), key=lambda item: item["id"])
        assert answer[0]["error"]["code"] == -32603, answer[0]
        assert "cannot be written as JSON" in answer[0]["error"]["message"]
        assert len(base64.b64decode(answer[1]["result"]["value"])) == VALUE, round


def test_an_error_whose_details_json_cannot_carry_is_sent_without_them(served: ServerProcess) -> None:
    """An error's details are the handler's: details JSON cannot carry made the batch a 500 -- and, on the
    Starlette route, left the answer's budget counted for good (review)."""
    for round in range(4 * MEMORY // ENCODED):
        batch = [
            {"jsonrpc": "2.0", "method": "poison.refuses", "id": 0},
            {"jsonrpc": "2.0", "method": "kv.get", "params": {"key": "big"}, "id": 1},
        ]
        answer = sorted(_rpc(served, batch), key=lambda item: item["id"])
        assert answer[0]["error"]["data"]["status"] == "INVALID_ARGUMENT", answer[0]
        assert answer[0]["error"]["message"] == "nope" and "details" not in answer[0]["error"]["data"]
        assert len(base64.b64decode(answer[1]["result"]["value"])) == VALUE, round
    request = urllib.request.Request(
        served.gateway_url + "/v1/poison/refuses", b"{}", {"Authorization": f"Bearer {served.token}"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:  # /v1 too (it was a 500 INTERNAL)
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 400
    error = json.loads(refused.value.read())["error"]
    assert error["status"] == "INVALID_ARGUMENT" and error["message"] == "nope" and "details" not in error


def _text_frame(payload: bytes) -> bytes:
    """A masked (client) text frame of any length."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    if len(payload) < 126:
        head = struct.pack("!BB", 0x81, 0x80 | len(payload))
    else:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, len(payload))
    return head + mask + masked


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """(opcode, payload) of the next (unmasked, server) frame, read in linear time (answers run to 70 MB)."""
    first, second = _exactly(sock, 2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", _exactly(sock, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", _exactly(sock, 8))
    return first & 0x0F, bytes(_exactly(sock, length))


def _exactly(sock: socket.socket, n: int) -> bytearray:
    data = bytearray(n)
    view = memoryview(data)
    got = 0
    while got < n:
        count = sock.recv_into(view[got:])
        assert count, "the gateway closed the connection"
        got += count
    return data


def test_a_websockets_messages_in_progress_share_the_gateways_budget(served: ServerProcess) -> None:
    # 16 batches sent at once, the answers read only once all are sent, slowly: unbounded, 16 x 70 MB held at once.
    # Bounded, the answers in progress hold at most max_answer_memory between them: some get no value at all.
    before = _peak_from_now(served.pid)
    sock = open_ws(served, rcvbuf=65536, token=served.token)
    messages = 16
    answers = []
    try:
        sock.settimeout(60)
        for m in range(messages):
            sock.sendall(_text_frame(json.dumps(_gets(m * BATCH)).encode()))
        while len(answers) < messages:
            opcode, payload = _read_frame(sock)
            if opcode == 0x1:
                answers.append(json.loads(payload))
            else:
                assert opcode == 0x9, opcode  # (the gateway's keepalive pings go unanswered: it does not mind)
    finally:
        sock.close()
    grown = _peak(served.pid) - before
    total = 0
    for answer in answers:
        first = min(item["id"] for item in answer)
        total += _check_batch(answer, range(first, first + BATCH), shed=True)
    assert total >= 1
    assert grown < PEAK_GROWTH, f"the gateway's peak memory grew by {grown >> 20} MiB for {messages} batches"


def _probe(server: ServerProcess) -> dict[str, Any]:
    answer: dict[str, Any] = _rpc(server, {"jsonrpc": "2.0", "method": "kv.get", "params": {"key": "big"}, "id": "p"})
    return answer


def test_answers_waiting_on_a_client_that_does_not_read_hold_the_gateways_budget(served: ServerProcess) -> None:
    # A WebSocket client sends calls for the value one message at a time and reads nothing: each answer, once the
    # socket's buffers are full, waits to be sent, counted. Past max_answer_memory, everyone's results are refused
    # RESOURCE_EXHAUSTED (retry after 1 s) -- unbounded, up to 64 answers (WS_MAX_PENDING) of any size were held.
    sock = open_ws(served, rcvbuf=4096, token=served.token)
    sent = 0
    try:
        sock.settimeout(60)
        probe = _probe(served)
        while "result" in probe and sent < 60:
            call = {"jsonrpc": "2.0", "method": "kv.get", "params": {"key": "big"}, "id": sent}
            sock.sendall(_text_frame(json.dumps(call).encode()))
            sent += 1
            probe = _probe(served)
        deadline = time.monotonic() + 10  # (the last messages' answers may not be made yet)
        while "result" in probe and time.monotonic() < deadline:
            probe = _probe(served)
        assert "error" in probe, f"{sent} answers of {ENCODED} bytes held, and the gateway takes more"
        error = probe["error"]
        assert error["code"] == -32008 and error["data"]["retry_after"] == 1.0, error
        assert "max_answer_memory" in error["message"], error
        # Once the client reads, its answers are sent and their bytes given back: everyone is served again.
        answers = 0
        while answers < sent:
            opcode, payload = _read_frame(sock)
            if opcode == 0x1:
                answers += 1
                answer = json.loads(payload)
                assert "result" in answer or answer["error"]["code"] == -32008, str(answer)[:300]
    finally:
        sock.close()
    deadline = time.monotonic() + 10
    while "result" not in (probe := _probe(served)) and time.monotonic() < deadline:
        pass
    assert "result" in probe, probe
