"""The ``topics`` storage domain on PostgreSQL (``PostgresTopics``): see topics.py for how it works."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from bastion.store.topics import (
    BOUND_SQL,
    CREATED_SQL,
    EXPLAINED_SQL,
    FEED_SQL,
    LOG_COLUMNS,
    REPLAY_PAGE_SQL,
    REPLAY_SIZES_SQL,
    RETIRED_SQL,
    TRIMMED_SQL,
    TooManyTopics,
    TopicHead,
    TopicMessage,
    TopicPosition,
    TopicStore,
    TrimPlan,
    feed_of,
    forgotten_head,
    message_of,
    plan_cuts,
    replay_last,
    retire,
    retired_bucket,
    trim_cut,
    trimmed_heads,
)
from bastion.store.topics_creators import PostgresTopicCreators

if TYPE_CHECKING:
    import asyncpg

__all__ = ["PostgresTopics"]

# One statement: lock and advance the counter (serialising publishers on every replica, so seq
# order is commit order), take the topic's next offset when durable ($2), append the message. No row:
# the durable topic has no head yet (the counter is then left as it was; only a head forgotten between the
# statement's snapshot and its lock leaves an unused seq: a gap, which readers of the log allow).
_PG_APPEND = (
    "WITH m AS (UPDATE topic_meta SET seq = seq + 1 WHERE id = 1 "
    "AND (NOT $2::bool OR EXISTS (SELECT 1 FROM topic_heads WHERE topic = $1)) RETURNING seq), "
    "h AS (UPDATE topic_heads SET last_offset = topic_heads.last_offset + 1 FROM m WHERE topic = $1 AND $2::bool "
    "RETURNING last_offset), "
    f"lg AS (INSERT INTO topic_log ({LOG_COLUMNS}) "
    "SELECT m.seq, $1, (SELECT last_offset FROM h), $3, $4, $5, $6 FROM m "
    "WHERE NOT $2::bool OR EXISTS (SELECT 1 FROM h) RETURNING seq, msg_offset) "
    "SELECT seq, msg_offset FROM lg"
)


_PG_INSERT = f"INSERT INTO topic_log ({LOG_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"


class PostgresTopics(PostgresTopicCreators, TopicStore):
    """topics on PostgreSQL: every append is one statement that first locks the seq counter."""

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
        row = await self._call(lambda c: c.fetchrow(_PG_APPEND, topic, durable, publisher, payload, encoded, at))
        if row is not None:
            return int(row[0]), None if row[1] is None else int(row[1])

        async def create(conn: asyncpg.Connection[Any]) -> tuple[int, int]:
            async with conn.transaction():
                # The counter's lock first, as every append and trim: each statement after it sees every
                # topic created before (another replica may have created this one meanwhile).
                seq = int(await conn.fetchval("UPDATE topic_meta SET seq = seq + 1 WHERE id = 1 RETURNING seq"))
                sql = "UPDATE topic_heads SET last_offset = last_offset + 1 WHERE topic = $1 RETURNING last_offset"
                offset = await conn.fetchval(sql, topic)
                if offset is None:
                    if max_topics is not None:
                        count = int(await conn.fetchval(CREATED_SQL.format(creator="$1"), publisher))
                        if count >= max_topics:
                            raise TooManyTopics(count)
                    offset = (await conn.fetchval(RETIRED_SQL.format(bucket="$1"), retired_bucket(topic)) or 0) + 1
                    await conn.execute(
                        "INSERT INTO topic_heads (topic, first_offset, last_offset, creator) VALUES ($1, $2, $2, $3)",
                        topic,
                        offset,
                        publisher,
                    )
                await conn.execute(_PG_INSERT, seq, topic, offset, publisher, payload, encoded, at)
                return seq, int(offset)

        seq, offset = await self._call(create)
        return seq, offset

    async def topics_position(self) -> TopicPosition:
        row = await self._call(lambda c: c.fetchrow("SELECT seq, trimmed FROM topic_meta WHERE id = 1"))
        return TopicPosition(int(row[0]), int(row[1]))

    async def topics_feed(self, after: int, limit: int) -> tuple[list[TopicMessage], int]:
        sql = FEED_SQL.format(after="$1", limit="$2")
        return feed_of([tuple(r) for r in await self._call(lambda c: c.fetch(sql, after, limit))])

    async def topics_replay(self, topic: str, from_offset: int, upto: int, limit: int) -> list[TopicMessage]:
        sql = (
            f"SELECT {LOG_COLUMNS} FROM topic_log WHERE topic = $1 AND msg_offset >= $2 AND seq <= $3 "
            "ORDER BY msg_offset LIMIT $4"
        )
        rows = await self._call(lambda c: c.fetch(sql, topic, from_offset, upto, limit))
        return [message_of(tuple(r)) for r in rows]

    async def topics_replay_page(
        self, topic: str, from_offset: int, upto: int, limit: int, max_bytes: int
    ) -> tuple[list[TopicMessage], bool]:
        sizes_sql = REPLAY_SIZES_SQL.format("$1", "$2", "$3", "$4", "octet_length")
        page_sql = REPLAY_PAGE_SQL.format("$1", "$2", "$3", "$4")

        async def read(c: asyncpg.Connection[Any]) -> tuple[list[Any], bool]:
            last, more = replay_last(list(await c.fetch(sizes_sql, topic, from_offset, upto, limit)), limit, max_bytes)
            return list(await c.fetch(page_sql, topic, from_offset, last, upto)), more

        rows, more = await self._call(read)
        return [message_of(tuple(r)) for r in rows], more

    async def topics_head(self, topic: str) -> TopicHead | None:
        sql = (
            "SELECT h.first_offset, h.last_offset, r.last_offset FROM (SELECT 1) o "
            "LEFT JOIN topic_heads h ON h.topic = $1 LEFT JOIN topic_retired r ON r.bucket = $2"
        )
        row = await self._call(lambda c: c.fetchrow(sql, topic, retired_bucket(topic)))
        if row[0] is not None:
            return TopicHead(topic, int(row[0]), int(row[1]))
        return forgotten_head(topic, None if row[2] is None else (row[2],))

    async def topics_forget(self, topics: list[str]) -> int:
        async def forget(conn: asyncpg.Connection[Any]) -> int:
            async with conn.transaction():
                await conn.execute("SELECT 1 FROM topic_meta WHERE id = 1 FOR UPDATE")  # as appends and trims
                rows = await conn.fetch(
                    "DELETE FROM topic_heads WHERE topic = ANY($1::text[]) AND first_offset > last_offset "
                    "RETURNING topic, last_offset, trimmed_seq",
                    topics,
                )
                await conn.executemany(
                    "INSERT INTO topic_retired (bucket, last_offset, trimmed_seq) VALUES ($1, $2, $3) "
                    "ON CONFLICT (bucket) DO UPDATE SET "
                    "last_offset = greatest(topic_retired.last_offset, excluded.last_offset), "
                    "trimmed_seq = greatest(topic_retired.trimmed_seq, excluded.trimmed_seq)",
                    retire([tuple(r) for r in rows]),
                )
                return len(rows)

        return int(await self._call(forget))

    async def topics_heads(self, after: str, limit: int) -> list[TopicHead]:
        sql = "SELECT topic, first_offset, last_offset FROM topic_heads WHERE topic > $1 ORDER BY topic LIMIT $2"
        rows = await self._call(lambda c: c.fetch(sql, after, limit))
        return [TopicHead(r[0], int(r[1]), int(r[2])) for r in rows]

    async def topics_trimmed(self, after: int, limit: int) -> tuple[list[TopicHead], int]:
        async def read(conn: asyncpg.Connection[Any]) -> tuple[list[TopicHead], int]:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                rows = await conn.fetch(TRIMMED_SQL.format(after="$1", limit="$2"), after, limit)
                top = await conn.fetchval(EXPLAINED_SQL.format(after="$1"), after)
            return [TopicHead(r[0], int(r[1]), int(r[2])) for r in rows], int(top)

        heads, top = await self._call(read)
        return heads, top

    async def topics_trim(self, topic: str, upto_offset: int, older_than: float | None, limit: int) -> int:
        async def trim(conn: asyncpg.Connection[Any]) -> int:
            async with conn.transaction():
                # The counter's lock first, as publishers take it: trims (every replica's leader sweeps)
                # and appends then queue in one order, never deadlock.
                await conn.execute("SELECT 1 FROM topic_meta WHERE id = 1 FOR UPDATE")
                rows = await conn.fetch(
                    "SELECT seq, msg_offset, at FROM topic_log WHERE topic = $1 AND msg_offset IS NOT NULL "
                    "ORDER BY msg_offset LIMIT $2",
                    topic,
                    limit,
                )
                cut, top = trim_cut([tuple(r) for r in rows], upto_offset, older_than)
                if not cut:
                    return 0
                status = await conn.execute(
                    "DELETE FROM topic_log WHERE topic = $1 AND msg_offset IS NOT NULL AND msg_offset <= $2", topic, cut
                )
                await conn.execute(
                    "UPDATE topic_heads SET first_offset = $1, trimmed_seq = greatest(trimmed_seq, $2) "
                    "WHERE topic = $3",
                    cut + 1,
                    top,
                    topic,
                )
                await conn.execute("UPDATE topic_meta SET trimmed = greatest(trimmed, $1) WHERE id = 1", top)
                return int(status.split()[-1])

        return int(await self._call(trim))

    async def topics_trim_many(self, plans: list[TrimPlan], limit: int) -> tuple[int, list[TrimPlan]]:
        # Where to cut, read first (no lock: later appends only add higher offsets, and a cut already
        # made by another replica only leaves less to delete); then one transaction for every topic.
        bound = BOUND_SQL.format(topic="r.topic", upto="r.upto", older="r.older")
        sql = (
            "SELECT b.* FROM unnest($1::text[], $2::bigint[], $3::float8[]) WITH ORDINALITY r(topic, upto, older, i), "
            f"LATERAL ({bound}) b ORDER BY r.i"
        )
        columns = ([p.topic for p in plans], [p.upto_offset for p in plans], [p.older_than for p in plans])
        bounds = [(r[0], r[1]) for r in await self._call(lambda c: c.fetch(sql, *columns))]
        cuts, left = plan_cuts(plans, bounds, limit)
        if not cuts:
            return 0, left

        async def trim(conn: asyncpg.Connection[Any]) -> int:
            async with conn.transaction():
                await conn.execute("SELECT 1 FROM topic_meta WHERE id = 1 FOR UPDATE")  # as appends take it
                rows = await conn.fetch(
                    "DELETE FROM topic_log l USING unnest($1::text[], $2::bigint[]) c(topic, cut) "
                    "WHERE l.topic = c.topic AND l.msg_offset IS NOT NULL AND l.msg_offset <= c.cut "
                    "RETURNING l.topic, l.seq, l.msg_offset",
                    [t for t, _ in cuts],
                    [c for _, c in cuts],
                )
                removed, heads, top = trimmed_heads([tuple(r) for r in rows])
                await conn.execute(
                    "UPDATE topic_heads h SET first_offset = greatest(h.first_offset, u.next), "
                    "trimmed_seq = greatest(h.trimmed_seq, u.seq) "
                    "FROM unnest($1::text[], $2::bigint[], $3::bigint[]) u(topic, next, seq) WHERE h.topic = u.topic",
                    list(heads),
                    [offset + 1 for offset, _ in heads.values()],
                    [seq for _, seq in heads.values()],
                )
                if top:
                    await conn.execute("UPDATE topic_meta SET trimmed = greatest(trimmed, $1) WHERE id = 1", top)
                return removed

        return int(await self._call(trim)), left

    async def topics_trim_live(self, older_than: float, limit: int) -> int:
        sql = (
            "DELETE FROM topic_log WHERE seq IN "
            "(SELECT seq FROM topic_log WHERE msg_offset IS NULL AND at < $1 ORDER BY at LIMIT $2)"
        )
        status = await self._call(lambda c: c.execute(sql, older_than, limit))
        return int(status.split()[-1])
