"""Declaring services: plain type-hinted Python functions become remote methods.

    svc = Service("greeter")

    @svc.method(public=True, idempotent=True)
    async def hello(name: str, times: int = 1) -> str:
        return ", ".join([f"Hello, {name}!"] * times)

The hints are the contract. Arguments are validated from them by msgspec
before the handler runs; a bad argument is answered INVALID_ARGUMENT naming
the field. A service declared ``Service(name, refuse_nul=True)`` (every
built-in one) also refuses text holding NUL (U+0000) there, in every ``str``
of its methods' arguments -- nested in lists, dicts and structs too, but not
in values typed ``Any`` nor in parameters typed ``OpaqueText`` -- so that no
such text reaches its store (PostgreSQL text cannot hold NUL; SQLite's can).
Four shapes are recognised from the signature:

* unary: ``def f(a: int) -> T`` (sync functions run in a thread pool);
* server stream: an ``async def`` generator, ``-> AsyncIterator[T]``;
* client stream: one parameter typed ``AsyncIterator[T]``, fed by the client;
* bidirectional: both.

A parameter typed ``Context`` receives the call's context (principal,
deadline, request id, metadata, and the server's narrow ``ServerInfo``). This
module knows nothing of the wire format.
"""

from __future__ import annotations

import collections.abc
import enum
import inspect
import re
import time
import typing
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Annotated, Any, Protocol, TypeVar, overload

import msgspec

from bastion.exceptions import CallError, UsageError
from bastion.security.principal import Principal

__all__ = [
    "Context",
    "MethodKind",
    "MethodSpec",
    "OpaqueText",
    "ServerInfo",
    "Service",
    "brief_error",
]

F = TypeVar("F", bound=Callable[..., Any])
_NAME = re.compile(r"^[a-z_][a-z0-9_]*\Z")

#: The key of msgspec's ``Meta.extra`` that marks text exempt from ``refuse_nul`` (``OpaqueText``).
OPAQUE_TEXT_KEY = "bastion.opaque_text"
#: Text that a ``refuse_nul`` service takes as it comes, NUL and all: for a parameter whose text is
#: never stored as text (a password, of which only a hash is kept).
OpaqueText = Annotated[str, msgspec.Meta(extra={OPAQUE_TEXT_KEY: True})]


def brief_error(error: str, most: int = 200) -> str:
    """A msgspec validation ``error`` with its reason cut to ``most`` characters (and its length), its path
    kept: msgspec names an unknown field, or a value no Literal or Enum allows, in full, and an error must
    not echo a caller's megabyte back. Both the arguments of a call and those of a job are refused so."""
    reason, at, path = error.rpartition(" - at `")
    if not at or not path.startswith("$") or len(path) > most:  # a marker inside the caller's text, not a path
        reason, at, path = error, "", ""
    if len(reason) > most:
        reason = f"{reason[:most]}... ({len(reason)} characters)"
    return f"{reason}{at}{path}"


class MethodKind(enum.Enum):
    UNARY = "unary"
    SERVER_STREAM = "server_stream"
    CLIENT_STREAM = "client_stream"
    BIDI_STREAM = "bidi_stream"


class ServerInfo(Protocol):
    """What a service may know of the server hosting it: nothing more."""

    @property
    def version(self) -> str: ...

    @property
    def started_at(self) -> float: ...

    @property
    def draining(self) -> bool:
        """True once the server is shutting down: it finishes calls it accepted but takes no new work."""
        ...

    def stats(self) -> Mapping[str, int | float]: ...

    def limits(self) -> Mapping[str, int | float]:
        """The limits every connection runs under (frame size, calls in flight, ...)."""
        ...

    async def rate_usage(self, principal: Principal, peer: str) -> Mapping[str, Any]:
        """The rate limits that apply to ``principal`` calling from ``peer``, and what is left."""
        ...

    def describe(self) -> list[dict[str, Any]]: ...


class PrincipalSource(Protocol):
    """A connection whose principal revalidation may change, and which a drain ends (``ServerSession``)."""

    def watch_principal(self, callback: Callable[[Principal], None]) -> Callable[[], None]: ...

    def end_at_drain(self, call_id: int, ending: Callable[[bool], CallError]) -> Callable[[], None]: ...


def _unwatched() -> None:
    return None


_new_object = object.__new__


class Context:
    """Per-call facts a handler may ask for by declaring a ``Context`` parameter."""

    __slots__ = (
        "_call_id",
        "_principals",
        "_request_id",
        "_session_id",
        "deadline",
        "metadata",
        "method",
        "peer",
        "principal",
        "server",
    )

    def __init__(
        self,
        *,
        method: MethodSpec,
        principal: Principal,
        request_id: str,
        peer: str,
        deadline: float | None,
        metadata: Mapping[str, str],
        server: ServerInfo,
        principals: PrincipalSource | None = None,
    ) -> None:
        self._principals = principals
        self.method = method
        self.principal = principal
        self._request_id: str | None = request_id
        self._session_id = self._call_id = 0
        self.peer = peer
        self.deadline = deadline  # time.monotonic() value, or None
        self.metadata = metadata
        self.server = server

    @property
    def request_id(self) -> str:
        """The call's id in the server's logs (an internal error's answer names it too)."""
        request_id = self._request_id
        if request_id is None:  # made on first use: few handlers ask, and formatting it is not free
            request_id = self._request_id = f"{self._session_id:x}-{self._call_id:x}"
        return request_id

    @staticmethod
    def _make(
        method: MethodSpec,
        principal: Principal,
        session_id: int,
        call_id: int,
        peer: str,
        deadline: float | None,
        metadata: Mapping[str, str],
        server: ServerInfo,
        principals: PrincipalSource | None,
    ) -> Context:
        """The server's ``Context(...)`` for each call, the same object made without the class call and
        its eight keywords (which cost a unary call several thousand instructions on CPython 3.11);
        its ``request_id`` is ``f"{session_id:x}-{call_id:x}"``, made if it is asked for."""
        ctx = _new_object(Context)
        ctx._principals = principals
        ctx.method = method
        ctx.principal = principal
        ctx._request_id = None
        ctx._session_id = session_id
        ctx._call_id = call_id
        ctx.peer = peer
        ctx.deadline = deadline
        ctx.metadata = metadata
        ctx.server = server
        return ctx

    def watch_principal(self, callback: Callable[[Principal], None]) -> Callable[[], None]:
        """Have ``callback`` called with the connection's principal each time revalidation replaces it
        (its roles changed; a disabled, deleted or revoked one closes the connection instead), so a long
        call can re-check its access; returns the function that stops it. Never called for a call
        whose connection is not revalidated (in-memory, or a principal that cannot change)."""
        if self._principals is None:
            return _unwatched
        return self._principals.watch_principal(callback)

    def end_at_drain(self, ending: Callable[[bool], CallError]) -> Callable[[], None]:
        """For a ``resumable`` stream: have a drain end it with ``ending(unsent)``'s status, message and
        ``details`` (the server adds its retry-after) instead of a bare UNAVAILABLE, so the stream's ending
        can say where to resume; returns the function that stops it. ``unsent``: the item the handler
        yielded last is still waiting for the client's credit (it never reaches the client). Called at
        once as the drain begins, in the event loop: it must not block, and the handler is cancelled
        right after (it runs no further). Never called for a call that no drain ends (in-memory)."""
        if self._principals is None:
            return _unwatched
        return self._principals.end_at_drain(self._call_id, ending)

    def time_remaining(self) -> float | None:
        """Seconds left before the call's deadline, or None without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())


class MethodSpec(msgspec.Struct, frozen=True):
    """Everything the server needs to know about one method, built once."""

    service: str
    name: str
    handler: Callable[..., Any]
    kind: MethodKind
    is_async: bool
    args_type: type[msgspec.Struct]
    result_type: Any
    input_type: Any  # item type of the client stream, or None
    input_param: str | None
    context_param: str | None
    public: bool = False
    idempotent: bool = False
    priority: int = 0
    roles: frozenset[str] = frozenset()
    resumable: bool = False  # a draining server ends it at once (Service.method)
    doc: str = ""
    refuse_nul: bool = False  # its service's: text holding NUL in its arguments is INVALID_ARGUMENT

    @property
    def full_name(self) -> str:
        return f"{self.service}.{self.name}"

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description: names, flags and JSON Schemas."""
        params = _schema(self.args_type)  # {} for types JSON Schema cannot express
        defs = params.pop("$defs", {})
        args = defs.pop(self.args_type.__name__, params)
        out: dict[str, Any] = {
            "name": self.full_name,
            "kind": self.kind.value,
            "doc": self.doc,
            "public": self.public,
            "idempotent": self.idempotent,
            "priority": self.priority,
            "roles": sorted(self.roles),
            "params": args,
            "result": _schema(self.result_type),
        }
        if self.input_type is not None:
            out["input"] = _schema(self.input_type)
        if defs:
            out["$defs"] = defs
        return out


def _schema(tp: Any) -> Any:
    try:
        return msgspec.json.schema(tp)
    except TypeError:
        return {}


class Service:
    """A named group of methods.

    refuse_nul: text holding NUL (U+0000) anywhere in a ``str`` of a method's
    arguments is answered INVALID_ARGUMENT naming the argument, before the
    handler runs (parameters typed ``OpaqueText`` and values typed ``Any``
    excepted). The built-in services set it, as their text goes to the store;
    a user's service may well want arbitrary strings, so it is off by default.
    """

    def __init__(self, name: str, *, doc: str = "", refuse_nul: bool = False) -> None:
        if not _NAME.match(name):
            raise UsageError(f"service name {name!r} must match {_NAME.pattern}")
        self.name = name
        self.doc = doc
        self.refuse_nul = refuse_nul
        self.methods: dict[str, MethodSpec] = {}

    def __repr__(self) -> str:
        return f"Service({self.name!r}, methods={sorted(self.methods)})"

    @overload
    def method(self, fn: F, /) -> F: ...

    @overload
    def method(
        self,
        *,
        name: str | None = None,
        public: bool = False,
        idempotent: bool = False,
        priority: int = 0,
        roles: Iterable[str] = (),
        resumable: bool = False,
    ) -> Callable[[F], F]: ...

    def method(  # type: ignore[misc]  # mypy misreads the bare-decorator overload
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        public: bool = False,
        idempotent: bool = False,
        priority: int = 0,
        roles: Iterable[str] = (),
        resumable: bool = False,
    ) -> F | Callable[[F], F]:
        """Register ``fn`` as a method; usable bare or with options.

        public: anonymous connections may call it (health, login).
        idempotent: running it twice has the effect of once; clients may retry.
        priority: default scheduling priority (higher runs first under load).
        roles: roles a caller needs (an ``admin`` passes every check).
        resumable: a server stream that never ends by itself (a watch, a
        subscription) and that the client resumes from where it got to: a
        draining server ends it at once with UNAVAILABLE, rather than waiting
        out its grace period for it and then cutting it off.
        """

        def register(func: F) -> F:
            spec = build_spec(
                self.name,
                func,
                name=name or func.__name__,
                public=public,
                idempotent=idempotent,
                priority=priority,
                roles=frozenset(roles),
                resumable=resumable,
                refuse_nul=self.refuse_nul,
            )
            if spec.name in self.methods:
                raise UsageError(f"{spec.full_name} is declared twice")
            self.methods[spec.name] = spec
            return func

        return register(fn) if fn is not None else register


def build_spec(
    service: str,
    func: Callable[..., Any],
    *,
    name: str,
    public: bool,
    idempotent: bool,
    priority: int,
    roles: frozenset[str],
    resumable: bool = False,
    refuse_nul: bool = False,
) -> MethodSpec:
    """Read a function's signature and hints into a ``MethodSpec``."""
    full = f"{service}.{name}"
    if not _NAME.match(name):
        raise UsageError(f"method name {name!r} must match {_NAME.pattern}")
    try:
        hints = typing.get_type_hints(func, include_extras=True)  # keep Annotated constraints
    except Exception as exc:
        raise UsageError(f"{full}: cannot resolve type hints: {exc}") from exc
    signature = inspect.signature(func)
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    input_param = context_param = input_type = None
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise UsageError(f"{full}: parameter {param.name!r} must be an ordinary named parameter")
        if param.name not in hints:
            raise UsageError(f"{full}: parameter {param.name!r} needs a type hint")
        hint = hints[param.name]
        if hint is Context:
            context_param = param.name
            continue
        item = _async_iterator_item(hint)
        if item is not None:
            if input_param is not None:
                raise UsageError(f"{full}: only one parameter may be a client stream")
            input_param, input_type = param.name, item
            continue
        if param.default is param.empty:
            fields.append((param.name, hint))
        else:
            fields.append((param.name, hint, param.default))
    is_gen = inspect.isasyncgenfunction(func)
    is_async = is_gen or inspect.iscoroutinefunction(func)
    returns = hints.get("return", Any)
    output_item = _async_iterator_item(returns)
    if is_gen and output_item is None:
        output_item = Any
    if output_item is not None and not is_gen:
        raise UsageError(f"{full}: a server stream must be an async generator function")
    if not is_async and (input_param is not None or inspect.isgeneratorfunction(func)):
        raise UsageError(f"{full}: streaming methods must be async")
    kind = {
        (False, False): MethodKind.UNARY,
        (True, False): MethodKind.SERVER_STREAM,
        (False, True): MethodKind.CLIENT_STREAM,
        (True, True): MethodKind.BIDI_STREAM,
    }[(output_item is not None, input_param is not None)]
    try:
        args_type = msgspec.defstruct(
            full, fields, kw_only=True, forbid_unknown_fields=True, module=getattr(func, "__module__", None)
        )
        msgspec.msgpack.Decoder(args_type)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{full}: argument types are not supported: {exc}") from exc
    if resumable and output_item is None:
        raise UsageError(f"{full}: only a server stream can be resumable")
    return MethodSpec(
        service=service,
        name=name,
        handler=func,
        kind=kind,
        is_async=is_async,
        args_type=args_type,
        result_type=output_item if output_item is not None else returns,
        input_type=input_type,
        input_param=input_param,
        context_param=context_param,
        public=public,
        idempotent=idempotent,
        priority=priority,
        roles=roles,
        resumable=resumable,
        doc=inspect.getdoc(func) or "",
        refuse_nul=refuse_nul,
    )


def _async_iterator_item(hint: Any) -> Any:
    """``T`` for AsyncIterator[T] / AsyncIterable[T] / AsyncGenerator[T, ...], else None."""
    origin = typing.get_origin(hint)
    if origin in (
        collections.abc.AsyncIterator,
        collections.abc.AsyncIterable,
        collections.abc.AsyncGenerator,
    ):
        args = typing.get_args(hint)
        return args[0] if args else Any
    if hint in (AsyncIterator, collections.abc.AsyncIterable, collections.abc.AsyncGenerator):
        return Any
    return None
