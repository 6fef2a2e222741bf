"""bastion: a fast, secure-by-default client-server framework for Python.

The exceptions, ``Status``, ``Service`` and ``Context`` load with the
package; the clients, the server and the configuration load when first named
(``bastion.Client``), so a client or a short CLI command does not import the
server, its stores and their drivers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bastion._version import __version__
from bastion.exceptions import (
    Aborted,
    AlreadyExists,
    BastionError,
    CallError,
    Cancelled,
    ConnectError,
    ConnectionClosed,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    LocalProtocolError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ProtocolError,
    RemoteProtocolError,
    ResourceExhausted,
    TransportError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    UnknownError,
    UsageError,
)
from bastion.security.principal import Principal
from bastion.service import Context, MethodKind, Service
from bastion.status import Status

if TYPE_CHECKING:
    from bastion.client.aio import Client
    from bastion.client.sync import SyncClient
    from bastion.config import Config, ServerLimits, load_config
    from bastion.jobs import JobRegistry
    from bastion.server.server import Server

#: The names loaded on first use, and the module each comes from.
_LAZY = {
    "Client": "bastion.client.aio",
    "Config": "bastion.config",
    "JobRegistry": "bastion.jobs",
    "Server": "bastion.server.server",
    "ServerLimits": "bastion.config",
    "SyncClient": "bastion.client.sync",
    "load_config": "bastion.config",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bastion' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Aborted",
    "AlreadyExists",
    "BastionError",
    "CallError",
    "Cancelled",
    "Client",
    "Config",
    "ConnectError",
    "ConnectionClosed",
    "Context",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InternalError",
    "InvalidArgument",
    "JobRegistry",
    "LocalProtocolError",
    "MethodKind",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "Principal",
    "ProtocolError",
    "RemoteProtocolError",
    "ResourceExhausted",
    "Server",
    "ServerLimits",
    "Service",
    "Status",
    "SyncClient",
    "TransportError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "UnknownError",
    "UsageError",
    "__version__",
    "load_config",
]
