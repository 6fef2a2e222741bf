"""The ``topics`` storage domain (publish/subscribe): interface and SQLite mixin (PostgreSQL: topics_postgres.py).

Theory of operation
-------------------

One table, ``topic_log``, carries every published message that must reach
another process or outlive its publish: the *durable* messages (kept, with a
per-topic ``msg_offset`` 1, 2, 3 …, until retention trims them) and the
*live* messages, which are kept only briefly (``msg_offset`` NULL) so that
every server process sharing the store -- replicas on PostgreSQL, workers on
one SQLite file -- can relay them to its own subscribers. Which topics are
durable, and how long anything is kept, is the service's business: the store
only appends, reads and trims.

Order. ``seq`` numbers every message of the store, durable or live, in commit
order: each append reads and advances the one counter (``topic_meta.seq``)
inside its own transaction -- SQLite has one writer; PostgreSQL locks the
counter row first, which serialises publishers across replicas -- so rows
become visible in ``seq`` order and a reader tailing ``seq > P`` never skips
one that commits later. A topic's offsets follow its ``seq`` order.
``topic_heads`` holds each durable topic's first kept and last offset, the highest ``seq`` trimming
ever removed from it (``trimmed_seq``), and who created it (topics_creators.py). A head that retention
emptied is removed (``topics_forget``); so that offsets never go backwards, its last offset (and trim) is
kept in ``topic_retired`` under its name's bucket (a fixed number of rows): the topic, if used again,
starts above it, and ``topics_head`` reports a forgotten topic as empty at that offset.

Trimming removes a durable topic's oldest messages only (its log is always a
contiguous range of offsets, ``first_offset .. last_offset``), and records
in ``topic_meta.trimmed`` the highest ``seq`` it ever removed, so a reader
that was behind can tell it may have missed something. Live rows are
removed by age and are not counted there: live delivery is at most once.

On PostgreSQL a trigger on ``topic_log`` notifies ``bastion_topics`` at each
commit (``Store.listen("topics")``), so other replicas read new messages
within milliseconds instead of at their next poll.
"""

from __future__ import annotations

import sqlite3
import zlib
from abc import ABC, abstractmethod
from typing import Any

import msgspec

from bastion.store._access import Notifying
from bastion.store.topics_creators import SQLiteTopicCreators, TopicCreators

__all__ = [
    "CREATED_SQL",
    "EXPLAINED_SQL",
    "FEED_SQL",
    "LOG_COLUMNS",
    "POSTGRES_FORGET_SCHEMA",
    "POSTGRES_SCHEMA",
    "POSTGRES_TRIMMED_SCHEMA",
    "REPLAY_PAGE_SQL",
    "REPLAY_SIZES_SQL",
    "RETIRED_BUCKETS",
    "RETIRED_SQL",
    "SQLITE_FORGET_SCHEMA",
    "SQLITE_SCHEMA",
    "SQLITE_TRIMMED_SCHEMA",
    "TRIMMED_SQL",
    "SQLiteTopics",
    "TooManyTopics",
    "TopicHead",
    "TopicMessage",
    "TopicPosition",
    "TopicStore",
    "TrimPlan",
    "feed_of",
    "forgotten_head",
    "message_of",
    "replay_last",
    "retire",
    "retired_bucket",
    "trim_cut",
]

