"""The mailboxes of the ``messages`` service: store-and-forward messages between users, as email does.

Written with the public service API only; storage is the ``MailStore``
interface (bastion/store/mail.py explains ids, atomic sends, retries,
quotas and the sender's token bucket).

Theory of operation
-------------------

Sending. ``send`` checks every argument against the ``[messages]`` limits,
expands ``role:NAME`` recipients to the role's users at that moment (who
may send to a role, and what they are told of its members, is
mail_recipients.py's part), resolves attachments to files the sender owns, then stores the whole send
in one transaction: either every recipient's mailbox gets its copy or none
does, and the call returns only once that is committed. The sender is
always the caller's principal; no argument can set it (a header named
``from`` is kept as an ordinary header and never shown as the sender).
Attachments are then shared read-only with each recipient (a recipient who
already has a share keeps it); a retried send repeats the sharing, so a
crash between the commit and the shares heals on retry.

Access. Every method acts on the caller's own mailbox only, named by the
principal -- never by an argument -- and message ids are per mailbox, so
no call can even name another user's message: an id that is not in the
caller's mailbox is NOT_FOUND, with the same message whether it was never
there, was deleted, or exists in someone else's mailbox.

Watching. ``watch`` tails the caller's mailbox by id. Ids grow with commit
order and are never reused (see the store), so "every message with an id
above the last one yielded" is exactly the new mail, and a watch resumed
with ``from_id`` misses nothing. A watcher keeps no buffer: when woken it
reads the next page from the store itself, so a slow watcher holds little
memory and never holds up a sender. A page is bounded in bytes as well as
in messages (``WATCH_PAGE_BYTES``, or one message when that alone is
larger): a watch parked mid-page by a client that stopped reading keeps
its page. A user's watches are counted against
``max_watchers_per_user`` across the workers of one server (``watch_holds``,
in the table they share); ``max_watchers`` bounds each process. It is woken three ways: a send in
this process nudges the recipients' watchers directly; on PostgreSQL the
mail trigger's ``NOTIFY`` (``Store.listen("mail")``) makes the hub (mail_watch.py) poll at
once; and while anyone watches, the hub polls the watched mailboxes' heads
(one query for all of them) every ``POLL_INTERVAL``, which catches mail
from other worker processes on one SQLite file and lost notifications.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import msgspec

from bastion.config import MessagesConfig
from bastion.exceptions import (
    CallError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from bastion.security.principal import Principal
from bastion.security.ratelimit_shared import Holds, LocalHolds
from bastion.service import Context, Service
from bastion.services import Background, every
from bastion.services.files import check_name
from bastion.services.mail_recipients import Recipients, resolve
from bastion.services.mail_watch import POLL_INTERVAL as POLL_INTERVAL  # re-exported: importable as before
from bastion.services.mail_watch import Hub, Watcher
from bastion.store.base import Store
from bastion.store.files import FileShare
from bastion.store.mail import MailAttachment, MailDraft, MailItem, MailLimits

__all__ = ["Attachment", "InboxPage", "MailEvent", "MailboxInfo", "Mailboxes", "Message", "Sent", "Summary"]

log = logging.getLogger("bastion.messages")

WATCH_PAGE = 64  # most messages a watcher reads from the store at once
# Most bytes of messages (their quota size) one watcher holds at once, beyond the first: a watch parked
# mid-page by a client that stops reading keeps its page, and 64 full-size bodies each were 16 MiB.
WATCH_PAGE_BYTES = 256 * 1024
# Used with fullmatch: "$" would also match before a final newline ("x-kind\n").
_HEADER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_CLIENT_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces
_MAX_DEPTH = 32  # nesting of a structured body
MAX_ID = 2**63 - 1  # the largest id a mailbox can hold (the stores' 64-bit integers); clients may send larger


# -- what the methods answer ----------------------------------------------------------------


class Attachment(msgspec.Struct, frozen=True):
    """A file of the ``files`` service attached by reference; the recipient may download it by ``file_id``."""

    file_id: str
    name: str
    owner: str
    size: int
    sha256: str


class Message(msgspec.Struct, frozen=True):
    """One message of the caller's mailbox.

    ``id``: its id in this mailbox; ``send_id``: the send's id, the same in
    every recipient's copy; ``sender``: who sent it (the "from", set by the
    server); ``to``: the addresses as the sender wrote them; ``body``: the
    bytes, or empty when the body is structured (``data``, None otherwise).
    """

    id: int
    send_id: int
    sender: str
    to: list[str]
    subject: str
    body: bytes
    data: Any
    headers: dict[str, str]
    attachments: list[Attachment]
    size: int
    sent_at: float
    read: bool


class Summary(msgspec.Struct, frozen=True):
    """One line of the inbox: a message without its body, headers and attachment details."""

    id: int
    send_id: int
    sender: str
    to: list[str]
    subject: str
    size: int
    sent_at: float
    read: bool
    attachments: int


class InboxPage(msgspec.Struct, frozen=True):
    """One page of ``inbox``; ``next`` is the ``cursor`` of the following page (None: this was the last)."""

    messages: list[Summary]
    next: int | None


class Sent(msgspec.Struct, frozen=True):
    """A stored send: its id, the users it was delivered to, when; ``duplicate``: an earlier send's answer."""

    id: int
    recipients: list[str]
    sent_at: float
    duplicate: bool


