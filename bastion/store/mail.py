"""The ``mail`` storage domain (the mailboxes of the ``messages`` service): interface, SQLite, PostgreSQL.

Theory of operation
-------------------

A *mailbox* belongs to one user: a row of ``mail_boxes`` (created by the
first delivery) holding the mailbox's counters -- ``last_id``, the newest
message id handed out, and ``count``/``unread``/``bytes`` -- and the rows of
``mail_messages`` keyed by ``(owner, id)``. Each recipient gets its own
copy of a message, so a mailbox is self-contained: deleting a message, or a
whole mailbox, never touches anyone else's. Both tables hang off
``users (name)`` with ``ON DELETE CASCADE``: deleting a user deletes their
mailbox, whichever path deletes the user.

Ids. A message's id is ``last_id + 1`` of its mailbox, taken in the same
transaction that inserts it, while that transaction holds the mailbox row
(SQLite: the one writer; PostgreSQL: the row lock of the upsert, kept to
commit). So ids grow with commit order in every mailbox and are never
reused: once id N is visible, no smaller id can still appear -- which is
what lets ``watch`` tail a mailbox by id without a gap.

A send (``mail_send``) is one transaction, all or nothing: it records the
send in ``mail_sends`` (its ``id`` is the send id every copy carries),
charges the sender's token bucket (``mail_senders``), then delivers to each
recipient in name order (so concurrent sends lock mailboxes in one order
and cannot deadlock), checking each mailbox's quota after counting the new
message in. Any refusal -- rate, quota, a recipient that no longer exists --
rolls the whole send back: either every recipient gets the message or none.

Retries. A send with a ``client_id`` is stored once per ``(sender,
client_id)``: the ``mail_sends`` row is unique on that pair, and a second
send finding it returns the first one's result (``duplicate``) without
delivering or charging anything -- or ``AlreadyExists`` when the retry's
``digest`` (a hash of its content, made by the service) differs.
``mail_forget_sends`` drops rows older than the window in which retries
are recognised. On PostgreSQL a retry racing its own first attempt waits on
the unique index until that attempt commits or rolls back.

Rate. ``mail_senders`` holds one token bucket per sender (``tokens`` as of
``at``); a send costs one token per recipient and refills at
``limits.rate`` per minute up to ``limits.burst``. Because the bucket is a
row updated in the send's own transaction, the limit holds across worker
processes and replicas sharing the store, and a refused send costs nothing.

Every time is a float UNIX timestamp passed in by the caller, so the store
has no clock of its own. On PostgreSQL each delivery notifies channel
``bastion_mail`` at commit (``Store.listen("mail")``), for watchers on other
replicas.
"""

from __future__ import annotations

import math
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from bastion.exceptions import AlreadyExists, NotFound, ResourceExhausted, Unavailable
from bastion.store._access import Notifying, PostgresAccess, SQLiteAccess

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "POSTGRES_SCHEMA",
    "SQLITE_SCHEMA",
    "MailAttachment",
    "MailDraft",
    "MailItem",
    "MailLimits",
    "MailSent",
    "MailStats",
    "MailStore",
    "PostgresMail",
    "SQLiteMail",
]

