"""Wire status codes and the table mapping each code to its exception class.

The codes are gRPC's, with the same numbers and meanings, so operators and
client authors can reuse what they already know. A code is never reused for a
different meaning (docs/protocol.md, section "Status codes").
"""

from __future__ import annotations

import enum

__all__ = ["RETRYABLE", "Status"]


class Status(enum.IntEnum):
    """The status of a finished call (or the reason a connection closes)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def from_wire(cls, code: int) -> Status:
        """Map a peer's code to a Status; codes we do not know become UNKNOWN."""
        try:
            return cls(code)
        except ValueError:
            return cls.UNKNOWN


#: Codes after which a call that is idempotent may be tried again.
RETRYABLE = frozenset({Status.UNAVAILABLE, Status.RESOURCE_EXHAUSTED})