class MailboxInfo(msgspec.Struct, frozen=True):
    """The caller's mailbox: unread and total messages, bytes held, and its quotas."""

    unread: int
    total: int
    bytes: int
    max_messages: int
    max_bytes: int


class MailEvent(msgspec.Struct, frozen=True):
    """One item of a ``watch`` stream: first "start" (``id``: the newest id in the mailbox then), then "mail"."""

    type: str
    id: int
    message: Message | None = None


def _message(item: MailItem) -> Message:
    body, data = (b"", msgspec.json.decode(item.body)) if item.body_kind == "json" else (item.body, None)
    attachments = [Attachment(a.file_id, a.name, a.owner, a.size, a.sha256) for a in item.attachments]
    return Message(
        item.id, item.send_id, item.sender, item.to, item.subject, body, data, item.headers, attachments,
        item.size, item.sent_at, item.read,
    )  # fmt: skip


def _summary(item: MailItem) -> Summary:
    return Summary(
        item.id, item.send_id, item.sender, item.to, item.subject, item.size, item.sent_at, item.read,
        len(item.attachments),
    )  # fmt: skip


def _not_found(id_: int) -> NotFound:
    return NotFound(f"no message {id_} in your mailbox")  # the same words as the store's


# -- argument checks ------------------------------------------------------------------------


def _text(value: str, what: str, limit: int, key: str) -> int:
    """The UTF-8 size of ``value``, once it is valid text within ``limit`` bytes (NUL: refused by refuse_nul)."""
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} must be valid text") from None
    if size > limit:
        raise InvalidArgument(f"{what} is {size} bytes, over {key} ({limit})")
    return size


