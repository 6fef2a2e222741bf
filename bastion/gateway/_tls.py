"""The gateway's TLS handshake, done here (not by the listener) so that each failure is counted by reason.

Theory of operation. Given an ``ssl`` context, asyncio's (and uvloop's)
``create_server`` runs the TLS handshake itself and drops a failed one
without a word: no callback, no log unless the loop is in debug mode. An
operator then cannot tell a port scanned by plaintext HTTP clients, a fleet
of clients that do not trust the certificate, or a flood of connections
that never finish their handshake (slowloris on TLS) from a quiet port --
while the native port counts its own (``bastion_rejections_total{reason="tls"}``).

So uvicorn listens in plaintext and each connection's protocol is a
``TLSAcceptor``: asyncio's own TLS layer (``asyncio.sslproto.SSLProtocol``,
the one the default loop uses; under uvloop too) around uvicorn's HTTP
protocol, with the handshake under ``header_timeout`` -- the deadline a
plaintext connection has for its first request's head. (Not
``loop.start_tls`` after the fact: uvloop starts reading a connection after
``connection_made`` whatever the protocol asked, so a ClientHello could
arrive before the TLS layer was in place.) The layer is the connection's
protocol from its first byte, and when the handshake completes it hands the
TLS transport to the HTTP protocol itself. A handshake that fails is counted
in ``Server.counters`` as ``gateway_tls_<reason>``, one of ``REASONS`` (a
fixed set: nothing from the client becomes a label); the TLS layer has
closed the connection. ``/metrics`` shows them as
``bastion_gateway_tls_handshake_failures_total{reason}``.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio.sslproto import SSLProtocol
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

from bastion.gateway._gate import ConnectionGate, peer_host

__all__ = ["REASONS", "TLSAcceptor", "failure_reason", "tls_acceptor"]

#: Why a gateway TLS handshake failed (the label values of the metric):
#: timeout -- not complete within ``header_timeout``; closed -- the client closed or reset the connection
#: mid-handshake; plaintext_http -- an HTTP request sent to the HTTPS port; certificate_rejected -- the
#: client refused the gateway's certificate (an unknown CA, a bad or unsupported certificate alert);
#: protocol -- any other TLS failure (no shared version or cipher, garbage); other -- anything else.
REASONS = ("timeout", "closed", "plaintext_http", "certificate_rejected", "protocol", "other")

_CERTIFICATE_ALERTS = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "TLSV1_ALERT_ACCESS_DENIED",
    }
)


def failure_reason(exc: BaseException) -> str:
    """The ``REASONS`` entry for the exception a failed handshake raised."""
    if isinstance(exc, TimeoutError | ConnectionAbortedError):  # (asyncio's handshake deadline: see TLSAcceptor)
        return "timeout"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionError):
        return "closed"
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None)
        if reason == "HTTP_REQUEST":
            return "plaintext_http"
        if reason in _CERTIFICATE_ALERTS:
            return "certificate_rejected"
        return "protocol"
    if isinstance(exc, OSError):
        return "closed"
    return "other"


class TLSAcceptor(SSLProtocol):
    """One connection's TLS layer (asyncio's own, the same whatever the loop), counting a failed handshake."""

    def __init__(
        self,
        app_protocol: asyncio.Protocol,
        context: ssl.SSLContext,
        timeout: float,
        counters: Counter[str],
        pending: set[TLSAcceptor],
        gate: ConnectionGate,
    ) -> None:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        # The deadline is asyncio's: past it the handshake fails with ConnectionAbortedError (and nothing else
        # raises that during a handshake), which ``failure_reason`` calls "timeout".
        super().__init__(loop, app_protocol, context, waiter, server_side=True, ssl_handshake_timeout=timeout)  # type: ignore[arg-type]
        self.app = app_protocol
        self.counters = counters
        self.pending = pending
        self.stopping = False  # aborted by the gateway stopping: not the client's failure
        self.raw: asyncio.BaseTransport | None = None
        self.gate = gate
        self.host: str | None = None  # set once admitted by the gate (_gate.py)
        self.refused = False
        waiter.add_done_callback(self._handshake_done)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport
        host = peer_host(transport)
        # Stopping, or past a cap: nothing can be said before a handshake.
        if self.gate.closing or self.gate.admit(host) is not None:
            self.refused = True
            cast(asyncio.Transport, transport).abort()
            return
        self.host = host
        self.pending.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.refused:
            return  # never started
        if self.host is not None:
            self.gate.release(self.host)
            self.host = None
        super().connection_lost(exc)

    def _do_shutdown(self) -> None:
        """Discard the client's application data before the close_notify exchange, as uvloop's TLS layer does.

        The gateway may close a connection while the client is still sending -- a 413 answered before the
        body is read. asyncio's layer (3.11) then fed the body's records to ``unwrap``, which fails on data
        after close_notify, and aborted the connection: the client got a reset instead of the answer.
        asyncio's private names are read defensively (tests/gateway/test_gateway_tls.py checks they are
        there): if a Python release renamed them, this would fall back to asyncio's own behaviour.
        """
        sslobj: ssl.SSLObject | None = getattr(self, "_sslobj", None)
        if sslobj is not None:
            try:
                while sslobj.read(getattr(self, "max_size", 256 * 1024)):
                    pass  # (b"": the client's close_notify came, which unwrap then completes with)
            except ssl.SSLError:
                pass  # want-read: all there was is gone (more may come); anything else: unwrap reports it
        super()._do_shutdown()  # type: ignore[misc]

    def abort(self) -> None:
        """Drop the connection mid-handshake (the gateway is stopping)."""
        self.stopping = True
        if self.raw is not None:
            cast(asyncio.Transport, self.raw).abort()

    def _handshake_done(self, waiter: asyncio.Future[None]) -> None:
        self.pending.discard(self)
        if waiter.cancelled() or self.stopping:
            return
        exc = waiter.exception()
        if exc is None:
            if getattr(self.app, "transport", None) is not None:
                return  # done: the HTTP protocol has the connection
            exc = ConnectionResetError("lost during the handshake")
        self.counters[f"gateway_tls_{failure_reason(exc)}"] += 1


def tls_acceptor(
    make_protocol: Callable[..., asyncio.Protocol],
    context: ssl.SSLContext,
    timeout: float,
    counters: Counter[str],
    pending: set[TLSAcceptor],
    gate: ConnectionGate,
) -> Callable[..., asyncio.BaseProtocol]:
    """The protocol factory for uvicorn (``http_protocol_class``): each connection a ``TLSAcceptor``
    whose HTTP protocol is ``make_protocol(**kwargs)`` with the keywords uvicorn passed."""

    def factory(**kwargs: Any) -> asyncio.BaseProtocol:
        return TLSAcceptor(make_protocol(**kwargs), context, timeout, counters, pending, gate)

    return factory
