"""The built-in ``files`` service (being written: issue 5)."""

from __future__ import annotations

from pathlib import Path

from bastion.config import FilesConfig
from bastion.service import Service
from bastion.store.files import FileStore

__all__ = ["Files"]


class Files:
    def __init__(self, store: FileStore, directory: Path, config: FilesConfig | None = None) -> None:
        self.store = store
        self.directory = directory
        self.config = config or FilesConfig()
        self.service = Service("files", doc="Streamed, verified, resumable file storage with quotas and sharing.")

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass
