"""The built-in ``kv`` service: namespaced keys with versions, compare-and-swap, TTLs and watches.

Written with the public service API only; it reaches storage through the
``KVStore`` interface (bastion/store/kv.py explains revisions and the change
log).

Theory of operation
-------------------

Access. Every call names a namespace or defaults to the caller's personal one,
``~<name>``. Access is decided before any lookup, from the caller's identity
and the namespace's access lists only, and every refusal reads the same
("no access to namespace …"), so a refusal never tells whether a namespace or
key exists. Owners use their ``~name``; ``readers``/``writers`` of a shared
namespace ("user:NAME", "role:NAME") read / read and write; admins do all,
but write only to namespaces that exist (a shared one created, the ``~NAME``
of a user there is), so no key waits for a namespace or user of its name to
be created later.

Watches. A ``Hub`` (kv_watch.py) tails the store's change log and fans each
change out to the watchers in this process. Writers never feed watchers directly: after a
write commits, the service merely *nudges* the hub, whose single feeder task
reads every change after the last one it delivered, in revision order, and
offers each to every matching watcher. Because the feeder reads the durable
log, watchers see exactly the committed changes, in order, with no gap --
whoever wrote them (this process, the expiry sweep, another replica on a
shared PostgreSQL, or the auth service handing over a deleted user's keys).
Changes made by other processes sharing the store (replicas on PostgreSQL,
workers on one SQLite file) reach this feed two ways: on PostgreSQL a
``NOTIFY`` from the log's trigger (``Store.listen("kv")``) nudges it within
milliseconds of the other replica's commit, and on every backend a poll
every ``POLL_INTERVAL`` while anyone watches catches whatever a lost
notification (or SQLite, which has none) would miss.

A watcher joins at the hub's position P (every change up to P has been
delivered to the watchers before it). With ``from_version`` it first replays
the log from that revision up to P, then takes live changes (all after P)
from its buffer; it skips any revision it has already yielded, so replay and
live neither overlap nor leave a gap. Each watcher's buffer is bounded
(``watch_buffer`` changes, ``watch_buffer_bytes`` of values): the feeder
only appends, never waits, so a slow watcher cannot hold up writers or other
watchers. When a buffer overflows, that watcher stops receiving; its stream
yields what it had and then ends with RESOURCE_EXHAUSTED carrying
``resume_from`` (the version to pass as ``from_version`` to continue).

Quotas. Each namespace may hold ``kv.quota_keys`` keys and ``kv.quota_bytes``
bytes (keys, values and content types); a put or put_many that would take it
past either is refused RESOURCE_EXHAUSTED and writes nothing (the store
checks, in the write's own transaction: bastion/store/kv.py). Deletes and
expiry always go through, so a full namespace is emptied the usual way.
``usage`` tells a namespace's reader where it stands.

Expiry. ``KV.start`` runs a sweep every ``sweep_interval`` seconds: it
deletes expired keys (each logged as a ``delete``, so watchers see it) and
trims the log to the newest ``history`` changes, and to at most
``history_bytes`` of them (kv_log.py). Expired keys are invisible
to reads at once, whether or not the sweep has run.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import AsyncIterator

import msgspec

from bastion.config import KVConfig
from bastion.exceptions import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from bastion.security.credentials import CredentialStore
from bastion.security.principal import ADMIN_ROLE, USER_NAME, USER_NAME_RULE, Principal
from bastion.security.ratelimit_shared import Holds, LocalHolds
from bastion.service import Context, Service
from bastion.services import Background, every
from bastion.services.kv_log import ChangeLogTrimmer
from bastion.services.kv_watch import FEED_PAGE as FEED_PAGE  # re-exported: importable from here as before
from bastion.services.kv_watch import POLL_INTERVAL as POLL_INTERVAL
from bastion.services.kv_watch import Hub, Watcher, behind, check_reached, replay
from bastion.store.base import Store
from bastion.store.kv import (
    KVChange,
    KVEntry,
    KVNamespace,
    KVQuota,
    KVStore,
    KVWrite,
    ValuesTooLarge,
    personal_namespace,
)

__all__ = ["KV", "Item", "Page", "PutItem", "Usage", "WatchEvent"]

log = logging.getLogger("bastion.kv")
#: Seconds between checks that a watcher may still read its namespace (while changes flow to it).
ACCESS_RECHECK = 2.0

SWEEP_PAGE = 1000  # expired keys deleted per transaction
_NAMESPACE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
_NAMESPACE_RULES = "shared namespace name is 1-64 lowercase letters, digits, '.', '_' or '-'"
_ACL_ENTRY = re.compile(rf"^(user|role):{USER_NAME_RULE}\Z")
_MAX_CONTENT_TYPE = 255
_ADMIN = [ADMIN_ROLE]


class Item(msgspec.Struct, frozen=True):
    """A key, its value and version (the revision of its last change)."""

    key: str
    value: bytes
    version: int
    content_type: str = ""
    expires_at: float | None = None


class PutItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One key of ``put_many``; fields as the arguments of ``put``."""

    key: str
    value: bytes
    content_type: str = ""
    expected_version: int | None = None
    ttl: float | None = None


class Page(msgspec.Struct, frozen=True):
    """One page of ``list``; ``next`` is the ``after`` of the next page (None: this was the last)."""

    items: list[Item]
    next: str | None


class WatchEvent(msgspec.Struct, frozen=True):
    """One item of a ``watch`` stream.

    ``type``: "start" (first item; ``version`` is the revision the watch is
    consistent with: replayed changes are at most that, live ones above it),
    "put" or "delete" (``value`` None; expiry included).
    """

    type: str
    version: int
    key: str = ""
    value: bytes | None = None
    content_type: str = ""


class Usage(msgspec.Struct, frozen=True):
    """What a namespace holds against its quota: keys, and their keys', values' and content types' bytes."""

    namespace: str
    keys: int
    bytes: int
    quota_keys: int
    quota_bytes: int


class NamespaceInfo(msgspec.Struct, frozen=True):
    name: str
    readers: list[str]
    writers: list[str]
    created_at: float
    created_by: str


def _item(entry: KVEntry) -> Item:
    return Item(entry.key, entry.value, entry.version, entry.content_type, entry.expires_at)


def _event(change: KVChange) -> WatchEvent:
    return WatchEvent(change.op, change.revision, change.key, change.value, change.content_type)


def _namespace_info(ns: KVNamespace) -> NamespaceInfo:
    return NamespaceInfo(ns.name, ns.readers, ns.writers, ns.created_at, ns.created_by)


# -- the component --------------------------------------------------------------------------


class KV:
    """The ``kv`` service over ``store``, with its expiry sweep and watch hub (a ``HostedComponent``)."""

    def __init__(
        self,
        store: KVStore,
        config: KVConfig | None = None,
        *,
        leader: bool = True,
        watch_holds: Holds | None = None,
        users: CredentialStore | None = None,
    ) -> None:
        """``leader``: run the expiry sweep here (with several workers, only worker 0 does). ``watch_holds``:
        count each user's watches across the workers of one server (else: in this process). ``users``:
        where an admin's write to another user's ``~NAME`` finds whether NAME exists (default: ``store``,
        if it keeps users; with none, such writes are refused)."""
        self.store = store
        self.users = users if users is not None else store if isinstance(store, Store) else None
        self.config = config or KVConfig()
        self.leader = leader
        self.watch_holds: Holds = LocalHolds() if watch_holds is None else watch_holds
        self.hub = Hub(store)
        self.quota = KVQuota(self.config.quota_keys, self.config.quota_bytes)
        self._background = Background()
        self._log = ChangeLogTrimmer(store, self.config.history, self.config.history_bytes)
        self.service = Service("kv", doc="Key-value storage with versions, compare-and-swap, TTLs and watches.")
        _declare(self, self.service)

    async def start(self) -> None:
        # Replicas sharing a PostgreSQL store hear of each other's writes at once; otherwise the poll finds them.
        work = [("bastion-kv-watch-feed", self.hub.run)]
        if self.leader:
            work.append(("bastion-kv-sweep", self._sweep_forever))
        await self._background.start(self.store, "kv", self.hub.nudge, work)

    async def aclose(self) -> None:
        await self._background.stop()
        self.hub.end_all(Unavailable("the kv service is stopping; watch again with from_version on a running server"))

    async def sweep(self, now: float | None = None) -> int:
        """Remove expired keys and trim the change log once; how many keys expired."""
        now = time.time() if now is None else now
        total = 0
        while True:
            n = await self.store.kv_expire(now, SWEEP_PAGE)
            total += n
            if n < SWEEP_PAGE:
                break
        trimmed = await self._log.trim()
        if total or trimmed:
            self.hub.nudge()
        return total

    async def _sweep_forever(self) -> None:
        await every(self.config.sweep_interval, self.sweep, log, "kv sweep")

    # -- checks shared by the methods ------------------------------------------------------

    async def namespace_for(self, principal: Principal, namespace: str | None, *, write: bool) -> str:
        """The namespace a call acts on, once ``principal`` may read (or ``write``) it."""
        if namespace is None or namespace == "":
            return personal_namespace(principal.name)
        if len(namespace) > 128:
            raise InvalidArgument("namespace: a name of at most 128 characters")
        admin = ADMIN_ROLE in principal.roles
        if namespace.startswith("~"):
            if namespace == personal_namespace(principal.name):
                return namespace
            owner = namespace[1:]
            if not USER_NAME.fullmatch(owner):
                raise InvalidArgument(f"namespace {namespace!r}: a personal namespace is ~NAME, a user's name")
            if admin:
                if write and (self.users is None or await self.users.get_user(owner) is None):
                    # Else keys waited in ~NAME for its next user (the store's write may check again).
                    raise NotFound(f"no user {owner!r}: an admin writes only to the namespace of a user that exists")
                return namespace
        elif not _NAMESPACE.match(namespace):
            raise InvalidArgument(f"namespace {namespace!r}: a {_NAMESPACE_RULES}; a personal one is ~NAME")
        else:
            # Admins read any namespace (one that does not exist holds nothing) but write only to one that
            # exists: else the keys were in no namespace, shown to whoever one of that name was later made for.
            record = None if admin and not write else await self.store.kv_get_namespace(namespace)
            if admin and write and record is None:
                raise NotFound(f"no namespace {namespace!r}: kv.create_namespace it first")
            if admin or (record is not None and _allowed(principal, record, write)):
                return namespace
        raise PermissionDenied(f"no {'write' if write else 'read'} access to namespace {namespace!r}")

    def check_key(self, key: str, what: str = "key") -> None:
        if key.isascii():  # O(1) in CPython, and then characters are bytes: no encoded copy to measure
            size = len(key)
        else:
            try:
                size = len(key.encode())  # strict UTF-8: a lone surrogate raises
            except UnicodeEncodeError:
                size = -1
        if 0 < size <= self.config.max_key_bytes and "\x00" not in key:
            return
        if not key:
            raise InvalidArgument(f"{what} must not be empty")
        if size > self.config.max_key_bytes:
            raise InvalidArgument(f"{what} is {size} bytes, over kv.max_key_bytes ({self.config.max_key_bytes})")
        raise InvalidArgument(f"{what} must be valid text without NUL characters")

    def check_write(
        self,
        key: str,
        value: bytes,
        content_type: str,
        expected_version: int | None,
        ttl: float | None,
        now: float,
    ) -> KVWrite:
        """The store's write for ``put``'s arguments, once they are within limits."""
        if not (key.isascii() and 0 < len(key) <= self.config.max_key_bytes and "\x00" not in key):
            self.check_key(key)  # check_key's first case, inline; the others (and their errors) there
        if len(value) > self.config.max_value_bytes:
            raise InvalidArgument(
                f"value of {key!r} is {len(value)} bytes, over kv.max_value_bytes ({self.config.max_value_bytes})"
            )
        if len(content_type) > _MAX_CONTENT_TYPE or "\x00" in content_type:  # PostgreSQL text cannot hold NUL
            raise InvalidArgument(f"content_type must not contain NUL nor be over {_MAX_CONTENT_TYPE} characters")
        if expected_version is not None and expected_version < 0:
            raise InvalidArgument("expected_version must be 0 (must not exist) or a version")
        expires = None
        if ttl is not None:
            if not (math.isfinite(ttl) and ttl > 0):
                raise InvalidArgument("ttl must be a positive number of seconds")
            expires = now + ttl
        return KVWrite(key, value, content_type, expected_version, expires)

    def check_batch(self, n: int, what: str) -> None:
        if n > self.config.max_batch:
            raise InvalidArgument(f"{n} {what} in one call, over kv.max_batch ({self.config.max_batch})")


