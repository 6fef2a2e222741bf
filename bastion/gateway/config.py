"""The HTTP gateway's settings: ``GatewayConfig`` is the ``[gateway]`` section of bastion/config.py."""

from __future__ import annotations

from bastion.config import GatewayConfig

__all__ = ["GatewayConfig"]
