"""Dispatch: the method table, built once, and the checks before a handler runs.

``MethodTable`` maps ``"service.method"`` to an ``Entry`` holding the spec and
a ready msgspec decoder for its arguments. ``admit`` performs, in order, the
checks every call passes before dispatch: the method exists (UNIMPLEMENTED),
the caller may call it (UNAUTHENTICATED for anonymous callers of non-public
methods, PERMISSION_DENIED for missing roles), and the arguments match the
method's hints (INVALID_ARGUMENT naming the field) -- for a method of a
``refuse_nul`` service (every built-in one) that includes holding no NUL
(U+0000) in any text (``nul_checks``), since PostgreSQL text cannot hold it
while SQLite's can: one rule here answers it alike on every store, where a
guard in each method was easy to forget. Nothing here runs a handler.

``IdempotencyKeys`` is the server half of idempotency keys: a unary call
whose metadata carries ``idempotency-key`` claims (principal, key) in the
store before its handler runs (``begin``), and its answer is recorded
(``finish``) before it is sent, so a retry of the call -- on this replica or
any other sharing the store -- gets the first answer back instead of running
it again. A failure that proves the call had no effect (RESOURCE_EXHAUSTED:
a quota or limit refused it) gives the claim back (``release``), so a retry
runs it. A call that may have taken effect before it stopped -- cancelled
(its connection dropped), past its deadline, or UNAVAILABLE from the store
("may not be saved") -- keeps its claim: it is neither recorded nor given
back, so a retry never runs it twice. A call holding its claim whose
connection is lost is not cancelled: it runs to its end, detached, and its
answer is recorded as usual (once.py; ``detach`` counts such calls against
``limits.max_detached_calls``). A retry
that finds the first execution still running waits for it a little, then
answers UNAVAILABLE (retry later); one whose first execution was abandoned
(its lease ran out: the server died mid-call) answers ABORTED, since whether
it took effect is unknown; a key reused for a different method or arguments
answers FAILED_PRECONDITION. See bastion/store/idempotency.py.
"""

from __future__ import annotations

import asyncio
import collections
import dis
import hashlib
import inspect
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec
import msgspec.inspect as mi

from bastion.exceptions import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    UsageError,
)
from bastion.security.principal import ADMIN_ROLE, Principal
from bastion.service import OPAQUE_TEXT_KEY, MethodKind, MethodSpec, Service, brief_error
from bastion.status import Status
from bastion.store.idempotency import IdempotencyRecord, IdempotencyStore

__all__ = ["IDEMPOTENCY_KEY", "Entry", "IdempotencyKeys", "MethodTable"]

log = logging.getLogger("bastion.server")

#: The call metadata key that carries an idempotency key.
IDEMPOTENCY_KEY = "idempotency-key"
#: The longest idempotency key accepted, in characters.
MAX_IDEMPOTENCY_KEY = 200
#: Most expired idempotency keys one sweep deletes (one store write).
_SWEEP_BATCH = 1000
#: Failures that prove the call had no effect: its claim is given back and a retry runs it.
RELEASED_ON = frozenset({Status.RESOURCE_EXHAUSTED})
#: Failures after which the effect is unknown: the claim is kept until its lease runs out
#: (a retry meanwhile answers UNAVAILABLE, then ABORTED: "outcome unknown").
UNKNOWN_ON = frozenset({Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED, Status.CANCELLED})