# Schema migration statements of this domain (its migration version is fixed in migrations.py).
SQLITE_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE topic_log (
        seq        INTEGER PRIMARY KEY,             -- commit order of every message in the store
        topic      TEXT NOT NULL,
        msg_offset INTEGER,                         -- offset in a durable topic; NULL: a live message
        publisher  TEXT NOT NULL,                   -- the authenticated principal that published it
        payload    BLOB NOT NULL,                   -- MessagePack of the published value
        headers    TEXT NOT NULL DEFAULT '{}',      -- JSON object of text to text
        at         REAL NOT NULL
    )""",
    "CREATE UNIQUE INDEX topic_log_offsets ON topic_log (topic, msg_offset) WHERE msg_offset IS NOT NULL",
    "CREATE INDEX topic_log_live ON topic_log (at) WHERE msg_offset IS NULL",
    """CREATE TABLE topic_heads (
        topic        TEXT PRIMARY KEY,
        first_offset INTEGER NOT NULL,              -- the oldest offset kept (last_offset + 1: none kept)
        last_offset  INTEGER NOT NULL               -- the latest offset handed out
    ) WITHOUT ROWID""",
    """CREATE TABLE topic_meta (
        id      INTEGER PRIMARY KEY CHECK (id = 1),
        seq     INTEGER NOT NULL,                   -- the latest seq handed out
        trimmed INTEGER NOT NULL                    -- the highest seq of a durable message trimmed
    )""",
    "INSERT INTO topic_meta (id, seq, trimmed) VALUES (1, 0, 0)",
)
POSTGRES_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE topic_log (
        seq        BIGINT PRIMARY KEY,
        topic      TEXT COLLATE "C" NOT NULL,
        msg_offset BIGINT,
        publisher  TEXT NOT NULL,
        payload    BYTEA NOT NULL,
        headers    TEXT NOT NULL DEFAULT '{}',
        at         DOUBLE PRECISION NOT NULL
    )""",
    "CREATE UNIQUE INDEX topic_log_offsets ON topic_log (topic, msg_offset) WHERE msg_offset IS NOT NULL",
    "CREATE INDEX topic_log_live ON topic_log (at) WHERE msg_offset IS NULL",
    """CREATE TABLE topic_heads (
        topic        TEXT COLLATE "C" PRIMARY KEY,
        first_offset BIGINT NOT NULL,
        last_offset  BIGINT NOT NULL
    )""",
    """CREATE TABLE topic_meta (
        id      INTEGER PRIMARY KEY CHECK (id = 1),
        seq     BIGINT NOT NULL,
        trimmed BIGINT NOT NULL
    )""",
    "INSERT INTO topic_meta (id, seq, trimmed) VALUES (1, 0, 0)",
    # Tell the other replicas' feeds (Store.listen("topics")) that the log grew; delivered at
    # commit, once per transaction, with the schema as payload.
    """CREATE FUNCTION topic_log_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('bastion_topics', current_schema());
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER topic_log_notify AFTER INSERT ON topic_log FOR EACH STATEMENT EXECUTE FUNCTION topic_log_notify()",
)

# Migration 11: which durable topics lost messages a feed had not read (each head's highest trimmed seq), so
# only their subscribers are ended. Old code leaves it 0: the hub then ends everyone, as that code did.
SQLITE_TRIMMED_SCHEMA: tuple[str, ...] = ("ALTER TABLE topic_heads ADD COLUMN trimmed_seq INTEGER NOT NULL DEFAULT 0",)
POSTGRES_TRIMMED_SCHEMA: tuple[str, ...] = ("ALTER TABLE topic_heads ADD COLUMN trimmed_seq BIGINT NOT NULL DEFAULT 0",)

# Migration 12: who created each durable topic (for the per-user limit; NULL: before it), and forgotten topics'
# last offsets and trims, by bucket of names (``retired_bucket``): the heads of topics retention emptied are removed,
# and a topic used again continues above every offset it had. Bounded: at most RETIRED_BUCKETS rows.
SQLITE_FORGET_SCHEMA: tuple[str, ...] = (
    "ALTER TABLE topic_heads ADD COLUMN creator TEXT",
    "CREATE INDEX topic_heads_by_creator ON topic_heads (creator) WHERE creator IS NOT NULL",
    """CREATE TABLE topic_retired (
        bucket      INTEGER PRIMARY KEY,            -- retired_bucket(topic)
        last_offset INTEGER NOT NULL,               -- the highest last offset of a forgotten topic of the bucket
        trimmed_seq INTEGER NOT NULL                -- the highest trimmed seq of one
    )""",
)
POSTGRES_FORGET_SCHEMA: tuple[str, ...] = (
    'ALTER TABLE topic_heads ADD COLUMN creator TEXT COLLATE "C"',
    "CREATE INDEX topic_heads_by_creator ON topic_heads (creator) WHERE creator IS NOT NULL",
    """CREATE TABLE topic_retired (
        bucket      INTEGER PRIMARY KEY,
        last_offset BIGINT NOT NULL,
        trimmed_seq BIGINT NOT NULL
    )""",
)
RETIRED_BUCKETS = 4096

_HEADERS = msgspec.json.Decoder(dict[str, str])
LOG_COLUMNS = "seq, topic, msg_offset, publisher, payload, headers, at"


# A replay page's sizes without its messages ({0}..{3}: topic, from offset, upto seq, limit; {4}: a function giving
# a value's bytes without reading it, SQLite's length or PostgreSQL's octet_length); then its messages up to the
# offset replay_last finds ({0}: topic, {1}..{2}: offsets, {3}: upto seq).
REPLAY_SIZES_SQL = (
    "SELECT msg_offset, {4}(payload) + {4}(headers) FROM topic_log WHERE topic = {0} AND msg_offset >= {1} "
    "AND seq <= {2} ORDER BY msg_offset LIMIT {3}"
)
REPLAY_PAGE_SQL = (
    f"SELECT {LOG_COLUMNS} FROM topic_log WHERE topic = {{0}} AND msg_offset BETWEEN {{1}} AND {{2}} "
    "AND seq <= {3} ORDER BY msg_offset"
)


def replay_last(sizes: list[Any], limit: int, max_bytes: int) -> tuple[int, bool]:
    """The last offset of a replay page of ``(offset, size)`` rows (read with ``limit``) within ``max_bytes``
    (at least one row), and whether more may follow: the page was cut short, by bytes or by ``limit``."""
    total, last = 0, 0
    for taken, (offset, size) in enumerate(sizes):
        total += int(size)
        if taken and total > max_bytes:
            return last, True
        last = int(offset)
    return last, len(sizes) == limit


class TooManyTopics(Exception):
    """``topics_append`` would create a durable topic past its creator's limit; ``count``: the ones they have."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


