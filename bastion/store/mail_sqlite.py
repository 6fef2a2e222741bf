"""The ``mail`` storage domain on SQLite (``SQLiteMail``): see mail.py for how it works."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from bastion.exceptions import NotFound
from bastion.store._access import SQLiteAccess
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

__all__ = ["SQLiteMail"]


_BOX_UPSERT = (
    "INSERT INTO mail_boxes (owner, last_id, count, unread, bytes) VALUES (?, 1, 1, 1, ?) "
    "ON CONFLICT (owner) DO UPDATE SET last_id = last_id + 1, count = count + 1, unread = unread + 1, "
    "bytes = bytes + excluded.bytes RETURNING last_id, count, bytes"
)
_MESSAGE_INSERT = f"INSERT INTO mail_messages ({_ITEM_COLUMNS}) VALUES ({', '.join('?' * 13)})"
_SEND_INSERT = "INSERT INTO mail_sends (sender, client_id, digest, recipients, at) VALUES (?, ?, ?, ?, ?)"
_SEND_FIND = "SELECT id, digest, recipients, at FROM mail_sends WHERE sender = ? AND client_id = ?"


def _sqlite_send(conn: sqlite3.Connection, d: MailDraft, limits: MailLimits) -> MailSent:
    if d.client_id is not None:
        prior = _prior(conn.execute(_SEND_FIND, (d.sender, d.client_id)).fetchone(), d)
        if prior is not None:
            return prior
    try:
        if limits.rate > 0:
            row = conn.execute("SELECT tokens, at FROM mail_senders WHERE sender = ?", (d.sender,)).fetchone()
            tokens, at = (limits.burst, d.at) if row is None else (float(row[0]), float(row[1]))
            tokens, at = _charge(tokens, at, len(d.recipients), limits, d.at)
            conn.execute(
                "INSERT INTO mail_senders (sender, tokens, at) VALUES (?, ?, ?) "
                "ON CONFLICT (sender) DO UPDATE SET tokens = excluded.tokens, at = excluded.at",
                (d.sender, tokens, at),
            )
        recipients = _encode(d.recipients).decode()
        send_id = conn.execute(_SEND_INSERT, (d.sender, d.client_id, d.digest, recipients, d.at)).lastrowid
        fields = (
            _encode(d.to).decode(), d.subject, d.body, d.body_kind, _encode(d.headers).decode(),
            _encode(d.attachments).decode(), d.size, d.at, 0,
        )  # fmt: skip
        for owner in sorted(d.recipients):
            id_, count, size = conn.execute(_BOX_UPSERT, (owner, d.size)).fetchone()
            full = _full(owner, limits.max_messages, limits.max_bytes, count, size)
            if full is None and (limits.sender_messages or limits.sender_bytes) and owner != d.sender:
                had, held = conn.execute(_FROM_SENDER.format("?", "?"), (owner, d.sender)).fetchone()
                full = _sender_full(d, owner, limits, int(had) + 1, int(held) + d.size)
            if full is not None:
                raise full
            conn.execute(_MESSAGE_INSERT, (owner, id_, send_id, d.sender, *fields))
    except sqlite3.IntegrityError as exc:
        if exc.sqlite_errorname == "SQLITE_CONSTRAINT_FOREIGNKEY":
            raise NotFound("a recipient (or the sender) is not a user any more; nothing was sent") from None
        raise
    assert send_id is not None
    return MailSent(int(send_id), list(d.recipients), d.at)


def _sqlite_found(conn: sqlite3.Connection, owner: str, ids: Sequence[int]) -> set[int]:
    wanted = sorted(set(ids))
    marks = ", ".join("?" * len(wanted))
    rows = conn.execute(f"SELECT id FROM mail_messages WHERE owner = ? AND id IN ({marks})", (owner, *wanted))
    return {int(r[0]) for r in rows}


class SQLiteMail(SQLiteAccess, MailStore):
    """Mailboxes on SQLite: every change is one write of the group commit."""

    async def mail_send(self, draft: MailDraft, limits: MailLimits) -> MailSent:
        return await self._write(lambda conn: _sqlite_send(conn, draft, limits))

    async def mail_get(self, owner: str, id: int, *, mark_read: bool = False) -> MailItem | None:
        sql = f"SELECT {_ITEM_COLUMNS} FROM mail_messages WHERE owner = ? AND id = ?"
        if not mark_read:
            row = await self._read(lambda conn: conn.execute(sql, (owner, id)).fetchone())
            return None if row is None else _item(row)

        def read(conn: sqlite3.Connection) -> MailItem | None:
            marked = "UPDATE mail_messages SET read = 1 WHERE owner = ? AND id = ? AND read = 0"
            if conn.execute(marked, (owner, id)).rowcount:
                conn.execute("UPDATE mail_boxes SET unread = unread - 1 WHERE owner = ?", (owner,))
            row = conn.execute(sql, (owner, id)).fetchone()
            return None if row is None else _item(row)

        return await self._write(read)

    async def mail_list(
        self, owner: str, after: int | None, limit: int, *, unread_only: bool, newest_first: bool, bodies: bool
    ) -> list[MailItem]:
        args: list[Any] = [owner]
        sql = _list_sql(args, "?", "X''", after, limit, unread_only, newest_first, bodies)
        return [_item(r) for r in await self._read(lambda conn: conn.execute(sql, args).fetchall())]

    async def mail_mark(self, owner: str, ids: Sequence[int], read: bool) -> int:
        def mark(conn: sqlite3.Connection) -> int:
            missing = _missing(ids, _sqlite_found(conn, owner, ids))
            if missing is not None:
                raise missing
            wanted = sorted(set(ids))
            marks = ", ".join("?" * len(wanted))
            sql = f"UPDATE mail_messages SET read = ? WHERE owner = ? AND read = ? AND id IN ({marks})"
            changed = conn.execute(sql, (int(read), owner, int(not read), *wanted)).rowcount
            delta = -changed if read else changed
            conn.execute("UPDATE mail_boxes SET unread = unread + ? WHERE owner = ?", (delta, owner))
            return int(changed)

        return await self._write(mark) if ids else 0

    async def mail_delete(self, owner: str, ids: Sequence[int]) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            missing = _missing(ids, _sqlite_found(conn, owner, ids))
            if missing is not None:
                raise missing
            wanted = sorted(set(ids))
            sql = (
                f"DELETE FROM mail_messages WHERE owner = ? AND id IN ({', '.join('?' * len(wanted))}) "
                "RETURNING size, read"
            )
            rows = conn.execute(sql, (owner, *wanted)).fetchall()
            size, unread = sum(r[0] for r in rows), sum(1 for r in rows if not r[1])
            conn.execute(
                "UPDATE mail_boxes SET count = count - ?, unread = unread - ?, bytes = bytes - ? WHERE owner = ?",
                (len(rows), unread, size, owner),
            )
            return len(rows)

        return await self._write(delete) if ids else 0

    async def mail_stats(self, owner: str) -> MailStats:
        sql = f"SELECT {_STATS_COLUMNS} FROM mail_boxes WHERE owner = ?"
        return _stats(await self._read(lambda conn: conn.execute(sql, (owner,)).fetchone()))

    async def mail_heads(self, owners: Sequence[str]) -> dict[str, int]:
        if not owners:
            return {}
        sql = f"SELECT owner, last_id FROM mail_boxes WHERE owner IN ({', '.join('?' * len(owners))})"
        rows = await self._read(lambda conn: conn.execute(sql, tuple(owners)).fetchall())
        return {owner: int(last) for owner, last in rows}

    async def mail_forget_sends(self, before: float) -> int:
        return await self._write(lambda conn: conn.execute("DELETE FROM mail_sends WHERE at < ?", (before,)).rowcount)
