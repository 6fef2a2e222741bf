"""docs/protocol.md must agree with the code it specifies.

* The worked example (section 11): its hex is what bastion's codec produces
  for those messages, and both protocol cores emit and accept exactly those
  bytes (``scripts/protocol_example.py`` builds and replays it).
* The state tables (section 5) are the tables of ``bastion/protocol/state.py``.
* The minimal client (section 12) works against a server built on the core.
"""

from __future__ import annotations

import importlib.util
import re
import socket
import ssl
import sys
import threading
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest

from bastion.exceptions import RemoteProtocolError
from bastion.protocol import messages
from bastion.protocol.connection import Connection, ProtocolLimits
from bastion.protocol.messages import Call, Credit, Hello, Pong, Welcome
from bastion.protocol.state import (
    CALL_TRANSITIONS,
    CONNECTION_TRANSITIONS,
    CallInput,
    CallState,
    ConnectionState,
    Direction,
    Role,
)
from bastion.status import Status

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "protocol.md"
SCRIPT = ROOT / "scripts" / "protocol_example.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("protocol_example", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


example = _load_script()


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


# -- section 11: the worked example --------------------------------------------


def test_example_replays_through_both_cores() -> None:
    example.replay(example.example_frames())


def _hex_by_frame(block: str) -> dict[str, bytes]:
    """The bytes of each dump in the block, keyed by the dump's title line."""
    out: dict[str, bytearray] = {}
    title = None
    line_re = re.compile(r"^([0-9a-f]{4})  ((?:[0-9a-f]{2} )*[0-9a-f]{2})(?:  |$)")
    for line in block.splitlines():
        if line.startswith("Frame "):
            title = line
            out[title] = bytearray()
            continue
        match = line_re.match(line)
        if match:
            assert title is not None, f"hex before any frame title: {line!r}"
            out[title] += bytes.fromhex(match.group(2))
    return {key: bytes(value) for key, value in out.items()}


def test_doc_hex_is_what_the_codec_produces(doc: str) -> None:
    frames = example.example_frames()
    dumps = list(_hex_by_frame(example.extract_block(doc)).items())
    expected = [frame.data for frame in frames] + [example.short_form_call()]
    assert len(dumps) == len(expected), [title for title, _ in dumps]
    for (title, shown), data in zip(dumps, expected, strict=True):
        assert shown == data, f"{title}\n  doc:   {shown.hex(' ')}\n  codec: {data.hex(' ')}"


def test_doc_hex_offsets_are_contiguous_per_direction(doc: str) -> None:
    """Each direction's offsets run on without gaps (the short form restarts at frame 3)."""
    next_offset = {"client": 0, "server": 0}
    block = example.extract_block(doc)
    sender = "client"
    for line in block.splitlines():
        if line.startswith("Frame "):
            sender = "client" if "client -> server" in line else "server"
            if "short form" in line:
                next_offset[sender] = example.example_frames()[2].offset
            continue
        match = re.match(r"^([0-9a-f]{4})  ((?:[0-9a-f]{2} )*[0-9a-f]{2})", line)
        if match:
            assert int(match.group(1), 16) == next_offset[sender], line
            next_offset[sender] += len(bytes.fromhex(match.group(2)))


def test_doc_example_block_is_current(doc: str) -> None:
    assert example.extract_block(doc) == example.render_block(), (
        "docs/protocol.md section 11 is stale: run python scripts/protocol_example.py --write"
    )


def test_script_check_mode(doc: str) -> None:
    assert example.main(["--check"]) == 0


# -- section 5: the state tables --------------------------------------------------

_MESSAGE_CLASSES = {cls.__name__: cls for cls in typing.get_args(messages.Message)}


def _table_rows(doc: str, first_cells: set[str]) -> list[list[str]]:
    rows = []
    for line in doc.splitlines():
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells and cells[0] in first_cells:
            rows.append(cells)
    return rows


