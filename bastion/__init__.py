"""bastion: a fast, secure-by-default client-server framework for Python."""

from bastion._version import __version__
from bastion.client.aio import Client
from bastion.client.sync import SyncClient
from bastion.config import Config, ServerLimits, load_config
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
from bastion.jobs import JobRegistry
from bastion.security.principal import Principal
from bastion.server.server import Server
from bastion.service import Context, MethodKind, Service
from bastion.status import Status

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
