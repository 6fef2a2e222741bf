"""A blob the store refers to that is missing from the files directory (lost, or deleted by hand).

Every backup failed with UNAVAILABLE "blob … vanished while the backup ran;
try again": retrying never helps (the blob is gone for good), so a server's
scheduled backups failed at every interval with advice that could not
work. The files service keeps a blob ``files.blob_grace`` after its last
file is deleted, so a referenced blob missing when the backup looks for it,
right after its snapshot, is missing from the store, not deleted meanwhile:
the backup now says so (DATA_LOSS), naming it and the files directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.exceptions import DataLoss
from bastion.store import backup
from tests.store.test_backup import FAST, make_data_dir


def test_a_missing_referenced_blob_is_data_loss_named_not_try_again(tmp_path: Path) -> None:
    db, files, digests = make_data_dir(tmp_path / "src")
    (files / "blobs" / digests[0][:2] / digests[0]).unlink()
    out = tmp_path / "a.bbk"
    with pytest.raises(DataLoss, match=f"blob {digests[0]}.*is missing from {files}") as raised:
        backup.backup_sqlite(db, files, out, None, scrypt_log_n=FAST)
    assert "try again" not in str(raised.value)
    assert list(tmp_path.glob("*.bbk")) == [] and list(tmp_path.glob(".*partial")) == []
