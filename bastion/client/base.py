"""The settings both clients share: one constructor, one retry property.

``Client`` and ``SyncClient`` take exactly the same keyword arguments; they
differ only in how bytes move. Each adds its own connection state in
``_init_state``.
"""

from __future__ import annotations

import os
import ssl
import uuid
from collections.abc import Callable, Sequence

from bastion.client._common import CLIENT_NAME, MAX_COLLECTED_BYTES, ClientTLS, build_hello, resolve_token
from bastion.client.balancer import CircuitBreaker, ReconnectBackoff, parse_endpoints
from bastion.client.policy import DEFAULT_RETRY, IdempotentMethods, RetryBudget, RetryPolicy
from bastion.exceptions import LocalProtocolError, UsageError
from bastion.protocol.connection import ProtocolLimits
from bastion.protocol.frames import FrameWriter
from bastion.protocol.messages import Welcome

__all__ = ["ClientBase"]


class ClientBase:
    """Address, credentials, TLS, timeouts and retry policy of a client.

    TLS is the default: the server is verified against ``ca`` (a PEM file;
    default: the file named by ``BASTION_CA``, else the system trust store),
    by hostname (``server_hostname`` overrides the name checked);
    ``cert``/``key`` present a client certificate for mutual TLS.
    ``timeout`` (seconds, None: none) covers a call's every attempt, waiting
    for a connection included; ``connect_timeout`` bounds one attempt at
    connecting (TCP, TLS and the bastion handshake), which the calls waiting
    for it share. ``insecure=True`` connects in plaintext (only to a server started with
    ``--insecure``). ``source_address`` is the local address to connect from.
    ``retry`` is the ``RetryPolicy`` for failed calls (default: 3 attempts
    with jittered exponential backoff, for idempotent calls only, under a
    retry budget); None never retries, not even a call that never started.
    ``reconnect`` makes the ``ReconnectBackoff`` that paces attempts at
    connecting to each address after one failed or a connection was lost
    (default: full jitter, from 0.1 s doubling up to 5 s, reset by a
    connection that stays up); a call waits for it within its own deadline.
    ``max_collected_bytes`` bounds what a unary call (``call``, ``invoke``)
    collects of a server stream's items (each counts its bytes plus 64):
    past it the call is cancelled and fails with RemoteProtocolError
    (RESOURCE_EXHAUSTED); ``stream()`` reads a stream of any length. It
    counts bytes on the wire: decoded, they may take up to ~72 times as much
    (docs/security.md, "Client-side limits").

    Several servers: ``address`` may be a list of addresses, a comma-separated
    string, or ``dns:///name:port`` (every address the name resolves to). The
    client then balances calls over them and fails over between them (see
    bastion/client/balancer.py): ``breaker`` makes each endpoint's
    ``CircuitBreaker``; ``health_interval`` is how often (seconds, jittered
    by half either way) the async client checks every endpoint's
    ``admin.ready`` (None: only when a breaker half-opens).
    """

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        token: str | None = None,
        token_file: str | None = None,
        timeout: float | None = None,
        connect_timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        limits: ProtocolLimits | None = None,
        name: str = CLIENT_NAME,
        ca: str | os.PathLike[str] | None = None,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        source_address: str | None = None,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        breaker: Callable[[], CircuitBreaker] = CircuitBreaker,
        health_interval: float | None = 5.0,
        reconnect: Callable[[], ReconnectBackoff] = ReconnectBackoff,
        max_collected_bytes: int = MAX_COLLECTED_BYTES,
    ) -> None:
        if not isinstance(max_collected_bytes, int) or max_collected_bytes < 1:
            raise UsageError(f"max_collected_bytes must be a positive integer, got {max_collected_bytes!r}")
        self.max_collected_bytes = max_collected_bytes
        self._addresses, self.balanced = parse_endpoints(address)
        self._init_state()
        self.host, self.port = self._addresses[0]
        self._make_breaker = breaker
        self._make_backoff = reconnect
        #: A single-server client's reconnect backoff (a balanced client's endpoints have one each).
        self._backoff = reconnect()
        self.health_interval = health_interval
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.limits = limits or ProtocolLimits()
        self.source_address = source_address
        self._token = resolve_token(token, token_file)
        self.tls = ClientTLS(ssl_context=ssl_context, ca=ca, cert=cert, key=key, insecure=insecure)
        self._server_hostname = server_hostname
        self._name = name
        try:  # the Hello is sent before the server's limits are known: it must fit the handshake's cap
            FrameWriter(self.limits.handshake_max_frame).write(build_hello(self.limits, self._token, name))
        except LocalProtocolError as exc:
            raise UsageError(f"the token and client name are too large for the handshake: {exc}") from None
        self.welcome: Welcome | None = None
        self.retry = retry
        self._methods = IdempotentMethods()  # what the current connection's server declared idempotent

    def _init_state(self) -> None:
        """Set up the subclass's own connection state: before the settings, so they may be kept in it.

        (The addresses, and ``balanced``, are known by then.)
        """

    @property
    def retry(self) -> RetryPolicy | None:
        """The retry policy (None: never retry); setting it also gives the client a fresh budget."""
        return self._retry

    @retry.setter
    def retry(self, policy: RetryPolicy | None) -> None:
        self._retry = policy
        self.retry_budget: RetryBudget | None = policy.new_budget() if policy is not None else None

    @property
    def _clock(self) -> Callable[[], float]:
        return self._retry.clock if self._retry is not None else DEFAULT_RETRY.clock

    @staticmethod
    def _with_key(metadata: dict[str, str] | None, idempotency_key: str | bool | None) -> dict[str, str] | None:
        """``metadata`` plus the call's idempotency key (True: a new random one)."""
        if idempotency_key is None or idempotency_key is False:
            return metadata
        key = uuid.uuid4().hex if idempotency_key is True else idempotency_key
        return {**(metadata or {}), "idempotency-key": key}

    def __repr__(self) -> str:
        if self.balanced:
            return f"{type(self).__name__}({','.join(f'{h}:{p}' for h, p in self._addresses)})"
        return f"{type(self).__name__}({self.host}:{self.port})"
