"""One typed configuration: built-in defaults < TOML file < environment < flags.

Read only at the entry points (the CLI, or a program constructing a Server);
everything below receives the finished, validated, frozen objects. Unknown
keys are errors, not silently ignored. Environment variables are
``BASTION_<KEY>`` for top-level keys and ``BASTION_<SECTION>__<KEY>`` for
keys in a section (e.g. ``BASTION_LIMITS__MAX_FRAME``; bastion/config_env.py).

Every limit is listed with its default and the attack it blunts in
docs/security.md.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from bastion.config_env import merge, overlay
from bastion.config_services import (
    DurableTopic,
    FilesConfig,
    JobsConfig,
    KVConfig,
    MessagesConfig,
    TopicRule,
    TopicsConfig,
    check_finite,
)
from bastion.exceptions import UsageError
from bastion.protocol.messages import DEFAULT_PORT
from bastion.security.ratelimit import RateLimitConfig
from bastion.server.dispatch import GROWTH_WORST
from bastion.server.scheduler import SchedulerConfig

__all__ = [
    "DEFAULT_PORT",
    "AuthConfig",
    "BackupConfig",
    "Config",
    "DurableTopic",
    "FilesConfig",
    "GatewayConfig",
    "JobsConfig",
    "KVConfig",
    "MessagesConfig",
    "ServerLimits",
    "TLSConfig",
    "TopicRule",
    "TopicsConfig",
    "load_config",
]

#: Room left in a frame for the rest of an upload chunk's message (call id, argument names...).
_ENVELOPE = 1024
#: The largest integer a Welcome can carry to clients (MessagePack int64).
_WIRE_INT_MAX = 2**63 - 1


class ServerLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-connection and per-server limits (docs/security.md, section 7, says what each blunts).

    max_frame: largest frame body after the handshake (bytes).
    handshake_max_frame: largest frame before authentication (bytes).
    max_inflight: calls one connection may have open at once.
    window: stream items a peer may send per call before it needs credit.
    handshake_timeout: seconds from accept to a finished bastion handshake
        (a quarter, at least 1 s, for one accepted into reserved_connections).
    ping_interval: seconds of silence before the server pings a connection.
    ping_timeout: seconds to wait for the Pong before closing.
    grace_period: seconds a draining server lets in-flight calls finish.
    threads: worker threads for synchronous handlers.
    write_high_water: bytes buffered for a slow reader before senders wait
        (and the server stops reading from that connection).

    Connection limits. The first three are checked at accept before any TLS
    work, and a connection over any is closed at once and counted; the
    fourth when a handshake ends:

    max_connections: 10000 connections open at once (handshaking ones
        included). Blunts fd and memory exhaustion by connection floods.
    max_connections_per_source: 256 open connections from one IP address.
        Blunts one host hoarding the server's connections.
    max_handshakes_per_source: 64 of them still in their handshake (from
        accept to the Welcome); counted in rejected_handshakes_per_source.
        Blunts one address holding the connections anyone may open with
        silent ones, each for up to handshake_timeout.
    reserved_connections: the last connections of max_connections kept for
        authenticated clients (None, the default: a tenth of max_connections;
        0: none). A handshake that ends while more than max_connections -
        reserved_connections connections are open (handshaking ones
        included) is refused GoAway(RESOURCE_EXHAUSTED) unless its principal
        is authenticated (a token, a session token, a client certificate);
        counted in rejected_connections_reserved. Blunts anonymous
        connections from many addresses locking authenticated clients out
        (handshakes that never end still hold a reserved slot, for a quarter
        of handshake_timeout: docs/security.md). Below max_connections.

    Slow and idle peers:

    idle_timeout: 300 s. A connection with no call open and no traffic but
        pings for this long gets GoAway (OK, "idle timeout") and is closed.
        Blunts idle connections piling up until max_connections.
    write_stall_timeout: 10 s. A connection whose write buffer stays above
        write_high_water this long is dropped (aborted, its buffer freed);
        so is one whose buffer passes the hard cap of 4 x write_high_water +
        max_frame at any time. Blunts a client that sends calls but never
        reads the answers.
    frame_timeout: 20 s, and frame_min_rate: 500 bytes/s. A frame begun
        must arrive whole within frame_timeout plus one second per
        frame_min_rate bytes of it received (a 1 MiB frame: 20 s + 35 min
        at 500 B/s), else GoAway (DEADLINE_EXCEEDED, "frame too slow") and
        close; the clock restarts while the server is not reading. Blunts a
        peer trickling a frame it never finishes to hold its connection
        past idle_timeout and keepalive (as Apache's RequestReadTimeout
        body=20,MinRate=500).
    max_args_memory: 1 GiB. What the arguments of calls in flight may cost
        once decoded, server-wide: a call counts its argument bytes (1 KiB
        or more) times 2 (flat: text, bytes, numbers), 24 when they may hold
        containers, or 80 for nested containers and values of any type,
        until it ends; past the limit such calls are refused
        RESOURCE_EXHAUSTED before decoding. Blunts decoding
        amplification (a 1 MiB frame of empty maps is about 73 MB of Python
        objects) multiplied by the calls that wait in queues, and queued
        calls in bytes (the queues bound them in count).
    read_high_water: 256 calls accepted on one connection but not yet
        started; at this many the server stops reading from the connection
        until they start. Blunts a fast sender queuing work faster than the
        server starts it.
    max_stream_buffer: 64 MiB. Bytes of client-stream items one connection
        may have received and not yet had taken by their handlers (the
        window counts items per call, not bytes); past it GoAway
        (RESOURCE_EXHAUSTED) and close, counted as closed_abuse. Blunts calls
        queued for a slot, or whose handlers do not read yet, each accepting
        window x max_frame bytes (max_inflight x 16 MiB by default). At least
        window x max_frame, so that one call's full window always fits.
    max_stream_buffer_total: 1 GiB. The same bytes on all connections of
        the process together. Past it the server stops reading from a
        connection that delivers an item while holding more than its share
        (max_stream_buffer_total / max_connections) until its handlers take
        items or the total falls below the limit: flow control, nothing
        closed or lost; a connection within its share is always read.
        Blunts many connections each under max_stream_buffer (64 MiB x
        10,000). At least max_stream_buffer.

    max_detached_calls: 128 keyed unary calls (metadata idempotency-key)
        running on, server-wide, after their connection was lost: such a
        call is not cancelled but runs to its end (bounded by its deadline,
        or by its claim's lease without one), still holding its scheduler
        slot and argument memory, and its answer is recorded for the
        client's retry (docs/operations.md, "Idempotency keys"). Past it,
        or past max_detached_calls_per_principal (16) for one principal,
        a call whose connection is lost is cancelled (its outcome unknown
        to a retry, as before); 0: none run on. Blunts a client piling up
        work by calling and hanging up.

    Protocol abuse, counted per connection in fixed 10-second windows; over a
    cap the connection gets GoAway(RESOURCE_EXHAUSTED) and is closed:

    max_cancels_per_10s: 1000 Cancels of open calls ("too many
        cancellations"). Blunts rapid reset: calls started and cancelled at
        once, costing the server work while never counting as in flight.
    max_pings_per_10s: 100 Pings ("ping flood"). Blunts Pong amplification.
    max_refused_per_10s: 1000 Calls refused for the max_inflight limit ("too
        many calls over max_inflight"). Blunts a client that ignores the limit
        and makes the server answer an endless stream of refusals.
    """

    max_frame: int = 1_048_576
    handshake_max_frame: int = 16_384
    max_inflight: int = 1024
    window: int = 16
    handshake_timeout: float = 5.0
    ping_interval: float = 30.0
    ping_timeout: float = 20.0
    grace_period: float = 30.0
    threads: int = 32
    write_high_water: int = 1_048_576
    max_connections: int = 10_000
    max_connections_per_source: int = 256
    max_handshakes_per_source: int = 64
    reserved_connections: int | None = None
    idle_timeout: float = 300.0
    write_stall_timeout: float = 10.0
    frame_timeout: float = 20.0
    frame_min_rate: int = 500
    max_args_memory: int = 1024**3
    read_high_water: int = 256
    max_stream_buffer: int = 64 * 1024**2
    max_stream_buffer_total: int = 1024**3
    max_detached_calls: int = 128
    max_detached_calls_per_principal: int = 16
    max_cancels_per_10s: int = 1000
    max_pings_per_10s: int = 100
    max_refused_per_10s: int = 1000

    def __post_init__(self) -> None:
        check_finite(self, "limits")
        for name in self.__struct_fields__:
            if name in ("max_detached_calls", "max_detached_calls_per_principal"):
                if getattr(self, name) < 0:  # 0: none run on
                    raise UsageError(f"limits.{name} must be 0 or more, got {getattr(self, name)!r}")
            elif name != "reserved_connections" and getattr(self, name) <= 0:
                raise UsageError(f"limits.{name} must be positive, got {getattr(self, name)!r}")
        if self.reserved_connections is not None and not 0 <= self.reserved_connections < self.max_connections:
            raise UsageError(
                f"limits.reserved_connections must be 0 or more and below limits.max_connections "
                f"({self.max_connections}), got {self.reserved_connections!r}"
            )
        # Sent to every client in its Welcome: a value that cannot be encoded would fail every handshake.
        for name, value in (("max_inflight", self.max_inflight), ("window", self.window)):
            if value > _WIRE_INT_MAX:
                raise UsageError(f"limits.{name} must be below 2**63, got {value!r}")
        if self.ping_interval * 1000 > _WIRE_INT_MAX:
            raise UsageError(f"limits.ping_interval is too large, got {self.ping_interval!r}")
        if self.handshake_max_frame > self.max_frame:
            raise UsageError("limits.handshake_max_frame must not exceed limits.max_frame")
        if self.max_frame > 2**32 - 1:
            raise UsageError("limits.max_frame must be below 4 GiB")
        if self.max_stream_buffer < self.window * self.max_frame:  # else one upload at full speed is closed
            raise UsageError(
                f"limits.max_stream_buffer ({self.max_stream_buffer}) must hold one call's window of items: "
                f"at least limits.window x limits.max_frame = {self.window * self.max_frame}"
            )
        if self.max_stream_buffer_total < self.max_stream_buffer:
            raise UsageError(
                f"limits.max_stream_buffer_total ({self.max_stream_buffer_total}) must be at least "
                f"limits.max_stream_buffer ({self.max_stream_buffer})"
            )
        if self.max_args_memory < GROWTH_WORST * self.max_frame:  # else a call of one frame never fits
            raise UsageError(
                f"limits.max_args_memory ({self.max_args_memory}) must hold one call of limits.max_frame bytes "
                f"at the worst growth: at least {GROWTH_WORST} x {self.max_frame}"
            )

    @property
    def anonymous_connections(self) -> int:
        """Connections open past which a handshake must authenticate: max_connections less the reserved ones."""
        reserved = self.max_connections // 10 if self.reserved_connections is None else self.reserved_connections
        return self.max_connections - reserved

    def handshake_timeout_at(self, open_connections: int) -> float:
        """The handshake deadline of a connection accepted as the ``open_connections``-th open one:
        ``handshake_timeout``, or once past ``anonymous_connections`` (into the reserved ones) a quarter of it,
        at least 1 s (never more than it), so that handshakes that never end hold the reserve briefly."""
        if open_connections <= self.anonymous_connections:
            return self.handshake_timeout
        return min(self.handshake_timeout, max(1.0, self.handshake_timeout / 4))

    @property
    def stream_share(self) -> int:
        """Bytes of stream items a connection may always hold, even past max_stream_buffer_total."""
        return min(self.max_stream_buffer_total // self.max_connections, self.max_stream_buffer)

    @property
    def write_hard_limit(self) -> int:
        """Bytes of unsent output at which a connection is dropped at once."""
        return 4 * self.write_high_water + self.max_frame


class TLSConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Transport security (docs/security.md, "TLS").

    With no ``cert``/``key``, ``bastion serve`` creates a development CA and a
    server certificate under ``<data_dir>/tls/`` on first start.

    insecure: serve plaintext (refused on a non-loopback host unless ``force_insecure``).
    cert, key: PEM files of a real certificate chain and its key (reloaded on SIGHUP).
    min_version: "1.3" (default) or "1.2" (then AEAD cipher suites only).
    client_auth: "none", "optional" or "required" client certificates (mutual TLS).
    client_ca: PEM bundle trusted for client certificates (default: the dev CA).
    crl: a PEM certificate revocation list checked against client certificates.
    revoked_serials: client certificate serial numbers (hex or decimal) to refuse.
    client_subjects: whom a verified client certificate may name: "users" (default: its subject must be
        a user in the store, created before the certificate was issued) or "any" (also subjects that are
        no user -- services -- which then speak with no roles).
    dev_cert_lifetime: seconds a development server certificate is issued for (default 365 days).
    dev_renew_before: a running server renews its development certificate when less than
        this many seconds of it remain (default 30 days), and loads it as SIGHUP would.
    """

    insecure: bool = False
    force_insecure: bool = False
    cert: str | None = None
    key: str | None = None
    min_version: str = "1.3"
    client_auth: str = "none"
    client_ca: str | None = None
    crl: str | None = None
    revoked_serials: list[str] = []
    client_subjects: str = "users"
    dev_cert_lifetime: float = 365 * 86400
    dev_renew_before: float = 30 * 86400

    def __post_init__(self) -> None:
        check_finite(self, "tls")
        if not 0 < self.dev_renew_before < self.dev_cert_lifetime:
            raise UsageError(
                "tls.dev_renew_before must be positive and below tls.dev_cert_lifetime, got "
                f"{self.dev_renew_before!r} and {self.dev_cert_lifetime!r}"
            )
        if self.min_version not in ("1.2", "1.3"):
            raise UsageError(f'tls.min_version must be "1.2" or "1.3", got {self.min_version!r}')
        if self.client_auth not in ("none", "optional", "required"):
            raise UsageError(f"tls.client_auth must be none, optional or required, got {self.client_auth!r}")
        if self.client_subjects not in ("users", "any"):
            raise UsageError(f'tls.client_subjects must be "users" or "any", got {self.client_subjects!r}')
        if (self.cert is None) != (self.key is None):
            raise UsageError("tls.cert and tls.key must be given together")


class AuthConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Authentication and brute-force throttling (docs/security.md, "Authentication").

    session_ttl: seconds a login's session token lives.
    token_ttl: default lifetime of API tokens in seconds (0: no expiry).
    revalidate_interval: seconds between re-checks of a connection's token
        (expiry and revocation take effect within this; must be <= 5).
    max_failures_per_source: failed logins from one address before it is throttled.
    max_failures_per_user_source: failures for one (username, address) pair before lockout.
    lockout: seconds a (username, address) pair stays locked.
    max_failures_per_user_global: failures for one username from anywhere per hour
        before that username is slowed everywhere but at the addresses it logged in from lately.
    redis_fail_open: with ``rate_limits.redis_url`` the throttle's counts live in Redis, shared by
        replicas; while Redis fails, throttle with each server's own counts (true) or refuse
        password logins UNAVAILABLE (false).
    """

    session_ttl: float = 12 * 3600
    token_ttl: float = 0
    revalidate_interval: float = 2.0
    max_failures_per_source: int = 20
    max_failures_per_user_source: int = 5
    lockout: float = 300.0
    max_failures_per_user_global: int = 100
    redis_fail_open: bool = True

    def __post_init__(self) -> None:
        check_finite(self, "auth")
        if not 0 < self.revalidate_interval <= 5:
            raise UsageError("auth.revalidate_interval must be in (0, 5] seconds")
        if self.session_ttl <= 0 or self.token_ttl < 0 or self.lockout <= 0:
            raise UsageError("auth.session_ttl and auth.lockout must be positive, auth.token_ttl >= 0")
        # A bucket of 0 never holds the token a failure costs: 0 would mean "refuse for ever
        # after one failure" (and a global allowance of 0 refills at 0 per second).
        for name in ("max_failures_per_source", "max_failures_per_user_source", "max_failures_per_user_global"):
            if getattr(self, name) < 1:
                raise UsageError(f"auth.{name} must be at least 1, got {getattr(self, name)!r}")


class BackupConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Backups (``admin.backup``, ``bastion backup``/``restore``).

    directory: where archives are written (default ``<data_dir>/backups``).
    interval: seconds between scheduled backups (0: none).
    keep: scheduled archives kept; older ones are deleted.
    passphrase_file: a file holding the passphrase that encrypts archives
    (or set ``BASTION_BACKUP_PASSPHRASE``); never a flag.
    """

    directory: str = ""
    interval: float = 0.0
    keep: int = 7
    passphrase_file: str | None = None

    def __post_init__(self) -> None:
        check_finite(self, "backup")
        if self.interval < 0 or self.keep < 1:
            raise UsageError(
                f"backup.interval must be >= 0 and backup.keep at least 1, got {self.interval}, {self.keep}"
            )


#: A DNS name or IPv4 address: labels of letters, digits and inner hyphens (or underscores), dot-separated.
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?\Z")

#: An origin as a browser serializes it in its Origin header: lower-case http(s) scheme and host, a port only if not
#: the default, no path ("null", what sandboxed frames send, and "*" are not origins a list may name).
_ORIGIN = re.compile(r"https?://([a-z0-9_.-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?\Z")


class GatewayConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The HTTP/JSON-RPC/WebSocket gateway (docs/gateway.md).

    http_port: TCP port on ``host`` (0 picks a free one; ``--http-port``).
    enabled: serve the gateway at all (``--no-http`` turns it off).
    cors_origins: origins allowed to call the API from a browser page served
    elsewhere (empty: CORS off). ws_origins: origins allowed to open /ws
    besides the gateway's own (empty: same origin only); both list origins as
    browsers send them (``https://app.example:8443``; not ``*`` or ``null``).
    public_origins: origins the gateway itself is served under through a
    TLS-terminating proxy (``https://console.example``): they count as its own
    origin (POSTs, /ws; no CORS) and their host names as allowed Hosts. max_body: the
    largest request body or WebSocket message, in bytes. max_batch: the most
    calls in one JSON-RPC batch. max_json_depth: the deepest nesting of
    arrays and objects accepted. cookie_secure: mark session cookies
    ``Secure`` and name them ``__Host-`` (over TLS they always are; turn off
    only for plaintext development servers: gateway/_cookies.py).
    idle_seconds: an unused bridged connection is closed after this long.
    header_timeout: seconds a client has to send a request's line and headers
    (and a new connection to send its first byte) before its connection is closed.
    body_timeout, body_min_rate: a request body has ``body_timeout`` seconds, plus
    one more per ``body_min_rate`` bytes received (a sustained bytes/s), else 408.
    send_timeout: seconds a response (or WebSocket message) being written may wait for the client to read
    before its connection is closed (what it held let go): _protocol.py.
    allowed_hosts: over plaintext, host names (no port) a request's Host may name
    besides IP addresses, ``localhost`` and ``host``; others get 400 (DNS rebinding).
    ``["*"]``: any.
    public_metrics: serve /metrics to anyone who reaches the port (default: only
    to a credential of a user with the ``metrics`` or ``admin`` role, or the
    token in ``metrics_token_file``; none 401, another user's 403). metrics_enabled,
    metrics_networks: /metrics and /openapi.json off (404), or only for clients
    in these CIDR networks (403). /openapi.json shows each caller what it may
    call. See bastion/gateway/_ops.py.
    max_connections, max_connections_per_source: connections open at once on the
    gateway's port, in total (503 past it) and from one client address (429;
    0: no per-address cap, for a gateway behind a reverse proxy). _gate.py.
    max_answer_bytes: the most bytes of results one JSON-RPC answer (a call or batch, /rpc or /ws) holds;
    max_answer_memory: of all answers in progress at once. Results past them: RESOURCE_EXHAUSTED. _answers.py.
    max_calls_in_flight: bridged unary calls in flight at once, gateway-wide (each result is held until the
    gateway takes it); past it a call is refused RESOURCE_EXHAUSTED, retry_after 1. bridge.py.
    """

    http_port: int = 7401
    enabled: bool = True
    cors_origins: list[str] = []
    ws_origins: list[str] = []
    public_origins: list[str] = []
    max_body: int = 1 << 20
    max_batch: int = 100
    max_json_depth: int = 32
    cookie_secure: bool = True
    idle_seconds: float = 60.0
    header_timeout: float = 20.0
    body_timeout: float = 20.0
    body_min_rate: float = 500.0
    send_timeout: float = 30.0
    allowed_hosts: list[str] = []
    public_metrics: bool = False
    metrics_enabled: bool = True
    metrics_networks: list[str] = []
    metrics_token_file: str | None = None
    max_connections: int = 4096
    max_connections_per_source: int = 256
    max_answer_bytes: int = 32 << 20
    max_answer_memory: int = 256 << 20
    max_calls_in_flight: int = 512

    def __post_init__(self) -> None:
        check_finite(self, "gateway")
        if self.max_connections <= 0 or self.max_connections_per_source < 0:
            raise UsageError("gateway.max_connections must be positive, max_connections_per_source 0 (off) or more")
        if self.public_metrics and self.metrics_token_file:
            raise UsageError(
                "gateway.public_metrics = true serves /metrics to anyone: drop it, or gateway.metrics_token_file"
            )
        for entry in self.metrics_networks:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise UsageError(f"gateway.metrics_networks: {entry!r} is not an IP address or CIDR network") from None
        for setting in ("cors_origins", "ws_origins", "public_origins"):
            for origin in getattr(self, setting):
                if not _ORIGIN.match(origin):
                    raise UsageError(
                        f"gateway.{setting}: {origin!r} is not an origin as browsers send it "
                        "(scheme://host[:port] in lower case, no path; not '*' or 'null')"
                    )
        for name in self.allowed_hosts:
            if name != "*" and not _HOST_NAME.match(name):
                raise UsageError(f"gateway.allowed_hosts: {name!r} is not a host name (no scheme, port or path)")
        if not 0 <= self.http_port <= 65535:
            raise UsageError(f"gateway.http_port must be 0..65535, got {self.http_port}")
        if not 0 < self.max_answer_bytes <= self.max_answer_memory:
            raise UsageError("gateway.max_answer_bytes must be positive and at most gateway.max_answer_memory")
        for name in ("max_body", "max_batch", "max_json_depth", "idle_seconds", "max_calls_in_flight"):
            if getattr(self, name) <= 0:
                raise UsageError(f"gateway.{name} must be positive, got {getattr(self, name)}")
        for name in ("header_timeout", "body_timeout", "body_min_rate", "send_timeout"):
            if not 0 < getattr(self, name) < math.inf:  # (NaN fails both)
                raise UsageError(f"gateway.{name} must be positive and finite, got {getattr(self, name)}")


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything ``bastion serve`` needs."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: str = "bastion-data"
    # "" = <data_dir>/bastion.db; or sqlite:///path, or postgresql://user@host/db (a password
    # goes in BASTION_STORE, PGPASSWORD, ~/.pgpass or store_password_file, never in a flag).
    store: str = ""
    store_password_file: str | None = None
    # Worker processes sharing the listening port (SO_REUSEPORT); "auto": one per core.
    workers: int | Literal["auto"] = 1
    # Seconds a worker's event loop may go without a heartbeat before the supervisor kills
    # (and so restarts) it: a hung worker would leave its share of new connections hanging. 0: never.
    worker_timeout: float = 30.0
    # Addresses (or CIDR networks) of load balancers allowed to send a PROXY protocol v2
    # header; a connection from one of them must start with it, others must not.
    trusted_proxies: list[str] = []
    services: list[str] = []  # "module:attribute" of extra Service objects
    log_level: str = "info"
    log_format: str = "text"  # or "json": one object per line (bastion/observability/logs.py)
    limits: ServerLimits = ServerLimits()
    tls: TLSConfig = TLSConfig()
    auth: AuthConfig = AuthConfig()
    rate_limits: RateLimitConfig = RateLimitConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    kv: KVConfig = KVConfig()
    files: FilesConfig = FilesConfig()
    jobs: JobsConfig = JobsConfig()
    backup: BackupConfig = BackupConfig()
    gateway: GatewayConfig = GatewayConfig()
    messages: MessagesConfig = MessagesConfig()

    def __post_init__(self) -> None:
        if self.workers != "auto" and not 1 <= self.workers <= 256:
            raise UsageError(f"workers must be 1..256 or auto, got {self.workers}")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"port must be 0..65535, got {self.port}")
        if not 0 <= self.worker_timeout < math.inf:
            raise UsageError(f"worker_timeout must be a finite number of seconds >= 0, got {self.worker_timeout!r}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise UsageError(f"log_level must be debug, info, warning or error, got {self.log_level!r}")
        if self.log_format not in ("text", "json"):
            raise UsageError(f"log_format must be text or json, got {self.log_format!r}")
        self._check_fits_a_frame()

    def _check_fits_a_frame(self) -> None:
        """What one message carries whole must fit a frame with room for the rest of it: over the frame
        limit, every upload in chunks of that size, or every answer carrying such a value, would fail."""
        kv, mail, topics = self.kv, self.messages, self.messages.topics
        sizes = (  # (key, its size, what else the same message may carry, why)
            ("files.chunk_bytes", self.files.chunk_bytes, (), "clients upload in chunks of that size"),
            ("jobs.max_result_bytes", self.jobs.max_result_bytes, (), "a result that large could never be fetched"),
            ("kv.max_value_bytes", kv.max_value_bytes, (("kv.max_key_bytes", kv.max_key_bytes),), "a value"),
            ("messages.max_body_bytes", mail.max_body_bytes, (
                ("messages.max_subject_bytes", mail.max_subject_bytes),
                ("messages.max_header_bytes", mail.max_header_bytes),
            ), "a message"),
            ("messages.topics.max_payload_bytes", topics.max_payload_bytes,
             (("messages.topics.max_header_bytes", topics.max_header_bytes),), "a message"),
        )  # fmt: skip
        limit = self.limits.max_frame
        for key, size, beside, why in sizes:
            room = _ENVELOPE + sum(other for _, other in beside)
            if size + room >= limit:
                detail = ""
                if beside:
                    also = ", ".join(f"{name} ({other})" for name, other in beside)
                    detail, why = f" ({also}, and {_ENVELOPE} for the rest)", f"{why} that large could never be sent"
                raise UsageError(
                    f"{key} ({size}) must be below limits.max_frame ({limit}) by more than {room} bytes{detail}: {why}"
                )


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective Config: defaults < file < environment < overrides (flags)."""
    data: dict[str, Any] = {}
    env = os.environ if environ is None else environ
    path = path or env.get("BASTION_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise UsageError(f"config file {path} is not UTF-8 text") from None
    from_env, origins = overlay(Config, env)
    data = merge(data, from_env)
    data = merge(data, overrides or {})
    try:
        return msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        where = str(exc).rpartition(" - at `")[2].rstrip("`")
        source = f" (from {origins[where]})" if where in origins else ""
        raise UsageError(f"invalid configuration: {exc}{source}") from None
