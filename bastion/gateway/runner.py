"""Serving the gateway: uvicorn inside the server's own event loop.

``serve`` binds the listening socket itself (port 0 picks a free one, read
back from ``GatewayServer.port``) -- or takes sockets already bound
(``sockets``: a worker of ``bastion serve --workers N`` gets its
SO_REUSEPORT sockets from the supervisor) -- then runs ``uvicorn.Server.serve`` as a
task of the running loop -- the loop the bastion ``Server`` runs in, so the
bridge's in-memory connections need no thread hops. uvicorn's own signal
handling is turned off: the bastion server owns SIGTERM/SIGINT and drains;
``GatewayServer.aclose`` stops the gateway (call it after the server's
shutdown has begun, so /readyz has answered 503 meanwhile).

TLS: with ``cert_files`` (certificate, key) -- the bastion server's own
files -- the gateway serves HTTPS and WSS with the same certificate (a
context of its own, ``http_server_context``: hardened as the server's, with
``tls_min_version`` -- the server's ``tls.min_version`` -- but ALPN
``http/1.1`` where the server's negotiates ``bastion/1``),
reloaded with the server's (``Server.also_reload``: SIGHUP, dev certificate renewal).
uvicorn listens in plaintext and each connection does its TLS handshake in
a ``TLSAcceptor`` (_tls.py), under ``header_timeout``, so that a failed one
is counted by reason (``bastion_gateway_tls_handshake_failures_total``).

HTTP is uvicorn's httptools protocol with the request line and headers bounded
in size (431 past 64 KiB) and in time (``header_timeout``), and a request
body's pace bounded (``body_timeout``, ``body_min_rate``; 408): _protocol.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import uvicorn

from bastion.exceptions import UsageError
from bastion.gateway._gate import ConnectionGate
from bastion.gateway._protocol import WebSocketProtocol, bounded_protocol
from bastion.gateway._tls import TLSAcceptor, tls_acceptor
from bastion.gateway.app import Gateway, create_app
from bastion.gateway.config import GatewayConfig
from bastion.security.tls import http_server_context
from bastion.server.server import Server

__all__ = ["GatewayServer", "bind", "serve"]

log = logging.getLogger("bastion.gateway")


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the bastion server handles signals


class GatewayServer:
    """A running gateway: ``port``, ``url``, ``gateway`` (routes' state), ``aclose()``."""

    def __init__(
        self,
        uv: _Uvicorn,
        task: asyncio.Task[None],
        sockets: list[socket.socket],
        gateway: Gateway,
        tls: bool,
        handshaking: set[TLSAcceptor],
        gate: ConnectionGate,
    ) -> None:
        self._uvicorn = uv
        self._gate = gate
        self._handshaking = handshaking
        self._task = task
        self._sockets = sockets
        self.gateway = gateway
        address = sockets[0].getsockname()
        self.host: str = address[0]
        self.port: int = address[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"{'https' if tls else 'http'}://{host}:{self.port}"

    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop accepting, let requests in progress finish (up to ``timeout``), close the bridge."""
        self._uvicorn.should_exit = True
        self._gate.closing = True  # handshakes begun from now on (uvicorn still accepts until its next tick)
        for acceptor in list(self._handshaking):  # not connections of uvicorn's yet: it would not close them
            acceptor.abort()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self._uvicorn.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        except Exception:
            # uvicorn's own shutdown can fail on a connection already closing (its websockets
            # sans-I/O protocol raises InvalidState); stopping must still succeed.
            log.warning("gateway: error while stopping; connections closed anyway", exc_info=True)
        finally:
            for sock in self._sockets:
                sock.close()
            await self.gateway.bridge.aclose()


async def serve(
    server: Server,
    config: GatewayConfig | None = None,
    *,
    host: str = "127.0.0.1",
    cert_files: tuple[str, str] | None = None,
    sockets: list[socket.socket] | None = None,
    tls_min_version: str = "1.3",
    metrics_snapshot: Callable[[], Mapping[str, Any]] | None = None,
) -> GatewayServer:
    """Start the gateway for ``server`` on ``host:config.http_port`` (or on ``sockets``); returns once it accepts.

    ``host`` also names the gateway: a page served under it is on the gateway's own origin (app.py).
    ``metrics_snapshot``: what /metrics shows, if not this server's numbers alone (``bastion serve
    --workers``: every worker's), in place before the first connection is accepted."""
    config = config or GatewayConfig()
    app = create_app(server, config, host=host)
    gateway: Gateway = app.state.gateway
    if metrics_snapshot is not None:
        gateway.metrics_snapshot = metrics_snapshot
    gateway.started = False
    sockets = sockets or [bind(host, config.http_port)]
    gate = ConnectionGate(
        config.max_connections, config.max_connections_per_source, server.counters, ipv6_prefix=server.ipv6_prefix
    )
    uv_config = uvicorn.Config(
        app,
        # httptools, with the request head bounded and the body's pace too
        http=bounded_protocol(
            config.header_timeout, config.body_timeout, config.body_min_rate, gate, config.send_timeout
        ),
        # uvicorn's "websockets-sansio", its 500 with the gateway's headers, its writes bounded in time
        ws=type("WebSocketProtocol", (WebSocketProtocol,), {"send_timeout": config.send_timeout}),
        lifespan="off",
        log_config=None,  # uvicorn's records go to the server's own log, in its format (log_format)
        log_level="warning",
        access_log=False,
        ws_max_size=config.max_body,
        server_header=False,
        date_header=True,
        # The client address drives login throttles, per-source limits and the audit log: never
        # take it from X-Forwarded-For (uvicorn trusts it from loopback by default).
        proxy_headers=False,
    )
    handshaking: set[TLSAcceptor] = set()
    uv_config.load()
    context = http_server_context(*cert_files, tls_min_version) if cert_files is not None else None
    if context is not None:  # the handshake is the TLSAcceptor's, which counts its failures (_tls.py)
        uv_config.http_protocol_class = tls_acceptor(  # type: ignore[assignment]
            uv_config.http_protocol_class, context, config.header_timeout, server.counters, handshaking, gate
        )
    uv = _Uvicorn(uv_config)
    task = asyncio.get_running_loop().create_task(uv.serve(sockets=sockets))
    while not uv.started:
        if task.done():
            for sock in sockets:
                sock.close()
            task.result()  # raises what stopped it
            raise UsageError("gateway: uvicorn stopped before it started")
        await asyncio.sleep(0.01)
    gateway.started = True
    if context is not None:
        server.also_reload.append(context)  # SIGHUP and dev certificate renewal reach it too
    return GatewayServer(uv, task, sockets, gateway, context is not None, handshaking, gate)


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not yet listening); UsageError if it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say they are TCP (proto 0 would
    # leave Nagle on, and a response written as head + body would wait for the client's delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"gateway: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock
