"""A restore keeps durable topics' offsets from going back (docs/operations.md, "Restores and topic offsets").

Durable topics hand out offsets 1, 2, 3 … per topic, and every message of
the store a ``seq`` (bastion/store/topics.py). A backup holds them as they
were then, so restoring an older one would set them back, and the offsets
handed out since the backup would be handed out again -- to other messages:
a subscriber resuming ``from_offset`` N from before the restore would get a
message it never saw under an offset it had, or miss messages. So a restore
that replaces a store it can read carries that store's positions over, as
bastion/store/restore_kv.py does kv's counter:

* ``topic_meta.seq`` goes on from the larger of the two; when the replaced
  one was larger, ``topic_meta.trimmed`` is raised to it (a feed still
  reading from before the restore is told it missed messages).
* A topic the replaced store had moved past the archive's last offset (its
  head's last offset, or, forgotten there, its ``topic_retired`` bucket's)
  keeps the archive's messages, followed by the replaced store's after
  them, copied over as they were (offset, ``seq``, payload …), when the
  replaced store still holds every one of those and they came after the
  archive (each ``seq`` above the archive's counter): the log stays one
  contiguous range of offsets, and a subscriber resuming from any offset
  gets the messages it had under it. Otherwise (the replaced store trimmed
  or forgot some of them, or its log cannot be read) it starts empty after
  that offset: its archived
  messages are removed as retention would trim them (``trimmed_seq``
  raised), since the log must be one contiguous range and the ones between
  went with the replaced store. A resume from before the restore is then
  told its offset is no longer kept (OUT_OF_RANGE) instead of being given
  other messages. (Before, such a topic always started empty: a restore of
  a store whose topics all moved on since the backup brought none of the
  archive's messages back.)
* A topic the replaced store has and the archive has not gets an empty head
  at its last offset (retention forgets it at its next sweep, into its
  bucket), and the replaced store's ``topic_retired`` buckets are merged in
  (the larger of each): a topic used again continues above them.

It needs the topics schema of migration 12 (``topic_retired``) in both
stores; otherwise nothing of topics is carried (logged on SQLite).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path

from bastion.store.topics import LOG_COLUMNS, RETIRED_BUCKETS, retired_bucket

__all__ = ["carry_offsets_sqlite", "postgres_topics_carry_sql"]

log = logging.getLogger("bastion.backup")


class _Positions:
    """What a store says of its topics' positions: meta (seq, trimmed), heads (topic -> last offset,
    trimmed seq), retired buckets (bucket -> last offset, trimmed seq)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.meta: tuple[int, int] = tuple(conn.execute("SELECT seq, trimmed FROM topic_meta WHERE id = 1").fetchone())
        rows = conn.execute("SELECT topic, last_offset, trimmed_seq FROM topic_heads").fetchall()
        self.heads: dict[str, tuple[int, int]] = {r[0]: (int(r[1]), int(r[2])) for r in rows}
        rows = conn.execute("SELECT bucket, last_offset, trimmed_seq FROM topic_retired").fetchall()
        self.retired: dict[int, tuple[int, int]] = {int(r[0]): (int(r[1]), int(r[2])) for r in rows}


def _has_topics(conn: sqlite3.Connection) -> bool:
    sql = "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('topic_meta', 'topic_retired')"
    return int(conn.execute(sql).fetchone()[0]) == 2


class _Unreadable(Exception):
    """The replaced store's log could not be read."""


def _append_newer(
    conn: sqlite3.Connection, old: sqlite3.Connection, topic: str, last: int, old_last: int, archived_seq: int
) -> bool:
    """Copy the replaced store's (``old``) messages of ``topic`` after offset ``last``, up to its ``old_last``,
    when it holds every one of them and each came after the archive (``seq`` above ``archived_seq``); whether
    it did. A replaced log that cannot be read (a damaged store: what restores are for) copies nothing
    (logged); a full disk is raised."""
    conn.execute("SAVEPOINT newer")
    try:
        copied = _copy_newer(conn, old, topic, last, old_last, archived_seq)
    except _Unreadable as exc:
        log.warning(
            "restore: cannot read the messages of %r after offset %d in the replaced store (%s)", topic, last, exc
        )
        copied = False
    if not copied:
        conn.execute("ROLLBACK TO newer")
    conn.execute("RELEASE newer")
    if copied:
        conn.execute("UPDATE topic_heads SET last_offset = ? WHERE topic = ?", (old_last, topic))
    return copied


def _copy_newer(
    conn: sqlite3.Connection, old: sqlite3.Connection, topic: str, last: int, old_last: int, archived_seq: int
) -> bool:
    sql = f"SELECT {LOG_COLUMNS} FROM topic_log WHERE topic = ? AND msg_offset > ? ORDER BY msg_offset"
    expected = last + 1
    try:
        rows = old.execute(sql, (topic, last))
    except sqlite3.DatabaseError as exc:
        raise _Unreadable(exc) from exc
    while True:
        try:
            batch = rows.fetchmany(512)
        except sqlite3.DatabaseError as exc:
            raise _Unreadable(exc) from exc
        if not batch:
            return expected == old_last + 1
        for seq, _, offset, *_ in batch:
            if offset != expected or seq <= archived_seq:  # a gap (trimmed), or not after the archive
                return False
            expected += 1
        conn.executemany(f"INSERT INTO topic_log ({LOG_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", batch)


def _carry(conn: sqlite3.Connection, was: _Positions, source: sqlite3.Connection) -> None:
    """Carry ``was`` (the replaced store's, read from ``source``) into the store of ``conn``, in one
    transaction."""
    conn.execute("BEGIN IMMEDIATE")
    seq, trimmed = conn.execute("SELECT seq, trimmed FROM topic_meta WHERE id = 1").fetchone()
    old_seq, old_trimmed = was.meta
    trimmed = old_seq if old_seq > seq else max(trimmed, old_trimmed)
    conn.execute("UPDATE topic_meta SET seq = ?, trimmed = ? WHERE id = 1", (max(seq, old_seq), trimmed))
    restored = conn.execute("SELECT topic, last_offset FROM topic_heads").fetchall()
    for topic, last in restored:
        old = was.heads.get(topic) or was.retired.get(retired_bucket(topic))
        if old is None or old[0] <= last:
            continue
        if topic in was.heads and _append_newer(conn, source, topic, last, old[0], seq):
            continue
        gone = conn.execute(
            "DELETE FROM topic_log WHERE topic = ? AND msg_offset IS NOT NULL RETURNING seq", (topic,)
        ).fetchall()
        cut = max([0, *(int(r[0]) for r in gone)])
        conn.execute(
            "UPDATE topic_heads SET first_offset = ?, last_offset = ?, trimmed_seq = max(trimmed_seq, ?) "
            "WHERE topic = ?",
            (old[0] + 1, old[0], cut, topic),
        )
    known = {r[0] for r in restored}
    conn.executemany(
        "INSERT INTO topic_heads (topic, first_offset, last_offset, trimmed_seq) VALUES (?, ?, ?, ?)",
        [(t, last + 1, last, cut) for t, (last, cut) in was.heads.items() if t not in known],
    )
    conn.executemany(
        "INSERT INTO topic_retired (bucket, last_offset, trimmed_seq) VALUES (?, ?, ?) ON CONFLICT (bucket) "
        "DO UPDATE SET last_offset = max(last_offset, excluded.last_offset), "
        "trimmed_seq = max(trimmed_seq, excluded.trimmed_seq)",
        [(b, last, cut) for b, (last, cut) in was.retired.items()],
    )
    conn.execute("COMMIT")


def carry_offsets_sqlite(replaced: Path, staged: Path) -> bool:
    """Carry the topic positions of the SQLite store at ``replaced`` over to the ``staged`` copy about to
    take its place (see the module's docstring); whether they were (no store there, no topics schema of
    migration 12 in one of them, or one that cannot be read: logged, not).

    ``replaced`` is opened as restore_kv.py opens it (a plain connection; no server has it open)."""
    if not replaced.exists():
        return False
    with contextlib.closing(sqlite3.connect(replaced, isolation_level=None, timeout=0)) as old:
        try:
            was = _Positions(old) if _has_topics(old) else None
        except sqlite3.Error as exc:
            log.warning(
                "restore: cannot read the topic offsets of %s (%s): they go on from the archive's", replaced, exc
            )
            return False
        with contextlib.closing(sqlite3.connect(staged, isolation_level=None)) as conn:
            if was is None or not _has_topics(conn):
                log.warning(
                    "restore: %s or the archive has no topic_retired (before migration 12): topic offsets go on "
                    "from the archive's",
                    replaced,
                )
                return False
            try:
                _carry(conn, was, old)
            finally:
                if conn.in_transaction:  # _carry failed half way: nothing of it is kept
                    conn.execute("ROLLBACK")
    return True


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# zlib.crc32 (topics.retired_bucket) in PL/pgSQL, of v_topic's UTF-8 bytes, into v_crc.
_CRC32 = (
    " v_bytes := convert_to(v_topic, 'UTF8'); v_crc := 4294967295;"
    " FOR i IN 0 .. length(v_bytes) - 1 LOOP"
    " v_crc := v_crc # get_byte(v_bytes, i);"
    " FOR j IN 1 .. 8 LOOP v_crc := (v_crc >> 1) # (3988292384 * (v_crc & 1)); END LOOP;"
    " END LOOP; v_crc := v_crc # 4294967295;"
)


