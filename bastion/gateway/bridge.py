"""The bridge: HTTP callers' calls, sent over in-memory bastion connections to the same server.

Theory of operation. The gateway is a second door into the one server, not
a second rule set, so it never authenticates, authorizes, rate-limits or
schedules anything itself. For each caller -- a credential (bearer token,
session cookie's token, or none) from one client address -- the bridge
keeps a ``DirectSession`` (bastion/server/direct.py): a real
``ServerSession`` whose handshake carries that credential and whose peer
address is the HTTP client's, answering into futures instead of frames. So
the server's own handshake authenticates it with the server's
``Authenticator`` (login throttles and per-source limits see the real
address), and every call on it passes session admission, the method table's
checks (existence, roles, argument validation), the rate limiter and the
scheduler exactly as a call from a native client does; revalidation closes
the session once its token is revoked, as for any connection.

Streams need the wire's flow control, so a caller's server streams and
uploads go over an in-memory bastion connection instead (a real ``Client``
joined to a real ``ServerSession`` by bastion/transport/memory.py), with the
same handshake and checks.

Calls in flight. A unary call's result is held by its direct session (decoded, and as MessagePack) from
the moment the call ends until the gateway's task takes it; a session may have ``limits.max_inflight``
calls in flight and every caller has one, so the bridge caps the unary calls in flight through it at once,
gateway-wide (``max_calls``: ``gateway.max_calls_in_flight``). Past it a call is refused at once with
RESOURCE_EXHAUSTED and ``retry_after`` 1 (HTTP 429, Retry-After), before anything is sent: waiting would hold
the request and its body instead. Streams and uploads are not counted (their items come under the
wire's flow control, a window at a time), and ``auth.logout`` is never refused for it (counted, though).

Sessions and connections are pooled by (credential, client host) and closed
after ``idle`` seconds unused; past ``max_clients`` the least recently used
is closed first. One the server closed (idle timeout, GoAway, revocation) is
simply reopened on next use -- with the handshake, and so the credential
check, done again.

Arguments. JSON has no bytes, so a ``bytes`` parameter arrives as a base64
string. Before sending, the bridge converts the JSON arguments with the
method's own argument type (``msgspec.convert``, strict), which turns base64
into bytes; if that conversion fails, the arguments go as they are and the
server refuses them with its own INVALID_ARGUMENT -- after its own
authentication and authorization checks, in the native order, so a caller
learns nothing here it would not learn natively. Positional ``params`` are
matched to the parameters in declaration order. Arguments whose types JSON
carries as they are (strings, numbers, lists, maps, structs of those: most
methods) skip that conversion, which would change nothing. JSON can say what MessagePack
cannot (an integer past 64 bits, say): such arguments are refused with
INVALID_ARGUMENT before anything is sent (a frame past the size limit with
RESOURCE_EXHAUSTED), whatever the method.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

import msgspec
import msgspec.inspect as mi

from bastion.client.aio import Client
from bastion.client.policy import RetryPolicy
from bastion.exceptions import LocalProtocolError, ResourceExhausted, error_for_status
from bastion.security.principal import Principal
from bastion.server.direct import DirectSession
from bastion.server.server import Server
from bastion.service import MethodKind
from bastion.transport.aio import Link

__all__ = ["Bridge", "Caller"]


class Caller(msgspec.Struct, frozen=True):
    """Who is calling: a credential (None: anonymous) from ``address`` ("host:port")."""

    token: str | None
    address: str

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0].strip("[]")

    def key(self) -> tuple[str | None, str]:
        """What its session is pooled by: the credential and the client's host."""
        return self.token, self.host


class _Pooled:
    """One caller's way in: a direct session for unary calls, a client for streams (each made on first use)."""

    __slots__ = ("busy", "client", "door", "last_used", "opening")

    def __init__(self) -> None:
        self.door: DirectSession | None = None
        self.client: Client | None = None
        self.opening = asyncio.Lock()  # one handshake at a time for the door
        self.last_used = time.monotonic()
        self.busy = 0

    @property
    def authenticated(self) -> bool:
        """Whether one of its ways in got through a handshake (a bad token gets nowhere: nothing is kept)."""
        return (self.door is not None and self.door.open) or (
            self.client is not None and self.client.welcome is not None
        )

    async def close(self) -> None:
        if self.door is not None:
            self.door.close()
        if self.client is not None:
            await self.client.close()


