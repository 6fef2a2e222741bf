"""Who is calling: the principal a connection authenticated as."""

from __future__ import annotations

import re
from typing import Final

import msgspec

__all__ = ["ADMIN_ROLE", "ANONYMOUS", "USER_NAME", "USER_NAME_RULE", "Principal"]

#: Holders of this role pass every role check.
ADMIN_ROLE: Final = "admin"

#: The user names ``auth.add_user`` accepts, and so the only ones a personal namespace, topic space, mailbox or
#: share may name: 1-64 ASCII letters, digits and ``. _ @ -``, starting with a letter or digit.
USER_NAME_RULE: Final = r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}"
#: ``USER_NAME_RULE`` compiled: use with ``fullmatch``.
USER_NAME: Final = re.compile(USER_NAME_RULE)


class Principal(msgspec.Struct, frozen=True):
    """An authenticated identity (or ``anonymous``) and its roles.

    ``authenticated`` is False only for the anonymous principal, which may call
    nothing but methods declared public.
    """

    name: str
    roles: frozenset[str] = frozenset()
    authenticated: bool = True
    mechanism: str = "token"  # "token", "session", "mtls", "none"
    token_id: str | None = None  # the credential to re-check for expiry and revocation
    expires_at: float | None = None
    issued_at: float | None = None  # a client certificate's notBefore: its user must be no newer

    def has_roles(self, required: frozenset[str]) -> bool:
        return ADMIN_ROLE in self.roles or required <= self.roles

    def may_call(self, public: bool, roles: frozenset[str]) -> bool:
        """Whether a method declared ``public`` and needing ``roles`` is this principal's to call (and so to
        see listed: ``admin.methods``, the gateway's /openapi.json and ``rpc.discover``); ``MethodTable.admit``
        decides the same, inline, on the call path."""
        return (public or self.authenticated) and (not roles or self.has_roles(roles))


ANONYMOUS: Final = Principal("anonymous", frozenset(), authenticated=False, mechanism="none")
