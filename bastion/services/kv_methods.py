"""The ``kv`` service's methods, the records they answer with and the namespace access rules they apply.

The wire surface of bastion/services/kv.py's ``KV``, where the theory of
operation is: each method checks and converts its arguments and calls into
``KV`` and its store.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import msgspec

from bastion.exceptions import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from bastion.security.principal import ADMIN_ROLE, USER_NAME_RULE, Principal
from bastion.service import Context, Service
from bastion.services.kv_watch import Watcher, behind, check_reached, replay
from bastion.store.kv import KVChange, KVEntry, KVNamespace, ValuesTooLarge, personal_namespace

if TYPE_CHECKING:
    from bastion.services.kv import KV

__all__ = ["ACCESS_RECHECK", "Item", "NamespaceInfo", "Page", "PutItem", "Usage", "WatchEvent", "declare"]

#: Seconds between checks that a watcher may still read its namespace (while changes flow to it).
ACCESS_RECHECK = 2.0

_NAMESPACE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
_NAMESPACE_RULES = "shared namespace name is 1-64 lowercase letters, digits, '.', '_' or '-'"
_ACL_ENTRY = re.compile(rf"^(user|role):{USER_NAME_RULE}\Z")
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


def declare(kv: KV, service: Service) -> None:
    """Declare the ``kv`` methods on ``service``, each calling into ``kv``."""
    store, cfg = kv.store, kv.config

    @service.method(idempotent=True)
    async def get(ctx: Context, key: str, namespace: str | None = None) -> Item:
        """The value and version of ``key``; NOT_FOUND if it does not exist (or has expired)."""
        if namespace:
            ns = await kv.namespace_for(ctx.principal, namespace, write=False)
        else:  # the caller's own: namespace_for's first case, without a coroutine to create and run
            ns = personal_namespace(ctx.principal.name)
        if not (key.isascii() and 0 < len(key) <= cfg.max_key_bytes):
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
        deleted = await store.kv_delete_namespace(name, time.time())
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
