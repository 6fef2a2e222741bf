"""The gateway's TLS handshake, done here (not by the listener) so that each failure is counted by reason.

Theory of operation. Given an ``ssl`` context, asyncio's (and uvloop's)
``create_server`` runs the TLS handshake itself and drops a failed one
without a word: no callback, no log unless the loop is in debug mode (uvloop
0.23, checked for each of ``REASONS``: not even the loop's exception
handler hears of it). An operator then cannot tell a port scanned by
plaintext HTTP clients, a fleet of clients that do not trust the
certificate, or a flood of connections that never finish their handshake
(slowloris on TLS) from a quiet port -- while the native port counts its
own (``bastion_rejections_total{reason="tls"}``).

So uvicorn listens in plaintext and each connection's protocol is a
``TLSAcceptor``: the running loop's own TLS layer -- uvloop's
(``uvloop.loop.SSLProtocol``, in C: what ``create_server(ssl=...)`` would
have used) under uvloop, as ``bastion serve`` runs, else asyncio's
(``asyncio.sslproto.SSLProtocol``) -- made by the gateway itself with a
handshake waiter of its own, around uvicorn's HTTP protocol, with the
handshake under ``header_timeout`` -- the deadline a plaintext connection
has for its first request's head. Both layers take the same arguments and
fail a handshake the same way (the waiter's exception: the ``ssl.SSLError``
OpenSSL raised, ConnectionResetError for an EOF, ConnectionAbortedError past
the deadline). uvloop reads data for a subclass of its layer on its fast
path (no Python call per record): an HTTPS call costs what it would behind
``create_server(ssl=...)`` (bench/README.md, "Over HTTPS"). uvloop neither
documents that class nor puts it in its stubs: if a release renamed it, the
gateway would run asyncio's layer, slower but the same otherwise
(tests/gateway/test_tls_layer.py fails loudly). (Not
``loop.start_tls`` after the fact: uvloop starts reading a connection after
``connection_made`` whatever the protocol asked, so a ClientHello could
arrive before the TLS layer was in place.) The layer is the connection's
protocol from its first byte, and when the handshake completes it hands the
TLS transport to the HTTP protocol itself. A handshake that fails is counted
in ``Server.counters`` as ``gateway_tls_<reason>``, one of ``REASONS`` (a
fixed set: nothing from the client becomes a label); the TLS layer has
closed the connection. ``/metrics`` shows them as
``bastion_gateway_tls_handshake_failures_total{reason}``. ``tls.min_version``
is the context's (``http_server_context``): OpenSSL refuses an older
version, and the refusal is counted as ``protocol``.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio.sslproto import SSLProtocol
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from bastion.gateway._gate import ConnectionGate, peer_host

try:
    import uvloop
    from uvloop.loop import SSLProtocol as UvloopSSLProtocol  # type: ignore[attr-defined]  # (not in its stubs)
except ImportError:  # (Windows: the asyncio loop)
    uvloop = None  # type: ignore[assignment]
    UvloopSSLProtocol = None

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


if TYPE_CHECKING:
    _Layer = SSLProtocol  # what the mixin's super() calls reach: uvloop's layer has the same methods
else:
    _Layer = object


class TLSAcceptor(_Layer):
    """One connection's TLS layer, counting a failed handshake: mixed into the loop's own layer (below)."""

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
        # The deadline is the layer's: past it the handshake fails with ConnectionAbortedError (and nothing
        # else raises that during a handshake), which ``failure_reason`` calls "timeout".
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


class AsyncioTLSAcceptor(TLSAcceptor, SSLProtocol):
    """asyncio's TLS layer (in Python), where the loop is not uvloop's."""

    def _do_shutdown(self) -> None:
        """Discard the client's application data before the close_notify exchange, as uvloop's TLS layer does.

        The gateway may close a connection while the client is still sending -- a 413 answered before the
        body is read. asyncio's layer (3.11) then fed the body's records to ``unwrap``, which fails on data
        after close_notify, and aborted the connection: the client got a reset instead of the answer.
        asyncio's private names are read defensively (tests/gateway/test_tls_layer.py checks they are
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


if UvloopSSLProtocol is not None:

    class UvloopTLSAcceptor(TLSAcceptor, UvloopSSLProtocol):  # type: ignore[misc]
        """uvloop's TLS layer (in C), whose reads uvloop's transport makes without a Python call."""


def layer_for(loop: asyncio.AbstractEventLoop) -> type[TLSAcceptor]:
    """The TLSAcceptor on ``loop``'s own TLS layer (uvloop's needs uvloop's loop; asyncio's runs on either)."""
    if uvloop is not None and isinstance(loop, uvloop.Loop):
        return cast(type[TLSAcceptor], UvloopTLSAcceptor)
    return AsyncioTLSAcceptor


def tls_acceptor(
    make_protocol: Callable[..., asyncio.Protocol],
    context: ssl.SSLContext,
    timeout: float,
    counters: Counter[str],
    pending: set[TLSAcceptor],
    gate: ConnectionGate,
) -> Callable[..., asyncio.BaseProtocol]:
    """The protocol factory for uvicorn (``http_protocol_class``): each connection a ``TLSAcceptor`` (on the
    running loop's TLS layer) whose HTTP protocol is ``make_protocol(**kwargs)`` with the keywords uvicorn passed."""
    acceptor = layer_for(asyncio.get_running_loop())

    def factory(**kwargs: Any) -> asyncio.BaseProtocol:
        return acceptor(make_protocol(**kwargs), context, timeout, counters, pending, gate)

    return factory
