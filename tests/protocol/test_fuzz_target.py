"""fuzz/fuzz_frames.py: run the atheris target's ``fuzz_one`` under hypothesis.

Random bytes mostly die at the length check, so the strategies also build
inputs from valid frames, spliced with junk, to get deep into the state
machines the way a coverage-guided fuzzer eventually would.
"""

from __future__ import annotations

import base64
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.protocol.messages import Call, Cancel, Credit, End, GoAway, Item, Ping, Pong
from tests.protocol.helpers import frame, raw_frame

FUZZ_PATH = Path(__file__).resolve().parents[2] / "fuzz" / "fuzz_frames.py"


def load_target() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_frames", FUZZ_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fuzz_frames = load_target()
fuzz_one = fuzz_frames.fuzz_one

FAST = settings(max_examples=150, deadline=None)

ids = st.integers(-1, 12)
client_frames = st.one_of(
    st.builds(lambda i, s: frame(Call(i, "m", msgspec.Raw(b"\xc0"), stream=s)), ids, st.booleans()),
    st.builds(lambda i: frame(Item(i, msgspec.Raw(b"\x01"))), ids),
    st.builds(lambda i: frame(End(i)), ids),
    st.builds(lambda i: frame(Cancel(i)), ids),
    st.builds(lambda i, n: frame(Credit(i, n)), ids, st.integers(-2, 5)),
    st.builds(lambda p: frame(Ping(p)), st.integers(0, 2**64 - 1)),
    st.builds(lambda p: frame(Pong(p)), st.integers(0, 2**64 - 1)),
    st.builds(lambda i: frame(GoAway(i, 0, "")), ids),
    st.binary(min_size=1, max_size=20).map(raw_frame),
    st.binary(max_size=8),
)


def test_target_imports_atheris_only_when_run() -> None:
    assert "atheris" not in sys.modules
    assert callable(fuzz_frames.main)


def test_corner_inputs() -> None:
    for data in (b"", b"\x00", b"\x04", b"\x07\xff\xff\xff\xff", b"\x04\x00\x00\x00\x00"):
        fuzz_one(data)
    fuzz_one(b"\x00" + fuzz_frames.HELLO_FRAME + frame(Ping(1)))


# Inputs atheris found; each once escaped as something other than RemoteProtocolError.
REGRESSIONS = [
    # A Call whose method name is not UTF-8: msgspec raised UnicodeDecodeError.
    "BQAAAAyYAwGigHVwkQHAwMPAAAAABZMBAAAHAaFhAP//BJMJAf////////8CYAAAAAOSCAEAAAAIlAwAAKNieWU=",
]


def test_regressions() -> None:
    for data in REGRESSIONS:
        fuzz_one(base64.b64decode(data))


def test_seeds_run_clean() -> None:
    for seed in fuzz_frames.seeds():
        fuzz_one(seed)


@FAST
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    fuzz_one(data)


@FAST
@given(mode=st.integers(0, 255), frames=st.lists(client_frames, max_size=30))
def test_structured_frames_after_handshake(mode: int, frames: list[bytes]) -> None:
    fuzz_one(bytes([mode | 4]) + b"".join(frames))


@FAST
@given(
    mode=st.integers(0, 255),
    frames=st.lists(client_frames, min_size=1, max_size=10),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_mutated_frames(mode: int, frames: list[bytes], edits: list[tuple[int, int]]) -> None:
    # Valid frames with a few bytes overwritten: lengths stay plausible, so
    # the damage reaches the decoder and the state machines.
    data = bytearray(b"".join(frames) or b"\x00")
    for position, byte in edits:
        data[position % len(data)] = byte
    fuzz_one(bytes([mode | 4]) + bytes(data))


@FAST
@given(mode=st.integers(0, 255), frames=st.lists(client_frames, max_size=10))
def test_structured_frames_from_idle(mode: int, frames: list[bytes]) -> None:
    fuzz_one(bytes([mode & ~4]) + fuzz_frames.HELLO_FRAME + b"".join(frames))