class Entry:
    """One method, ready to dispatch."""

    __slots__ = (
        "decoder",
        "fields",
        "growth",
        "inline",
        "input_decoder",
        "metric_row",
        "nul_checks",
        "positional",
        "spec",
        "stream_mismatch",
        "streams_in",
        "streams_out",
        "unary_async",
    )

    def __init__(self, spec: MethodSpec) -> None:
        self.spec = spec
        self.decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(spec.args_type)
        self.fields: tuple[str, ...] = spec.args_type.__struct_fields__
        #: How many times their MessagePack bytes its arguments may take once decoded, at worst.
        self.growth = args_growth(spec.args_type)
        #: Its arguments that may hold text: position, name and how to find NUL in it (None: ``str``, or None).
        self.nul_checks = nul_checks(spec.args_type) if spec.refuse_nul else ()
        self.input_decoder: msgspec.msgpack.Decoder[Any] | None = (
            msgspec.msgpack.Decoder(spec.input_type) if spec.input_param is not None else None
        )
        self.streams_out = spec.kind in (MethodKind.SERVER_STREAM, MethodKind.BIDI_STREAM)
        #: Whether the method takes an input stream: what a Call's ``stream`` flag must say (docs/protocol.md 7.1).
        self.streams_in = spec.input_param is not None
        #: The refusal of a Call whose ``stream`` flag says otherwise.
        self.stream_mismatch = (
            f"{spec.full_name} takes an input stream: call it with stream true"
            if self.streams_in
            else f"{spec.full_name} takes no input stream: call it with stream false"
        )
        #: The method's row in the server's CallStats (the server sets it; -1: not counted apart).
        self.metric_row = -1
        #: An ``async def`` returning one value: the usual call, run without the general path's detours.
        self.unary_async = spec.is_async and spec.input_param is None and not self.streams_out
        #: Its handler cannot suspend: the session may run it to its end at once, without a task.
        self.inline = self.unary_async and never_suspends(spec.handler)
        #: Unary, and its handler takes its arguments by position (``takes_positionally``): the session
        #: calls it with ``decode_values``, without a dict of them to build and match by name.
        self.positional = self.unary_async and takes_positionally(spec)

    def decode_args(self, raw: msgspec.Raw) -> dict[str, Any]:
        """The call's arguments by name; INVALID_ARGUMENT if they do not match the method's hints."""
        args = msgspec.structs.asdict(self._decode(raw))  # in C: every field by attribute name, as ``fields``
        for _, name, check in self.nul_checks:  # none but for refuse_nul: then text, mostly checked inline
            value = args[name]
            if check is None:
                if value is not None and "\x00" in value:
                    raise self._holds_nul(name, "")
            elif (where := check(value)) is not None:
                raise self._holds_nul(name, where)
        return args

    def decode_values(self, raw: msgspec.Raw) -> tuple[Any, ...]:
        """The call's arguments in the handler's order, without its Context (a ``positional`` entry's)."""
        values = msgspec.structs.astuple(self._decode(raw))
        for i, name, check in self.nul_checks:  # as in decode_args
            value = values[i]
            if check is None:
                if value is not None and "\x00" in value:
                    raise self._holds_nul(name, "")
            elif (where := check(value)) is not None:
                raise self._holds_nul(name, where)
        return values

    def _decode(self, raw: msgspec.Raw) -> msgspec.Struct:
        try:
            args: msgspec.Struct = self.decoder.decode(raw)
        except msgspec.ValidationError as exc:
            raise InvalidArgument(f"{self.spec.full_name}: {_describe(exc)}") from None
        except msgspec.DecodeError as exc:
            raise InvalidArgument(f"{self.spec.full_name}: arguments are not a map: {exc}") from None
        except UnicodeDecodeError:
            # ``Call.args`` is Raw: the frame decoder skipped over it, so text that is not UTF-8
            # shows up here first, and msgspec raises it as no DecodeError.
            raise InvalidArgument(f"{self.spec.full_name}: arguments hold text that is not UTF-8") from None
        return args

    def _holds_nul(self, name: str, where: str) -> InvalidArgument:
        return InvalidArgument(f"{self.spec.full_name}: argument {name}{where} must not contain NUL characters")


def takes_positionally(spec: MethodSpec) -> bool:
    """Whether ``spec.handler`` may be called as ``handler(*values)``, or ``handler(context, *values)``
    with a Context parameter: its own parameters (a wrapper's, not what it wraps) are all plain ones,
    its Context first, then the arguments in the order of ``spec.args_type``'s fields."""
    handler = spec.handler
    if hasattr(handler, "__signature__") or not inspect.isfunction(getattr(handler, "__func__", handler)):
        return False  # a signature declared (a wrapper's may not be its own), or no plain function: by name
    try:
        params = inspect.signature(handler, follow_wrapped=False).parameters.values()
    except (TypeError, ValueError):
        return False
    if any(param.kind is not param.POSITIONAL_OR_KEYWORD for param in params):
        return False
    expected = ([spec.context_param] if spec.context_param is not None else []) + list(spec.args_type.__struct_fields__)
    return [param.name for param in params] == expected


#: What decoded arguments may cost, at worst, per byte of MessagePack, by how deeply they may nest
#: containers: none (text, numbers, bytes: an object or two per fixed field); one level (a list of
#: numbers, text or flat structs: a two-character string is 3 bytes and 59 decoded, a pointer and
#: the object); more, or values of any type (a one-byte empty map becomes a 64-byte dict and the
#: pointer to it: 73x measured for a frame of them).
GROWTH = (2, 24, 80)
GROWTH_WORST = GROWTH[-1]


def args_growth(args_type: Any) -> int:
    """How many times their MessagePack bytes arguments of ``args_type`` may take once decoded."""

    def depth(info: mi.Type, seen: frozenset[int]) -> int:
        """Containers nested in ``info``, at most 2 (values of any type count as 2)."""
        if isinstance(info, mi.AnyType | mi.CustomType | mi.ExtType):
            return 2
        if isinstance(info, mi.CollectionType):
            return min(2, 1 + depth(info.item_type, seen))
        if isinstance(info, mi.DictType):
            return min(2, 1 + max(depth(info.key_type, seen), depth(info.value_type, seen)))
        if isinstance(info, mi.UnionType):
            return max(depth(t, seen) for t in info.types)
        if isinstance(info, mi.TupleType):
            return max((depth(t, seen) for t in info.item_types), default=0)
        if isinstance(info, mi.StructType | mi.DataclassType | mi.TypedDictType | mi.NamedTupleType):
            if id(info) in seen:  # a recursive type: it nests as deep as the peer likes
                return 2
            return max((depth(field.type, seen | {id(info)}) for field in info.fields), default=0)
        return 0

    return GROWTH[depth(mi.type_info(args_type), frozenset())]


#: Where in a value its text holds NUL (``"[2].key"``; ``""``: the value itself), or None if nowhere.
NulCheck = Callable[[Any], str | None]


def nul_checks(args_type: Any) -> tuple[tuple[int, str, NulCheck | None], ...]:
    """The fields of ``args_type`` that may hold text: each one's position, name and ``NulCheck``, or None
    for a field typed ``str`` or ``str | None``, which ``Entry`` looks into inline (the usual case, and
    kv.get's and kv.put's: a call to a check per argument would cost them more).

    Text is every ``str`` the hints declare, in lists, sets, tuples, dicts (keys and values) and structs
    as well; not text in values typed ``Any`` (a job's arguments, a message's data: the caller's, stored
    as MessagePack) nor text typed ``OpaqueText`` (a password: only its hash is stored).
    """
    info = mi.type_info(args_type)
    assert isinstance(info, mi.StructType)
    out: list[tuple[int, str, NulCheck | None]] = []
    for i, field in enumerate(info.fields):
        check = _nul_check(field.type, {})
        if check is not None:
            plain = isinstance(field.type, mi.StrType) or (
                isinstance(field.type, mi.UnionType)
                and sorted(type(t).__name__ for t in field.type.types) == ["NoneType", "StrType"]
            )
            out.append((i, field.name, None if plain else check))
    return tuple(out)


def _text_nul(value: Any) -> str | None:
    return "" if value.__class__ is str and "\x00" in value else None


def _nul_check(info: mi.Type, building: dict[int, list[NulCheck | None]]) -> NulCheck | None:
    """The NulCheck of values of type ``info``; None if they hold no text. ``building``: the struct types
    whose checks are being made (a recursive type refers to its own through a cell filled once made)."""
    if isinstance(info, mi.Metadata):
        return None if (info.extra or {}).get(OPAQUE_TEXT_KEY) else _nul_check(info.type, building)
    if isinstance(info, mi.StrType):
        return _text_nul
    if isinstance(info, mi.UnionType):
        checks = [c for c in (_nul_check(t, building) for t in info.types) if c is not None]
        if len(checks) <= 1:  # each check looks only at values of its own type: str | None is _text_nul
            return checks[0] if checks else None
        return lambda value: next((w for c in checks if (w := c(value)) is not None), None)
    if isinstance(info, mi.CollectionType):
        return _items_nul(_nul_check(info.item_type, building))
    if isinstance(info, mi.TupleType):
        items = [(i, c) for i, t in enumerate(info.item_types) if (c := _nul_check(t, building)) is not None]
        return _fields_nul(items, tuple, lambda value, i: value[i], "[{}]") if items else None
    if isinstance(info, mi.DictType):
        return _dict_nul(_nul_check(info.key_type, building), _nul_check(info.value_type, building))
    if isinstance(info, mi.StructType | mi.DataclassType | mi.NamedTupleType | mi.TypedDictType):
        if id(info.cls) in building:
            cell = building[id(info.cls)]
            return lambda value: cell[0](value) if cell[0] is not None else None
        cell = building[id(info.cls)] = [None]
        fields = [(f.name, c) for f in info.fields if (c := _nul_check(f.type, building)) is not None]
        if fields:
            if isinstance(info, mi.TypedDictType):
                cell[0] = _fields_nul(fields, dict, lambda value, name: value.get(name), ".{}")
            else:
                cell[0] = _fields_nul(fields, info.cls, getattr, ".{}")
        del building[id(info.cls)]
        return cell[0]
    return None  # numbers, bytes, literals, enums, Any...: no text of the caller's to look into


def _shown(key: object, most: int = 64) -> str:
    """``key`` as a path names it, cut to ``most`` characters (and its length): a caller's megabyte-long
    key must not come back in the error."""
    text = repr(key)
    return text if len(text) <= most else f"{text[:most]}... ({len(text)} characters)"


def _items_nul(item: NulCheck | None) -> NulCheck | None:
    if item is None:
        return None

    def check(value: Any) -> str | None:
        if isinstance(value, list | tuple | set | frozenset):
            for i, x in enumerate(value):
                if (where := item(x)) is not None:
                    return f"[{i}]{where}" if isinstance(value, list | tuple) else f"[{_shown(x)}]{where}"
        return None

    return check


def _dict_nul(key: NulCheck | None, val: NulCheck | None) -> NulCheck | None:
    if key is None and val is None:
        return None

    def check(value: Any) -> str | None:
        if isinstance(value, dict):
            for k, v in value.items():
                if key is not None and key(k) is not None:
                    return f"[{_shown(k)}] (its key)"
                if val is not None and (where := val(v)) is not None:
                    return f"[{_shown(k)}]{where}"
        return None

    return check


def _fields_nul(fields: list[tuple[Any, NulCheck]], cls: type, get: Callable[[Any, Any], Any], form: str) -> NulCheck:
    def check(value: Any) -> str | None:
        if isinstance(value, cls):
            for name, field in fields:
                if (where := field(get(value, name))) is not None:
                    return form.format(name) + where
        return None

    return check


#: The opcodes through which a coroutine can give up control: ``await``, ``async for`` and ``async with``.
_SUSPENDING = frozenset(
    {"GET_AWAITABLE", "SEND", "YIELD_VALUE", "GET_AITER", "GET_ANEXT", "BEFORE_ASYNC_WITH", "END_ASYNC_FOR"}
)


def never_suspends(handler: Callable[..., Any]) -> bool:
    """Whether ``handler`` is an ``async def`` (or a method of one) with no ``await``, ``async for``
    or ``async with`` in its body: its coroutine always ends in its first step.

    Such a handler is run by the session there and then, in a copy of the
    context, instead of in a task of its own (no task to create, schedule and
    collect: the usual cost of a call on Python 3.11). Since it cannot suspend,
    nothing can interleave with it, cancel it or outlive it, so it behaves as
    in a task, except that ``asyncio.current_task()`` is None while it runs.
    Anything else -- a wrapper, a partial, a callable object -- is not inspected
    and runs in a task.
    """
    func = getattr(handler, "__func__", handler)  # a bound method's function
    if not inspect.iscoroutinefunction(func) or not inspect.isfunction(func):
        return False
    return not any(instruction.opname in _SUSPENDING for instruction in dis.get_instructions(func.__code__))


