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
import time

from bastion.config import KVConfig
from bastion.exceptions import InvalidArgument, NotFound, PermissionDenied, Unavailable
from bastion.security.credentials import CredentialStore
from bastion.security.principal import ADMIN_ROLE, USER_NAME, Principal
from bastion.security.ratelimit_shared import Holds, LocalHolds
from bastion.service import Service
from bastion.services import Background, every
from bastion.services.kv_log import ChangeLogTrimmer
from bastion.services.kv_methods import _NAMESPACE, _NAMESPACE_RULES, _allowed, declare
from bastion.services.kv_watch import FEED_PAGE as FEED_PAGE  # re-exported: importable from here as before
from bastion.services.kv_watch import POLL_INTERVAL as POLL_INTERVAL
from bastion.services.kv_watch import Hub
from bastion.store.base import Store
from bastion.store.kv import KVQuota, KVStore, KVWrite, personal_namespace

__all__ = ["KV"]

log = logging.getLogger("bastion.kv")

SWEEP_PAGE = 1000  # expired keys deleted per transaction
_MAX_CONTENT_TYPE = 255


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
        self.service = Service(
            "kv", doc="Key-value storage with versions, compare-and-swap, TTLs and watches.", refuse_nul=True
        )
        declare(self, self.service)

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
        if 0 < size <= self.config.max_key_bytes:  # (and no NUL: the dispatcher refused that, see refuse_nul)
            return
        if not key:
            raise InvalidArgument(f"{what} must not be empty")
        if size > self.config.max_key_bytes:
            raise InvalidArgument(f"{what} is {size} bytes, over kv.max_key_bytes ({self.config.max_key_bytes})")
        raise InvalidArgument(f"{what} must be valid text")

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
        if not (key.isascii() and 0 < len(key) <= self.config.max_key_bytes):
            self.check_key(key)  # check_key's first case, inline; the others (and their errors) there
        if len(value) > self.config.max_value_bytes:
            raise InvalidArgument(
                f"value of {key!r} is {len(value)} bytes, over kv.max_value_bytes ({self.config.max_value_bytes})"
            )
        if len(content_type) > _MAX_CONTENT_TYPE:
            raise InvalidArgument(f"content_type must not be over {_MAX_CONTENT_TYPE} characters")
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