def retired_bucket(topic: str) -> int:
    """The ``topic_retired`` row that remembers ``topic`` once forgotten (the same in every process)."""
    return zlib.crc32(topic.encode()) % RETIRED_BUCKETS


def forgotten_head(topic: str, row: Any) -> TopicHead | None:
    """The head of a topic with no row in ``topic_heads``: none, or empty at its bucket's last offset."""
    return None if row is None else TopicHead(topic, int(row[0]) + 1, int(row[0]))


def retire(rows: list[Any]) -> list[tuple[int, int, int]]:
    """Removed heads (topic, last_offset, trimmed_seq) as their buckets' (bucket, last_offset, trimmed_seq)."""
    buckets: dict[int, tuple[int, int]] = {}
    for topic, last, trimmed in rows:
        old = buckets.get(retired_bucket(topic), (0, 0))
        buckets[retired_bucket(topic)] = (max(old[0], int(last)), max(old[1], int(trimmed)))
    return [(b, last, trimmed) for b, (last, trimmed) in buckets.items()]


# -- records --------------------------------------------------------------------------------


class TopicMessage(msgspec.Struct, frozen=True):
    """One row of the log: ``offset`` is None for a live message; ``payload`` is MessagePack."""

    seq: int
    topic: str
    offset: int | None
    publisher: str
    payload: bytes
    headers: dict[str, str]
    at: float


class TopicHead(msgspec.Struct, frozen=True):
    """A durable topic's kept offsets: ``first_offset .. last_offset`` (none kept when first > last)."""

    topic: str
    first_offset: int
    last_offset: int


class TrimPlan(msgspec.Struct, frozen=True):
    """What retention removes of one durable topic (kept from ``first_offset``): every message up to
    ``upto_offset``, then on while they are older than ``older_than`` (None: no age limit)."""

    topic: str
    first_offset: int
    upto_offset: int
    older_than: float | None