def _describe(exc: msgspec.ValidationError) -> str:
    # msgspec says "... - at `$.field`"; name the argument the way a caller wrote it.
    text = brief_error(str(exc))  # msgspec quotes an unknown field, or a bad Literal value, in full
    return text.replace("`$.", "argument `").replace("Object missing required field", "missing argument")


class MethodTable:
    """Every method the server offers, by full name."""

    def __init__(self, services: Iterable[Service]) -> None:
        self.entries: dict[str, Entry] = {}
        self.services: dict[str, Service] = {}
        for service in services:
            if service.name in self.services:
                raise UsageError(f"service {service.name!r} is registered twice")
            self.services[service.name] = service
            for spec in service.methods.values():
                self.entries[spec.full_name] = Entry(spec)

    def admit(self, method: str, principal: Principal) -> Entry:
        """The entry for ``method`` if ``principal`` may call it; else raise."""
        entry = self.entries.get(method)
        spec = entry.spec if entry is not None else None
        if spec is None or not (spec.public or principal.authenticated):
            if not principal.authenticated:
                # Do not tell an anonymous caller which methods exist.
                raise Unauthenticated(f"{method} requires authentication")
            raise Unimplemented(f"unknown method {method!r}")
        roles = spec.roles
        if roles and not (roles <= principal.roles or ADMIN_ROLE in principal.roles):  # has_roles, inline
            raise PermissionDenied(f"{method} requires role {', '.join(sorted(spec.roles))}")
        assert entry is not None
        return entry

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "name": service.name,
                "doc": service.doc,
                "methods": [spec.describe() for spec in service.methods.values()],
            }
            for service in self.services.values()
        ]


