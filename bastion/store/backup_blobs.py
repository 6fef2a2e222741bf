"""A backup holds the blobs its snapshot names from the moment it names them (bastion/store/backup.py).

The files service removes a blob ``files.blob_grace`` after the last file
referring to it is deleted (bastion/services/files.py). A backup archives the
blobs its snapshot names one after the other, after the database (and, on
PostgreSQL, after ``pg_dump``): for a large store that can take longer than
the grace, and a blob swept meanwhile failed the whole backup at its end. So
each blob is hard-linked into the backup's private staging directory as soon
as the snapshot names it and archived from there: a sweep unlinks only its
own name. A blob that cannot be linked (the staging directory on another
file system, or the blob already missing) is archived from where it is, as
before.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from bastion.store.archive_read import private_dirs
from bastion.store.backup_progress import Meter, Progress

__all__ = ["hold_blobs"]


def hold_blobs(
    blobs: list[tuple[str, Path]], staging: Path, progress: Progress | None = None
) -> list[tuple[str, Path]]:
    """``blobs`` (archive path, file), each file replaced by a hard link to it under ``staging`` where one can
    be made (see the module's docstring). ``progress`` hears the ``blobs`` phase: the bytes of those held."""
    held = []
    meter = Meter(progress, "blobs")
    for path, file in blobs:
        if progress is not None:  # a stat per blob, only when someone is watching
            with contextlib.suppress(OSError):
                meter.add(file.stat().st_size)
        link = staging / path  # files/blobs/<sha[:2]>/<sha>: checked by blob_members
        try:
            private_dirs(staging, link.parent)
            with contextlib.suppress(FileExistsError):  # a hash named twice
                os.link(file, link, follow_symlinks=False)
        except OSError:  # another file system (EXDEV), or gone already: archived (or missed) as before
            held.append((path, file))
            continue
        held.append((path, link))
    meter.finish()
    return held
