"""Who created each durable topic (``topic_heads.creator``), on both backends; topics.py has the rest of the domain.

The creator is recorded when a durable topic's first message creates its head,
and serves one purpose: ``topics_append`` counts a publisher's heads against
``max_topics`` (``messages.topics.max_durable_topics_per_user``). It grants no
access (who may publish or read a topic is the service's rules) and plays no
part in retention; it goes with the head when the head is forgotten. A NULL
creator (heads made before migration 12, or passed on to nobody) counts for
no one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from bastion.store._access import PostgresAccess, SQLiteAccess

__all__ = ["PASS_ON_SQL", "PostgresTopicCreators", "SQLiteTopicCreators", "TopicCreators"]

PASS_ON_SQL = "UPDATE topic_heads SET creator = {heir} WHERE creator = {creator}"


class TopicCreators(ABC):
    """The creators' part of ``TopicStore``."""

    @abstractmethod
    async def topics_pass_on(self, creator: str, heir: str | None) -> int:
        """Record the durable topics ``creator`` created as ``heir``'s (None: nobody's), in one transaction;
        how many. Nothing checks the heir's limit: they may end up over it (and create none until under)."""


class SQLiteTopicCreators(SQLiteAccess, TopicCreators):
    async def topics_pass_on(self, creator: str, heir: str | None) -> int:
        sql = PASS_ON_SQL.format(heir="?", creator="?")
        return int(await self._write(lambda c: c.execute(sql, (heir, creator)).rowcount))


class PostgresTopicCreators(PostgresAccess, TopicCreators):
    async def topics_pass_on(self, creator: str, heir: str | None) -> int:
        sql = PASS_ON_SQL.format(heir="$1::text", creator="$2")
        status = await self._call(lambda c: c.execute(sql, heir, creator))
        return int(status.split()[-1])
