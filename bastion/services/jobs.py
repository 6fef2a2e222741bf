"""The built-in ``jobs`` service (being written: issue 5)."""

from __future__ import annotations

from collections.abc import Sequence

from bastion.config import JobsConfig
from bastion.jobs import JobRegistry
from bastion.service import Service
from bastion.store.jobs import JobStore

__all__ = ["Jobs"]


class Jobs:
    def __init__(self, store: JobStore, registries: Sequence[JobRegistry], config: JobsConfig | None = None) -> None:
        self.store = store
        self.registries = list(registries)
        self.config = config or JobsConfig()
        self.service = Service("jobs", doc="Computation jobs: submit, watch progress, cancel, fetch results.")

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass
