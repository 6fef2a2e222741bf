"""The one async storage interface, and ``open_store`` to pick a backend.

``Store`` is what the rest of bastion sees of storage: the ``CredentialStore``
that security defines (users, tokens, lockouts), plus a lifecycle. Backends
implement it -- SQLite (``bastion.store.sqlite``, embedded, the default) and
PostgreSQL (``bastion.store.postgres``, shared between replicas) -- and both
pass the same test suite (tests/store/). No SQL leaves a backend.

Contract every backend keeps:

* every method is a coroutine; a write that returned has been committed
  durably (it survives the process being killed right after);
* a failing write fails only its own caller;
* ``add_token`` raises ``AlreadyExists`` for a token id or digest already
  stored and ``NotFound`` for a user that does not exist; deleting a user
  deletes their tokens (a recreated name never inherits old tokens);
* lists come back in a stable order: users by name, tokens by
  ``(created_at, id)``;
* calling a method on a store that is not open raises ``UsageError``.

Use a store as an async context manager, which opens and closes it::

    async with open_store("/var/lib/bastion/bastion.db") as store:
        await store.create_user(User("ada"))
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from bastion.exceptions import UsageError
from bastion.security.credentials import Token, User
from bastion.store.files import FileStore
from bastion.store.idempotency import IdempotencyStore
from bastion.store.jobs import JobStore
from bastion.store.kv import KVStore
from bastion.store.mail import MailStore
from bastion.store.topics import TopicStore

if TYPE_CHECKING:
    from bastion.security.credentials import CredentialStore

__all__ = ["Store", "open_store"]


class Store(KVStore, FileStore, JobStore, IdempotencyStore, MailStore, TopicStore, ABC):
    """An async, durable store; structurally a ``CredentialStore``, plus every storage domain."""

    # -- lifecycle ------------------------------------------------------------------------

    @abstractmethod
    async def open(self) -> None:
        """Connect, apply pending schema migrations, and start serving calls.

        Raises ``UsageError`` if the database was written by a newer bastion.
        """

    @abstractmethod
    async def close(self) -> None:
        """Finish every write already accepted, then release all resources.

        Idempotent; calls made after ``close`` raise ``UsageError``.
        """

    @property
    @abstractmethod
    def schema_version(self) -> int:
        """The schema version of the open database (0 before ``open``)."""

    @property
    @abstractmethod
    def stats(self) -> Mapping[str, int]:
        """Counters for tests and metrics, e.g. ``commits`` and ``writes``."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- users ----------------------------------------------------------------------------

    @abstractmethod
    async def create_user(self, user: User) -> bool:
        """Insert; False if the name is taken."""

    @abstractmethod
    async def get_user(self, name: str) -> User | None: ...

    @abstractmethod
    async def update_user(self, user: User) -> bool:
        """Replace the record of ``user.name``; False if there is none."""

    @abstractmethod
    async def set_password_hash(self, name: str, password_hash: str | None, *, replacing: str | None = None) -> bool:
        """Replace ``name``'s password hash and nothing else -- not roles or the disabled flag another
        call may have changed meanwhile; False if there is no such user. Given ``replacing``, only if the
        stored hash is still that one (a rehash at login must not undo a password set meanwhile)."""

    @abstractmethod
    async def set_access(self, name: str, roles: frozenset[str], disabled: bool) -> bool:
        """Replace ``name``'s roles and disabled flag and nothing else -- not a password hash another call
        may have set meanwhile; False if there is no such user."""

    @abstractmethod
    async def delete_user(self, name: str) -> bool:
        """Delete the user, their tokens and the login throttle's rows for them (known sources and
        lockouts, ``throttle_key_ranges``) in one transaction, so a name reused later inherits none of
        them; False if there was no such user."""

    @abstractmethod
    async def list_users(self) -> list[User]:
        """Every user, by name."""

    @abstractmethod
    async def users_with_role(self, role: str, limit: int) -> list[str]:
        """The names of the users holding ``role``, by name, at most ``limit`` of them; read through an
        index (schema migration 16), so it costs what it returns, not what the user table holds."""

    # -- tokens ---------------------------------------------------------------------------

    @abstractmethod
    async def add_token(self, token: Token) -> None:
        """Insert; ``AlreadyExists`` if the id or digest is taken, ``NotFound`` if the user is."""

    @abstractmethod
    async def token_by_digest(self, digest: str) -> Token | None: ...

    @abstractmethod
    async def token_by_id(self, token_id: str) -> Token | None: ...

    @abstractmethod
    async def list_tokens(self, user: str | None = None) -> list[Token]:
        """The tokens of ``user`` (every token if None), revoked ones too, by ``(created_at, id)``."""

    @abstractmethod
    async def revoke_token(self, token_id: str, at: float) -> bool:
        """Mark revoked; False if unknown or already revoked."""

    @abstractmethod
    async def revoke_user_tokens(self, user: str, at: float) -> int:
        """Revoke every live token of ``user`` (not revoked, not expired at ``at``); the number revoked."""

    @abstractmethod
    async def purge_sessions(self, user: str, now: float, limit: int) -> int:
        """Delete up to ``limit`` of ``user``'s session tokens (kind "session") revoked or expired by ``now``
        (found through the tokens_by_user index); the number deleted. API tokens are never purged."""

    # -- lockouts -------------------------------------------------------------------------

    @abstractmethod
    async def get_lockout(self, key: str) -> float | None:
        """The time until which ``key`` is locked out, if any (expired times included)."""

    @abstractmethod
    async def set_lockout(self, key: str, until: float) -> None:
        """Set, or replace, the lockout of ``key``."""

    @abstractmethod
    async def expire_lockouts(self, now: float, limit: int) -> int:
        """Delete up to ``limit`` lockouts that ended at or before ``now``; the number deleted."""

    @abstractmethod
    async def delete_lockouts(self, user: str) -> dict[str, float]:
        """Delete ``user``'s lockouts (keys ``login:USER|SOURCE``, one key range through the primary key; the
        known sources stay) in one statement; the source of each deleted and when it ended or ends."""


