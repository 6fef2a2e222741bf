"""Durable storage: one async interface (``Store``), pluggable backends.

``open_store(path_or_url)`` picks the backend: a file path or ``sqlite:///``
URL gives the embedded SQLite store (``bastion.store.sqlite``), a
``postgresql://`` URL the shared PostgreSQL store (``bastion.store.postgres``).
A ``Store`` implements the interfaces security defines
(``bastion.security.credentials.CredentialStore``); nothing above the store
sees SQL.
"""

from __future__ import annotations

from bastion.store.base import Store, open_store
from bastion.store.migrations import LATEST as LATEST_SCHEMA_VERSION
from bastion.store.postgres import PostgresStore
from bastion.store.sqlite import SQLiteStore

__all__ = ["LATEST_SCHEMA_VERSION", "PostgresStore", "SQLiteStore", "Store", "open_store"]
