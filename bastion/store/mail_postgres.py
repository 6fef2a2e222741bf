"""The ``mail`` storage domain on PostgreSQL (``PostgresMail``): see mail.py for how it works."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bastion.exceptions import NotFound, Unavailable
from bastion.store._access import PostgresAccess
from bastion.store.mail import (  # the domain's records and the row helpers both backends share
    _FROM_SENDER,
    _ITEM_COLUMNS,
    _STATS_COLUMNS,
    MailDraft,
    MailItem,
    MailLimits,
    MailSent,
    MailStats,
    MailStore,
    _charge,
    _encode,
    _full,
    _item,
    _list_sql,
    _missing,
    _prior,
    _sender_full,
    _stats,
)

if TYPE_CHECKING:
    import asyncpg

__all__ = ["PostgresMail"]


# The upsert locks the mailbox row until commit: concurrent deliveries to one mailbox queue here.
_PG_BOX_UPSERT = (
    "INSERT INTO mail_boxes (owner, last_id, count, unread, bytes) VALUES ($1, 1, 1, 1, $2) "
    "ON CONFLICT (owner) DO UPDATE SET last_id = mail_boxes.last_id + 1, count = mail_boxes.count + 1, "
    "unread = mail_boxes.unread + 1, bytes = mail_boxes.bytes + excluded.bytes RETURNING last_id, count, bytes"
)
# One statement per send: every recipient's copy, with the ids the upserts handed out.
_PG_MESSAGES_INSERT = (
    f"INSERT INTO mail_messages ({_ITEM_COLUMNS}) "
    "SELECT o, i, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, FALSE FROM unnest($1::text[], $2::bigint[]) AS t (o, i)"
)
# Waits for a concurrent send with the same client_id to finish; no row back: it (or an older one) exists.
_PG_SEND_INSERT = (
    "INSERT INTO mail_sends (sender, client_id, digest, recipients, at) VALUES ($1, $2, $3, $4, $5) "
    "ON CONFLICT (sender, client_id) DO NOTHING RETURNING id"
)
_PG_SEND_FIND = "SELECT id, digest, recipients, at FROM mail_sends WHERE sender = $1 AND client_id = $2"
# Locks the sender's bucket row (made full if new) until commit.
_PG_BUCKET = (
    "INSERT INTO mail_senders (sender, tokens, at) VALUES ($1, $2, $3) "
    "ON CONFLICT (sender) DO UPDATE SET sender = excluded.sender RETURNING tokens, at"
)


async def _pg_send(conn: asyncpg.Connection[Any], d: MailDraft, limits: MailLimits) -> MailSent:
    import asyncpg

    try:
        async with conn.transaction():
            recipients = _encode(d.recipients).decode()
            send_id = await conn.fetchval(_PG_SEND_INSERT, d.sender, d.client_id, d.digest, recipients, d.at)
            if send_id is None:
                prior = _prior(await conn.fetchrow(_PG_SEND_FIND, d.sender, d.client_id), d)
                if prior is None:  # forgotten by the sweep since the insert found it: rare, and safe to retry
                    raise Unavailable("the send with this client_id was just being forgotten; try again")
                return prior
            if limits.rate > 0:
                tokens, at = await conn.fetchrow(_PG_BUCKET, d.sender, limits.burst, d.at)
                tokens, at = _charge(float(tokens), float(at), len(d.recipients), limits, d.at)
                await conn.execute(
                    "UPDATE mail_senders SET tokens = $2, at = $3 WHERE sender = $1", d.sender, tokens, at
                )
            owners, ids = sorted(d.recipients), []
            for owner in owners:
                id_, count, size = await conn.fetchrow(_PG_BOX_UPSERT, owner, d.size)
                full = _full(owner, limits.max_messages, limits.max_bytes, int(count), int(size))
                if full is None and (limits.sender_messages or limits.sender_bytes) and owner != d.sender:
                    # The upsert holds the mailbox: every earlier delivery to it has committed.
                    had, held = await conn.fetchrow(_FROM_SENDER.format("$1", "$2"), owner, d.sender)
                    full = _sender_full(d, owner, limits, int(had) + 1, int(held) + d.size)
                if full is not None:
                    raise full
                ids.append(int(id_))
            await conn.execute(
                _PG_MESSAGES_INSERT, owners, ids, send_id, d.sender, _encode(d.to).decode(), d.subject, d.body,
                d.body_kind, _encode(d.headers).decode(), _encode(d.attachments).decode(), d.size, d.at,
            )  # fmt: skip
            return MailSent(int(send_id), list(d.recipients), d.at)
    except asyncpg.ForeignKeyViolationError:
        raise NotFound("a recipient (or the sender) is not a user any more; nothing was sent") from None


async def _pg_found(conn: asyncpg.Connection[Any], owner: str, ids: Sequence[int]) -> set[int]:
    """The ``ids`` present in ``owner``'s mailbox, once its row is locked (every change locks it first)."""
    await conn.execute("SELECT 1 FROM mail_boxes WHERE owner = $1 FOR UPDATE", owner)
    rows = await conn.fetch("SELECT id FROM mail_messages WHERE owner = $1 AND id = ANY($2::bigint[])", owner, ids)
    return {int(r[0]) for r in rows}


