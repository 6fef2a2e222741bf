"""A forked child and the async client: whatever the child does with its copy of the parent's ``Client``, the
parent's connection keeps working, and a new client in the child works.

The child inherits the parent's socket -- the same socket, not a copy -- and,
forked from inside a running event loop, that loop's copy with the socket's
registration in the epoll set both processes now share. A child that closed
its copy of the client (or whose loop shut down: ``asyncio.run``'s cleanup
after a ``sys.exit`` in the child) wrote a GoAway and a TLS close_notify into
the parent's connection and took the parent's socket out of the shared
epoll set: the parent's next call got no answer at all. Real server, real
TLS; the child reports through a pipe and leaves with ``os._exit``.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable

import pytest

from bastion import Client, SyncClient
from tests.support.server import ServerProcess


def _in_child(work: Callable[[], Awaitable[str]]) -> Awaitable[str]:
    """Fork; the child runs ``work`` on the loop it inherited and writes its answer to a pipe; the parent
    returns that answer once the child has exited."""

    async def fork() -> str:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            signal.alarm(10)
            try:
                answer = await work()
            except BaseException as exc:
                answer = f"error {exc!r}"
            os.write(write_end, answer.encode())
            os._exit(0)
        os.close(write_end)
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        with os.fdopen(read_end, "rb") as pipe:
            answer = pipe.read().decode()
        assert status == 0, answer
        return answer

    return fork()


def _child_client(server: ServerProcess) -> str:
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as own:
        return repr(own.call("demo.echo", value="child"))


@pytest.mark.parametrize("leave", ["close", "loop shutdown"])
async def test_a_child_that_leaves_its_copy_of_the_client_does_not_break_the_parents(
    server: ServerProcess, leave: str
) -> None:
    async with Client(server.address, token_file=str(server.token_file), timeout=5) as client:
        assert await client.call("demo.echo", value="parent") == "parent"
        loop = asyncio.get_running_loop()  # the child's copy runs on, though get_running_loop() says none there

        async def child() -> str:
            answer = _child_client(server)
            if leave == "close":
                await client.close()
            else:
                await loop.shutdown_asyncgens()  # what asyncio.run does as it ends
            return answer

        assert await _in_child(child) == "'child'"
        assert await client.call("demo.echo", value="parent again") == "parent again"