# Schema migration statements of this domain (its migration version is fixed in migrations.py).
SQLITE_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE mail_boxes (
        owner   TEXT PRIMARY KEY REFERENCES users (name) ON DELETE CASCADE,
        last_id INTEGER NOT NULL,                   -- the newest message id handed out here
        count   INTEGER NOT NULL,
        unread  INTEGER NOT NULL,
        bytes   INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE mail_messages (
        owner       TEXT NOT NULL REFERENCES mail_boxes (owner) ON DELETE CASCADE,
        id          INTEGER NOT NULL,
        send_id     INTEGER NOT NULL,
        sender      TEXT NOT NULL,
        recipients  TEXT NOT NULL,                  -- JSON array: "to" as the sender gave it
        subject     TEXT NOT NULL,
        body        BLOB NOT NULL,
        body_kind   TEXT NOT NULL CHECK (body_kind IN ('bytes', 'json')),
        headers     TEXT NOT NULL,                  -- JSON object of strings
        attachments TEXT NOT NULL,                  -- JSON array of MailAttachment
        size        INTEGER NOT NULL,
        sent_at     REAL NOT NULL,
        read        INTEGER NOT NULL DEFAULT 0 CHECK (read IN (0, 1)),
        PRIMARY KEY (owner, id)
    )""",
    "CREATE INDEX mail_messages_unread ON mail_messages (owner, id) WHERE read = 0",
    """CREATE TABLE mail_sends (
        id         INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused, even after old rows are forgotten
        sender     TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
        client_id  TEXT,
        digest     TEXT NOT NULL,                  -- of the content: a reused client_id must match
        recipients TEXT NOT NULL,                  -- JSON array: the mailboxes delivered to
        at         REAL NOT NULL,
        UNIQUE (sender, client_id)
    )""",
    "CREATE INDEX mail_sends_by_time ON mail_sends (at)",
    """CREATE TABLE mail_senders (
        sender TEXT PRIMARY KEY REFERENCES users (name) ON DELETE CASCADE,
        tokens REAL NOT NULL,                      -- the token bucket, as of ``at``
        at     REAL NOT NULL
    ) WITHOUT ROWID""",
)
POSTGRES_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE mail_boxes (
        owner   TEXT COLLATE "C" PRIMARY KEY REFERENCES users (name) ON DELETE CASCADE,
        last_id BIGINT NOT NULL,
        count   BIGINT NOT NULL,
        unread  BIGINT NOT NULL,
        bytes   BIGINT NOT NULL
    )""",
    """CREATE TABLE mail_messages (
        owner       TEXT COLLATE "C" NOT NULL REFERENCES mail_boxes (owner) ON DELETE CASCADE,
        id          BIGINT NOT NULL,
        send_id     BIGINT NOT NULL,
        sender      TEXT COLLATE "C" NOT NULL,
        recipients  TEXT NOT NULL,
        subject     TEXT NOT NULL,
        body        BYTEA NOT NULL,
        body_kind   TEXT NOT NULL CHECK (body_kind IN ('bytes', 'json')),
        headers     TEXT NOT NULL,
        attachments TEXT NOT NULL,
        size        BIGINT NOT NULL,
        sent_at     DOUBLE PRECISION NOT NULL,
        read        BOOLEAN NOT NULL DEFAULT FALSE,
        PRIMARY KEY (owner, id)
    )""",
    "CREATE INDEX mail_messages_unread ON mail_messages (owner, id) WHERE NOT read",
    """CREATE TABLE mail_sends (
        id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        sender     TEXT COLLATE "C" NOT NULL REFERENCES users (name) ON DELETE CASCADE,
        client_id  TEXT COLLATE "C",
        digest     TEXT NOT NULL,
        recipients TEXT NOT NULL,
        at         DOUBLE PRECISION NOT NULL,
        UNIQUE (sender, client_id)
    )""",
    "CREATE INDEX mail_sends_by_time ON mail_sends (at)",
    """CREATE TABLE mail_senders (
        sender TEXT COLLATE "C" PRIMARY KEY REFERENCES users (name) ON DELETE CASCADE,
        tokens DOUBLE PRECISION NOT NULL,
        at     DOUBLE PRECISION NOT NULL
    )""",
    # Tell the other replicas' watchers (Store.listen("mail")) that mail arrived; delivered
    # at commit, once per transaction, with the schema as payload.
    """CREATE FUNCTION mail_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('bastion_mail', current_schema());
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER mail_notify AFTER INSERT ON mail_messages FOR EACH STATEMENT EXECUTE FUNCTION mail_notify()",
)


# -- records --------------------------------------------------------------------------------


class MailAttachment(msgspec.Struct, frozen=True):
    """A file of the ``files`` service, by reference: the recipients get a read share on it."""

    file_id: str
    name: str
    owner: str
    size: int
    sha256: str


class MailDraft(msgspec.Struct, frozen=True):
    """One send, ready to store.

    ``recipients``: the mailboxes to deliver to (user names, each once);
    ``to``: the addresses as the sender gave them (users and ``role:NAME``);
    ``body_kind``: "bytes", or "json" for a structured body (``body`` is its
    JSON); ``size``: what each copy counts against a mailbox's byte quota;
    ``digest``: a hash of the content, compared when ``client_id`` repeats.
    """

    sender: str
    recipients: list[str]
    to: list[str]
    subject: str
    body: bytes
    body_kind: str
    headers: dict[str, str]
    attachments: list[MailAttachment]
    size: int
    at: float
    client_id: str | None = None
    digest: str = ""


class MailLimits(msgspec.Struct, frozen=True):
    """What a send may use: mailbox quotas, and the sender's bucket (``rate`` per minute, 0: unlimited)."""

    max_messages: int
    max_bytes: int
    rate: float = 0.0
    burst: float = 0.0


class MailSent(msgspec.Struct, frozen=True):
    """A stored send: its id, the mailboxes it went to, when; ``duplicate``: a retry of an earlier send."""

    id: int
    recipients: list[str]
    at: float
    duplicate: bool = False


class MailItem(msgspec.Struct, frozen=True):
    """One message in one mailbox (``body`` is empty when listed without bodies)."""

    owner: str
    id: int
    send_id: int
    sender: str
    to: list[str]
    subject: str
    body: bytes
    body_kind: str
    headers: dict[str, str]
    attachments: list[MailAttachment]
    size: int
    sent_at: float
    read: bool


class MailStats(msgspec.Struct, frozen=True):
    """A mailbox's counters (all 0 before its first message)."""

    last_id: int = 0
    count: int = 0
    unread: int = 0
    bytes: int = 0


_strings = msgspec.json.Decoder(list[str])
_headers = msgspec.json.Decoder(dict[str, str])
_attachments = msgspec.json.Decoder(list[MailAttachment])
_encode = msgspec.json.encode


def _item(row: Sequence[Any]) -> MailItem:
    owner, id_, send_id, sender, to, subject, body, kind, headers, attachments, size, sent_at, read = row
    return MailItem(
        owner, int(id_), int(send_id), sender, _strings.decode(to), subject, bytes(body), kind,
        _headers.decode(headers), _attachments.decode(attachments), int(size), float(sent_at), bool(read),
    )  # fmt: skip


def _stats(row: Sequence[Any] | None) -> MailStats:
    return MailStats() if row is None else MailStats(*(int(v) for v in row))


def _full(owner: str, max_messages: int, max_bytes: int, count: int, size: int) -> ResourceExhausted | None:
    """The refusal of a send that would leave ``owner``'s mailbox at ``count`` messages of ``size`` bytes."""
    if count > max_messages:
        what, limit = f"{max_messages} messages", "messages"
    elif size > max_bytes:
        what, limit = f"{max_bytes} bytes", "bytes"
    else:
        return None
    return ResourceExhausted(
        f"the mailbox of {owner!r} is full (it holds at most {what}); nothing was sent",
        details={"mailbox": owner, "limit": limit},
    )


def _charge(tokens: float, at: float, cost: int, limits: MailLimits, now: float) -> float:
    """The bucket's tokens after paying ``cost`` at ``now``; ``ResourceExhausted`` if it cannot pay."""
    refill = max(0.0, now - at) * limits.rate / 60.0
    tokens = min(limits.burst, tokens + refill)
    if tokens >= cost:
        return tokens - cost
    wait = (cost - tokens) * 60.0 / limits.rate
    raise ResourceExhausted(
        f"sending too fast: {limits.rate:g} deliveries a minute (burst {limits.burst:g}) per sender; "
        f"try again in {wait:.1f} s",
        details={"rate": limits.rate, "burst": limits.burst, "cost": cost},
        retry_after=math.ceil(wait * 1000) / 1000,
    )


def _reused(client_id: str) -> AlreadyExists:
    return AlreadyExists(f"client_id {client_id!r} was already used for a different message; nothing was sent")


def _missing(ids: Sequence[int], found: set[int]) -> NotFound | None:
    for id_ in ids:
        if id_ not in found:
            return NotFound(f"no message {id_} in your mailbox")
    return None


# -- the interface --------------------------------------------------------------------------


class MailStore(Notifying, ABC):
    """What every backend offers for mailboxes; see the module docstring."""

    @abstractmethod
    async def mail_send(self, draft: MailDraft, limits: MailLimits) -> MailSent:
        """Deliver ``draft`` to every recipient atomically (all or none), durably; see the module docstring.

        ``ResourceExhausted``: the sender's rate (with ``retry_after``) or a
        recipient's quota (``details["mailbox"]``); ``NotFound``: a recipient
        is not a user; ``AlreadyExists``: ``client_id`` reused for other content.
        """

    @abstractmethod
    async def mail_get(self, owner: str, id: int, *, mark_read: bool = False) -> MailItem | None:
        """One message of ``owner``'s mailbox (None: no such id); ``mark_read`` marks it read first."""

    @abstractmethod
    async def mail_list(
        self, owner: str, after: int | None, limit: int, *, unread_only: bool, newest_first: bool, bodies: bool
    ) -> list[MailItem]:
        """Up to ``limit`` messages of ``owner`` by id, past ``after`` in the direction of the listing."""

    @abstractmethod
    async def mail_mark(self, owner: str, ids: Sequence[int], read: bool) -> int:
        """Mark messages read (or unread); how many changed. ``NotFound`` (nothing changed) if one is missing."""

    @abstractmethod
    async def mail_delete(self, owner: str, ids: Sequence[int]) -> int:
        """Delete messages; how many. ``NotFound`` (nothing deleted) if one is missing."""

    @abstractmethod
    async def mail_stats(self, owner: str) -> MailStats: ...

    @abstractmethod
    async def mail_heads(self, owners: Sequence[str]) -> dict[str, int]:
        """The ``last_id`` of each of these mailboxes that exists."""

    @abstractmethod
    async def mail_forget_sends(self, before: float) -> int:
        """Forget sends recorded before ``before`` (their client_ids no longer deduplicate); how many."""


_ITEM_COLUMNS = (
    "owner, id, send_id, sender, recipients, subject, body, body_kind, headers, attachments, size, sent_at, read"
)
_STATS_COLUMNS = "last_id, count, unread, bytes"


def _list_sql(
    args: list[Any],
    mark: str,
    empty: str,
    after: int | None,
    limit: int,
    unread_only: bool,
    newest_first: bool,
    bodies: bool,
) -> str:
    """``mail_list``'s query in a dialect (``mark(n)``: the nth placeholder; ``empty``: an empty blob), given
    ``args`` holding the owner; appends the other arguments to ``args``."""
    columns = _ITEM_COLUMNS if bodies else _ITEM_COLUMNS.replace("body,", f"{empty} AS body,", 1)
    sql = f"SELECT {columns} FROM mail_messages WHERE owner = {mark.format(1)}"
    if after is not None:
        args.append(after)
        sql += f" AND id {'<' if newest_first else '>'} {mark.format(len(args))}"
    if unread_only:
        sql += " AND NOT read" if mark != "?" else " AND read = 0"
    args.append(limit)
    return sql + f" ORDER BY id {'DESC' if newest_first else 'ASC'} LIMIT {mark.format(len(args))}"


# -- SQLite ---------------------------------------------------------------------------------

_BOX_UPSERT = (
    "INSERT INTO mail_boxes (owner, last_id, count, unread, bytes) VALUES (?, 1, 1, 1, ?) "
    "ON CONFLICT (owner) DO UPDATE SET last_id = last_id + 1, count = count + 1, unread = unread + 1, "
    "bytes = bytes + excluded.bytes RETURNING last_id, count, bytes"
)
_MESSAGE_INSERT = f"INSERT INTO mail_messages ({_ITEM_COLUMNS}) VALUES ({', '.join('?' * 13)})"
_SEND_INSERT = "INSERT INTO mail_sends (sender, client_id, digest, recipients, at) VALUES (?, ?, ?, ?, ?)"
_SEND_FIND = "SELECT id, digest, recipients, at FROM mail_sends WHERE sender = ? AND client_id = ?"


def _prior(row: Sequence[Any] | None, draft: MailDraft) -> MailSent | None:
    """The earlier send ``row`` (found by client_id) as this send's answer; None if there was none."""
    if row is None:
        return None
    id_, digest, recipients, at = row
    if digest != draft.digest:
        raise _reused(str(draft.client_id))
    return MailSent(int(id_), _strings.decode(recipients), float(at), duplicate=True)


def _sqlite_send(conn: sqlite3.Connection, d: MailDraft, limits: MailLimits) -> MailSent:
    if d.client_id is not None:
        prior = _prior(conn.execute(_SEND_FIND, (d.sender, d.client_id)).fetchone(), d)
        if prior is not None:
            return prior
    try:
        if limits.rate > 0:
            row = conn.execute("SELECT tokens, at FROM mail_senders WHERE sender = ?", (d.sender,)).fetchone()
            tokens, at = (limits.burst, d.at) if row is None else (float(row[0]), float(row[1]))
            tokens = _charge(tokens, at, len(d.recipients), limits, d.at)
            conn.execute(
                "INSERT INTO mail_senders (sender, tokens, at) VALUES (?, ?, ?) "
                "ON CONFLICT (sender) DO UPDATE SET tokens = excluded.tokens, at = excluded.at",
                (d.sender, tokens, d.at),
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


# -- PostgreSQL -----------------------------------------------------------------------------

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
                tokens = _charge(float(tokens), float(at), len(d.recipients), limits, d.at)
                await conn.execute(
                    "UPDATE mail_senders SET tokens = $2, at = $3 WHERE sender = $1", d.sender, tokens, d.at
                )
            owners, ids = sorted(d.recipients), []
            for owner in owners:
                id_, count, size = await conn.fetchrow(_PG_BOX_UPSERT, owner, d.size)
                full = _full(owner, limits.max_messages, limits.max_bytes, int(count), int(size))
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
