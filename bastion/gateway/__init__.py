"""The HTTP gateway: JSON-RPC 2.0 over HTTP and WebSocket, plain JSON routes, OpenAPI.

A second door into the same server: every call goes through the server's own
authentication, authorization, rate limits and scheduler (see bridge.py).
``create_app(server, config)`` builds the ASGI application (front.py, around Starlette);
``serve(server, config)`` runs it with uvicorn inside the running event loop.
``read_token_file`` reads ``gateway.metrics_token_file`` as the gateway does (``bastion serve --check`` tries it).
"""

from bastion.gateway._ops import read_token_file
from bastion.gateway.app import Gateway, create_app
from bastion.gateway.bridge import Bridge, Caller
from bastion.gateway.config import GatewayConfig
from bastion.gateway.runner import GatewayServer, serve

__all__ = ["Bridge", "Caller", "Gateway", "GatewayConfig", "GatewayServer", "create_app", "read_token_file", "serve"]