def test_connection_tables_match_state_py(doc: str) -> None:
    for role in Role:
        documented: dict[tuple[ConnectionState, Direction, type], ConnectionState] = {}
        for cells in _table_rows(doc, {role.value}):
            if len(cells) != 5 or cells[2] not in ("send", "receive"):
                continue  # another table (section 8.2) that starts with "client" or "server"
            _, state, direction, names, new = cells
            for name in names.split(","):
                key = (
                    ConnectionState[state],
                    Direction.SEND if direction == "send" else Direction.RECV,
                    _MESSAGE_CLASSES[name.strip()],
                )
                assert key not in documented, f"{role.value}: {cells} repeats a transition"
                documented[key] = ConnectionState[new]
        assert documented == CONNECTION_TRANSITIONS[role], role


def test_call_table_matches_state_py(doc: str) -> None:
    inputs = {member.value: member for member in CallInput}
    documented: dict[tuple[CallState, CallInput], CallState] = {}
    for cells in _table_rows(doc, {state.name for state in CallState}):
        if len(cells) != 4:
            continue  # the table of state meanings
        state, event, new, _ = cells
        documented[CallState[state], inputs[event.replace("receive ", "recv ", 1)]] = CallState[new]
    assert documented == CALL_TRANSITIONS


def test_doc_limits_are_the_defaults(doc: str) -> None:
    limits = ProtocolLimits()
    section = doc.split("## 10. Limits", 1)[1].split("\n## ", 1)[0]
    assert f"| {limits.handshake_max_frame} bytes |" in section
    assert f"| {limits.max_frame} bytes |" in section
    assert f"| {limits.max_inflight} |" in section
    assert f"| {limits.window} items per call |" in section
    hello = msgspec.structs.fields(Hello)
    assert {f.name: f.default for f in hello}["window"] == limits.window
    assert {f.name: f.default for f in hello}["max_frame"] == limits.max_frame


def test_doc_status_table_matches_status_py(doc: str) -> None:
    section = doc.split("### 9.1 Status codes", 1)[1].split("\n### ", 1)[0]
    codes = {str(status.value) for status in Status}
    rows = {int(cells[0]): cells[1] for cells in _table_rows(section, codes) if len(cells) == 4}
    assert rows == {int(status): status.name for status in Status}


# -- section 12: the minimal client --------------------------------------------------


def _appendix_namespace(doc: str) -> dict[str, Any]:
    start = doc.index("<!-- BEGIN appendix-client -->")
    end = doc.index("<!-- END appendix-client -->", start)
    code = doc[start:end].split("```python\n", 1)[1].rsplit("```", 1)[0]
    namespace: dict[str, Any] = {"__name__": "appendix_client"}
    exec(compile(code, f"{DOC}:appendix", "exec"), namespace)
    return namespace


