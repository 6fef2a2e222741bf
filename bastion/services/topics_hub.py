"""The topics fan-out: who may use which topic, and the hub that feeds this process's subscribers.

Theory of operation
-------------------

Access (``TopicAccess``). Admins may publish and subscribe to every topic;
every user may use their own space ``user.<name>.>``
(``topics_syntax.personal_pattern``); anything else needs a rule of
``[[messages.topics.rules]]`` whose pattern matches the topic and whose
``publish`` / ``subscribe`` list names the user ("user:NAME"), one of their
roles ("role:NAME") or everyone signed in ("*"). Rules only grant; there is
no deny. A subscription's pattern must overlap something the subscriber may
read, and each message is then checked against the subscriber's access
before it is buffered, so a wide pattern (``>``) delivers only the topics
the subscriber may read.

The hub (``Hub``). A publish appends to the store's topic log
(bastion/store/topics.py) and nudges the hub, whose single feeder task reads every message after the last one it
delivered, in commit order, and offers each to every subscriber of this
process. So subscribers see exactly what was committed, in order, whoever
published it: this process, a worker sharing the SQLite file (found by the
poll every ``POLL_INTERVAL`` while anyone subscribes), or a replica sharing
PostgreSQL (whose commit notifies ``Store.listen("topics")``, nudging the
hub within milliseconds). If the feed finds that durable messages it had
not read yet were trimmed, the subscribers of those topics (named by
``topic_heads.trimmed_seq``) cannot be served without a gap: each is ended
with the lagged error, naming where to resume; the others go on. One exception:
a live message published by a process alone on its store (``Topics(relay=
False)``) goes straight to its subscribers (``deliver_live``), never stored --
unless the feed has yet to deliver a message this process appended before
it: then it waits for the feed to get there, so that what one client
publishes arrives in the order it was published, live or durable.

Subscribers (``Subscriber``). Each has a bounded buffer (messages and
payload bytes); ``offer`` only appends, never waits, so a subscriber that
stops reading holds up neither publishers nor other subscribers. When its
buffer is full it *overflows*: it takes nothing more, counts what it misses
and remembers, per durable topic, the first offset it missed; its stream
yields what was buffered and then ends with RESOURCE_EXHAUSTED carrying
those offsets (``resume_from``) and the count (``dropped``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import msgspec

from bastion.config import TopicRule
from bastion.exceptions import CallError, ResourceExhausted
from bastion.security.principal import ADMIN_ROLE, Principal
from bastion.services import on_wakeup
from bastion.services.topics_syntax import matches, overlaps, personal_pattern
from bastion.store.topics import TopicMessage, TopicStore

__all__ = ["POLL_INTERVAL", "Hub", "Subscriber", "TopicAccess", "TopicEvent"]

log = logging.getLogger("bastion.topics")

POLL_INTERVAL = 0.25  # seconds between log polls while anyone subscribes (messages from other processes)
FEED_PAGE = 256  # messages the hub reads at once
_ACCESS_CACHE = 1024  # topics whose access one subscriber remembers
_FIRST_DROPPED = 1024  # durable topics whose first missed offset one subscriber remembers
_ROUTES = 4096  # topics whose subscribers the hub remembers
_ROUTE_ENTRIES = 1 << 18  # subscribers listed in all routes together (2 MiB; 4096 subscriptions on ">": 64 topics)
_HELD = 4096  # live messages held behind this process's undelivered appends
_TRIMMED_TOPICS = 256  # topics trimmed under the feed whose subscribers alone it ends (more: it ends all)


class TopicEvent(msgspec.Struct, frozen=True):
    """One item of a ``subscribe`` stream.

    ``type``: "start" (first item: from here on, messages are live) or
    "message". ``offset``: the message's offset in its durable topic (None:
    a live topic). ``publisher``: who published it, as authenticated by the
    server. ``time``: when it was published (UNIX seconds).
    """

    type: str
    topic: str = ""
    offset: int | None = None
    publisher: str = ""
    payload: Any = None
    headers: dict[str, str] = {}
    time: float = 0.0


_RAW = msgspec.msgpack.Decoder(msgspec.Raw)


def event(message: TopicMessage) -> TopicEvent:
    """The stream item of ``message``; DecodeError if its payload is not one whole MessagePack value.

    The payload stays encoded (``msgspec.Raw``, written into each subscriber's frames as it is): a
    buffered message then holds its encoded bytes -- what ``subscriber_buffer_bytes`` counts -- and
    not the Python objects they decode to, which can take many times the space (an empty map is
    one byte encoded, 64 decoded)."""
    payload = _RAW.decode(message.payload)
    return TopicEvent("message", message.topic, message.offset, message.publisher, payload, message.headers, message.at)


class TopicAccess:
    """Who may publish and subscribe to what (see the module docstring)."""

    def __init__(self, rules: list[TopicRule]) -> None:
        self._publish = [(r.pattern, frozenset(r.publish)) for r in rules if r.publish]
        self._subscribe = [(r.pattern, frozenset(r.subscribe)) for r in rules if r.subscribe]

    def may_publish(self, principal: Principal, topic: str) -> bool:
        return self._may(self._publish, principal, topic)

    def may_subscribe(self, principal: Principal, topic: str) -> bool:
        return self._may(self._subscribe, principal, topic)

    def may_subscribe_some(self, principal: Principal, pattern: str) -> bool:
        """Whether some topic matching ``pattern`` may be read by ``principal``."""
        if ADMIN_ROLE in principal.roles:
            return True
        personal = personal_pattern(principal.name)
        if personal is not None and overlaps(pattern, personal):
            return True
        names = _names(principal)
        return any(overlaps(pattern, p) for p, entries in self._subscribe if entries & names)

    def _may(self, rules: list[tuple[str, frozenset[str]]], principal: Principal, topic: str) -> bool:
        if ADMIN_ROLE in principal.roles:
            return True
        personal = personal_pattern(principal.name)
        if personal is not None and matches(personal, topic):
            return True
        names = _names(principal)
        return any(entries & names and matches(p, topic) for p, entries in rules)


def _names(principal: Principal) -> frozenset[str]:
    return frozenset({"*", f"user:{principal.name}", *(f"role:{role}" for role in principal.roles)})


class Subscriber:
    """One subscription's bounded buffer; ``offer`` never blocks."""

    def __init__(self, pattern: str, principal: Principal, access: TopicAccess, max_items: int, max_bytes: int) -> None:
        self.pattern, self.principal, self.access = pattern, principal, access
        self.owner = principal.name
        self.max_items, self.max_bytes = max_items, max_bytes
        self.buffer: deque[tuple[TopicMessage, TopicEvent]] = deque()
        self.bytes = 0
        self.overflowed = False
        self.dropped = 0
        self.first_dropped: dict[str, int] = {}  # durable topic -> the first offset not buffered
        self.unrecorded = False  # a durable message was dropped that first_dropped had no room left for
        # Set by the hub: the stream ends, after its buffer, with this error class and reason.
        self.ended: tuple[type[CallError], str] | None = None
        self.wakeup = asyncio.Event()
        self._readable: dict[str, bool] = {}

    def wants(self, message: TopicMessage) -> bool:
        return self.ended is None and self.reads(message.topic)

    def reads(self, topic: str) -> bool:
        """Whether ``topic`` is one this subscription delivers (it matches the pattern, and may be read)."""
        if not matches(self.pattern, topic):
            return False
        allowed = self._readable.get(topic)
        if allowed is None:
            if len(self._readable) >= _ACCESS_CACHE:
                self._readable.clear()
            allowed = self._readable[topic] = self.access.may_subscribe(self.principal, topic)
        return allowed

    def offer(self, message: TopicMessage, item: TopicEvent) -> None:
        size = len(message.payload)
        if not self.overflowed and (len(self.buffer) >= self.max_items or self.bytes + size > self.max_bytes):
            self.overflowed = True
        if self.overflowed:
            self.dropped += 1
            if message.offset is not None and message.topic not in self.first_dropped:
                if len(self.first_dropped) < _FIRST_DROPPED:
                    self.first_dropped[message.topic] = message.offset
                else:
                    self.unrecorded = True
        else:
            self.buffer.append((message, item))
            self.bytes += size
        self.wakeup.set()

    def take(self) -> tuple[TopicMessage, TopicEvent] | None:
        if not self.buffer:
            return None
        message, item = self.buffer.popleft()
        self.bytes -= len(message.payload)
        return message, item

    def end(self, kind: type[CallError], why: str) -> None:
        self.ended = (kind, why)
        self.wakeup.set()

    def reauthorize(self, principal: Principal) -> None:
        """From now on deliver what ``principal`` (the subscriber's, revalidated) may read -- including
        what is buffered: the messages of topics it may no longer read are dropped (not counted as
        ``dropped``: withheld, not missed), not delivered after the re-check."""
        self.principal = principal
        self._readable.clear()
        kept = deque(entry for entry in self.buffer if self.reads(entry[0].topic))
        if len(kept) < len(self.buffer):
            self.buffer = kept
            self.bytes = sum(len(message.payload) for message, _ in kept)


class Hub:
    """Tails the topic log and fans messages out to this process's subscribers (see the module docstring)."""

    def __init__(self, store: TopicStore) -> None:
        self._store = store
        self._subscribers: set[Subscriber] = set()
        self._position: int | None = None  # last seq delivered; None while nobody subscribes
        self._lock = asyncio.Lock()  # the feeder's read-and-deliver step vs. a subscriber joining
        self._nudged = asyncio.Event()
        #: Topic -> the subscribers that want it: matching each message against every
        #: subscriber's pattern and access once per topic, not once per message.
        self._routes: dict[str, list[Subscriber]] = {}
        self._routed = 0  # subscribers listed in all routes together
        self._appended = 0  # the last seq this process appended to the log
        #: Live messages published here while the feed had not yet delivered this process's
        #: earlier appends, each after the seq it must follow: a publisher's messages arrive in order.
        self._held: deque[tuple[int, TopicMessage]] = deque()
        #: Subscribers whose ``join`` waits (for the lock, or the log's position): they count against the limits.
        self._joining: list[Subscriber] = []

    def __len__(self) -> int:
        return len(self._subscribers) + len(self._joining)

    def nudge(self) -> None:
        """New messages may be in the log (a publish committed here, or a notification from elsewhere)."""
        if self._subscribers:
            self._nudged.set()

    def appended(self, seq: int) -> None:
        """This process committed message ``seq`` to the log: deliver it (and hold later live ones behind it)."""
        self._appended = max(self._appended, seq)
        self.nudge()

    async def join(self, subscriber: Subscriber) -> int:
        """Add ``subscriber``; the seq P after which messages reach it live.

        It counts (``len``, ``count``) from the call on, before the first await: subscriptions
        checked against the limits at once cannot all pass while each waits here."""
        self._joining.append(subscriber)
        try:
            async with self._lock:
                if self._position is None:
                    self._position = (await self._store.topics_position()).seq
                self._subscribers.add(subscriber)
                self._forget_routes()
                return self._position
        finally:
            self._joining.remove(subscriber)

    def leave(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)
        self._forget_routes()
        if not self._subscribers:
            self._position = None
            self._held.clear()

    def _forget_routes(self) -> None:
        self._routes.clear()
        self._routed = 0

    def reroute(self) -> None:
        """A subscriber's access changed: match topics to subscribers afresh."""
        self._forget_routes()

    def end_all(self, kind: type[CallError], why: str) -> None:
        for subscriber in list(self._subscribers):
            subscriber.end(kind, why)
        self._subscribers.clear()
        self._forget_routes()
        self._held.clear()
        self._position = None

    async def run(self) -> None:
        """The feeder: deliver every new message, in order, whenever nudged (or polled)."""
        await on_wakeup(self._nudged, POLL_INTERVAL, self._feed_all, log, "topics feed")

    async def _feed_all(self) -> None:
        while await self._feed_once():
            pass

    async def _feed_once(self) -> bool:
        """Deliver one page of messages; whether there may be more."""
        async with self._lock:
            if self._position is None or not self._subscribers:
                return False
            after = self._position
            messages, trimmed = await self._store.topics_feed(after, FEED_PAGE)
            if self._position is None:  # the last subscriber left meanwhile (leaving takes no lock)
                return False
            if trimmed > after and not await self._end_trimmed(after, trimmed):
                return False
            held = self._held
            for message in messages:
                try:
                    self._fan_out(message)
                except msgspec.DecodeError:  # not written by bastion: skip it, keep the feed alive
                    log.error("topics feed: message %d of %r is not valid; skipped", message.seq, message.topic)
                while held and held[0][0] <= message.seq:  # live ones published right after this one
                    self._fan_out(held.popleft()[1])
            if messages:
                self._position = messages[-1].seq
            while held and held[0][0] <= self._position:
                self._fan_out(held.popleft()[1])
            return len(messages) == FEED_PAGE

    async def _end_trimmed(self, after: int, trimmed: int) -> bool:
        """Durable messages after ``after`` were trimmed before this feed read them: end the subscribers of
        those topics (they cannot go on gaplessly); whether the others may go on (False: all were ended)."""
        lost, explained = await self._store.topics_trimmed(after, _TRIMMED_TOPICS)
        if self._position is None:
            return False
        if not lost or len(lost) >= _TRIMMED_TOPICS or explained < trimmed:
            # Too many topics to name, or trimmed by code that does not say which (or a head since removed).
            self.end_all(ResourceExhausted, "messages it had not delivered yet were trimmed by retention")
            return False
        for subscriber in self._subscribers:
            head = next((h for h in lost if subscriber.reads(h.topic)), None)
            if subscriber.ended is None and head is not None:
                subscriber.end(
                    ResourceExhausted,
                    f"messages of {head.topic!r} it had not delivered yet were trimmed by retention; "
                    f"the earliest kept is {head.first_offset}",
                )
        return True

    def deliver_live(self, topic: str, publisher: str, payload: bytes, headers: dict[str, str], at: float) -> None:
        """Offer a live message published here to this process's subscribers, bypassing the log
        (``Topics(relay=False)``: no other process shares the store)."""
        if not self._subscribers:
            return
        message = TopicMessage(0, topic, None, publisher, payload, headers, at)
        if self._position is not None and self._position < self._appended:  # the feed is behind our own appends
            self._held.append((self._appended, message))
            if len(self._held) <= _HELD:
                return
            message = self._held.popleft()[1]  # bounded: past _HELD, order yields to memory
        self._fan_out(message)

    def _fan_out(self, message: TopicMessage) -> None:
        """Offer ``message`` to every subscriber that wants it; DecodeError if its payload is not MessagePack."""
        route = self._routes.get(message.topic)
        if route is None:
            route = [s for s in self._subscribers if s.wants(message)]
            if len(self._routes) >= _ROUTES or self._routed + len(route) > _ROUTE_ENTRIES:
                self._forget_routes()  # bounded in topics and in the subscribers listed (wide patterns)
            if len(route) <= _ROUTE_ENTRIES:
                self._routes[message.topic] = route
                self._routed += len(route)
        item: TopicEvent | None = None
        for subscriber in route:
            if subscriber.ended is None:
                if item is None:
                    item = event(message)
                subscriber.offer(message, item)
