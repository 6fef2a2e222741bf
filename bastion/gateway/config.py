"""The HTTP gateway's settings (``[gateway]``; the lead moves this into bastion/config.py)."""

from __future__ import annotations

import msgspec

__all__ = ["GatewayConfig"]


class GatewayConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Settings of the HTTP/JSON-RPC/WebSocket gateway.

    http_port: TCP port (0 picks a free one). enabled: serve the gateway at
    all. cors_origins: origins allowed to call the API from a browser page
    served elsewhere (empty: CORS off). ws_origins: origins allowed to open
    /ws besides the gateway's own (empty: same origin only). max_body: the
    largest request body or WebSocket message, in bytes. max_batch: the most
    calls in one JSON-RPC batch. max_json_depth: the deepest nesting of
    arrays and objects accepted. cookie_secure: mark session cookies
    ``Secure`` (turn off only for plaintext development servers).
    idle_seconds: an unused bridged connection is closed after this long.
    """

    http_port: int = 7401
    enabled: bool = True
    cors_origins: list[str] = []
    ws_origins: list[str] = []
    max_body: int = 1 << 20
    max_batch: int = 100
    max_json_depth: int = 32
    cookie_secure: bool = True
    idle_seconds: float = 60.0
