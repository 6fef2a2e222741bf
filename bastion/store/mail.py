"""The ``mail`` storage domain (the mailboxes of the ``messages`` service): interface and records.

The backends are mail_sqlite.py and mail_postgres.py.

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
message in -- and, while holding that mailbox, what the sender already has
in it (``MailLimits.sender_*``: one sender may fill only part of another's
mailbox, counted through the index ``mail_messages_by_sender``). Any
refusal -- rate, quota, a recipient that no longer exists -- rolls the
whole send back: either every recipient gets the message or none.

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
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from bastion.exceptions import AlreadyExists, NotFound, ResourceExhausted
from bastion.store._access import Notifying

if TYPE_CHECKING:
    pass

__all__ = [
    "POSTGRES_SCHEMA",
    "SENDER_INDEX_SCHEMA",
    "SQLITE_SCHEMA",
    "MailAttachment",
    "MailDraft",
    "MailItem",
    "MailLimits",
    "MailSent",
    "MailStats",
    "MailStore",
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


# Migration 15: the index that counts one sender's messages in a mailbox (MailLimits.sender_*).
SENDER_INDEX_SCHEMA: tuple[str, ...] = ("CREATE INDEX mail_messages_by_sender ON mail_messages (owner, sender, size)",)


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
    """What a send may use: mailbox quotas, and the sender's bucket (``rate`` per minute, 0: unlimited).

    ``sender_messages``/``sender_bytes``: how much of another user's mailbox one sender's messages may
    fill (0: no separate limit); mail to oneself counts only against the mailbox's own quotas.
    """

    max_messages: int
    max_bytes: int
    rate: float = 0.0
    burst: float = 0.0
    sender_messages: int = 0
    sender_bytes: int = 0


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


def _sender_full(d: MailDraft, owner: str, limits: MailLimits, count: int, size: int) -> ResourceExhausted | None:
    """The refusal of a send that would leave ``count`` messages of ``size`` bytes from ``d.sender`` in
    ``owner``'s mailbox (this one included)."""
    if owner == d.sender:
        return None
    if limits.sender_messages and count > limits.sender_messages:
        what, limit = f"{limits.sender_messages} messages", "sender_messages"
    elif limits.sender_bytes and size > limits.sender_bytes:
        what, limit = f"{limits.sender_bytes} bytes", "sender_bytes"
    else:
        return None
    return ResourceExhausted(
        f"the mailbox of {owner!r} holds as much from you as one sender may (at most {what}); nothing was sent",
        details={"mailbox": owner, "limit": limit},
    )


def _charge(tokens: float, at: float, cost: int, limits: MailLimits, now: float) -> tuple[float, float]:
    """The bucket (tokens, as of when) after paying ``cost`` at ``now``; ``ResourceExhausted`` if it cannot pay.

    The bucket's time never moves back: a send timed before it (a replica whose
    clock is behind) is refilled nothing, and leaves the time as it was -- else
    the next send through the replica ahead would be refilled for the gap again.
    """
    refill = max(0.0, now - at) * limits.rate / 60.0
    tokens = min(limits.burst, tokens + refill)
    if tokens >= cost:
        return tokens - cost, max(at, now)
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
# What one sender already has in one mailbox (a covering index: mail_messages_by_sender).
_FROM_SENDER = "SELECT count(*), coalesce(sum(size), 0) FROM mail_messages WHERE owner = {0} AND sender = {1}"


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


def _prior(row: Sequence[Any] | None, draft: MailDraft) -> MailSent | None:
    """The earlier send ``row`` (found by client_id) as this send's answer; None if there was none."""
    if row is None:
        return None
    id_, digest, recipients, at = row
    if digest != draft.digest:
        raise _reused(str(draft.client_id))
    return MailSent(int(id_), _strings.decode(recipients), float(at), duplicate=True)