def plan_cuts(
    plans: list[TrimPlan], bounds: list[tuple[int | None, int | None]], limit: int
) -> tuple[list[tuple[str, int]], list[TrimPlan]]:
    """Where to cut each plan's topic (remove offsets up to it), at most ``limit`` messages in all; and the
    plans left (in part) for another transaction. ``bounds``: per plan, the first offset to keep (None: none)
    and the last offset kept (None: nothing kept)."""
    cuts: list[tuple[str, int]] = []
    budget = limit
    for i, (plan, (keep, last)) in enumerate(zip(plans, bounds, strict=True)):
        if budget <= 0:
            return cuts, plans[i:]
        end = keep - 1 if keep is not None else last
        if end is None or end < plan.first_offset:
            continue
        cut = min(end, plan.first_offset - 1 + budget)
        budget -= cut - plan.first_offset + 1
        cuts.append((plan.topic, cut))
        if cut < end:
            return cuts, [msgspec.structs.replace(plan, first_offset=cut + 1), *plans[i + 1 :]]
    return cuts, []


def trimmed_heads(rows: list[Any]) -> tuple[int, dict[str, tuple[int, int]], int]:
    """Deleted rows (topic, seq, offset): how many, each topic's (highest offset, highest seq), the highest seq."""
    heads: dict[str, tuple[int, int]] = {}
    for topic, seq, offset in rows:
        old = heads.get(topic, (0, 0))
        heads[topic] = (max(old[0], int(offset)), max(old[1], int(seq)))
    return len(rows), heads, max((seq for _, seq in heads.values()), default=0)


# Per plan: the first offset to keep, and the last one kept (plan_cuts' bounds).
BOUND_SQL = (
    "SELECT (SELECT msg_offset FROM topic_log WHERE topic = {topic} AND msg_offset IS NOT NULL AND msg_offset > {upto} "
    "AND NOT coalesce(at < {older}, false) ORDER BY msg_offset LIMIT 1), "
    "(SELECT max(msg_offset) FROM topic_log WHERE topic = {topic} AND msg_offset IS NOT NULL)"
)


class TopicPosition(msgspec.Struct, frozen=True):
    """``seq``: the latest message's (0: none yet); ``trimmed``: the highest seq of a trimmed durable message."""

    seq: int
    trimmed: int


def message_of(row: tuple[Any, ...]) -> TopicMessage:
    seq, topic, offset, publisher, payload, headers, at = row
    return TopicMessage(
        int(seq), topic, None if offset is None else int(offset), publisher, bytes(payload), _HEADERS.decode(headers),
        float(at),
    )  # fmt: skip


# One statement, so one snapshot: the meta row, joined with the page of messages (if any).
FEED_SQL = (
    f"SELECT m.trimmed, l.* FROM topic_meta m LEFT JOIN (SELECT {LOG_COLUMNS} FROM topic_log "
    "WHERE seq > {after} ORDER BY seq LIMIT {limit}) l ON 1 = 1 WHERE m.id = 1 ORDER BY l.seq"
)


TRIMMED_SQL = (
    "SELECT topic, first_offset, last_offset FROM topic_heads WHERE trimmed_seq > {after} ORDER BY topic LIMIT {limit}"
)


# What the heads explain of topic_meta.trimmed: nothing (0) if a forgotten topic's trim is after ``after``.
EXPLAINED_SQL = (
    "SELECT CASE WHEN EXISTS (SELECT 1 FROM topic_retired WHERE trimmed_seq > {after}) THEN 0 "
    "ELSE coalesce((SELECT max(trimmed_seq) FROM topic_heads), 0) END"
)


def feed_of(rows: list[Any]) -> tuple[list[TopicMessage], int]:
    trimmed = int(rows[0][0])
    return [message_of(tuple(row[1:])) for row in rows if row[1] is not None], trimmed


def trim_cut(rows: list[Any], upto_offset: int, older_than: float | None) -> tuple[int, int]:
    """The offset and highest seq of the longest prefix of ``rows`` (seq, offset, at) to remove; (0, 0): none."""
    cut = top = 0
    for seq, offset, at in rows:
        if offset > upto_offset and (older_than is None or at >= older_than):
            break
        cut, top = int(offset), max(top, int(seq))
    return cut, top


# -- the interface --------------------------------------------------------------------------


