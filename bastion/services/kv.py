"""The built-in ``kv`` service (being written: issue 5)."""

from __future__ import annotations

from bastion.config import KVConfig
from bastion.service import Service
from bastion.store.kv import KVStore

__all__ = ["KV"]


class KV:
    def __init__(self, store: KVStore, config: KVConfig | None = None) -> None:
        self.store = store
        self.config = config or KVConfig()
        self.service = Service("kv", doc="Key-value storage with versions, compare-and-swap, TTLs and watches.")

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass
