"""Authentication in the handshake: a Hello's credentials -> a Principal.

The server asks its ``Authenticator`` once per connection, before any call
is dispatched. A connection without credentials is ``ANONYMOUS`` and may
call only public methods; bad credentials refuse the handshake with
UNAUTHENTICATED. Tokens are compared by their SHA-256 digest in constant
time and never stored or logged in the clear.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import Protocol

from bastion.exceptions import Unauthenticated
from bastion.security.principal import ANONYMOUS, Principal

__all__ = ["AllowAnonymous", "Authenticator", "StaticTokens", "hash_token", "new_token"]

TOKEN_PREFIX = "bst_"


def new_token() -> str:
    """A fresh API token: 256 random bits, URL-safe, with a recognisable prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Authenticator(Protocol):
    async def authenticate(self, token: str | None, peer: str) -> Principal:
        """The principal for these credentials; raise Unauthenticated to refuse."""
        ...


class AllowAnonymous:
    """Everyone is anonymous; presenting a token is an error (none exist)."""

    async def authenticate(self, token: str | None, peer: str) -> Principal:
        if token is not None:
            raise Unauthenticated("invalid token")
        return ANONYMOUS


class StaticTokens:
    """A fixed set of tokens, held only as digests."""

    def __init__(self, tokens: Mapping[str, Principal]) -> None:
        self._by_digest = {hash_token(token): principal for token, principal in tokens.items()}

    async def authenticate(self, token: str | None, peer: str) -> Principal:
        if token is None:
            return ANONYMOUS
        digest = hash_token(token)
        found: Principal | None = None
        # Compare against every digest so timing does not depend on a match.
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                found = principal
        if found is None:
            raise Unauthenticated("invalid token")
        return found
