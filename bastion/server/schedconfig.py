"""The call scheduler's configuration (``[scheduler]``) and a call's effective priority.

Kept apart from bastion/server/scheduler.py, which re-exports both.
"""

from __future__ import annotations

import math

import msgspec

from bastion.exceptions import UsageError
from bastion.server.tickets import Level

__all__ = ["SchedulerConfig", "effective_priority"]


def effective_priority(declared: int, requested: int | None) -> int:
    """The priority a call runs at: the caller may lower the method's, never raise it."""
    return declared if requested is None else min(declared, requested)


class SchedulerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Limits of the call scheduler (server-wide).

    max_concurrency: calls running at once; more wait in queues.
    control_reserve: extra slots only CONTROL calls may use (health under overload).
    queue_limit: waiting calls per level.
    principal_queue_limit: waiting calls per principal per level (one flooder's share).
    control_min_priority: priorities at or above this are CONTROL.
    interactive_min_priority: priorities at or above this (and below control) are
        INTERACTIVE; lower ones are BATCH.
    codel_target: acceptable queueing delay in seconds; while a level is overloaded,
        its newcomers are admitted for about this much waiting and calls that have
        waited twice this long are shed.
    codel_interval: seconds the delay must stay above target before shedding starts.
    retry_after: seconds suggested to refused callers before trying again.
    """

    max_concurrency: int = 256
    control_reserve: int = 8
    queue_limit: int = 1024
    principal_queue_limit: int = 128
    control_min_priority: int = 10
    interactive_min_priority: int = 0
    codel_target: float = 0.05
    codel_interval: float = 0.1
    retry_after: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_concurrency", "queue_limit", "principal_queue_limit"):
            if getattr(self, name) <= 0:
                raise UsageError(f"scheduler.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("codel_target", "codel_interval", "retry_after"):
            # NaN compares false with everything, and an infinite retry_after is no number of
            # milliseconds: a refusal carrying it could not be sent, and its call went unanswered.
            if not 0 < getattr(self, name) < math.inf:
                raise UsageError(f"scheduler.{name} must be positive and finite, got {getattr(self, name)!r}")
        if self.control_reserve < 0:
            raise UsageError(f"scheduler.control_reserve must not be negative, got {self.control_reserve!r}")
        if self.control_min_priority <= self.interactive_min_priority:
            raise UsageError("scheduler.control_min_priority must be above scheduler.interactive_min_priority")

    def level_for(self, priority: int) -> Level:
        if priority >= self.control_min_priority:
            return Level.CONTROL
        if priority >= self.interactive_min_priority:
            return Level.INTERACTIVE
        return Level.BATCH