class TopicStore(Notifying, TopicCreators, ABC):
    """What every backend offers for topics. Every write is one transaction; see the module docstring."""

    @abstractmethod
    async def topics_append(
        self,
        topic: str,
        durable: bool,
        publisher: str,
        payload: bytes,
        headers: dict[str, str],
        at: float,
        max_topics: int | None = None,
    ) -> tuple[int, int | None]:
        """Append one message, committed before this returns; its ``(seq, offset)`` (offset None: live).

        A durable topic's first message creates it, for ``publisher``: ``TooManyTopics`` (nothing written)
        if they have ``max_topics`` already (None: no limit)."""

    @abstractmethod
    async def topics_position(self) -> TopicPosition: ...

    @abstractmethod
    async def topics_feed(self, after: int, limit: int) -> tuple[list[TopicMessage], int]:
        """Messages with ``seq > after``, durable and live, by seq; and ``trimmed`` as of the same moment.

        Read in one snapshot, so ``trimmed > after`` says exactly that a durable
        message after ``after`` was trimmed before it could be read.
        """

    @abstractmethod
    async def topics_replay(self, topic: str, from_offset: int, upto: int, limit: int) -> list[TopicMessage]:
        """Durable messages of ``topic`` with ``offset >= from_offset`` and ``seq <= upto``, by offset."""

    @abstractmethod
    async def topics_replay_page(
        self, topic: str, from_offset: int, upto: int, limit: int, max_bytes: int
    ) -> tuple[list[TopicMessage], bool]:
        """As ``topics_replay``, but no more messages than fit ``max_bytes`` of payloads and headers (at least
        one), their sizes read first without them; and whether more may follow (the page was cut short)."""

    @abstractmethod
    async def topics_head(self, topic: str) -> TopicHead | None:
        """The durable topic's offsets; None if nothing was ever published to it durably (or to a topic
        forgotten in its bucket); a forgotten topic's is empty at its bucket's last offset."""

    @abstractmethod
    async def topics_heads(self, after: str, limit: int) -> list[TopicHead]:
        """Durable topics named after ``after`` (bytewise), by name."""

    @abstractmethod
    async def topics_forget(self, topics: list[str]) -> int:
        """Remove the heads of those of ``topics`` that are empty (everything trimmed); how many were."""

    @abstractmethod
    async def topics_trimmed(self, after: int, limit: int) -> tuple[list[TopicHead], int]:
        """Up to ``limit`` durable topics that lost a message with ``seq > after`` to trimming, by name; and the
        highest ``trimmed_seq`` of all topics (what they explain of ``topic_meta.trimmed``)."""

    @abstractmethod
    async def topics_trim(self, topic: str, upto_offset: int, older_than: float | None, limit: int) -> int:
        """Remove up to ``limit`` of ``topic``'s oldest durable messages: those up to ``upto_offset``, then
        on while they are older than ``older_than`` (None: no age limit); how many were removed."""

    @abstractmethod
    async def topics_trim_many(self, plans: list[TrimPlan], limit: int) -> tuple[int, list[TrimPlan]]:
        """Apply ``plans`` in one transaction, removing at most ``limit`` messages: how many were removed,
        and the plans left to apply (in another call)."""

    @abstractmethod
    async def topics_trim_live(self, older_than: float, limit: int) -> int:
        """Remove up to ``limit`` live messages appended before ``older_than``; how many."""


# -- SQLite ---------------------------------------------------------------------------------

_SQLITE_INSERT = f"INSERT INTO topic_log ({LOG_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
RETIRED_SQL = "SELECT last_offset FROM topic_retired WHERE bucket = {bucket}"
CREATED_SQL = "SELECT count(*) FROM topic_heads WHERE creator = {creator}"


