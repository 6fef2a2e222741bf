"""Who is calling: the principal a connection authenticated as."""

from __future__ import annotations

from typing import Final

import msgspec

__all__ = ["ADMIN_ROLE", "ANONYMOUS", "Principal"]

#: Holders of this role pass every role check.
ADMIN_ROLE: Final = "admin"


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

    def has_roles(self, required: frozenset[str]) -> bool:
        return ADMIN_ROLE in self.roles or required <= self.roles


ANONYMOUS: Final = Principal("anonymous", frozenset(), authenticated=False, mechanism="none")
