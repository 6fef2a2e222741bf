"""The ``files`` storage domain: interface, SQLite mixin, PostgreSQL mixin.

(Being written: see issue 5.)
"""

from __future__ import annotations

from abc import ABC

from bastion.store._access import PostgresAccess, SQLiteAccess

__all__ = ["POSTGRES_SCHEMA", "SQLITE_SCHEMA", "FileStore", "PostgresFiles", "SQLiteFiles"]

# Schema migration statements of this domain (its migration version is fixed in migrations.py).
SQLITE_SCHEMA: tuple[str, ...] = ()
POSTGRES_SCHEMA: tuple[str, ...] = ()


class FileStore(ABC):
    """What every backend offers for files."""


class SQLiteFiles(SQLiteAccess, FileStore):
    pass


class PostgresFiles(PostgresAccess, FileStore):
    pass
