"""Durable storage: one async interface (``Store``), pluggable backends.

``open_store(path_or_url)`` picks the backend: a file path or ``sqlite:///``
URL gives the embedded SQLite store (``bastion.store.sqlite``), a
``postgresql://`` URL the shared PostgreSQL store (``bastion.store.postgres``).
A ``Store`` implements the interfaces security defines
(``bastion.security.credentials.CredentialStore``); nothing above the store
sees SQL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bastion.store.base import Store, open_store

if TYPE_CHECKING:
    from bastion.store.migrations import LATEST as LATEST_SCHEMA_VERSION
    from bastion.store.postgres import PostgresStore
    from bastion.store.sqlite import SQLiteStore

#: Loaded when first named, so a module that needs only the interfaces (the
#: services, a client) does not import SQLite's and PostgreSQL's drivers.
_LAZY = {
    "LATEST_SCHEMA_VERSION": ("bastion.store.migrations", "LATEST"),
    "PostgresStore": ("bastion.store.postgres", "PostgresStore"),
    "SQLiteStore": ("bastion.store.sqlite", "SQLiteStore"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'bastion.store' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


__all__ = ["LATEST_SCHEMA_VERSION", "PostgresStore", "SQLiteStore", "Store", "open_store"]
