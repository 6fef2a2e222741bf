"""Backups behind ``admin.backup`` (being written: issue 5)."""

from __future__ import annotations

from pathlib import Path

from bastion.config import BackupConfig
from bastion.store.base import Store

__all__ = ["Backups"]


class Backups:
    def __init__(
        self, store: Store, *, data_dir: Path, files_dir: Path, config: BackupConfig | None = None,
        passphrase: bytes | None = None,
    ) -> None:  # fmt: skip
        self.store = store
        self.data_dir = data_dir
        self.files_dir = files_dir
        self.config = config or BackupConfig()
        self.passphrase = passphrase

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass
