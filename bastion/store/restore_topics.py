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
  starts empty after that offset: its archived messages are removed as
  retention would trim them (``trimmed_seq`` raised), since the log must be
  one contiguous range of offsets and the ones between went with the
  replaced store. A resume from before the restore is then told its offset
  is no longer kept (OUT_OF_RANGE) instead of being given other messages.
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

from bastion.store.topics import RETIRED_BUCKETS, retired_bucket

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


def _carry(conn: sqlite3.Connection, was: _Positions) -> None:
    """Carry ``was`` (the replaced store's) into the store of ``conn``, in one transaction."""
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
    try:
        with contextlib.closing(sqlite3.connect(replaced, isolation_level=None, timeout=0)) as old:
            was = _Positions(old) if _has_topics(old) else None
    except sqlite3.Error as exc:
        log.warning("restore: cannot read the topic offsets of %s (%s): they go on from the archive's", replaced, exc)
        return False
    with contextlib.closing(sqlite3.connect(staged, isolation_level=None)) as conn:
        if was is None or not _has_topics(conn):
            log.warning(
                "restore: %s or the archive has no topic_retired (before migration 12): topic offsets go on "
                "from the archive's",
                replaced,
            )
            return False
        _carry(conn, was)
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
        f" BEGIN IF {present} THEN"
        f" UPDATE {new}.topic_meta AS t SET seq = greatest(t.seq, o.seq),"
        " trimmed = CASE WHEN o.seq > t.seq THEN o.seq ELSE greatest(t.trimmed, o.trimmed) END"
        f" FROM {old}.topic_meta AS o WHERE t.id = 1 AND o.id = 1;"
        f" FOR v_topic, v_last, v_old IN SELECT n.topic, n.last_offset, o.last_offset FROM {new}.topic_heads AS n"
        f" LEFT JOIN {old}.topic_heads AS o ON o.topic = n.topic LOOP"
        " IF v_old IS NULL THEN"
        f"{_CRC32}"
        f" SELECT last_offset INTO v_old FROM {old}.topic_retired WHERE bucket = v_crc % {RETIRED_BUCKETS};"
        " END IF;"
        " IF v_old > v_last THEN"
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