class PostgresMail(PostgresAccess, MailStore):
    """Mailboxes on PostgreSQL: every change is one transaction holding the mailbox row's lock."""

    async def mail_send(self, draft: MailDraft, limits: MailLimits) -> MailSent:
        result: MailSent = await self._call(lambda conn: _pg_send(conn, draft, limits))
        return result

    async def mail_get(self, owner: str, id: int, *, mark_read: bool = False) -> MailItem | None:
        sql = f"SELECT {_ITEM_COLUMNS} FROM mail_messages WHERE owner = $1 AND id = $2"
        if not mark_read:
            row = await self._call(lambda conn: conn.fetchrow(sql, owner, id))
            return None if row is None else _item(tuple(row))

        async def read(conn: asyncpg.Connection[Any]) -> MailItem | None:
            async with conn.transaction():
                if await _pg_found(conn, owner, [id]):
                    marked = "UPDATE mail_messages SET read = TRUE WHERE owner = $1 AND id = $2 AND NOT read"
                    if await conn.execute(marked, owner, id) == "UPDATE 1":
                        await conn.execute("UPDATE mail_boxes SET unread = unread - 1 WHERE owner = $1", owner)
                row = await conn.fetchrow(sql, owner, id)
                return None if row is None else _item(tuple(row))

        result: MailItem | None = await self._call(read)
        return result

    async def mail_list(
        self, owner: str, after: int | None, limit: int, *, unread_only: bool, newest_first: bool, bodies: bool
    ) -> list[MailItem]:
        args: list[Any] = [owner]
        sql = _list_sql(args, "${}", "''::bytea", after, limit, unread_only, newest_first, bodies)
        rows = await self._call(lambda conn: conn.fetch(sql, *args))
        return [_item(tuple(r)) for r in rows]

    async def mail_mark(self, owner: str, ids: Sequence[int], read: bool) -> int:
        wanted = sorted(set(ids))

        async def mark(conn: asyncpg.Connection[Any]) -> int:
            async with conn.transaction():
                missing = _missing(ids, await _pg_found(conn, owner, wanted))
                if missing is not None:
                    raise missing
                sql = "UPDATE mail_messages SET read = $3 WHERE owner = $1 AND id = ANY($2::bigint[]) AND read <> $3"
                changed = int((await conn.execute(sql, owner, wanted, read)).split()[-1])
                delta = -changed if read else changed
                await conn.execute("UPDATE mail_boxes SET unread = unread + $2 WHERE owner = $1", owner, delta)
                return changed

        return int(await self._call(mark)) if wanted else 0

    async def mail_delete(self, owner: str, ids: Sequence[int]) -> int:
        wanted = sorted(set(ids))

        async def delete(conn: asyncpg.Connection[Any]) -> int:
            async with conn.transaction():
                missing = _missing(ids, await _pg_found(conn, owner, wanted))
                if missing is not None:
                    raise missing
                rows = await conn.fetch(
                    "DELETE FROM mail_messages WHERE owner = $1 AND id = ANY($2::bigint[]) RETURNING size, read",
                    owner, wanted,
                )  # fmt: skip
                size, unread = sum(int(r[0]) for r in rows), sum(1 for r in rows if not r[1])
                await conn.execute(
                    "UPDATE mail_boxes SET count = count - $2, unread = unread - $3, bytes = bytes - $4 "
                    "WHERE owner = $1",
                    owner, len(rows), unread, size,
                )  # fmt: skip
                return len(rows)

        return int(await self._call(delete)) if wanted else 0

    async def mail_stats(self, owner: str) -> MailStats:
        sql = f"SELECT {_STATS_COLUMNS} FROM mail_boxes WHERE owner = $1"
        row = await self._call(lambda conn: conn.fetchrow(sql, owner))
        return _stats(None if row is None else tuple(row))

    async def mail_heads(self, owners: Sequence[str]) -> dict[str, int]:
        if not owners:
            return {}
        sql = "SELECT owner, last_id FROM mail_boxes WHERE owner = ANY($1::text[])"
        rows = await self._call(lambda conn: conn.fetch(sql, list(owners)))
        return {r[0]: int(r[1]) for r in rows}

    async def mail_forget_sends(self, before: float) -> int:
        status = await self._call(lambda conn: conn.execute("DELETE FROM mail_sends WHERE at < $1", before))
        return int(status.split()[-1])
