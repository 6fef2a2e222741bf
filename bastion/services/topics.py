"""Topics of the ``messages`` service: publish/subscribe, live or durable, across replicas.

Written with the public service API only; the ``Messages`` component
(bastion/services/messages.py) builds a ``Topics`` and lets it add its
methods to the one ``messages`` service: ``publish``, ``subscribe`` and
``topic_info``.

Theory of operation
-------------------

Names and access: bastion/services/topics_syntax.py (NATS-style names and
wildcards) and bastion/services/topics_hub.py (who may publish and
subscribe; the hub feeding subscribers).

Live and durable. A topic matching an entry of ``[messages.topics]
durable`` is *durable*: each publish is appended to the store's topic log
with the topic's next offset and committed before ``publish`` returns that
offset; retention (``keep`` messages, ``max_age`` seconds) trims the oldest.
Every other topic is *live*: its messages also pass through the log, so that
every process sharing the store delivers them, but without an offset, and
they are removed after ``relay_seconds`` -- a subscriber gets a live message
only if it was subscribed when the message was published (at most once).

Resuming. ``subscribe(topic, from_offset=N)`` on one durable topic joins the
hub at its position P (every message up to P has been delivered to the
subscribers before it), replays the topic's log from offset N up to P, then
takes live messages (all after P) from its buffer, skipping any offset it
has already yielded: replay and live neither overlap nor leave a gap.

Retention runs on the leader (``leader=True``; with several workers, worker
0): every ``sweep_interval`` seconds it trims each durable topic to its
``keep``/``max_age`` and removes live messages older than ``relay_seconds``.
Each page of ``HEADS_PAGE`` topics is trimmed in one transaction removing at
most ``SWEEP_PAGE`` messages (more: another), not one per topic. Trims by
several replicas at once are safe (each is one transaction). A topic
retention emptied is forgotten at the next sweep: its head row goes (the
store keeps its offsets by bucket, so a topic used again continues above
them). Each user (admins aside) may have created at most
``max_durable_topics_per_user`` durable topics that are still kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from bastion.config import DurableTopic, TopicsConfig
from bastion.exceptions import CallError, InvalidArgument, OutOfRange, PermissionDenied, ResourceExhausted, Unavailable
from bastion.security.principal import ADMIN_ROLE, Principal
from bastion.security.ratelimit_shared import Holds, LocalHolds
from bastion.service import Context, Service
from bastion.services import Background, every
from bastion.services.topics_hub import Hub, Subscriber, TopicAccess, TopicEvent, event
from bastion.services.topics_syntax import is_wildcard, matches, pattern_error, personal_pattern, topic_error
from bastion.store.topics import TooManyTopics, TopicStore, TrimPlan

__all__ = ["TopicEvent", "TopicInfo", "Topics"]

log = logging.getLogger("bastion.topics")

REPLAY_PAGE = 256  # messages read at once when replaying a durable topic
# Bytes of messages (payloads and headers) read at once when replaying, beyond the first: a replay parked
# mid-page by a client that stops reading keeps its page, and 256 full-size payloads were 64 MiB.
REPLAY_BYTES = 1024 * 1024
SWEEP_PAGE = 1000  # messages removed per transaction by retention
HEADS_PAGE = 500  # durable topics the sweep reads at once
REMEMBERED = 1024  # durable topics whose offsets one pattern's stream remembers (for resume_offsets)
RESUME_BYTES = 128 * 1024  # of topic names in one ending's resume_offsets (well within a default 1 MiB frame)
MAX_OFFSET = 2**63 - 1  # the largest offset a topic can hold (the stores' 64-bit integers); clients may send larger


class TopicInfo(msgspec.Struct, frozen=True):
    """What ``topic_info`` tells: whether the topic is durable, its kept offsets, and the caller's access.

    ``first_offset .. last_offset`` are kept (none when first > last; both 0:
    nothing was ever published to it durably).
    """

    topic: str
    durable: bool
    first_offset: int
    last_offset: int
    may_publish: bool
    may_subscribe: bool


class Topics:
    """Publish/subscribe over ``store`` for the ``messages`` service (a ``Component``)."""

    def __init__(
        self,
        store: TopicStore,
        config: TopicsConfig | None = None,
        *,
        leader: bool = True,
        relay: bool = True,
        subscribe_holds: Holds | None = None,
    ) -> None:
        """``leader``: run the retention sweep here (with several workers, only worker 0 does).
        ``subscribe_holds``: count each user's subscriptions across the workers of one server (else: in
        this process).

        ``relay``: other processes share the store (workers on one SQLite
        file, replicas on PostgreSQL), so live messages go through its log to
        reach their subscribers. Without it (one process alone on its store,
        what ``bastion serve`` runs by default) a live message goes straight to
        this process's subscribers and the store never sees it.
        """
        self.store = store
        self.config = config or TopicsConfig()
        self.leader = leader
        self.relay = relay
        self.subscribe_holds: Holds = LocalHolds() if subscribe_holds is None else subscribe_holds
        self.access = TopicAccess(self.config.rules)
        self.hub = Hub(store)
        self._background = Background()

    def declare(self, service: Service) -> None:
        """Add ``publish``, ``subscribe`` and ``topic_info`` to ``service``."""
        _declare(self, service)

    async def start(self) -> None:
        # Replicas sharing a PostgreSQL store hear of each other's publishes at once; otherwise the poll finds them.
        work = [("bastion-topics-feed", self.hub.run)]
        if self.leader:
            work.append(("bastion-topics-sweep", self._sweep_forever))
        await self._background.start(self.store, "topics", self.hub.nudge, work)

    async def aclose(self) -> None:
        await self._background.stop()
        self.hub.end_all(Unavailable, "the messages service is stopping")

    def durable_for(self, topic: str) -> DurableTopic | None:
        """The retention of ``topic`` if it is durable (the first matching ``durable`` entry), else None."""
        return next((d for d in self.config.durable if matches(d.pattern, topic)), None)

    async def sweep(self, now: float | None = None) -> int:
        """Apply retention once: trim durable topics, remove old live messages; how many messages went."""
        now = time.time() if now is None else now
        total = await self._drain(lambda: self.store.topics_trim_live(now - self.config.relay_seconds, SWEEP_PAGE))
        after = ""
        while True:
            heads = await self.store.topics_heads(after, HEADS_PAGE)
            # Emptied by retention (at an earlier sweep): forgotten, their offsets kept by bucket (see the store).
            empty = [h.topic for h in heads if h.first_offset > h.last_offset]
            if empty:
                await self.store.topics_forget(empty)
            plans = []
            for head in heads:
                durable = self.durable_for(head.topic)
                if durable is None or head.first_offset > head.last_offset:
                    continue  # no longer declared durable: kept as it is until it is again (or just forgotten)
                upto = head.last_offset - durable.keep if durable.keep else 0
                older = now - durable.max_age if durable.max_age else None
                if upto >= head.first_offset or older is not None:
                    plans.append(TrimPlan(head.topic, head.first_offset, upto, older))
            while plans:  # a page of topics in one transaction, at most SWEEP_PAGE messages removed by each
                removed, plans = await self.store.topics_trim_many(plans, SWEEP_PAGE)
                total += removed
            if len(heads) < HEADS_PAGE:
                return total
            after = heads[-1].topic

    async def forget_user(self, name: str, heir: str | None = None) -> int:
        """``auth.delete_user``'s step for topics: empty the deleted user's durable topics in their personal
        space ``user.<name>.>``, whoever the ``heir`` (a space is its owner's, as a mailbox is); how many
        messages went. A user given the name later owns the space: it must not replay what the deleted
        one kept there. Trimmed as retention trims (subscribers lose nothing unannounced) and forgotten:
        the offsets are kept, so a topic used again goes on above them.

        The durable topics they created elsewhere stay as they are (messages and all, for whoever the rules
        let publish and read there), but are recorded as the heir's, counted against the heir's
        ``max_durable_topics_per_user`` (not checked: the heir may end up over it, as with files), or as
        nobody's: a user given the name later starts with none to their count."""
        personal = personal_pattern(name)
        total = await self._empty_space(personal[:-1]) if personal is not None else 0
        await self.store.topics_pass_on(name, heir)
        return total

    async def _empty_space(self, prefix: str) -> int:
        """Empty and forget the durable topics named ``prefix``... (``"user.<name>."``: they sort together,
        right after it, bytewise); how many messages went."""
        total, after = 0, prefix
        while True:
            heads = await self.store.topics_heads(after, HEADS_PAGE)
            mine = [h for h in heads if h.topic.startswith(prefix)]
            plans = [TrimPlan(h.topic, h.first_offset, h.last_offset, None) for h in mine]
            plans = [p for p in plans if p.first_offset <= p.upto_offset]
            while plans:
                removed, plans = await self.store.topics_trim_many(plans, SWEEP_PAGE)
                total += removed
            if mine:
                await self.store.topics_forget([h.topic for h in mine])
            if len(mine) < len(heads) or len(heads) < HEADS_PAGE:
                return total
            after = heads[-1].topic

    @staticmethod
    async def _drain(step: Callable[[], Awaitable[int]]) -> int:
        total = 0
        while True:
            n = await step()
            total += n
            if n < SWEEP_PAGE:
                return total

    async def _sweep_forever(self) -> None:
        await every(self.config.sweep_interval, self.sweep, log, "topics sweep")

    # -- checks shared by the methods ------------------------------------------------------

    def check_topic(self, topic: str) -> None:
        error = topic_error(topic, self.config.max_topic_length)
        if error is not None:
            raise InvalidArgument(error)

    def check_headers(self, headers: dict[str, str]) -> None:
        cfg = self.config
        if len(headers) > cfg.max_headers:
            raise InvalidArgument(f"{len(headers)} headers, over messages.topics.max_headers ({cfg.max_headers})")
        size = sum(len(k.encode(errors="replace")) + len(v.encode(errors="replace")) for k, v in headers.items())
        if size > cfg.max_header_bytes:
            raise InvalidArgument(
                f"headers are {size} bytes, over messages.topics.max_header_bytes ({cfg.max_header_bytes})"
            )
        if any(not k for k in headers):
            raise InvalidArgument("a header name must not be empty")

    def encode_payload(self, payload: Any) -> bytes:
        encoded = msgspec.msgpack.encode(payload)
        if len(encoded) > self.config.max_payload_bytes:
            raise InvalidArgument(
                f"payload is {len(encoded)} bytes, over messages.topics.max_payload_bytes "
                f"({self.config.max_payload_bytes})"
            )
        return encoded


# -- subscribing ----------------------------------------------------------------------------


class _Subscription:
    """One ``subscribe`` call: its checks, its replay, and what it has delivered (for the lagged error)."""

    def __init__(self, topics: Topics, ctx: Context, pattern: str, from_offset: int | None) -> None:
        self.topics, self.pattern, self.from_offset = topics, pattern, from_offset
        self.single = not is_wildcard(pattern)
        self.last: dict[str, int] = {}  # durable topic -> the last offset yielded (or skipped as already seen)
        if from_offset is not None and self.single:  # nothing yielded yet: a drain before the replay begins
            self.last[pattern] = from_offset - 1  # resumes from from_offset, not past what is still to replay
        self.forgot = False  # a durable topic was delivered that ``last`` had no room left for
        self.in_hand: tuple[str, int | None] | None = None  # (topic, offset) of the item being yielded
        cfg = topics.config
        self.subscriber = Subscriber(
            pattern, ctx.principal, topics.access, cfg.subscriber_buffer, cfg.subscriber_buffer_bytes
        )

    def check(self) -> None:
        topics, cfg, principal = self.topics, self.topics.config, self.subscriber.principal
        error = pattern_error(self.pattern, cfg.max_topic_length)
        if error is not None:
            raise InvalidArgument(error)
        if self.from_offset is not None:
            if not 0 <= self.from_offset <= MAX_OFFSET:
                raise InvalidArgument(f"from_offset must be an offset (1 to {MAX_OFFSET}), or 0 for the earliest kept")
            if not self.single or topics.durable_for(self.pattern) is None:
                raise InvalidArgument("from_offset needs one durable topic as the pattern (no wildcards)")
        if not self.readable(principal):
            raise PermissionDenied(f"no subscribe access to {self.pattern!r}")
        if len(topics.hub) >= cfg.max_subscribers:
            raise ResourceExhausted(
                f"{cfg.max_subscribers} subscriptions are open on this server (messages.topics.max_subscribers)"
            )
        holds, limit = topics.subscribe_holds, cfg.max_subscribers_per_user
        mine = holds.acquire(principal.name, limit)
        if mine >= limit:
            raise ResourceExhausted(
                f"you have {mine} subscriptions open on this server (messages.topics.max_subscribers_per_user); "
                "close some first"
            )

    def readable(self, principal: Principal) -> bool:
        """Whether ``principal`` may subscribe to the pattern (for a wildcard: to some topic it matches)."""
        access = self.topics.access
        if self.single:
            return access.may_subscribe(principal, self.pattern)
        return access.may_subscribe_some(principal, self.pattern)

    def regranted(self, principal: Principal) -> None:
        """The connection's principal was revalidated with other roles: deliver only what it may read now,
        or end the stream PERMISSION_DENIED (dropping what was buffered) if that is nothing."""
        subscriber = self.subscriber
        subscriber.reauthorize(principal)
        self.topics.hub.reroute()
        if not self.readable(principal) and subscriber.ended is None:
            subscriber.buffer.clear()
            subscriber.bytes = 0
            subscriber.end(PermissionDenied, f"no subscribe access to {self.pattern!r} any more")

    async def replay(self, upto: int) -> AsyncIterator[TopicEvent]:
        """The durable topic's messages from ``from_offset`` with seq up to ``upto``, checked for trimming."""
        store, topic = self.topics.store, self.pattern
        assert self.from_offset is not None
        head = await store.topics_head(topic)
        first = head.first_offset if head is not None else 1
        following = head.last_offset + 1 if head is not None else 1  # the offset the next publish gets
        if self.from_offset > following:
            # As Kafka's OFFSET_OUT_OF_RANGE (with auto.offset.reset=none): an offset the topic has not
            # reached yet is a client's mistake (a stale or foreign offset), not a wait for it.
            raise OutOfRange(
                f"offset {self.from_offset} of {topic!r} is past its end: the next offset is {following} "
                f"(the earliest kept is {first})",
                details={"earliest": first, "next": following},
            )
        expected = first if self.from_offset == 0 else self.from_offset
        self.last[topic] = expected - 1
        while True:
            if expected < first:
                raise OutOfRange(
                    f"offset {expected} of {topic!r} is no longer kept; the earliest kept is {first}",
                    details={"earliest": first},
                )
            page, more = await store.topics_replay_page(topic, expected, upto, REPLAY_PAGE, REPLAY_BYTES)
            if page and page[0].offset != expected:  # trimmed between our reads
                first = page[0].offset or expected
                continue
            ended = self.subscriber.ended
            if ended is not None and ended[0] is PermissionDenied:
                raise self.ending(*ended)
            for message in page:
                offset = message.offset or 0
                self.last[topic], expected = offset, offset + 1
                self.in_hand = (topic, offset)
                yield event(message)
                self.in_hand = None
            if not more:
                if not page:
                    head = await store.topics_head(topic)
                    if head is not None and head.first_offset > expected:
                        first = head.first_offset
                        continue
                return

    def fresh(self, topic: str, offset: int | None) -> bool:
        """Whether a live message is new to this stream (a durable offset not yielded yet).

        A pattern's stream remembers at most ``REMEMBERED`` topics (its memory and its ending's
        ``resume_offsets`` stay bounded, whatever number of topics it delivers): only a replayed
        single topic needs ``last`` to skip what it has yielded; the others only report it."""
        if offset is None:
            return True
        last = self.last.get(topic)
        if last is not None and offset <= last:
            return False
        if last is not None or len(self.last) < REMEMBERED:
            self.last[topic] = offset
        else:
            self.forgot = True
        return True

    def _resume(self) -> tuple[dict[str, int], bool]:
        """Where to resume each durable topic (the first dropped offset, else the one after the last
        yielded): at most ``REMEMBERED`` topics and ``RESUME_BYTES`` of names, so the ending fits a frame;
        and whether some topic was left out."""
        resume: dict[str, int] = {}
        room = RESUME_BYTES
        first, last = self.subscriber.first_dropped, self.last
        # The first offset not delivered: what was dropped first, unless some before it were not delivered
        # either (a replay not finished, or messages still buffered or in hand at a drain).
        candidates = [
            *((t, min(o, last[t] + 1) if t in last else o) for t, o in first.items()),
            *((t, o + 1) for t, o in last.items() if t not in first),
        ]
        for topic, offset in candidates:
            room -= len(topic) + 10
            if len(resume) >= REMEMBERED or room < 0:
                return resume, True
            resume[topic] = offset
        return resume, self.forgot or self.subscriber.unrecorded

    def drained(self, unsent: bool) -> CallError:
        """The ending at a drain (``Context.end_at_drain``), which ends the stream at once: the messages
        not sent to the client -- buffered, or in hand (``unsent``) -- are dropped, counted and resumed from.
        As the lagged error, with UNAVAILABLE (the server adds its retry-after)."""
        sub = self.subscriber
        held = [(m.topic, m.offset) for m, _ in sub.buffer if m.offset is None or m.offset > self.last.get(m.topic, 0)]
        if unsent and self.in_hand is not None:
            held.insert(0, self.in_hand)
        first: dict[str, int] = {}
        for topic, offset in held:
            if offset is not None and topic not in first:
                first[topic] = offset
        for topic, offset in sub.first_dropped.items():
            first.setdefault(topic, offset)
        sub.first_dropped = first
        sub.dropped += len(held)
        sub.buffer.clear()
        sub.bytes = 0
        return self.ending(Unavailable, "server is draining: resume this stream on another server")

    def ending(self, kind: type[CallError], why: str) -> CallError:
        """The error that ends the stream: ``why``, what was dropped, and where to resume each durable topic."""
        sub = self.subscriber
        resume, partial = self._resume()
        details: dict[str, Any] = {"dropped": sub.dropped}
        message = f"subscription to {self.pattern!r} ended ({why})"
        if sub.dropped:
            message += f": {sub.dropped} {'message was' if sub.dropped == 1 else 'messages were'} dropped"
        if self.single and self.pattern in resume:
            details["resume_from"] = resume[self.pattern]
            message += f"; subscribe again with from_offset={resume[self.pattern]} to continue"
        elif resume:
            details["resume_offsets"] = resume
            message += "; resume each durable topic from its offset in resume_offsets"
        if partial:
            details["resume_offsets_partial"] = True
            message += f" (it names at most {REMEMBERED} topics: not every one this stream delivered)"
        return kind(message, details=details)


def _declare(topics: Topics, service: Service) -> None:
    store, cfg = topics.store, topics.config

    @service.method
    async def publish(ctx: Context, topic: str, payload: Any, headers: dict[str, str] | None = None) -> int | None:
        """Publish ``payload`` (bytes or any structured value) to ``topic``; its offset if the topic is
        durable (stored before this returns), None if it is live.

        Subscribers see the caller as the publisher: it cannot be set by the caller.
        """
        topics.check_topic(topic)
        if not topics.access.may_publish(ctx.principal, topic):
            raise PermissionDenied(f"no publish access to topic {topic!r}")
        headers = headers or {}
        topics.check_headers(headers)
        encoded = topics.encode_payload(payload)
        durable = topics.durable_for(topic) is not None
        if not durable and not topics.relay:  # nobody else shares the store: straight to our subscribers
            topics.hub.deliver_live(topic, ctx.principal.name, encoded, headers, time.time())
            return None
        limit = None if ADMIN_ROLE in ctx.principal.roles else cfg.max_durable_topics_per_user
        try:
            seq, offset = await store.topics_append(
                topic, durable, ctx.principal.name, encoded, headers, time.time(), limit
            )
        except TooManyTopics as exc:
            raise ResourceExhausted(
                f"you have created {exc.count} durable topics that are still kept "
                "(messages.topics.max_durable_topics_per_user); publishing to a new one would be another",
                details={"limit": cfg.max_durable_topics_per_user},
            ) from None
        topics.hub.appended(seq)
        return offset

    @service.method(resumable=True)
    async def subscribe(ctx: Context, pattern: str, from_offset: int | None = None) -> AsyncIterator[TopicEvent]:
        """A stream of the messages published to topics matching ``pattern`` (wildcards ``*`` and ``>``)
        that the caller may read: first a "start" item, then "message" items.

        ``from_offset`` (one durable topic only): replay from that offset (0:
        the earliest kept) before going live, with nothing missed or repeated
        at the seam; OUT_OF_RANGE if it is no longer kept, or if it is past the
        topic's next offset (``details``: ``earliest`` kept, ``next``). A subscriber that
        falls ``subscriber_buffer`` messages behind is ended with
        RESOURCE_EXHAUSTED: ``dropped`` counts what it missed, and
        ``resume_from`` (one topic) or ``resume_offsets`` (a pattern) say where
        to resume durable topics. A drain ends it at once with UNAVAILABLE and
        the same details, what was buffered for it counted as dropped.
        """
        sub = _Subscription(topics, ctx, pattern, from_offset)
        sub.check()  # the last check takes a hold in topics.subscribe_holds, if any: given back below
        subscriber, holds, name = sub.subscriber, topics.subscribe_holds, ctx.principal.name
        try:
            start = await topics.hub.join(subscriber)
        except BaseException:
            holds.release(name)
            raise
        unwatch = ctx.watch_principal(sub.regranted)
        unending = ctx.end_at_drain(sub.drained)
        try:
            yield TopicEvent("start", pattern)
            if from_offset is not None:
                async for item in sub.replay(start):
                    yield item
            while True:
                taken = subscriber.take()
                if taken is not None:
                    message, item = taken
                    if sub.fresh(message.topic, message.offset):
                        sub.in_hand = (message.topic, message.offset)
                        yield item
                        sub.in_hand = None
                    continue
                if subscriber.ended is not None:
                    raise sub.ending(*subscriber.ended)
                if subscriber.overflowed:
                    raise sub.ending(
                        ResourceExhausted,
                        f"it fell behind: more than {cfg.subscriber_buffer} messages or "
                        f"{cfg.subscriber_buffer_bytes} bytes waited for it",
                    )
                await subscriber.wakeup.wait()
                subscriber.wakeup.clear()
        finally:
            unending()
            unwatch()
            topics.hub.leave(subscriber)
            holds.release(name)

    @service.method(idempotent=True)
    async def topic_info(ctx: Context, topic: str) -> TopicInfo:
        """Whether ``topic`` is durable, the offsets it keeps, and whether the caller may publish and subscribe."""
        topics.check_topic(topic)
        may_publish = topics.access.may_publish(ctx.principal, topic)
        may_subscribe = topics.access.may_subscribe(ctx.principal, topic)
        if not (may_publish or may_subscribe):
            raise PermissionDenied(f"no access to topic {topic!r}")
        durable = topics.durable_for(topic) is not None
        head = await store.topics_head(topic) if durable and may_subscribe else None
        first, last = (head.first_offset, head.last_offset) if head is not None else (0, 0)
        return TopicInfo(topic, durable, first, last, may_publish, may_subscribe)