class CoreServer:
    """A one-connection server built on bastion's protocol core, for the appendix client.

    Methods: admin.health, greeter.hello, numbers.count (a server stream of
    ``n`` items, paced by the client's credit) and admin.bye (answers, then
    sends a graceful GoAway). It pings the client right after the Welcome.
    """

    TOKENS = {"tok_example": "example"}

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.ssl_context = ssl_context
        self.errors: list[BaseException] = []
        self.pongs: list[int] = []
        self.alpn: str | None = None
        self.calls: list[Call] = []
        self._streams: dict[int, Iterator[int]] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join(10)
        self.listener.close()
        assert not self._thread.is_alive()

    def _run(self) -> None:
        try:
            sock, _ = self.listener.accept()
            sock.settimeout(10)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=True)
                self.alpn = sock.selected_alpn_protocol()
            with sock:
                self._serve(sock)
        except BaseException as exc:
            self.errors.append(exc)

    def _serve(self, sock: socket.socket) -> None:
        core = Connection(Role.SERVER)
        while core.state is not ConnectionState.CLOSED:
            data = sock.recv(65536)
            if not data:
                core.receive_eof()
                break
            try:
                events = core.receive_data(data)
            except RemoteProtocolError as exc:
                self.errors.append(exc)
                sock.sendall(core.data_to_send())
                break
            for event in events:
                self._handle(core, event)
            sock.sendall(core.data_to_send())

    def _handle(self, core: Connection, event: Any) -> None:
        if isinstance(event, Hello):
            principal = "anonymous" if event.token is None else self.TOKENS.get(event.token)
            if principal is None:
                core.reject(Status.UNAUTHENTICATED, "invalid token")
                return
            lim = core.limits
            core.send_welcome(
                Welcome(1, "core-server/0", principal, lim.max_frame, lim.max_inflight, lim.window, 30_000)
            )
            core.send_ping(7)
        elif isinstance(event, Pong):
            self.pongs.append(event.payload)
        elif isinstance(event, Call):
            self.calls.append(event)
            self._call(core, event)
        elif isinstance(event, Credit):
            self._pump(core, event.id)

    def _call(self, core: Connection, call: Call) -> None:
        args = msgspec.msgpack.decode(call.args)
        if call.method == "admin.health":
            core.send_result(call.id, {"status": "ok"})
        elif call.method == "greeter.hello":
            core.send_result(call.id, f"Hello, {args['name']}!")
        elif call.method == "numbers.count":
            self._streams[call.id] = iter(range(args["n"]))
            self._pump(core, call.id)
        elif call.method == "admin.bye":
            core.send_result(call.id, "bye")
            core.send_goaway(Status.OK, "draining")
        else:
            core.send_error(call.id, Status.UNIMPLEMENTED, f"unknown method {call.method!r}")

    def _pump(self, core: Connection, call_id: int) -> None:
        stream = self._streams.get(call_id)
        if stream is None:
            return
        while core.send_credit(call_id) > 0:
            value = next(stream, None)
            if value is None:
                del self._streams[call_id]
                core.send_result(call_id, None)
                return
            core.send_item(call_id, value)


@pytest.fixture
def tls_pair(tmp_path: Path) -> tuple[ssl.SSLContext, str]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    server_context.set_alpn_protocols(["bastion/1"])
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    return server_context, str(cafile)


def _run_session(doc: str, connect: Callable[[type, int], Any], server: CoreServer) -> None:
    namespace = _appendix_namespace(doc)
    client = connect(namespace["MiniClient"], server.port)
    try:
        assert client.call("admin.health") == {"status": "ok"}
        assert client.call("greeter.hello", name="Ada") == "Hello, Ada!"
        # 40 items through a window of 16: only works if the client grants credit.
        assert client.call("numbers.count", n=40) == list(range(40))
        with pytest.raises(namespace["CallFailed"]) as refused:
            client.call("nope.nothing")
        assert refused.value.code == Status.UNIMPLEMENTED
        assert client.call("admin.bye") == "bye"
        # The GoAway is read while waiting for this call, which the server never started.
        with pytest.raises(namespace["CallFailed"]) as going:
            client.call("admin.health")
        assert going.value.code == Status.UNAVAILABLE
    finally:
        client.close()
    server.join()
    assert server.errors == []
    assert server.pongs == [7]
    # Call 6 arrived after the GoAway (last_id 5): the core dropped it unseen.
    assert [call.id for call in server.calls] == [1, 2, 3, 4, 5]


def test_appendix_client_plaintext(doc: str) -> None:
    server = CoreServer()
    _run_session(doc, lambda cls, port: cls("127.0.0.1", port, token="tok_example", tls=False), server)


def test_appendix_client_tls(doc: str, tls_pair: tuple[ssl.SSLContext, str]) -> None:
    server_context, cafile = tls_pair
    server = CoreServer(server_context)
    _run_session(doc, lambda cls, port: cls("127.0.0.1", port, token="tok_example", cafile=cafile), server)
    assert server.alpn == "bastion/1"


def test_appendix_client_anonymous_and_refused(doc: str) -> None:
    namespace = _appendix_namespace(doc)
    server = CoreServer()
    client = namespace["MiniClient"]("127.0.0.1", server.port, tls=False)
    assert client.call("admin.health") == {"status": "ok"}
    client.close()
    server.join()
    assert server.errors == []

    server = CoreServer()
    with pytest.raises(namespace["CallFailed"]) as refused:
        namespace["MiniClient"]("127.0.0.1", server.port, token="wrong", tls=False)
    assert refused.value.code == Status.UNAUTHENTICATED
    server.join()
    assert server.errors == []
