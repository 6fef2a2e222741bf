"""How long a response being written may wait for its client to read: ``gateway.send_timeout``.

uvicorn waits for a connection's transport to drain (below its low-water mark)
only before it writes (HTTP and WebSocket alike), never after, and with no deadline. So the last write of
an answer returned at once with the whole of it in the transport's buffer --
the answer's budget (``_answers.py``) given back while the process still held
up to ``max_answer_bytes`` for a client that might never read -- and a write
after a full buffer waited for as long as the client liked. Here
(``HeadBoundedProtocol`` and ``WebSocketProtocol`` in _protocol.py) each
write waits for the buffer to drain before it, and a response's last write
(an HTTP body's end, a WebSocket message) after it too, so what an answer holds
stays counted until the client has taken it; each wait lasts at most
``send_timeout`` seconds, past which the connection is aborted (its buffer
dropped, not flushed) and the wait ends, the answer's budget given back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from bastion.gateway._shared import REFUSALS_LOGGED
from bastion.observability.loglimit import suppressed_note

__all__ = ["drained"]

log = logging.getLogger("bastion.gateway")


async def drained(writable: Awaitable[object], transport: asyncio.Transport, timeout: float, peer: str) -> bool:
    """Wait for ``writable`` (the transport's buffer drained, or the connection gone) at most ``timeout``
    seconds; past it abort the connection (its buffer dropped) and return False."""
    try:
        await asyncio.wait_for(writable, timeout)
        return True
    except TimeoutError:
        transport.abort()
        if (skipped := REFUSALS_LOGGED.take("send_timeout")) is not None:
            log.info(
                "closed the connection of %s: it did not read what was sent it within gateway.send_timeout (%g s)%s",
                peer,
                timeout,
                suppressed_note(skipped),
            )
        return False