class SQLiteTopics(SQLiteTopicCreators, TopicStore):
    """topics on SQLite: an append is one write of a group commit (one writer, so seq order is commit order)."""

    async def topics_append(
        self,
        topic: str,
        durable: bool,
        publisher: str,
        payload: bytes,
        headers: dict[str, str],
        at: float,
        max_topics: int | None = None,
    ) -> tuple[int, int | None]:
        encoded = msgspec.json.encode(headers).decode()

        def append(conn: sqlite3.Connection) -> tuple[int, int | None]:
            offset = None
            if durable:
                sql = "UPDATE topic_heads SET last_offset = last_offset + 1 WHERE topic = ? RETURNING last_offset"
                row = conn.execute(sql, (topic,)).fetchone()
                if row is None:  # a new topic (or a forgotten one): created above its bucket's last offset
                    if max_topics is not None:
                        count = int(conn.execute(CREATED_SQL.format(creator="?"), (publisher,)).fetchone()[0])
                        if count >= max_topics:
                            return -1, count  # refused, nothing written (raising would rerun the group)
                    row = conn.execute(RETIRED_SQL.format(bucket="?"), (retired_bucket(topic),)).fetchone()
                    offset = (int(row[0]) if row is not None else 0) + 1
                    conn.execute(
                        "INSERT INTO topic_heads (topic, first_offset, last_offset, creator) VALUES (?, ?, ?, ?)",
                        (topic, offset, offset, publisher),
                    )
                else:
                    offset = int(row[0])
            seq = int(conn.execute("UPDATE topic_meta SET seq = seq + 1 WHERE id = 1 RETURNING seq").fetchone()[0])
            conn.execute(_SQLITE_INSERT, (seq, topic, offset, publisher, payload, encoded, at))
            return seq, offset

        seq, offset = await self._write(append)
        if seq < 0:
            raise TooManyTopics(offset or 0)
        return seq, offset

    async def topics_position(self) -> TopicPosition:
        row = await self._read(lambda c: c.execute("SELECT seq, trimmed FROM topic_meta WHERE id = 1").fetchone())
        return TopicPosition(int(row[0]), int(row[1]))

    async def topics_feed(self, after: int, limit: int) -> tuple[list[TopicMessage], int]:
        sql = FEED_SQL.format(after="?", limit="?")
        return feed_of(await self._read(lambda c: c.execute(sql, (after, limit)).fetchall()))

    async def topics_replay(self, topic: str, from_offset: int, upto: int, limit: int) -> list[TopicMessage]:
        sql = (
            f"SELECT {LOG_COLUMNS} FROM topic_log WHERE topic = ? AND msg_offset >= ? AND seq <= ? "
            "ORDER BY msg_offset LIMIT ?"
        )
        rows = await self._read(lambda c: c.execute(sql, (topic, from_offset, upto, limit)).fetchall())
        return [message_of(r) for r in rows]

    async def topics_replay_page(
        self, topic: str, from_offset: int, upto: int, limit: int, max_bytes: int
    ) -> tuple[list[TopicMessage], bool]:
        sizes_sql, page_sql = REPLAY_SIZES_SQL.format("?", "?", "?", "?", "length"), REPLAY_PAGE_SQL.format(*"????")

        def read(c: sqlite3.Connection) -> tuple[list[Any], bool]:
            last, more = replay_last(
                c.execute(sizes_sql, (topic, from_offset, upto, limit)).fetchall(), limit, max_bytes
            )
            return c.execute(page_sql, (topic, from_offset, last, upto)).fetchall(), more

        rows, more = await self._read(read)
        return [message_of(r) for r in rows], more

    async def topics_head(self, topic: str) -> TopicHead | None:
        sql = "SELECT topic, first_offset, last_offset FROM topic_heads WHERE topic = ?"

        def read(conn: sqlite3.Connection) -> TopicHead | None:
            row = conn.execute(sql, (topic,)).fetchone()
            if row is not None:
                return TopicHead(row[0], int(row[1]), int(row[2]))
            return forgotten_head(
                topic, conn.execute(RETIRED_SQL.format(bucket="?"), (retired_bucket(topic),)).fetchone()
            )

        return await self._read(read)

    async def topics_forget(self, topics: list[str]) -> int:
        def forget(conn: sqlite3.Connection) -> int:
            rows = []
            for topic in topics:
                rows += conn.execute(
                    "DELETE FROM topic_heads WHERE topic = ? AND first_offset > last_offset "
                    "RETURNING topic, last_offset, trimmed_seq",
                    (topic,),
                ).fetchall()
            conn.executemany(
                "INSERT INTO topic_retired (bucket, last_offset, trimmed_seq) VALUES (?, ?, ?) ON CONFLICT (bucket) "
                "DO UPDATE SET last_offset = max(last_offset, excluded.last_offset), "
                "trimmed_seq = max(trimmed_seq, excluded.trimmed_seq)",
                retire(rows),
            )
            return len(rows)

        return await self._write(forget)

    async def topics_heads(self, after: str, limit: int) -> list[TopicHead]:
        sql = "SELECT topic, first_offset, last_offset FROM topic_heads WHERE topic > ? ORDER BY topic LIMIT ?"
        rows = await self._read(lambda c: c.execute(sql, (after, limit)).fetchall())
        return [TopicHead(r[0], int(r[1]), int(r[2])) for r in rows]

    async def topics_trimmed(self, after: int, limit: int) -> tuple[list[TopicHead], int]:
        def read(conn: sqlite3.Connection) -> tuple[list[TopicHead], int]:
            rows = conn.execute(TRIMMED_SQL.format(after="?", limit="?"), (after, limit)).fetchall()
            top = conn.execute(EXPLAINED_SQL.format(after="?"), (after,)).fetchone()[0]
            return [TopicHead(r[0], int(r[1]), int(r[2])) for r in rows], int(top)

        return await self._read(read)

    async def topics_trim(self, topic: str, upto_offset: int, older_than: float | None, limit: int) -> int:
        def trim(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                "SELECT seq, msg_offset, at FROM topic_log WHERE topic = ? AND msg_offset IS NOT NULL "
                "ORDER BY msg_offset LIMIT ?",
                (topic, limit),
            ).fetchall()
            cut, top = trim_cut(rows, upto_offset, older_than)
            if not cut:
                return 0
            removed = conn.execute(
                "DELETE FROM topic_log WHERE topic = ? AND msg_offset IS NOT NULL AND msg_offset <= ?", (topic, cut)
            ).rowcount
            conn.execute(
                "UPDATE topic_heads SET first_offset = ?, trimmed_seq = max(trimmed_seq, ?) WHERE topic = ?",
                (cut + 1, top, topic),
            )
            conn.execute("UPDATE topic_meta SET trimmed = max(trimmed, ?) WHERE id = 1", (top,))
            return int(removed)

        return await self._write(trim)

    async def topics_trim_many(self, plans: list[TrimPlan], limit: int) -> tuple[int, list[TrimPlan]]:
        bound = BOUND_SQL.format(topic="?1", upto="?2", older="?3")

        def trim(conn: sqlite3.Connection) -> tuple[int, list[TrimPlan]]:
            bounds = [conn.execute(bound, (p.topic, p.upto_offset, p.older_than)).fetchone() for p in plans]
            cuts, left = plan_cuts(plans, [(b[0], b[1]) for b in bounds], limit)
            rows: list[Any] = []
            for topic, cut in cuts:
                rows += conn.execute(
                    "DELETE FROM topic_log WHERE topic = ? AND msg_offset IS NOT NULL AND msg_offset <= ? "
                    "RETURNING topic, seq, msg_offset",
                    (topic, cut),
                ).fetchall()
            removed, heads, top = trimmed_heads(rows)
            conn.executemany(
                "UPDATE topic_heads SET first_offset = max(first_offset, ?), trimmed_seq = max(trimmed_seq, ?) "
                "WHERE topic = ?",
                [(offset + 1, seq, topic) for topic, (offset, seq) in heads.items()],
            )
            if top:
                conn.execute("UPDATE topic_meta SET trimmed = max(trimmed, ?) WHERE id = 1", (top,))
            return removed, left

        return await self._write(trim)

    async def topics_trim_live(self, older_than: float, limit: int) -> int:
        sql = (
            "DELETE FROM topic_log WHERE seq IN "
            "(SELECT seq FROM topic_log WHERE msg_offset IS NULL AND at < ? ORDER BY at LIMIT ?)"
        )
        return int(await self._write(lambda c: c.execute(sql, (older_than, limit)).rowcount))