class Bridge:
    """Calls into ``server`` on behalf of HTTP callers (see the module docstring)."""

    def __init__(self, server: Server, *, idle: float = 60.0, max_clients: int = 4096, max_calls: int = 512) -> None:
        self.server = server
        self.max_calls = max_calls
        self.calls = 0  # unary calls in flight (see "Calls in flight" above)
        self.idle = idle
        self.max_clients = max_clients
        self._pool: collections.OrderedDict[tuple[str | None, str], _Pooled] = collections.OrderedDict()
        self._plain: dict[str, bool] = {}  # method -> its arguments need no conversion from JSON
        self._sweeper: asyncio.Task[None] | None = None

    # -- the method table, read-only --------------------------------------------------

    def kind(self, method: str) -> MethodKind | None:
        entry = self.server.table.entries.get(method)
        return entry.spec.kind if entry is not None else None

    def arguments(self, method: str, params: dict[str, Any] | list[Any] | None) -> dict[str, Any]:
        """JSON ``params`` as the arguments to send (see "Arguments" above)."""
        entry = self.server.table.entries.get(method)
        if params is None:
            args: dict[str, Any] = {}
        elif isinstance(params, list):
            names = entry.fields if entry is not None else ()
            args = {names[i] if i < len(names) else f"positional[{i}]": value for i, value in enumerate(params)}
        else:
            args = params
        if entry is None:
            return args
        plain = self._plain.get(method)
        if plain is None:
            plain = self._plain[method] = _json_native(entry.spec.args_type)
        if plain:
            return args
        try:
            converted = msgspec.convert(args, entry.spec.args_type)
        except (msgspec.ValidationError, TypeError):
            return args  # the server refuses them, in its own order of checks
        return {name: getattr(converted, name) for name in entry.fields}

    # -- calls -------------------------------------------------------------------------

    async def call(self, caller: Caller, method: str, params: dict[str, Any] | list[Any] | None) -> Any:
        """Call ``method``; its result, or the call's ``CallError``.

        The connection's handshake errors (UNAUTHENTICATED for a bad token,
        RESOURCE_EXHAUSTED from the login throttle) are raised the same way; RESOURCE_EXHAUSTED too past
        ``max_calls`` in flight.
        """
        if self.calls >= self.max_calls and method != _LOGOUT:  # (ending a session is never put off)
            raise ResourceExhausted(
                f"the gateway has its limit of {self.max_calls} calls in flight (gateway.max_calls_in_flight): "
                "retry shortly",
                retry_after=1.0,
            )
        self.calls += 1
        pooled = self._checkout(caller)
        try:
            try:
                args = _args_encoder.encode(self.arguments(method, params))
            except (TypeError, ValueError, OverflowError) as exc:
                raise _unsendable(LocalProtocolError(f"cannot encode Call: {exc}")) from None
            if len(args) > self.server.limits.max_frame:
                raise ResourceExhausted(
                    f"the arguments cannot be sent: {len(args)} bytes exceed the server's limit of "
                    f"{self.server.limits.max_frame}"
                )
            door = pooled.door
            if door is None or not door.open:
                door = await self._door(pooled, caller)
            return await door.call(method, args)
        finally:
            self.calls -= 1
            self._checkin(pooled, caller)

    async def check(self, caller: Caller) -> Principal:
        """Open (or reuse) the caller's session: who it authenticated as; raises UNAUTHENTICATED for a bad
        credential (and whatever else the handshake refuses: the login throttle's RESOURCE_EXHAUSTED...)."""
        pooled = self._checkout(caller)
        try:
            return (await self._door(pooled, caller)).principal
        finally:
            self._checkin(pooled, caller)

    async def forget(self, caller: Caller) -> None:
        """Close the caller's session and connection now (after a logout, say)."""
        pooled = self._pool.pop(caller.key(), None)
        if pooled is not None:
            await pooled.close()

    async def stream(
        self, caller: Caller, method: str, params: dict[str, Any] | list[Any] | None
    ) -> AsyncIterator[Any]:
        """Call a server-streaming method; yield its items."""
        pooled = self._checkout(caller)
        try:
            async for item in self._client(pooled, caller).stream(method, **self.arguments(method, params)):
                yield item
        except LocalProtocolError as exc:
            raise _unsendable(exc) from None
        finally:
            self._checkin(pooled, caller)

    async def upload(self, caller: Caller, method: str, args: dict[str, Any], items: AsyncIterable[bytes]) -> Any:
        """Call a client-stream method, sending ``items``; its result."""
        pooled = self._checkout(caller)
        try:
            return await self._client(pooled, caller).upload(method, items, **args)
        except LocalProtocolError as exc:
            raise _unsendable(exc) from None
        finally:
            self._checkin(pooled, caller)

    # -- the pool ------------------------------------------------------------------------

    async def _door(self, pooled: _Pooled, caller: Caller) -> DirectSession:
        """The caller's direct session, opened (handshake and all) if it has none open."""
        door = pooled.door
        if door is not None and door.open:
            return door
        async with pooled.opening:
            door = pooled.door
            if door is not None and door.open:
                return door
            if door is not None:
                door.close()  # draining, or closed by the server
            pooled.door = None
            door = DirectSession(self.server, caller.address, caller.token)
            await door.start()
            pooled.door = door
            return door

    def _client(self, pooled: _Pooled, caller: Caller) -> Client:
        """The caller's in-memory client, for streams."""
        if pooled.client is None:
            client = Client("memory", token=caller.token, retry=_NO_RETRY, health_interval=None)
            client._connector = self._connector(caller.address)  # the seam bastion.testing uses too
            pooled.client = client
        return pooled.client

    def _checkout(self, caller: Caller) -> _Pooled:
        key = caller.key()
        pooled = self._pool.get(key)
        if pooled is None:
            pooled = self._pool[key] = _Pooled()
            self._evict()
            if self._sweeper is None or self._sweeper.done():
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        else:
            self._pool.move_to_end(key)
        pooled.busy += 1
        return pooled

    def _checkin(self, pooled: _Pooled, caller: Caller) -> None:
        pooled.busy -= 1
        pooled.last_used = time.monotonic()
        if not pooled.busy and not pooled.authenticated:
            # Never got through a handshake (a bad token, say): keep nothing for it.
            key = caller.key()
            if self._pool.get(key) is pooled:
                del self._pool[key]
            asyncio.get_running_loop().create_task(pooled.close())

    def _connector(self, address: str) -> Callable[[Callable[[], Link]], Any]:
        server = self.server

        async def connect(client_protocol: Callable[[], Link]) -> None:
            # A session like an accepted socket's, minus the connection slot,
            # whose peer is the HTTP client.
            server.connect_memory(client_protocol(), peer=address)

        return connect

    def _evict(self) -> None:
        while len(self._pool) > self.max_clients:
            for key, pooled in self._pool.items():
                if not pooled.busy:
                    del self._pool[key]
                    asyncio.get_running_loop().create_task(pooled.close())
                    break
            else:
                return  # every one is in use: let the pool run over for now

    async def _sweep(self) -> None:
        while self._pool:
            await asyncio.sleep(max(self.idle / 4, 0.05))
            cutoff = time.monotonic() - self.idle
            for key, pooled in list(self._pool.items()):
                if not pooled.busy and pooled.last_used < cutoff:
                    del self._pool[key]
                    await pooled.close()

    def __len__(self) -> int:
        return len(self._pool)

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        pool, self._pool = self._pool, collections.OrderedDict()
        for pooled in pool.values():
            await pooled.close()