class IdempotencyKeys:
    """Claims, records and replays answers by (principal, idempotency key), in a shared store.

    ``window``: seconds an answer is remembered (default 24 hours).
    ``lease``: seconds a claim of a call without a deadline lasts before it
    counts as abandoned (a call with a deadline holds it until then, plus a
    second). ``wait``: how long a retry waits for a first execution still
    running before answering UNAVAILABLE; ``poll``: how often it looks.
    """

    def __init__(
        self,
        store: IdempotencyStore,
        *,
        window: float = 86400.0,
        lease: float = 60.0,
        wait: float = 2.0,
        poll: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window <= 0 or lease <= 0:
            raise UsageError("IdempotencyKeys: window and lease must be positive")
        self.store = store
        self.window = window
        self.lease = lease
        self.wait = wait
        self.poll = poll
        self._clock = clock
        self._next_sweep = 0.0
        #: Calls running detached (their connection lost: once.py), by principal; and their counts.
        self._detached: collections.Counter[str] = collections.Counter()
        self._detached_counts = {"detached_calls": 0, "detached_calls_total": 0, "detached_calls_refused": 0}

    @staticmethod
    def key_of(metadata: Mapping[str, str] | None) -> str | None:
        """The idempotency key a call's metadata carries, checked; None if it carries none."""
        if not metadata or IDEMPOTENCY_KEY not in metadata:
            return None
        key = metadata[IDEMPOTENCY_KEY]
        if not isinstance(key, str) or not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or not key.isprintable():
            raise InvalidArgument(
                f"metadata {IDEMPOTENCY_KEY!r} must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters"
            )
        return key

    async def begin(
        self, principal: str, key: str, method: str, args: bytes, timeout: float | None
    ) -> str | IdempotencyRecord:
        """Claim ``key`` for this call: the claim's owner id (run the call), or the first answer to replay.

        Raises FAILED_PRECONDITION if ``key`` was used for another method or
        other arguments, UNAVAILABLE if the first execution is still running
        after ``wait``, ABORTED if it was abandoned mid-call.
        """
        now = self._clock()
        digest = hashlib.sha256(method.encode() + b"\0" + args).digest()
        owner = secrets.token_hex(8)
        lease = self.lease if timeout is None else timeout + 1.0
        claim = IdempotencyRecord(
            principal, key, method, digest, "running", owner, None, None, None, now, now + self.window, now + lease
        )
        if now >= self._next_sweep:
            self._next_sweep = now + 60.0
            if await self._sweep(now):
                self._next_sweep = now  # a full batch: more may be left, so the next call sweeps again
        found = await self.store.idempotency_begin(claim, now)
        if found is None:
            return owner
        stop = now + (self.wait if timeout is None else min(self.wait, max(0.0, timeout - 0.1)))
        while True:
            if found.method != method or found.digest != digest:
                raise FailedPrecondition(
                    f"idempotency key {key!r} was already used for a different call "
                    f"({found.method} with other arguments); use a new key for a new call",
                    details={"method": found.method},
                )
            if found.state == "done":
                return found
            now = self._clock()
            if found.lease_until <= now:
                raise Aborted(
                    f"the first call with idempotency key {key!r} was interrupted (its server stopped, or it "
                    "ran past its lease) and may or may not have taken effect; check, then retry with a new key"
                )
            if now >= stop:
                raise Unavailable(f"a call with idempotency key {key!r} is still running; retry later", retry_after=0.5)
            await asyncio.sleep(self.poll)
            again = await self.store.idempotency_get(principal, key)
            if again is None or again.expires_at <= self._clock():  # given back: claim it now
                return await self.begin(principal, key, method, args, timeout)
            found = again

    async def finish(
        self, principal: str, key: str, owner: str, status: Status, message: str | None, value: bytes | None
    ) -> None:
        """Record the call's answer under its claim."""
        if not await self.store.idempotency_finish(principal, key, owner, int(status), message, value):
            log.warning("idempotency key of %s was taken over before its answer was recorded", principal)

    async def release(self, principal: str, key: str, owner: str) -> None:
        """Give the claim back: the call failed retryably and may run again."""
        try:
            await self.store.idempotency_release(principal, key, owner)
        except Exception:  # the lease runs out on its own
            log.warning("could not release an idempotency key of %s", principal, exc_info=True)

    async def _sweep(self, now: float) -> bool:
        """Delete one batch of expired keys; whether the batch was full.

        A batch a minute would not keep up with more than that many keyed calls a
        minute (the table would grow without bound), so a full batch has the next
        call sweep again: at most one batch per call, while there is a backlog.
        """
        try:
            return await self.store.idempotency_expire(now, _SWEEP_BATCH) >= _SWEEP_BATCH
        except Exception:
            log.warning("could not delete expired idempotency keys", exc_info=True)
            return False

    def detach(self, principal: str, most: int, most_each: int) -> bool:
        """Count a call of ``principal`` running on detached, unless ``most`` run so already, or
        ``most_each`` of ``principal``'s: whether it may (``detached`` must follow when it ends)."""
        counts = self._detached_counts
        if counts["detached_calls"] >= most or self._detached[principal] >= most_each:
            counts["detached_calls_refused"] += 1
            return False
        counts["detached_calls"] += 1
        counts["detached_calls_total"] += 1
        self._detached[principal] += 1
        return True

    def detached(self, principal: str) -> None:
        """A call ``detach`` counted has ended."""
        self._detached_counts["detached_calls"] -= 1
        left = self._detached[principal] - 1
        if left > 0:
            self._detached[principal] = left
        else:
            del self._detached[principal]

    def stats(self) -> dict[str, int]:
        """detached_calls: keyed calls running on now after their connection was lost;
        detached_calls_total: such calls so far; detached_calls_refused: calls cancelled with their
        connection as before, over limits.max_detached_calls or its per-principal twin."""
        return dict(self._detached_counts)

    @staticmethod
    def replay(record: IdempotencyRecord) -> tuple[Status, str | None, msgspec.Raw | None]:
        """The first answer as (status, error message, encoded value)."""
        try:
            status = Status(record.status or 0)
        except ValueError:
            status = Status.UNKNOWN
        value = msgspec.Raw(record.value) if record.value is not None else None
        return status, record.message, value
