"""A restore keeps kv's revision counter from going back (docs/operations.md, "Restores and kv versions").

kv hands out versions from one counter per store (``kv_meta.revision``;
bastion/store/kv.py). A backup holds the counter as it was then, so
restoring an older one would set it back, and the versions handed out since
the backup would be handed out again -- to other values: a client's
compare-and-swap with a version from before the restore could then succeed
against a value it never saw. So a restore that replaces a store it can read
carries that store's counter over: the restored one goes on from the larger
of the two. When that moves it past the restored store's own, the changes
logged between the two are lost with the replaced store, so the compaction
mark goes up to the counter too (and the restored log rows below it go, as
``kv_compact`` removes them): a watch resuming from a version before the
restore is told OUT_OF_RANGE and starts afresh, rather than silently missing
what the restore undid.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path

from bastion.store.kv import KVRevisions

__all__ = ["carried_revisions", "carry_revisions_sqlite", "postgres_carry_sql"]

log = logging.getLogger("bastion.backup")


def carried_revisions(restored: KVRevisions, replaced: KVRevisions) -> KVRevisions:
    """The restored store's counter and compaction mark, once ``replaced``'s are carried over."""
    if replaced.current > restored.current:
        return KVRevisions(replaced.current, replaced.current)
    return KVRevisions(restored.current, max(restored.compacted, replaced.compacted))


def _revisions(conn: sqlite3.Connection) -> KVRevisions | None:
    has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'kv_meta'").fetchone()
    row = conn.execute("SELECT revision, compacted FROM kv_meta WHERE id = 1").fetchone() if has_meta else None
    return None if row is None else KVRevisions(int(row[0]), int(row[1]))


def carry_revisions_sqlite(replaced: Path, staged: Path) -> KVRevisions | None:
    """Carry the kv counter of the SQLite store at ``replaced`` over to the ``staged`` copy about to take
    its place; the staged store's revisions, None if nothing was carried (no store there, no kv in it, or
    one that cannot be read: logged).

    ``replaced`` is read as ``check_not_in_use`` opens it (no server has it open): a plain connection,
    which reads what its WAL holds and, the last to close, folds the WAL in and removes it -- a read-only
    one would leave ``-wal``/``-shm`` files behind, to be renamed aside with it.
    """
    if not replaced.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(replaced, isolation_level=None, timeout=0)) as old:
            was = _revisions(old)
    except sqlite3.Error as exc:
        log.warning("restore: cannot read the kv versions of %s (%s): they go on from the archive's", replaced, exc)
        return None
    if was is None:
        return None
    with contextlib.closing(sqlite3.connect(staged, isolation_level=None)) as conn:
        restored = _revisions(conn)
        if restored is None:
            return None
        now = carried_revisions(restored, was)
        if now != restored:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE kv_meta SET revision = ?, compacted = ? WHERE id = 1", (now.current, now.compacted))
            conn.execute("DELETE FROM kv_log WHERE revision <= ?", (now.compacted,))
            conn.execute("COMMIT")
        return now


def postgres_carry_sql(target: str, replaced: str) -> str:
    """SQL for the restore's transaction, after the restored schema is ``target`` and the old one
    ``replaced``: ``carried_revisions`` of the two, when both hold a kv store."""

    def quote(identifier: str) -> str:
        return '"' + identifier.replace('"', '""') + '"'

    def literal(text: str) -> str:
        return "'" + text.replace("'", "''") + "'"

    new, old = f"{quote(target)}.kv_meta", f"{quote(replaced)}.kv_meta"
    return (
        "DO $carry$ BEGIN"
        f" IF to_regclass({literal(new)}) IS NOT NULL AND to_regclass({literal(old)}) IS NOT NULL THEN"
        f" UPDATE {new} AS t SET revision = greatest(t.revision, o.revision),"
        " compacted = CASE WHEN o.revision > t.revision THEN o.revision"
        " ELSE greatest(t.compacted, o.compacted) END"
        f" FROM {old} AS o WHERE t.id = 1 AND o.id = 1;"
        f" DELETE FROM {quote(target)}.kv_log WHERE revision <= (SELECT compacted FROM {new} WHERE id = 1);"
        " END IF; END $carry$;"
    )