_NATIVE = (mi.AnyType, mi.NoneType, mi.BoolType, mi.IntType, mi.FloatType, mi.StrType, mi.LiteralType)
_ITEMS = (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)
_RECORDS = (mi.StructType, mi.TypedDictType, mi.DataclassType, mi.NamedTupleType)


def _json_native(args_type: type) -> bool:
    """Whether decoded JSON validates as the method's arguments as it is: no bytes (base64), dates,
    enums, non-string map keys... anywhere in them, so ``msgspec.convert`` would change nothing."""
    seen: set[type] = set()

    def plain(info: mi.Type) -> bool:
        if isinstance(info, _NATIVE):
            return True
        if isinstance(info, _ITEMS):
            return plain(info.item_type)
        if isinstance(info, mi.TupleType):
            return all(plain(item) for item in info.item_types)
        if isinstance(info, mi.DictType):
            return isinstance(info.key_type, mi.StrType | mi.AnyType) and plain(info.value_type)
        if isinstance(info, mi.UnionType):
            return all(plain(member) for member in info.types)
        if isinstance(info, _RECORDS):
            if info.cls in seen:
                return True
            seen.add(info.cls)
            return all(plain(field.type) for field in info.fields)
        return False

    return plain(mi.type_info(args_type))


def _unsendable(exc: LocalProtocolError) -> Exception:
    """The coded error for arguments the native protocol cannot carry (nothing was sent)."""
    return error_for_status(int(exc.status), f"the arguments cannot be sent: {exc}")


_args_encoder = msgspec.msgpack.Encoder()
_LOGOUT = "auth.logout"
#: The gateway never retries: an HTTP caller decides for itself, as a native one does.
_NO_RETRY: RetryPolicy | None = None
