"""One job in its own process: ``python -m bastion.services.jobs_runner``.

Theory of operation
-------------------

The server (``JobProcess.start``) starts this module as a new process in a
new session (so its process group holds the job and anything the job
starts, and one ``killpg`` ends them all). The two talk over the child's
standard streams, in frames of a 4-byte big-endian length and a MessagePack
body:

* stdin, server -> child: one ``RunRequest`` (module and qualified name of
  the job function, its arguments as MessagePack, the memory limit, the
  largest result allowed, the server's ``sys.path`` as file-system bytes, so a
  directory whose name is not UTF-8 travels as it is). The server then keeps
  stdin open and never writes again: end of file on stdin means the server
  is gone (even killed with SIGKILL), and a watchdog thread then kills the
  job's whole process group, so no job outlives its runner. Once it has read
  the request the child moves that pipe off descriptor 0 to one only the
  watchdog reads, and the job's standard input becomes ``/dev/null``: a job
  that redirects or closes its standard input (as daemonizing code does)
  cannot look like a server that is gone.
* stdout, child -> server: ``Progress`` messages, then one ``Done`` (the
  result, MessagePack) or ``Failed`` (a one-line reason). The child moves
  its own stdout to stderr before importing the job, so what the job prints
  cannot corrupt the channel.
* stderr, child -> server: what the job prints (stdout and stderr). The
  server keeps only its last ``output_bytes`` (``OutputTail``), at most
  ``OUTPUT_LINES`` lines of it, which the
  jobs service logs with the job's id when the job ends: a job printing
  without end neither floods the server's log nor grows its memory.

The child gets a minimal environment (``job_environment``): what a program
needs to run, plus what the configuration names or sets, never the server's
settings and secrets (``BASTION_*``, database DSNs, tokens).

A process the job leaves in a session of its own (out of reach of the
group's ``killpg``) may hold the pipes open for as long as it lives: once
the job's own process has exited, the server reads what is left until
nothing has arrived for ``_DRAIN_AFTER_EXIT`` seconds (at most
``_DRAIN_TRIES`` times over) and then closes its ends, so such a process
can hold neither the job's slot nor a server that is stopping.

The child sets ``RLIMIT_AS`` before it imports the job's module, so a job
that allocates past its limit gets ``MemoryError`` (reported as "out of
memory") or dies; either way only its own process. The server reads every
frame with a size cap and a typed decoder: a crashing, garbling or silent
child ends as a ``failed`` job with a reason, never as a server error.
Nothing here is pickled.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import math
import os
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import IO, Any

import msgspec

__all__ = [
    "BASE_ENVIRONMENT", "FRAMES_PER_TURN", "OUTPUT_LINES", "Done", "Failed", "JobProcess", "OutputTail", "Progress",
    "RunRequest", "exit_reason", "job_environment", "main",
]  # fmt: skip

_HEADER = struct.Struct(">I")
_PROGRESS_EVERY = 0.1  # seconds between progress frames from one job (the last one always goes)
_MESSAGE_CHARS = 200
_ERROR_CHARS = 2000  # the longest failure reason kept (the job's exception, cut)
_STREAM_LIMIT = 2**16  # the buffer limit of the job's stdout reader (asyncio's default)
#: The most frames of one job read and handled in one pass of the event loop before it lets others run.
FRAMES_PER_TURN = 64
#: The most lines of a job's output kept (and logged), whatever ``output_bytes`` allows.
OUTPUT_LINES = 1000
_DRAIN_AFTER_EXIT = 1.0  # seconds the pipes are still read once the job's process has exited...
_DRAIN_TRIES = 10  # ...and again, up to this many times, while data still arrives
#: What a job's process gets of the server's environment whatever the configuration says (and ``LC_*``).
BASE_ENVIRONMENT = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR",
    "PYTHONPATH", "PYTHONHOME", "PYTHONUTF8", "PYTHONIOENCODING", "PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX",
    "VIRTUAL_ENV",
)  # fmt: skip


class RunRequest(msgspec.Struct, frozen=True):
    module: str
    qualname: str
    args: bytes
    memory_mb: int
    max_result_bytes: int
    path: list[bytes]  # os.fsencode of each entry: a name that is not UTF-8 is no valid MessagePack str


class Progress(msgspec.Struct, frozen=True, tag="progress"):
    fraction: float
    message: str = ""


class Done(msgspec.Struct, frozen=True, tag="done"):
    result: bytes  # MessagePack of the job's return value


class Failed(msgspec.Struct, frozen=True, tag="failed"):
    error: str


Message = Progress | Done | Failed
_decode_message = msgspec.msgpack.Decoder(Message).decode


class JobProtocolError(Exception):
    """The job's process broke the framing (a frame too large, or not a message)."""


