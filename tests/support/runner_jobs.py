"""Job functions that probe the job runner's edges (``registry``): its environment, its output, and
processes that misbehave on the result channel or outlive the job.

Served in-process as ``tests.support.runner_jobs:registry`` beside ``demo_jobs``. Jobs that leave a
process behind write its pid to ``<directory>/<tag>.pid`` so the test can find it and end it.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from bastion.jobs import JobRegistry

registry = JobRegistry()


def _write_pid(directory: str, tag: str, pid: int) -> None:
    tmp = Path(directory) / f"{tag}.pid.tmp"
    tmp.write_text(str(pid))
    tmp.rename(Path(directory) / f"{tag}.pid")  # appears atomically to a poller


@registry.job
def environment() -> dict[str, str]:
    """The job process's whole environment."""
    return dict(os.environ)


@registry.job
def blank_lines(n: int) -> int:
    """Print ``n`` empty lines, then ``LAST LINE``; return ``n``."""
    sys.stdout.write("\n" * n + "LAST LINE\n")
    return n


@registry.job
def loud(kib: int, fail: bool = False) -> int:
    """Print ``kib`` KiB of numbered lines, half on stdout and half on stderr, between a first and a last
    line the test looks for; then return ``kib`` (``fail``: raise ValueError instead)."""
    print("FIRST LINE", flush=True)
    line = "x" * 100
    for i in range(kib * 1024 // 112):
        print(f"{i:>10} {line}", file=sys.stdout if i % 2 else sys.stderr)
    print("LAST LINE", flush=True)
    if fail:
        raise ValueError("loud and failed")
    return kib


def _channel() -> Any:
    """The runner's result channel, as the job's own code could reach it (a misbehaving job, or a
    library writing to a descriptor it should not)."""
    frame: Any = sys._getframe()
    while frame is not None:
        if "channel" in frame.f_locals and hasattr(frame.f_locals["channel"], "_out"):
            return frame.f_locals["channel"]._out
        frame = frame.f_back
    raise LookupError("no channel")


@registry.job
def raw_frame(kind: str) -> str:
    """Write a frame of the job's own making on the result channel, then return "ok".

    ``progress``: a progress message of 300000 characters with an out-of-range fraction;
    ``nan``: a progress fraction that is not a number; ``garbage``: a frame that is not a message;
    ``huge``: a header announcing 2 GiB; ``done``: a result that is not MessagePack, then exit at once;
    ``badtext``: a progress message whose text is not UTF-8; ``badresult``: a result holding text that is
    not UTF-8, then exit at once; ``failed``: a failure of 300000 characters, then exit at once."""
    out = _channel()
    if kind == "failed":
        body = msgspec.msgpack.encode({"type": "failed", "error": "f" * 300_000})
        out.write(struct.pack(">I", len(body)) + body)
        os._exit(0)
    if kind in ("badtext", "badresult"):
        bad = b"\xa3\xff\xfe\xfd"  # a 3-byte str that is no UTF-8
        if kind == "badtext":
            body = msgspec.msgpack.encode({"type": "progress", "fraction": 0.5, "message": "abc"})
            body = body.replace(b"\xa3abc", bad)
        else:
            body = msgspec.msgpack.encode({"type": "done", "result": bad})
        out.write(struct.pack(">I", len(body)) + body)
        if kind == "badresult":
            os._exit(0)
        time.sleep(0.6)
        return "ok"
    if kind == "huge":
        out.write(struct.pack(">I", 2**31))
        time.sleep(30)
    if kind == "done":
        done = msgspec.msgpack.encode({"type": "done", "result": b"\xc1"})
        out.write(struct.pack(">I", len(done)) + done)
        os._exit(0)
    if kind == "garbage":
        body = b"\xc1 not msgpack"
    else:
        fraction = float("nan") if kind == "nan" else 7.5
        body = msgspec.msgpack.encode({"type": "progress", "fraction": fraction, "message": "m" * 300_000})
    out.write(struct.pack(">I", len(body)) + body)
    time.sleep(0.6)  # long enough for the server to record the progress
    return "ok"


@registry.job
def escape(directory: str, tag: str, how: str, seconds: float = 0.0) -> str:
    """Leave a process behind in a session of its own, out of reach of the job's process group, that
    lives a minute: ``fork`` (it holds every descriptor, the result channel among them) or ``spawn``
    (a new program, holding the job's stdin, stdout and stderr); then sleep ``seconds`` and return ``tag``."""
    if how == "fork":
        child = os.fork()
        if child == 0:
            os.setsid()
            time.sleep(60)
            os._exit(0)
    else:
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True, close_fds=False
        ).pid
    _write_pid(directory, tag, child)
    time.sleep(seconds)
    return tag


@registry.job
def quiet_stdin(how: str) -> str:
    """Do what a daemonizing library does to standard input -- ``devnull`` (point it at /dev/null) or
    ``close`` (close it) -- then work a moment and return ``how``."""
    if how == "devnull":
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    else:
        os.close(0)
    time.sleep(0.5)
    return how


@registry.job
def flood(frames: int) -> int:
    """Write ``frames`` progress frames on the result channel as fast as it takes them, past the progress
    callable's throttle (a job writing its own frames), then return ``frames``."""
    body = msgspec.msgpack.encode({"type": "progress", "fraction": 0.5, "message": "flood"})
    batch = (struct.pack(">I", len(body)) + body) * 1000
    out = _channel()
    for _ in range(frames // 1000):
        out.write(batch)
    return frames
