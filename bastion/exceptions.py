"""Every exception bastion raises, under one root.

    BastionError
    ├── ProtocolError                 the wire rules were broken
    │   ├── LocalProtocolError        ... by us (a bug or API misuse)
    │   └── RemoteProtocolError       ... by the peer (we close the connection, or fail the one call)
    ├── TransportError                the byte stream failed (OS, TLS, EOF)
    │   ├── ConnectError              could not connect or handshake
    │   └── ConnectionClosed          the connection ended under a call
    ├── CallError                     the server answered a call with a status
    │   ├── Cancelled                 CANCELLED
    │   ├── UnknownError              UNKNOWN
    │   ├── InvalidArgument           INVALID_ARGUMENT
    │   ├── DeadlineExceeded          DEADLINE_EXCEEDED (also a TimeoutError)
    │   ├── NotFound                  NOT_FOUND
    │   ├── AlreadyExists             ALREADY_EXISTS
    │   ├── PermissionDenied          PERMISSION_DENIED
    │   ├── ResourceExhausted         RESOURCE_EXHAUSTED
    │   ├── FailedPrecondition        FAILED_PRECONDITION
    │   ├── Aborted                   ABORTED
    │   ├── OutOfRange                OUT_OF_RANGE
    │   ├── Unimplemented             UNIMPLEMENTED
    │   ├── InternalError             INTERNAL
    │   ├── Unavailable               UNAVAILABLE
    │   ├── DataLoss                  DATA_LOSS
    │   └── Unauthenticated           UNAUTHENTICATED
    └── UsageError                    bastion was used wrongly (bad config, bad declaration)

Handlers raise ``CallError`` subclasses to answer with a status; any other
exception in a handler becomes INTERNAL with a request id and no traceback.
"""

from __future__ import annotations

from typing import Any, ClassVar

from bastion.status import Status

__all__ = [
    "Aborted",
    "AlreadyExists",
    "BastionError",
    "CallError",
    "Cancelled",
    "ConnectError",
    "ConnectionClosed",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InternalError",
    "InvalidArgument",
    "LocalProtocolError",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ProtocolError",
    "RemoteProtocolError",
    "ResourceExhausted",
    "TransportError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "UnknownError",
    "UsageError",
    "error_for_status",
]


class BastionError(Exception):
    """The root of every exception bastion raises."""


class ProtocolError(BastionError):
    """The wire protocol was violated.

    ``status`` is the code sent to the peer in the closing GOAWAY.
    """

    def __init__(self, message: str, status: Status = Status.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.status = status


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol: a bug or a misuse of the API."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; the connection is closed.

    (A client also raises it for a call whose answer does not decode -- a str
    that is not UTF-8, say: the frame around it was whole, so only that call
    fails and the connection serves on.)
    """


class TransportError(BastionError):
    """The byte stream under the protocol failed."""


class ConnectError(TransportError):
    """Could not connect, or the TLS or bastion handshake failed."""


class ConnectionClosed(TransportError):
    """The connection closed while a call was waiting on it."""


class UsageError(BastionError):
    """bastion was used wrongly: a bad configuration or service declaration."""


class CallError(BastionError):
    """A call finished with a non-OK status.

    Raise a subclass in a handler to answer with that status; the message and
    ``details`` travel to the client, ``retry_after`` (seconds) tells it when
    trying again is worthwhile.
    """

    status: ClassVar[Status] = Status.UNKNOWN

    def __init__(
        self,
        message: str = "",
        *,
        details: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message or self.status.name)
        self.message = message or self.status.name
        self.details = details or {}
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class Cancelled(CallError):
    status = Status.CANCELLED


class UnknownError(CallError):
    status = Status.UNKNOWN


class InvalidArgument(CallError):
    status = Status.INVALID_ARGUMENT


class DeadlineExceeded(CallError, TimeoutError):
    status = Status.DEADLINE_EXCEEDED


class NotFound(CallError):
    status = Status.NOT_FOUND


class AlreadyExists(CallError):
    status = Status.ALREADY_EXISTS


class PermissionDenied(CallError):
    status = Status.PERMISSION_DENIED


class ResourceExhausted(CallError):
    status = Status.RESOURCE_EXHAUSTED


class FailedPrecondition(CallError):
    status = Status.FAILED_PRECONDITION


class Aborted(CallError):
    status = Status.ABORTED


class OutOfRange(CallError):
    status = Status.OUT_OF_RANGE


class Unimplemented(CallError):
    status = Status.UNIMPLEMENTED


class InternalError(CallError):
    status = Status.INTERNAL


class Unavailable(CallError):
    status = Status.UNAVAILABLE


class DataLoss(CallError):
    status = Status.DATA_LOSS


class Unauthenticated(CallError):
    status = Status.UNAUTHENTICATED


_BY_STATUS: dict[Status, type[CallError]] = {
    cls.status: cls
    for cls in (
        Cancelled,
        UnknownError,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        InternalError,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def error_for_status(
    code: int,
    message: str,
    *,
    details: dict[str, Any] | None = None,
    retry_after: float | None = None,
) -> CallError:
    """Build the exception for a wire status code (unknown codes -> UnknownError)."""
    cls = _BY_STATUS.get(Status.from_wire(code), UnknownError)
    return cls(message, details=details, retry_after=retry_after)