def _check_data(value: Any, depth: int = 0) -> None:
    """A structured body is JSON-like: null, booleans, numbers, text, lists and objects with text keys."""
    if depth > _MAX_DEPTH:
        raise InvalidArgument(f"data: nested more than {_MAX_DEPTH} levels deep")
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgument("data: numbers must be finite")
    elif isinstance(value, list):
        for item in value:
            _check_data(item, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgument("data: object keys must be text")
            _check_data(item, depth + 1)
    else:
        raise InvalidArgument(f"data: {type(value).__name__} is not JSON-like (send bytes as body instead)")


def _body(cfg: MessagesConfig, body: bytes, data: Any) -> tuple[bytes, str]:
    """The stored body and its kind ("bytes" or "json")."""
    kind = "bytes"
    if data is not None:
        if body:
            raise InvalidArgument("give the body as bytes (body) or structured (data), not both")
        _check_data(data)
        body, kind = msgspec.json.encode(data), "json"
    if len(body) > cfg.max_body_bytes:
        raise InvalidArgument(f"the body is {len(body)} bytes, over messages.max_body_bytes ({cfg.max_body_bytes})")
    return body, kind


def _headers(cfg: MessagesConfig, headers: dict[str, str]) -> int:
    """The headers' size, once they are within limits."""
    if len(headers) > cfg.max_headers:
        raise InvalidArgument(f"{len(headers)} headers, over messages.max_headers ({cfg.max_headers})")
    size = 0
    for name, value in headers.items():
        if not _HEADER.fullmatch(name):
            raise InvalidArgument(f"header name {name!r}: 1-64 letters, digits, '_', '.' or '-'")
        size += len(name) + _text(value, f"header {name!r}", cfg.max_header_bytes, "messages.max_header_bytes")
    if size > cfg.max_header_bytes:
        raise InvalidArgument(f"the headers are {size} bytes, over messages.max_header_bytes ({cfg.max_header_bytes})")
    return size


def _digest(*parts: Any) -> str:
    return hashlib.sha256(msgspec.msgpack.encode(parts)).hexdigest()


# -- the component --------------------------------------------------------------------------


class Mailboxes:
    """The mailbox methods of ``messages``, their watch hub and client_id sweep (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        config: MessagesConfig | None = None,
        *,
        leader: bool = True,
        watch_holds: Holds | None = None,
    ) -> None:
        """``leader``: run the sweep here (with several workers, only worker 0 does). ``watch_holds``: count
        each user's watches across the workers of one server (else: in this process)."""
        self.store = store
        self.config = config or MessagesConfig()
        self.leader = leader
        self.watch_holds: Holds = LocalHolds() if watch_holds is None else watch_holds
        self.hub = Hub(store)
        cfg, share = self.config, self.config.mailbox_sender_share
        self.limits = MailLimits(
            cfg.mailbox_messages, cfg.mailbox_bytes, cfg.send_rate, cfg.send_burst,
            0 if share >= 1 else max(1, int(cfg.mailbox_messages * share)),
            0 if share >= 1 else max(1, int(cfg.mailbox_bytes * share)),
        )  # fmt: skip
        self._background = Background()

    async def start(self) -> None:
        work = [("bastion-mail-watch-poll", self.hub.run)]
        if self.leader:
            work.append(("bastion-mail-sweep", self._sweep_forever))
        await self._background.start(self.store, "mail", self.hub.poke, work)

    async def aclose(self) -> None:
        await self._background.stop()
        self.hub.end_all(Unavailable("the messages service is stopping; watch again with from_id on a running server"))

    async def sweep(self, now: float | None = None) -> int:
        """Forget the client_ids of sends older than ``client_id_ttl`` once; how many."""
        now = time.time() if now is None else now
        return await self.store.mail_forget_sends(now - self.config.client_id_ttl)

    async def _sweep_forever(self) -> None:
        await every(self.config.sweep_interval, self.sweep, log, "mail sweep")

    # -- sending ----------------------------------------------------------------------------

    async def attachments(self, principal: Principal, names: list[str]) -> list[MailAttachment]:
        """The sender's own files named ``names`` (sharing a file is its owner's decision)."""
        if len(names) > self.config.max_attachments:
            raise InvalidArgument(
                f"{len(names)} attachments, over messages.max_attachments ({self.config.max_attachments})"
            )
        out: list[MailAttachment] = []
        for name in dict.fromkeys(names):
            record = await self.store.files_get_by_name(principal.name, check_name(name))
            if record is None:
                raise NotFound(f"attachments: you have no file {name!r}")
            out.append(MailAttachment(record.id, record.name, record.owner, record.size, record.sha256))
        return out

    async def share(self, attachments: list[MailAttachment], recipients: list[str], now: float) -> None:
        """Give each recipient a read share of each attachment, unless they can already read it."""
        for attachment in attachments:
            shares = await self.store.files_shares(attachment.file_id)
            holders = {s.grantee for s in shares if s.kind == "user"} | {attachment.owner}
            for user in recipients:
                if user in holders:
                    continue
                try:
                    await self.store.files_share(FileShare(attachment.file_id, "user", user, "read", now))
                except NotFound:
                    if await self.store.files_get(attachment.file_id) is not None:
                        continue  # the recipient's user was deleted meanwhile: no share to a name nobody holds
                    log.info("attachment %s was deleted before it could be shared", attachment.file_id)
                    break  # deleted since it was attached: nothing left to share

    async def send(
        self,
        principal: Principal,
        to: list[str],
        subject: str,
        body: bytes,
        data: Any,
        headers: dict[str, str],
        attachments: list[str],
        client_id: str | None,
    ) -> Sent:
        cfg = self.config
        if client_id is not None and not _CLIENT_ID.fullmatch(client_id):
            raise InvalidArgument("client_id: 1-128 printable ASCII characters without spaces")
        subject_size = _text(subject, "subject", cfg.max_subject_bytes, "messages.max_subject_bytes")
        stored, kind = _body(cfg, body, data)
        # Every copy stores the addresses: each once, as many as there may be recipients, and counted.
        to = list(dict.fromkeys(to))
        if len(to) > cfg.max_recipients:
            raise InvalidArgument(f"{len(to)} addresses, over messages.max_recipients ({cfg.max_recipients})")
        resolved = await resolve(self.store, cfg, principal, to)
        if attachments and resolved.limited:
            raise PermissionDenied(
                "attachments: only admins may attach files to a role:NAME send (each member would get a share "
                "of the file, and its shares show who they are)"
            )
        recipients = resolved.users
        size = len(stored) + subject_size + _headers(cfg, headers) + sum(len(address) for address in to)
        files = await self.attachments(principal, attachments)
        now = time.time()
        digest = _digest(to, subject, stored, kind, sorted(headers.items()), sorted(attachments))
        draft = MailDraft(
            principal.name, recipients, to, subject, stored, kind, dict(headers), files, size, now,
            client_id, digest,
        )  # fmt: skip
        try:
            sent = await self.store.mail_send(draft, self.limits)
        except ResourceExhausted as exc:
            raise resolved.conceal(_named(exc)) from None
        except NotFound:
            raise await self._which_missing(principal, resolved) from None
        if not sent.duplicate:
            self.hub.nudge(sent.recipients)
        await self.share(files, sent.recipients, now)
        return Sent(sent.id, resolved.shown(sent.recipients), sent.at, sent.duplicate)

    async def _which_missing(self, principal: Principal, recipients: Recipients) -> CallError:
        if await self.store.get_user(principal.name) is None:  # e.g. a client certificate with no user
            return PermissionDenied(f"sending mail needs a user account, and {principal.name!r} has none")
        for name in recipients.users:
            if not recipients.hidden(name) and await self.store.get_user(name) is None:
                return NotFound(f"to: no user {name!r}; nothing was sent")
        return NotFound("a recipient was deleted during the send; nothing was sent")

    # -- the mailbox ------------------------------------------------------------------------

    async def watch(
        self, principal: Principal, from_id: int | None, draining: Callable[[], bool] = lambda: False
    ) -> AsyncGenerator[MailEvent, None]:
        cfg = self.config
        if from_id is not None and not 1 <= from_id <= MAX_ID + 1:
            raise InvalidArgument(f"from_id must be a message id (1 to {MAX_ID + 1})")
        if len(self.hub) >= cfg.max_watchers:
            raise ResourceExhausted(
                f"{cfg.max_watchers} mailbox watches are open on this server (messages.max_watchers)"
            )
        holds, limit = self.watch_holds, cfg.max_watchers_per_user
        mine = holds.acquire(principal.name, limit)
        if mine >= limit:
            raise ResourceExhausted(
                f"you have {mine} mailbox watches open on this server (messages.max_watchers_per_user); close some"
            )
        # Joined before the first await, so that watches opened at once count each other against the limits.
        watcher = Watcher(principal.name, 0 if from_id is None else from_id - 1, draining)
        self.hub.join(watcher)
        try:
            head = (await self.store.mail_stats(principal.name)).last_id
            if from_id is None:
                watcher.last = head
            yield MailEvent("start", head)
            while True:
                watcher.wakeup.clear()  # before reading: mail committed after the read wakes us again
                page, more = await self._watch_page(principal.name, watcher.last)
                for item in page:
                    watcher.last = item.id
                    yield MailEvent("mail", item.id, _message(item))
                if watcher.ended is not None:
                    raise watcher.ended
                if not more:
                    await watcher.wakeup.wait()
        finally:
            self.hub.leave(watcher)
            holds.release(principal.name)

    async def _watch_page(self, owner: str, after: int) -> tuple[list[MailItem], bool]:
        """The next messages past ``after``, whole, within ``WATCH_PAGE_BYTES`` (at least one); and whether
        more may follow at once. Sizes are read first without bodies, so a page is bounded in bytes."""
        heads = await self.store.mail_list(
            owner, after, WATCH_PAGE, unread_only=False, newest_first=False, bodies=False
        )
        take, total = 0, 0
        for item in heads:
            total += item.size
            if take and total > WATCH_PAGE_BYTES:
                break
            take += 1
        if not take:
            return [], False
        page = await self.store.mail_list(owner, after, take, unread_only=False, newest_first=False, bodies=True)
        # Fewer than asked: messages were deleted meanwhile, and nothing follows them yet.
        return page, len(page) == take and (take < len(heads) or len(heads) == WATCH_PAGE)

    def declare(self, service: Service) -> None:
        """Add the mailbox methods to ``service``."""
        _declare(self, service)


def _named(exc: ResourceExhausted) -> ResourceExhausted:
    """The store's refusal, naming the setting that caused it."""
    limit = exc.details.get("limit")
    key = {
        "messages": "mailbox_messages", "bytes": "mailbox_bytes",
        "sender_messages": "mailbox_sender_share", "sender_bytes": "mailbox_sender_share",
    }.get(str(limit), "send_rate")  # fmt: skip
    return ResourceExhausted(f"{exc.message} (messages.{key})", details=exc.details, retry_after=exc.retry_after)


def _frame_budget(ctx: Context) -> int:
    """Bytes one answer may carry: half a frame, leaving room for framing."""
    return int(ctx.server.limits().get("max_frame", 1_048_576)) // 2


# -- the methods ----------------------------------------------------------------------------


def _declare(mail: Mailboxes, service: Service) -> None:
    store, cfg = mail.store, mail.config

    @service.method
    async def send(
        ctx: Context,
        to: list[str],
        subject: str = "",
        body: bytes = b"",
        data: Any = None,
        headers: dict[str, str] | None = None,
        attachments: list[str] | None = None,
        client_id: str | None = None,
    ) -> Sent:
        """Send a message to users and ``role:NAME`` groups; stored durably in every mailbox, or in none.

        The sender is you (there is no "from" argument). ``body`` is bytes,
        or ``data`` a structured (JSON-like) body. ``attachments`` names
        your files; each recipient gets a read share. A retry with the same
        ``client_id`` is stored once and answers the first send's result.
        """
        return await mail.send(ctx.principal, to, subject, body, data, headers or {}, attachments or [], client_id)

    @service.method(idempotent=True)
    async def inbox(
        ctx: Context,
        unread_only: bool = False,
        limit: int | None = None,
        cursor: int | None = None,
        oldest_first: bool = False,
    ) -> InboxPage:
        """Your messages without bodies, newest first (``oldest_first``: the other way), one page at a time.

        Pass a page's ``next`` as ``cursor`` for the following page. A page
        holds at most ``limit`` (default and maximum messages.max_page).
        """
        limit = cfg.max_page if limit is None else limit
        if not 0 < limit <= cfg.max_page:
            raise InvalidArgument(f"limit must be 1..{cfg.max_page} (messages.max_page)")
        if cursor is not None and cursor > MAX_ID:
            raise InvalidArgument("cursor must be the 'next' of a previous page")
        items = await store.mail_list(
            ctx.principal.name, cursor, limit + 1, unread_only=unread_only, newest_first=not oldest_first,
            bodies=False,
        )  # fmt: skip
        budget, page = _frame_budget(ctx), list[Summary]()
        for item in items[:limit]:
            budget -= 64 + len(item.subject) + sum(len(t) + 2 for t in item.to)
            if page and budget < 0:
                break
            page.append(_summary(item))
        return InboxPage(page, page[-1].id if len(page) < len(items) else None)

    @service.method(idempotent=True)
    async def read(ctx: Context, id: int) -> Message:
        """One of your messages, whole; marks it read. NOT_FOUND if your mailbox has no such id."""
        item = await store.mail_get(ctx.principal.name, id, mark_read=True) if 1 <= id <= MAX_ID else None
        if item is None:
            raise _not_found(id)
        return _message(item)

    @service.method(idempotent=True)
    async def mark(ctx: Context, ids: list[int], read: bool = True) -> int:
        """Mark messages read (or unread: ``read=false``); how many changed.

        All or none: NOT_FOUND names an id your mailbox does not hold.
        """
        _check_ids(ids, cfg)
        return await store.mail_mark(ctx.principal.name, ids, read)

    @service.method(idempotent=True)
    async def delete(ctx: Context, ids: list[int]) -> int:
        """Delete messages; how many. All or none: NOT_FOUND names an id your mailbox does not hold."""
        _check_ids(ids, cfg)
        return await store.mail_delete(ctx.principal.name, ids)

    @service.method(idempotent=True)
    async def unread(ctx: Context) -> MailboxInfo:
        """Your mailbox's unread and total messages, bytes held, and its quotas."""
        stats = await store.mail_stats(ctx.principal.name)
        return MailboxInfo(stats.unread, stats.count, stats.bytes, cfg.mailbox_messages, cfg.mailbox_bytes)

    @service.method
    async def watch(ctx: Context, from_id: int | None = None) -> AsyncIterator[MailEvent]:
        """A stream of your new mail: a "start" item, then a "mail" item per message, whole, in id order.

        With ``from_id``, messages from that id on are replayed first (pass
        the last id you saw plus one to resume without a gap).
        """
        async with contextlib.aclosing(mail.watch(ctx.principal, from_id, lambda: ctx.server.draining)) as events:
            async for event in events:
                yield event


def _check_ids(ids: list[int], cfg: MessagesConfig) -> None:
    if len(ids) > cfg.max_page:
        raise InvalidArgument(f"{len(ids)} ids in one call, over messages.max_page ({cfg.max_page})")
    for id_ in ids:
        if not 1 <= id_ <= MAX_ID:
            raise _not_found(id_)
