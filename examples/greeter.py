"""A small custom service: the four method shapes in a dozen lines.

Serve it next to the built-in services (from the repository root, so that
``examples`` is importable)::

    bastion serve --service examples.greeter:service

then call it with ``examples/client_async.py``, ``examples/client_sync.py``
or ``bastion call``. Test it without a server through ``bastion.testing``
(see ``tests/test_examples.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from msgspec import Meta

from bastion import Service

service = Service("greeter", doc="Greetings, sums and streams: an example service.")


@service.method(public=True, idempotent=True)
async def hello(name: str, times: Annotated[int, Meta(ge=1, le=100)] = 1) -> str:
    """Greet ``name``, ``times`` times. Public: anonymous callers may use it."""
    return " ".join([f"Hello, {name}!"] * times)


@service.method(idempotent=True)
def add(a: int, b: int) -> int:
    """The sum of two integers. A plain function: it runs in the server's thread pool."""
    return a + b


@service.method
async def count(n: Annotated[int, Meta(ge=0, le=1_000_000)]) -> AsyncIterator[int]:
    """A server stream: the numbers 0 .. n-1, sent as the client makes room for them."""
    for i in range(n):
        yield i


@service.method
async def total(chunks: AsyncIterator[bytes]) -> int:
    """A client stream: the number of bytes in all the chunks the client sends."""
    size = 0
    async for chunk in chunks:
        size += len(chunk)
    return size