def _allowed(principal: Principal, ns: KVNamespace, write: bool) -> bool:
    entries = ns.writers if write else [*ns.readers, *ns.writers]
    if f"user:{principal.name}" in entries:
        return True
    return any(f"role:{role}" in entries for role in principal.roles)


def _check_acl(entries: list[str], what: str) -> list[str]:
    for entry in entries:
        if not _ACL_ENTRY.match(entry):
            raise InvalidArgument(f'{what}: {entry!r} is not "user:NAME" or "role:NAME"')
    return sorted(set(entries))


def _frame_budget(ctx: Context) -> int:
    """Bytes of values one answer may carry: half a frame, leaving room for keys and framing."""
    return int(ctx.server.limits().get("max_frame", 1_048_576)) // 2


# -- the methods ----------------------------------------------------------------------------


def _declare(kv: KV, service: Service) -> None:
    store, cfg = kv.store, kv.config

    @service.method(idempotent=True)
    async def get(ctx: Context, key: str, namespace: str | None = None) -> Item:
        """The value and version of ``key``; NOT_FOUND if it does not exist (or has expired)."""
        if namespace:
            ns = await kv.namespace_for(ctx.principal, namespace, write=False)
        else:  # the caller's own: namespace_for's first case, without a coroutine to create and run
            ns = personal_namespace(ctx.principal.name)
        if not (key.isascii() and 0 < len(key) <= cfg.max_key_bytes and "\x00" not in key):
            kv.check_key(key)  # its first case inline, as in check_write
        (entry,) = await store.kv_get_many(ns, [key], time.time())
        if entry is None:
            raise NotFound(f"no key {key!r} in namespace {ns!r}")
        return Item(entry.key, entry.value, entry.version, entry.content_type, entry.expires_at)  # _item's

    @service.method(idempotent=True)
    async def get_many(ctx: Context, keys: list[str], namespace: str | None = None) -> list[Item | None]:
        """Several keys at once, in the order asked; None for each one that does not exist."""
        ns = await kv.namespace_for(ctx.principal, namespace, write=False)
        kv.check_batch(len(keys), "keys")
        for key in keys:
            kv.check_key(key)
        budget = _frame_budget(ctx)
        try:  # the store measures the values before it reads any: more than the budget, it reads none
            entries = await store.kv_get_many(ns, keys, time.time(), budget)
        except ValuesTooLarge as e:
            raise ResourceExhausted(
                f"the {len(keys)} values come to {e.total} bytes, more than one answer carries "
                f"({budget}); ask for fewer keys at a time"
            ) from None
        return [None if e is None else _item(e) for e in entries]

    @service.method
    async def put(
        ctx: Context,
        key: str,
        value: bytes,
        namespace: str | None = None,
        expected_version: int | None = None,
        ttl: float | None = None,
        content_type: str = "",
    ) -> int:
        """Set ``key`` to ``value``; the new version.

        ``expected_version``: 0 = only if the key does not exist; n = only if
        its version is n (compare-and-swap; ABORTED otherwise). ``ttl``:
        seconds until the key expires.
        """
        if namespace:
            ns = await kv.namespace_for(ctx.principal, namespace, write=True)
        else:  # the caller's own: namespace_for's first case, without a coroutine to create and run
            ns = personal_namespace(ctx.principal.name)
        now = time.time()
        write = kv.check_write(key, value, content_type, expected_version, ttl, now)
        try:
            (version,) = await store.kv_put(ns, (write,), now, kv.quota)
        except NotFound:  # a shared namespace (or a user) gone since namespace_for: its refusal of the caller now
            await kv.namespace_for(ctx.principal, namespace, write=True)
            raise
        kv.hub.nudge()
        return version

    @service.method
    async def put_many(ctx: Context, items: list[PutItem], namespace: str | None = None) -> list[int]:
        """Put several keys atomically: all are written, or none (any mismatch: ABORTED); their new versions."""
        ns = await kv.namespace_for(ctx.principal, namespace, write=True)
        kv.check_batch(len(items), "items")
        now = time.time()
        writes = [kv.check_write(i.key, i.value, i.content_type, i.expected_version, i.ttl, now) for i in items]
        if len({w.key for w in writes}) != len(writes):
            raise InvalidArgument("put_many: a key appears more than once")
        if not writes:
            return []
        try:
            versions = await store.kv_put(ns, writes, now, kv.quota)
        except NotFound:  # as in put
            await kv.namespace_for(ctx.principal, namespace, write=True)
            raise
        kv.hub.nudge()
        return versions

    @service.method
    async def delete(ctx: Context, key: str, namespace: str | None = None, expected_version: int | None = None) -> bool:
        """Delete ``key``; whether it existed. With ``expected_version``, only if it matches (ABORTED otherwise)."""
        ns = await kv.namespace_for(ctx.principal, namespace, write=True)
        kv.check_key(key)
        if expected_version is not None and expected_version < 0:
            raise InvalidArgument("expected_version must be 0 (must not exist) or a version")
        revision = await store.kv_delete(ns, key, expected_version, time.time())
        if revision:
            kv.hub.nudge()
        return revision > 0

    @service.method(idempotent=True)
    async def usage(ctx: Context, namespace: str | None = None) -> Usage:
        """The keys and bytes a namespace holds (expired keys until the sweep removes them) and its quota."""
        ns = await kv.namespace_for(ctx.principal, namespace, write=False)
        held = await store.kv_usage(ns)
        return Usage(ns, held.keys, held.bytes, kv.quota.keys, kv.quota.bytes)

    @service.method(name="list", idempotent=True)
    async def list_(
        ctx: Context,
        prefix: str = "",
        namespace: str | None = None,
        limit: int | None = None,
        after: str | None = None,
        keys_only: bool = False,
    ) -> Page:
        """Keys starting with ``prefix``, in byte order, one page at a time.

        Pass the page's ``next`` as ``after`` for the following page. A page
        holds at most ``limit`` (default and maximum kv.max_page) items and
        stops early to fit one answer; ``keys_only`` leaves values out.
        """
        ns = await kv.namespace_for(ctx.principal, namespace, write=False)
        if prefix:
            kv.check_key(prefix, "prefix")
        if after is not None:
            kv.check_key(after, "after")
        limit = cfg.max_page if limit is None else limit
        if not 0 < limit <= cfg.max_page:
            raise InvalidArgument(f"limit must be 1..{cfg.max_page} (kv.max_page)")
        budget, items = _frame_budget(ctx), list[Item]()
        # The store reads values only up to the budget (then one entry more, empty, to say more follow).
        entries = await store.kv_list(ns, prefix, after, limit + 1, time.time(), budget, keys_only)
        for entry in entries[:limit]:
            item = _item(entry)
            budget -= len(item.value) + len(item.key)
            if items and budget < 0:
                break
            items.append(item)
        more = len(items) < len(entries)
        return Page(items, items[-1].key if more else None)

    @service.method(resumable=True)
    async def watch(
        ctx: Context, prefix: str = "", namespace: str | None = None, from_version: int | None = None
    ) -> AsyncIterator[WatchEvent]:
        """A stream of changes to keys starting with ``prefix``: first a "start" item, then
        "put"/"delete" items in version order, replayed from ``from_version`` if given, then live.

        OUT_OF_RANGE if ``from_version`` is older than the kept history (the
        message names the earliest available) or past the store's next version; RESOURCE_EXHAUSTED, with
        ``resume_from`` in its details, if this watcher falls too far behind.
        """
        ns = await kv.namespace_for(ctx.principal, namespace, write=False)
        if prefix:
            kv.check_key(prefix, "prefix")
        if from_version is not None and from_version < 1:
            raise InvalidArgument("from_version must be a version (1 or more)")
        if len(kv.hub) >= cfg.max_watchers:
            raise ResourceExhausted(f"{cfg.max_watchers} watches are open on this server (kv.max_watchers)")
        holds, name, limit = kv.watch_holds, ctx.principal.name, cfg.max_watchers_per_user
        mine = holds.acquire(name, limit)
        if mine >= limit:
            raise ResourceExhausted(
                f"you have {mine} watches open on this server (kv.max_watchers_per_user); close some first"
            )
        watcher = Watcher(ns, prefix, cfg.watch_buffer, cfg.watch_buffer_bytes, name)
        try:
            start = await kv.hub.join(watcher)
        except BaseException:
            holds.release(name)
            raise
        current = [ctx.principal]  # the connection's principal, as revalidation replaces it
        regranted: list[Principal] = []  # replaced, not checked yet

        def on_principal(principal: Principal) -> None:
            current[0] = principal
            regranted[:] = [principal]
            watcher.wakeup.set()

        unwatch = ctx.watch_principal(on_principal)
        try:
            if from_version is not None:
                await check_reached(store, from_version, start)
            yield WatchEvent("start", start)
            last = start
            if from_version is not None:
                async for change in replay(store, ns, prefix, from_version, start):
                    yield _event(change)
                last = max(start, from_version - 1)
            checked = time.monotonic()
            while True:
                if regranted:  # the caller's roles changed: PERMISSION_DENIED if they no longer may read
                    await kv.namespace_for(regranted.pop(), namespace, write=False)
                live = watcher.take()
                if live is not None:
                    if time.monotonic() - checked >= ACCESS_RECHECK:
                        # The namespace's access lists may have changed (or it was deleted) since the watch
                        # began: PERMISSION_DENIED ends the stream before another change goes out.
                        await kv.namespace_for(current[0], namespace, write=False)
                        checked = time.monotonic()
                    if live.revision > last:
                        last = live.revision
                        yield _event(live)
                    continue
                if watcher.ended is not None:
                    raise watcher.ended
                if watcher.overflowed:
                    raise behind(
                        last + 1,
                        f"more than {cfg.watch_buffer} changes or {cfg.watch_buffer_bytes} "
                        "bytes waited for this stream",
                    )
                await watcher.wakeup.wait()
                watcher.wakeup.clear()
        finally:
            unwatch()
            kv.hub.leave(watcher)
            holds.release(name)

    @service.method(roles=_ADMIN)
    async def create_namespace(
        ctx: Context, name: str, readers: list[str] | None = None, writers: list[str] | None = None
    ) -> NamespaceInfo:
        """Create a shared namespace (admin) with its access lists of "user:NAME" / "role:NAME"."""
        if not _NAMESPACE.match(name):
            raise InvalidArgument(f"a {_NAMESPACE_RULES}")
        record = KVNamespace(
            name, _check_acl(readers or [], "readers"), _check_acl(writers or [], "writers"), time.time(),
            ctx.principal.name,
        )  # fmt: skip
        if not await store.kv_create_namespace(record):
            raise AlreadyExists(f"namespace {name!r} exists")
        return _namespace_info(record)

    @service.method(roles=_ADMIN, idempotent=True)
    async def set_access(ctx: Context, name: str, readers: list[str], writers: list[str]) -> NamespaceInfo:
        """Replace a shared namespace's access lists (admin)."""
        record = await store.kv_update_namespace(name, _check_acl(readers, "readers"), _check_acl(writers, "writers"))
        if record is None:
            raise NotFound(f"no namespace {name!r}")
        return _namespace_info(record)

    @service.method(roles=_ADMIN)
    async def delete_namespace(ctx: Context, name: str) -> int:
        """Delete a shared namespace and every key in it (admin); how many keys were deleted."""
        deleted = None if "\x00" in name else await store.kv_delete_namespace(name, time.time())  # no name holds NUL
        if deleted is None:
            raise NotFound(f"no namespace {name!r}")
        kv.hub.nudge()
        return deleted

    @service.method(idempotent=True)
    async def namespaces(ctx: Context) -> list[NamespaceInfo]:
        """The shared namespaces the caller may read (admin: all), by name."""
        records = await store.kv_list_namespaces()
        p = ctx.principal
        return [_namespace_info(r) for r in records if ADMIN_ROLE in p.roles or _allowed(p, r, False)]