def postgres_topics_carry_sql(target: str, replaced: str) -> str:
    """SQL for the restore's transaction, after the restored schema is ``target`` and the old one
    ``replaced``: the module docstring's carry, when both hold the topics schema of migration 12."""
    new, old = _quote(target), _quote(replaced)
    present = " AND ".join(
        f"to_regclass({_literal(f'{schema}.{table}')}) IS NOT NULL"
        for schema in (new, old)
        for table in ("topic_meta", "topic_retired")
    )
    return (
        "DO $topics$ DECLARE v_topic text; v_last bigint; v_old bigint; v_cut bigint; v_bytes bytea; v_crc bigint;"
        " v_head boolean; v_seq bigint; v_count bigint; v_low bigint;"
        f" BEGIN IF {present} THEN"
        f" SELECT seq INTO v_seq FROM {new}.topic_meta WHERE id = 1;"
        f" UPDATE {new}.topic_meta AS t SET seq = greatest(t.seq, o.seq),"
        " trimmed = CASE WHEN o.seq > t.seq THEN o.seq ELSE greatest(t.trimmed, o.trimmed) END"
        f" FROM {old}.topic_meta AS o WHERE t.id = 1 AND o.id = 1;"
        f" FOR v_topic, v_last, v_old IN SELECT n.topic, n.last_offset, o.last_offset FROM {new}.topic_heads AS n"
        f" LEFT JOIN {old}.topic_heads AS o ON o.topic = n.topic LOOP"
        " v_head := v_old IS NOT NULL;"
        " IF v_old IS NULL THEN"
        f"{_CRC32}"
        f" SELECT last_offset INTO v_old FROM {old}.topic_retired WHERE bucket = v_crc % {RETIRED_BUCKETS};"
        " END IF;"
        " v_count := NULL; v_low := NULL;"
        " IF v_old > v_last AND v_head THEN"
        f" SELECT count(*), min(seq) INTO v_count, v_low FROM {old}.topic_log"
        " WHERE topic = v_topic AND msg_offset > v_last AND msg_offset <= v_old;"
        " END IF;"
        " IF v_old > v_last AND v_count = v_old - v_last AND v_low > v_seq THEN"
        f" INSERT INTO {new}.topic_log ({LOG_COLUMNS}) SELECT {LOG_COLUMNS} FROM {old}.topic_log"
        " WHERE topic = v_topic AND msg_offset > v_last AND msg_offset <= v_old;"
        f" UPDATE {new}.topic_heads SET last_offset = v_old WHERE topic = v_topic;"
        " ELSIF v_old > v_last THEN"
        f" WITH gone AS (DELETE FROM {new}.topic_log WHERE topic = v_topic AND msg_offset IS NOT NULL RETURNING seq)"
        " SELECT coalesce(max(seq), 0) INTO v_cut FROM gone;"
        f" UPDATE {new}.topic_heads SET first_offset = v_old + 1, last_offset = v_old,"
        " trimmed_seq = greatest(trimmed_seq, v_cut) WHERE topic = v_topic;"
        " END IF; END LOOP;"
        f" INSERT INTO {new}.topic_heads (topic, first_offset, last_offset, trimmed_seq)"
        f" SELECT o.topic, o.last_offset + 1, o.last_offset, o.trimmed_seq FROM {old}.topic_heads AS o"
        f" WHERE NOT EXISTS (SELECT 1 FROM {new}.topic_heads AS n WHERE n.topic = o.topic);"
        f" INSERT INTO {new}.topic_retired AS t (bucket, last_offset, trimmed_seq)"
        f" SELECT bucket, last_offset, trimmed_seq FROM {old}.topic_retired ON CONFLICT (bucket) DO UPDATE SET"
        " last_offset = greatest(t.last_offset, excluded.last_offset),"
        " trimmed_seq = greatest(t.trimmed_seq, excluded.trimmed_seq);"
        " END IF; END $topics$;"
    )
