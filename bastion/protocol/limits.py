"""The limits one end of a connection enforces on what it receives (``ProtocolLimits``).

The protocol core (bastion/protocol/connection.py) holds one per connection;
servers derive theirs from their configuration, clients from the server's
Welcome. Also importable from ``bastion.protocol.connection``, as before.
"""

from __future__ import annotations

import msgspec

__all__ = ["ProtocolLimits"]


class ProtocolLimits(msgspec.Struct, frozen=True):
    """Limits one end enforces on what it receives (docs/security.md, "Limits").

    max_frame: largest frame body accepted after the handshake.
    handshake_max_frame: largest frame accepted before it (pre-authentication).
    max_inflight: calls a server lets one connection have open at once.
    window: stream items the peer may send per call before it needs credit.
    """

    max_frame: int = 1_048_576
    handshake_max_frame: int = 16_384
    max_inflight: int = 1024
    window: int = 16

    def __post_init__(self) -> None:
        for name in ("max_frame", "handshake_max_frame", "max_inflight", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_frame > 2**32 - 1 or self.handshake_max_frame > self.max_frame:
            raise ValueError("need handshake_max_frame <= max_frame < 2**32")