if TYPE_CHECKING:

    def _a_store_is_a_credential_store(store: Store) -> CredentialStore:
        return store  # mypy fails here if Store and security's interface drift apart


_SQLITE_PREFIX = "sqlite:///"
_POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+")


def open_store(url_or_path: str | os.PathLike[str], *, password: str | None = None) -> Store:
    """The store for a path or URL, not yet opened (use ``async with``).

    A plain path or ``sqlite:///path`` (``sqlite:////abs/path`` for an absolute
    one, as in SQLAlchemy) selects SQLite. ``postgresql://…`` or
    ``postgres://…`` (libpq URL syntax; ``postgresql+asyncpg://`` is accepted
    too) selects PostgreSQL; query parameters libpq does not know are server
    settings, so ``?search_path=tenant`` keeps the tables in schema
    ``tenant``. ``password`` is the PostgreSQL password when it is kept out
    of the URL (a file, the environment; PGPASSWORD and ~/.pgpass work as
    with libpq); SQLite ignores it.
    """
    text = os.fspath(url_or_path)
    if not text.strip():
        raise UsageError("store location is empty: give a file path, sqlite:///path or postgresql://…")
    if text.startswith(_POSTGRES_SCHEMES):
        if text.startswith("postgresql+") and not text.startswith("postgresql+asyncpg://"):
            driver = text.split("://", 1)[0]
            raise UsageError(f"unsupported store scheme {driver!r}: use postgresql://… (bastion uses asyncpg)")
        from bastion.store.postgres import PostgresStore

        return PostgresStore(text, password=password)
    if text.startswith(_SQLITE_PREFIX):
        text = text[len(_SQLITE_PREFIX) :]
        if not text or text == ":memory:":
            raise UsageError("a sqlite:/// store needs a file path (in-memory databases are not durable)")
    elif "://" in text or text.startswith("sqlite:"):
        scheme = text.split(":", 1)[0]
        raise UsageError(f"unknown store scheme {scheme!r}: give a file path, sqlite:///path or postgresql://…")
    from bastion.store.sqlite import SQLiteStore

    return SQLiteStore(Path(text))