# -- the server's side -----------------------------------------------------------------------


def job_environment(
    passed: Iterable[str] = (), extra: Mapping[str, str] | None = None, environ: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """The environment of a job's process: ``BASE_ENVIRONMENT`` and ``LC_*`` and the ``passed`` names, as
    far as ``environ`` has them, then ``extra`` over them."""
    names = {*BASE_ENVIRONMENT, *passed}
    env = {name: value for name, value in environ.items() if name in names or name.startswith("LC_")}
    env.update(extra or {})
    return env


class OutputTail:
    """The last ``limit`` bytes of what a job printed, and how many bytes came before them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self._buffer = bytearray()

    def add(self, data: bytes) -> None:
        self.total += len(data)
        self._buffer += data
        if len(self._buffer) > 2 * self.limit:  # trimmed in batches: each byte is moved about once
            del self._buffer[: len(self._buffer) - self.limit]

    def lines(self) -> tuple[list[str], int]:
        """The kept lines, at most ``OUTPUT_LINES`` (text, undecodable bytes escaped), and how many bytes
        before them were not kept (a line cut by the limit is dropped whole)."""
        data = bytes(self._buffer[-self.limit :])
        dropped = self.total - len(data)
        if dropped and b"\n" in data:
            cut = data.index(b"\n") + 1
            data, dropped = data[cut:], dropped + cut
        end = len(data) - 1 if data.endswith(b"\n") else len(data)
        for _ in range(OUTPUT_LINES):  # each kept line is a log record: short lines must not make thousands
            end = data.rfind(b"\n", 0, end)
            if end < 0:
                break
        else:
            data, dropped = data[end + 1 :], dropped + end + 1
        return data.decode("utf-8", "backslashreplace").splitlines(), dropped


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's protocol of ``create_subprocess_exec``, plus an event set when the process itself exits.

    ``Process.wait`` also waits for the pipes to close, and a child the job forked (a worker pool
    left open) holds them for as long as it lives."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=_STREAM_LIMIT, loop=loop)
        self.exited = asyncio.Event()
        self.received = False  # data arrived on stdout or stderr since this was last cleared

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        self.received = True
        super().pipe_data_received(fd, data)

    def process_exited(self) -> None:
        super().process_exited()
        self.exited.set()


class JobProcess:
    """A running job process, seen from the server."""

    def __init__(
        self, process: asyncio.subprocess.Process, transport: asyncio.SubprocessTransport, protocol: _Protocol,
        max_result_bytes: int, output_bytes: int,
    ) -> None:  # fmt: skip
        self.process = process
        self.max_result_bytes = max_result_bytes
        self.max_frame = max_result_bytes + 4096  # the result and the message around it
        self.output = OutputTail(output_bytes)
        self._transport = transport
        self._protocol = protocol
        self._reader = asyncio.create_task(self._read_output(), name=f"bastion-job-output {process.pid}")

    @classmethod
    async def start(
        cls, module: str, qualname: str, args: bytes, *, memory_mb: int, max_result_bytes: int,
        env: Mapping[str, str] | None = None, output_bytes: int = 64 * 1024,
    ) -> JobProcess:  # fmt: skip
        """Start the job's process with ``env`` as its whole environment (default: ``job_environment()``).

        Returns once the process is started: its request is written as the process reads it, not waited
        for, so the caller's timeout, armed before this, covers a process that never reads it (one stuck
        at start-up, a request past the pipe's buffer); killed, the process drops what was not read."""
        loop = asyncio.get_running_loop()
        protocol = _Protocol(loop)
        transport, _ = await loop.subprocess_exec(
            lambda: protocol, sys.executable, "-m", "bastion.services.jobs_runner",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, env=dict(env) if env is not None else job_environment(),
        )  # fmt: skip
        process = asyncio.subprocess.Process(transport, protocol, loop)  # as create_subprocess_exec makes it
        path = [os.fsencode(p) for p in sys.path if p]
        request = RunRequest(module, qualname, args, memory_mb, max_result_bytes, path)
        body = msgspec.msgpack.encode(request)
        assert process.stdin is not None
        process.stdin.write(_HEADER.pack(len(body)) + body)  # buffered by the transport (one bounded request)
        return cls(process, transport, protocol, max_result_bytes, output_bytes)

    async def _read_output(self) -> None:
        stderr = self.process.stderr
        assert stderr is not None
        with contextlib.suppress(Exception):
            while chunk := await stderr.read(_STREAM_LIMIT):
                self.output.add(chunk)

    def _close_pipes(self, tries: int = _DRAIN_TRIES) -> None:
        """Stop reading the job's pipes (what a process outside its group still holds): end of file to
        both readers; not while what the job wrote before it exited is still arriving (a slow server)."""
        if self._protocol.received and tries:
            self._protocol.received = False
            asyncio.get_running_loop().call_later(_DRAIN_AFTER_EXIT, self._close_pipes, tries - 1)
            return
        for fd in (1, 2):
            pipe = self._transport.get_pipe_transport(fd)
            if pipe is not None:
                pipe.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL the job's whole process group (idempotent)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    async def messages(self) -> AsyncIterator[Progress | Done | Failed]:
        """Each message the job sends, until it closes its end; ``JobProtocolError`` on garbage.

        Frames already buffered are read without a pause, so a job writing frames as fast as it can
        (its own, past ``_Reporter``'s throttle) would have thousands handled in one step of the event
        loop, stalling every other call: after ``FRAMES_PER_TURN`` of them the loop runs first."""
        stdout = self.process.stdout
        assert stdout is not None
        read = 0
        while True:
            read += 1
            if read % FRAMES_PER_TURN == 0:
                await asyncio.sleep(0)
            try:
                header = await stdout.readexactly(_HEADER.size)
            except asyncio.IncompleteReadError:
                return
            (size,) = _HEADER.unpack(header)
            if size > self.max_frame:
                raise JobProtocolError(f"the job's process sent a {size}-byte message (limit {self.max_frame})")
            try:
                message = _decode_message(await stdout.readexactly(size))
            except asyncio.IncompleteReadError:
                return
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec raises the latter for text
                raise JobProtocolError(f"the job's process sent a malformed message: {exc}") from None
            if isinstance(message, Done):
                self._check_result(message.result)
            if isinstance(message, Progress):
                yield _bounded(message)
            elif isinstance(message, Failed) and len(message.error) > _ERROR_CHARS:
                yield Failed(message.error[:_ERROR_CHARS])  # one the job wrote itself, past _run's cut
            else:
                yield message

    def _check_result(self, result: bytes) -> None:
        """A result written by the job itself (past ``_run``'s checks) must still be one: stored, a result
        that is not MessagePack failed every ``jobs.result`` of it."""
        if len(result) > self.max_result_bytes:
            raise JobProtocolError(
                f"the job's result is {len(result)} bytes, over the limit of {self.max_result_bytes}"
            )
        try:
            msgspec.msgpack.decode(result)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
            raise JobProtocolError("the job's process sent a result that is not MessagePack") from None

    async def exited(self) -> None:
        """Return once the job's own process has exited, having killed what it left in its group
        (not ``wait()``: see ``_Protocol``); its pipes are closed ``_DRAIN_AFTER_EXIT`` seconds later."""
        await self._protocol.exited.wait()
        self.kill()
        self._protocol.received = False
        asyncio.get_running_loop().call_later(_DRAIN_AFTER_EXIT, self._close_pipes)

    async def wait(self) -> int:
        """Wait for the process to exit (killing its group if it lingers) and its output to be read, close
        its stdin; the exit code."""
        code = await self.process.wait()
        self.kill()  # anything the job left behind in its group
        await self._reader
        if self.process.stdin is not None:
            self.process.stdin.close()
        return code


def _bounded(progress: Progress) -> Progress:
    """``progress`` within what ``_Reporter`` sends: a job that writes its own frames (past the throttle)
    cannot store a huge message or a fraction outside 0..1 (NaN among them)."""
    fraction = progress.fraction if math.isfinite(progress.fraction) else 0.0
    return Progress(min(1.0, max(0.0, fraction)), progress.message[:_MESSAGE_CHARS])


def exit_reason(code: int, memory_mb: int) -> str:
    """Why a job's process ended without reporting a result."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = (
            f" (perhaps out of memory: its limit is {memory_mb} MB)"
            if -code in (signal.SIGKILL, signal.SIGSEGV)
            else ""
        )
        return f"the job's process crashed: killed by {name}{hint}"
    return f"the job's process exited with code {code} without a result"


# -- the child's side -------------------------------------------------------------------------


class _Channel:
    def __init__(self, fd: int) -> None:
        self._out = os.fdopen(fd, "wb", buffering=0)
        self._lock = threading.Lock()

    def send(self, message: Message) -> None:
        body = msgspec.msgpack.encode(message)
        with self._lock:
            self._out.write(_HEADER.pack(len(body)) + body)


def _text(text: str) -> str:
    """``text`` as MessagePack can carry it: a lone surrogate (what ``os.listdir`` gives for a file name
    that is not UTF-8) becomes its escape, ``\\udce9``, instead of failing the whole message."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _describe(exc: BaseException) -> str:
    """``Type: message``, even for an exception whose ``str`` itself fails."""
    try:
        detail = str(exc)
    except Exception:
        detail = "(its message cannot be shown)"
    return _text(f"{type(exc).__name__}: {detail}")


class _Reporter:
    """The ``progress`` callable a job receives."""

    def __init__(self, channel: _Channel) -> None:
        self._channel = channel
        self._last = 0.0

    def __call__(self, fraction: float, message: str = "") -> None:
        fraction = min(1.0, max(0.0, float(fraction)))
        now = time.monotonic()
        if now - self._last < _PROGRESS_EVERY and fraction < 1.0:
            return
        self._last = now
        self._channel.send(Progress(fraction, _text(str(message)[:_MESSAGE_CHARS])))


def _read_request(stream: IO[bytes]) -> RunRequest:
    header = stream.read(_HEADER.size)
    if len(header) != _HEADER.size:
        raise SystemExit("bastion.services.jobs_runner: no request on stdin (it is started by bastion serve)")
    (size,) = _HEADER.unpack(header)
    return msgspec.msgpack.decode(stream.read(size), type=RunRequest)


def _watch_parent(fd: int) -> None:
    """Block on ``fd`` (the server's end of what was stdin); at end of file the server is gone: end the
    job's whole process group."""
    with contextlib.suppress(OSError):
        while os.read(fd, 4096):
            pass
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _detach_stdin() -> int:
    """Move the server's pipe off descriptor 0, where the job can redirect or close it; the descriptor
    now holding it (not inherited by programs the job starts). The job's stdin reads ``/dev/null``."""
    watched = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return watched


def _limit_memory(memory_mb: int) -> None:
    limit = memory_mb * 1024 * 1024
    with contextlib.suppress(ValueError, OSError):  # the hard limit may already be lower
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _load(request: RunRequest) -> Any:
    from bastion.jobs import JOB_ATTRIBUTE, JobSpec

    sys.path[:] = [os.fsdecode(p) for p in request.path]
    obj: Any = importlib.import_module(request.module)
    for part in request.qualname.split("."):
        obj = getattr(obj, part)
    spec = getattr(obj, JOB_ATTRIBUTE, None)
    if not isinstance(spec, JobSpec):
        raise LookupError(f"{request.module}.{request.qualname} is not a registered job")
    return spec


def _run(request: RunRequest, channel: _Channel) -> Message:
    try:
        spec = _load(request)
        kwargs = spec.decode_args(request.args)
    except MemoryError:
        return Failed(f"out of memory while loading the job (its limit is {request.memory_mb} MB)")
    except Exception as exc:
        traceback.print_exc()
        return Failed(f"cannot load the job {request.module}:{request.qualname}: {_describe(exc)}")
    if spec.progress_param is not None:
        kwargs[spec.progress_param] = _Reporter(channel)
    try:
        value = spec.func(**kwargs)
    except MemoryError:
        return Failed(f"out of memory: the job's limit is {request.memory_mb} MB")
    except BaseException as exc:  # SystemExit and KeyboardInterrupt too: the job ended without a result
        traceback.print_exc()
        return Failed(_describe(exc)[:_ERROR_CHARS])
    try:
        result = msgspec.msgpack.encode(value)
    except Exception as exc:  # TypeError, OverflowError (ints past 64 bits), RecursionError, UnicodeEncodeError...
        return Failed(f"the job's result cannot be encoded: {_describe(exc)}")
    if len(result) > request.max_result_bytes:
        return Failed(f"the job's result is {len(result)} bytes, over the limit of {request.max_result_bytes}")
    return Done(result)


def main() -> None:
    channel_fd = os.dup(1)
    os.dup2(2, 1)  # the job's prints go to the server's log, not into the channel
    request = _read_request(sys.stdin.buffer)  # the whole of what the server writes: nothing is read ahead
    watched = _detach_stdin()
    threading.Thread(target=_watch_parent, args=(watched,), name="bastion-job-watchdog", daemon=True).start()
    _limit_memory(request.memory_mb)
    channel = _Channel(channel_fd)
    outcome = _run(request, channel)
    try:
        channel.send(outcome)
    except Exception as exc:  # never die here without a word: the server would report only an exit code
        channel.send(Failed(f"cannot report the job's outcome: {_describe(exc)}"[:_ERROR_CHARS]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # not waiting for threads the job may have left running


if __name__ == "__main__":
    main()
