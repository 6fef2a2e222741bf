"""How the PostgreSQL store turns the driver's exceptions into bastion's (``_translate``).

The rules are in bastion/store/postgres.py's module docstring ("Errors"):
connection loss, server shutdown, timeouts and serialization failures become
``Unavailable``, values PostgreSQL rejects ``InvalidArgument``, the rest
``InternalError``. ``_is_closed`` and ``_unsent`` tell ``PostgresStore._call``
whether a failed call may run again on a fresh connection.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from bastion.exceptions import BastionError, InternalError, InvalidArgument, Unavailable
from bastion.store.postgres_dsn import redact_dsn

Connection = Any  # asyncpg.Connection (asyncpg ships no type information)

# SQLSTATE classes that mean "try again": 08 connection exception, 40 transaction rollback
# (serialization failure, deadlock), 53 insufficient resources, 57 operator intervention
# (shutdown, statement timeout), 55P03 lock not available.
_RETRYABLE_CLASSES = ("08", "40", "53", "57")


def _is_closed(conn: Connection) -> bool:
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:  # the pool already took back a connection that died
        return True


def _unsent(exc: Exception) -> bool:
    """Whether ``exc`` is asyncpg refusing to send on a connection it found broken (nothing reached the server)."""
    if isinstance(exc, asyncpg.exceptions._base.DataError):  # bad arguments: a bug, not a dead connection
        return False
    return isinstance(exc, (asyncpg.InterfaceError, asyncpg.InternalClientError))


def _translate(exc: Exception, *, connection_lost: bool = False) -> Exception:
    """bastion errors pass through; the driver's become bastion's, so no SQL error escapes the store."""
    if isinstance(exc, BastionError):
        return exc
    error: Exception
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        if state.startswith(_RETRYABLE_CLASSES) or state == "55P03":
            error = Unavailable(f"store: {_describe(exc)}")
        elif state.startswith("22"):  # data exception: a value PostgreSQL cannot store
            error = InvalidArgument(f"store: value rejected: {_describe(exc)}")
        else:
            error = InternalError(f"store: {_describe(exc)}")
    elif isinstance(exc, (OSError, TimeoutError)) or (connection_lost and _unsent(exc)):
        # The network, a statement running past command_timeout, a connection that died.
        error = Unavailable(f"store: {_describe(exc)}")
    elif isinstance(exc, (asyncpg.InterfaceError, asyncpg.InternalClientError)):
        error = InternalError(f"store: {_describe(exc)}")  # misuse of the driver: a bug
    else:
        return exc  # a bug in the caller's function, not the database's: keep it as it is
    return error


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _describe_dsn_error(exc: BaseException, dsn: str) -> str:
    """``_describe(exc)`` for an error connecting to ``dsn`` -- except the text of a ValueError asyncpg raised
    parsing a DSN that holds a password: it quotes the DSN's pieces (``invalid literal for int(): 's3'``, ``bad
    query field: 'cret@db/x'``), which are pieces of the password where one was not percent-encoded."""
    if isinstance(exc, ValueError) and not isinstance(exc, asyncpg.InterfaceError) and redact_dsn(dsn) != dsn:
        return (
            f"{type(exc).__name__}: the DSN does not parse (its text is not shown: it holds a password; "
            "a password's reserved characters, such as / ? # @ :, must be percent-encoded)"
        )
    return _describe(exc)
