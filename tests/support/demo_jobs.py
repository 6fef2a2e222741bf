"""Job functions the jobs tests run (``registry``), one per way a job can end.

Served in-process as ``tests.support.demo_jobs:registry`` and by real servers
as ``demo_jobs:registry`` (with ``tests/support`` on ``PYTHONPATH``). Jobs
that tests watch from outside write files into the ``directory`` they are
given: ``<tag>.pid`` (their pid, as they start) and ``<tag>.runs`` (one line
per run), so a test can see a job running, find its process, and count how
many times it ran.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import msgspec

from bastion.jobs import JobRegistry, Progress

registry = JobRegistry()


class Point(msgspec.Struct):
    x: int
    y: int


def _started(directory: str, tag: str) -> None:
    base = Path(directory)
    with open(base / f"{tag}.runs", "a") as runs:
        runs.write(f"{os.getpid()}\n")
    tmp = base / f"{tag}.pid.tmp"
    tmp.write_text(str(os.getpid()))
    tmp.rename(base / f"{tag}.pid")  # appears atomically to a poller


@registry.job
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@registry.job
def shift(point: Point, by: int = 1) -> Point:
    """Move a point diagonally (a Struct argument and result)."""
    return Point(point.x + by, point.y + by)


@registry.job
def steps(n: int, delay: float, progress: Progress) -> int:
    """Take ``n`` steps of ``delay`` seconds, reporting progress after each."""
    for i in range(n):
        time.sleep(delay)
        progress((i + 1) / n, f"step {i + 1} of {n}")
    return n


@registry.job
def boom(message: str) -> None:
    """Raise ValueError(message)."""
    raise ValueError(message)


@registry.job(retryable=True)
def report_then_fail(message: str, progress: Progress) -> None:
    """Report ``message`` as progress, then raise ValueError(message) (retryable: a failure is still final)."""
    progress(0.5, message)
    time.sleep(0.6)  # long enough for the server to record the progress
    raise ValueError(message)


@registry.job
def leave_a_child(seconds: float, then: str = "return") -> int:
    """Fork a child that lingers ``seconds`` holding every descriptor it inherited (as a forked worker
    pool left open does), then at once return its pid (``then="exit"``: die with code 3 instead)."""
    child = os.fork()
    if child == 0:
        time.sleep(seconds)
        os._exit(0)
    if then == "exit":
        os._exit(3)
    return child


@registry.job(memory_mb=200)
def hog(mb: int) -> int:
    """Allocate ``mb`` MiB (over its 200 MB limit for large ``mb``)."""
    block = bytearray(mb * 1024 * 1024)
    return len(block)


@registry.job(timeout=1.0)
def oversleep(seconds: float) -> float:
    """Sleep ``seconds`` (past its 1 s timeout for more than 1)."""
    time.sleep(seconds)
    return seconds


@registry.job
def crash(how: str) -> None:
    """Die without a result: ``exit`` (os._exit(3)) or ``abort`` (SIGABRT)."""
    if how == "abort":
        os.abort()
    os._exit(3)


@registry.job
def chatty(text: str) -> str:
    """Print to stdout (which must not disturb the result channel), then return."""
    print("noise on stdout", text, flush=True)
    return text


@registry.job
def nap(directory: str, tag: str, seconds: float) -> str:
    """Record the start, then sleep ``seconds``; not retryable."""
    _started(directory, tag)
    time.sleep(seconds)
    return tag


@registry.job(retryable=True)
def durable_nap(directory: str, tag: str, seconds: float) -> str:
    """Record the start, then sleep ``seconds``; retryable (a lost run is run again)."""
    _started(directory, tag)
    time.sleep(seconds)
    return tag


@registry.job
def claim_once(directory: str, tag: str, seconds: float = 0.0) -> int:
    """Create ``<directory>/<tag>`` exclusively (fails if the job already ran), then sleep; the runner's pid."""
    fd = os.open(os.path.join(directory, tag), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    time.sleep(seconds)
    return os.getppid()  # the server that ran it


@registry.job
def unencodable(kind: str) -> object:
    """Return what MessagePack cannot hold: ``int`` (past 64 bits), ``deep`` (nested past any depth
    limit) or ``text`` (a str with a lone surrogate, as ``os.listdir`` gives for an undecodable file name)."""
    if kind == "int":
        return 2**70
    if kind == "deep":
        value: list[object] = []
        for _ in range(100_000):
            value = [value]
        return value
    return ["ok", b"caf\xe9".decode("utf-8", "surrogateescape")]


@registry.job
def undecodable_name(progress: Progress) -> None:
    """Report and fail with a file name that is not UTF-8 (a lone surrogate, as ``os.listdir`` gives it)."""
    name = b"caf\xe9".decode("utf-8", "surrogateescape")
    progress(0.5, f"reading {name}")
    time.sleep(0.6)  # long enough for the server to record the progress
    raise ValueError(f"cannot read {name}")


class _SlowFlush:
    """A stdout whose flush first records that it was called (in ``path``), then takes ``seconds``."""

    def __init__(self, stream: object, path: Path, seconds: float) -> None:
        self.stream, self.path, self.seconds = stream, path, seconds

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        self.path.write_text(str(os.getpid()))
        time.sleep(self.seconds)


@registry.job
def linger_after_result(directory: str, tag: str, seconds: float, fail: bool = False) -> str:
    """Return at once (``fail``: raise ValueError), but make the process linger ``seconds`` after sending
    its outcome: the runner flushes stdout after it, and this stdout's flush writes ``<tag>.pid`` and sleeps."""
    sys.stdout = _SlowFlush(sys.stdout, Path(directory) / f"{tag}.pid", seconds)  # type: ignore[assignment]
    if fail:
        raise ValueError(f"{tag} failed on its own")
    return tag


@registry.job
def mistyped(kind: str) -> int:
    """Declare ``int`` but return what ``kind`` names: ``text`` (a str), ``float``, ``bool``, ``none`` or
    ``int`` (the one that matches)."""
    return {"text": "seven", "float": 7.5, "bool": True, "none": None, "int": 7}[kind]  # type: ignore[return-value]


@registry.job
def as_point(value: dict[str, int | str]) -> Point:
    """Return ``value`` as it is, declared a ``Point``: a matching map is converted to one."""
    return value  # type: ignore[return-value]


@registry.job
def widened(n: int) -> float:
    """Return the int ``n`` where a ``float`` is declared (converted, as msgspec widens ints to floats)."""
    return n


class Checked(msgspec.Struct):
    """A result whose own check raises what msgspec does not turn into a validation error."""

    value: int

    def __post_init__(self) -> None:
        if self.value < 0:
            raise LookupError(f"no entry for {self.value}")


@registry.job
def as_checked(value: int) -> Checked:
    """Return ``{"value": value}``, declared a ``Checked``: the server's conversion of a negative one raises
    LookupError (the job's process never builds a ``Checked``)."""
    return {"value": value}  # type: ignore[return-value]
