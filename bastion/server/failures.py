"""Answering a call that failed: the error it gets, what it counts and audits (``ServerSession``'s).

``CallFailures`` is mixed into ``ServerSession`` (session.py), which sets every
attribute stubbed here. Every call gets an answer: one that cannot be sent as
it is (details that do not encode, a frame over the peer's limit) goes out as
its status and a short message alone.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Any

from bastion.exceptions import CallError, LocalProtocolError
from bastion.observability.loglimit import suppressed_note
from bastion.protocol.connection import Connection
from bastion.security.throttle import LoginThrottled
from bastion.service import MethodSpec
from bastion.status import Status

if TYPE_CHECKING:
    from bastion.server.server import Server

__all__ = ["CallFailures"]

log = logging.getLogger("bastion.server")
_DENIED = (Status.UNAUTHENTICATED, Status.PERMISSION_DENIED)


class CallFailures:
    """The failed-call answers of ``ServerSession``."""

    server: Server
    core: Connection
    id: int
    _expired: set[int]  # running calls whose deadline timer has cancelled them

    def _audit_denial(self, method: str, status: Status) -> None:
        raise NotImplementedError  # the session's (upkeep.py): log a denial, within the audit budget

    def _failed(self, call_id: int, spec: MethodSpec, exc: BaseException) -> Status:
        """Answer a call whose handler (or its answer) failed with ``exc``; the status it ended with."""
        if isinstance(exc, CallError):
            # Before TimeoutError: DeadlineExceeded is both, and a handler's
            # own DeadlineExceeded must reach the client as it was raised.
            self._answer_error(call_id, exc)
            if exc.status in _DENIED:  # the service's own check (an ACL, a password) refused the caller
                self.server.counters["auth_failures_denied"] += 1
                if exc.status is Status.PERMISSION_DENIED:  # a handler's UNAUTHENTICATED audits itself (auth.login)
                    self._audit_denial(spec.full_name, exc.status)
            elif isinstance(exc, LoginThrottled):  # auth.login met the login throttle
                self.server.counters["auth_failures_throttled"] += 1
            return exc.status
        if isinstance(exc, asyncio.CancelledError):
            if call_id in self._expired:  # our deadline timer cancelled the task
                self._send_error(call_id, Status.DEADLINE_EXCEEDED, "deadline exceeded")
                return Status.DEADLINE_EXCEEDED
            # Client cancel: the core has closed the call, so this sends nothing.
            # Shutdown: tell the client the call did not finish.
            self._send_error(call_id, Status.UNAVAILABLE, "server shutting down", retry_after=1.0)
            return Status.UNAVAILABLE if self.server.draining else Status.CANCELLED
        if isinstance(exc, LocalProtocolError):
            self._send_error(call_id, exc.status, f"{spec.full_name}: result cannot be sent: {exc}")
            return exc.status
        self._internal_error(call_id, spec.full_name, self._request_id(call_id))
        return Status.INTERNAL

    def _request_id(self, call_id: int) -> str:
        """The id a call's Context and its internal-error log line carry: session and call."""
        return f"{self.id:x}-{call_id:x}"

    def _answer_error(self, call_id: int, exc: CallError) -> None:
        self._send_error(call_id, exc.status, exc.message, exc.details or None, exc.retry_after)

    def _send_error(
        self,
        call_id: int,
        status: Status,
        message: str,
        details: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        """Answer ``call_id`` with ``status``; if the answer cannot be sent as it is (details that do
        not encode, a retry_after that is no number of milliseconds, a frame over the peer's limit),
        with the status and a short message alone: every call is answered, and the others go on."""
        try:
            retry = math.ceil(retry_after * 1000) if retry_after is not None else None
            self.core.send_error(call_id, status, message, details=details, retry_after_ms=retry)
        except (LocalProtocolError, OverflowError, ValueError, TypeError) as exc:
            # The peer may cause this on every call (its max_frame, the method name an error repeats).
            if (left_out := self.server.log_budget.take("unsendable_answer")) is not None:
                log.warning(
                    "call %d: its %s answer could not be sent as it was (%s); sent without details%s",
                    call_id,
                    status.name,
                    exc,
                    suppressed_note(left_out),
                )
            self.core.send_error(call_id, status, f"{status.name} (the full answer could not be sent)")

    def _internal_error(self, call_id: int, method: str, request_id: str) -> None:
        log.exception("handler %s failed (request id %s)", method, request_id)
        self.server.counters["internal_errors"] += 1
        self.core.send_error(call_id, Status.INTERNAL, f"internal error (request id {request_id})")
