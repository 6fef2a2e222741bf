"""Topic names and subscription patterns (NATS-style), and the personal topic space.

A topic name is 1 to ``max_length`` characters: tokens separated by ``.``,
each token one or more of ``A-Z a-z 0-9 _ - @ ~`` (so ``orders.eu.created``).
A pattern is a topic name whose tokens may also be the wildcards ``*`` (any
one token) and, as the last token only, ``>`` (one or more tokens):
``orders.*.created`` matches ``orders.eu.created``; ``orders.>`` matches
``orders.eu`` and ``orders.eu.created`` but not ``orders``; ``>`` matches
every topic.

Pure functions only: the config validates its patterns with them, and the
service its arguments.
"""

from __future__ import annotations

import re

from bastion.security.principal import USER_NAME

__all__ = ["is_wildcard", "matches", "overlaps", "pattern_error", "personal_pattern", "topic_error"]

_TOKEN = r"[A-Za-z0-9_@~-]+"
_TOPIC = re.compile(rf"{_TOKEN}(?:\.{_TOKEN})*")
_PATTERN = re.compile(rf"(?:(?:{_TOKEN}|\*)\.)*(?:{_TOKEN}|\*|>)")
_RULES = "tokens of letters, digits, '_', '-', '@' or '~' separated by '.'"


def topic_error(topic: str, max_length: int) -> str | None:
    """Why ``topic`` is not a valid topic name (None: it is)."""
    if not 0 < len(topic) <= max_length:
        return f"a topic name is 1 to {max_length} characters, got {len(topic)}"
    if _TOPIC.fullmatch(topic) is None:
        return f"topic {topic!r} is not valid: {_RULES} (no wildcards)"
    return None


def pattern_error(pattern: str, max_length: int) -> str | None:
    """Why ``pattern`` is not a valid subscription pattern (None: it is)."""
    if not 0 < len(pattern) <= max_length:
        return f"a topic pattern is 1 to {max_length} characters, got {len(pattern)}"
    if _PATTERN.fullmatch(pattern) is None:
        return f"pattern {pattern!r} is not valid: {_RULES}, where a token may be '*' and the last may be '>'"
    return None


def is_wildcard(pattern: str) -> bool:
    """Whether ``pattern`` (valid) has a wildcard token, i.e. may match more than one topic."""
    return any(token in ("*", ">") for token in pattern.split("."))


def matches(pattern: str, topic: str) -> bool:
    """Whether the valid ``pattern`` matches the valid ``topic``."""
    want, have = pattern.split("."), topic.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def overlaps(a: str, b: str) -> bool:
    """Whether some topic matches both valid patterns ``a`` and ``b``."""
    x, y = a.split("."), b.split(".")
    for i in range(max(len(x), len(y))):
        s = x[i] if i < len(x) else None
        t = y[i] if i < len(y) else None
        if s == ">" or t == ">":
            return s is not None and t is not None
        if s is None or t is None:
            return False
        if s != t and "*" not in (s, t):
            return False
    return True


#: What a user name may be (as auth.create_user checks it): only such a name has a personal space.


def personal_pattern(user: str) -> str | None:
    """``user.<name>.>``: the topics ``user`` may always publish and subscribe to.

    A ``.`` in a user name becomes ``~`` (which user names cannot hold), so
    one user's space never contains another's: ``ada.l`` owns ``user.ada~l.>``.
    None (no personal space) for a name no user can have -- a client
    certificate's subject, say: ``*`` would own every user's space, ``ada~l``
    that of ``ada.l``.
    """
    if USER_NAME.fullmatch(user) is None:
        return None
    return f"user.{user.replace('.', '~')}.>"
