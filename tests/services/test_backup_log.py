"""A server's backups log one line as they start and one as they end, with the size and how long it took
(bastion/services/backup.py): no progress bar in a server, but an operator reading its log sees a long
backup running, and how long each took."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest

from bastion.services.backup import Backups
from bastion.store.sqlite import SQLiteStore


def test_a_backup_logs_its_start_and_its_end_with_size_and_duration(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with SQLiteStore(tmp_path / "bastion.db") as store:
            backups = Backups(store, data_dir=tmp_path, files_dir=tmp_path / "files")
            backups.scrypt_log_n = 10
            async with asyncio.timeout(30):
                await backups.backup()

    with caplog.at_level(logging.INFO, logger="bastion.backup"):
        asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records if r.name == "bastion.backup"]
    started = [m for m in messages if re.fullmatch(r"on-demand backup bastion-backup-\S+\.bbk started", m)]
    ended = [m for m in messages if re.fullmatch(r"backup \S+ written: \d+ bytes, \d+ members, in \d+\.\d s", m)]
    assert len(started) == 1 and len(ended) == 1, messages
    assert messages.index(started[0]) < messages.index(ended[0])
