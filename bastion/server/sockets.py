"""The socket work of ``Server``'s accept path: binding listeners and reading PROXY headers.

Kept out of bastion/protocol (which does no I/O: its PROXY code parses bytes it
is given) and out of server.py (whose size it would push past the limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from bastion.protocol.proxy import ProxyHeader, ProxyHeaderError, ProxyHeaderReader, direct_client_answer

__all__ = ["bind", "read_proxy_header"]


async def bind(host: str, port: int) -> list[socket.socket]:
    """Bound (not yet listening) sockets for every address ``host`` resolves to, as create_server would."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def read_proxy_header(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> ProxyHeader:
    """Read one PROXY v2 header off ``conn``, not a byte more (what follows is the client's).

    Bytes that start like a client's TLS or bastion handshake instead (one that skipped the balancer) are
    answered once with ``direct_client_answer``'s fixed refusal before the error is raised; the caller closes.
    """
    reader = ProxyHeaderReader()
    while True:
        data = await loop.sock_recv(conn, reader.needed)
        if not data:
            raise ProxyHeaderError("the connection closed before a complete PROXY header")
        try:
            header = reader.feed(data)
        except ProxyHeaderError as exc:
            direct = direct_client_answer(reader.received)
            if direct is None:
                raise
            with contextlib.suppress(OSError):  # a few bytes into an empty send buffer: never blocks
                conn.send(direct.answer)
            raise ProxyHeaderError(
                f"{exc}; it began with {direct.sent} (a client connecting directly, not through the balancer?); "
                f"answered with {direct.told}"
            ) from None
        if header is not None:
            return header
