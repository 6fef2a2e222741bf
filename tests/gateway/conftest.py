"""A real server and its gateway over real TCP, running in a background thread's event loop.

``world`` (one per module) hosts auth, kv and the demo service on a real
``Server`` with the real ``StoreAuthenticator`` over SQLite, listening for
native clients on a free port, with the gateway (``bastion.gateway.serve``)
on another. Tests talk to it as outside clients would: urllib, curl, the
``websockets`` client, and bastion's own ``Client`` for the native door.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from bastion.config import KVConfig
from bastion.gateway import GatewayConfig, GatewayServer, serve
from bastion.security.audit import AuditLog
from bastion.security.authn import StoreAuthenticator, hash_token, new_token, new_token_id
from bastion.security.credentials import Token, User
from bastion.security.passwords import PasswordHasher
from bastion.security.principal import ADMIN_ROLE
from bastion.security.ratelimit import RateLimitConfig, RateLimiter, RateRule
from bastion.security.throttle import LoginThrottle
from bastion.server.server import Server
from bastion.services.auth import create_service
from bastion.services.kv import KV
from bastion.store import open_store
from tests.support.demo_service import service as demo
from tests.support.stores import service_store

T = TypeVar("T")
PASSWORD = "correct horse battery"
#: Calls to demo.* a holder of role "limited" may make at once (burst), refilling negligibly.
LIMITED_BURST = 10
#: The roles of the users the world creates (each gets an API token; carol a password).
USERS = {
    "root": frozenset({ADMIN_ROLE}),
    "ada": frozenset(),
    "olga": frozenset({"ops"}),
    "lim": frozenset({"limited"}),
    "carol": frozenset(),
}


class Reply(msgspec.Struct):
    status: int
    headers: dict[str, str]
    cookies: list[str]
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


class World:
    """Handles on the running server; ``run`` executes a coroutine in its loop."""

    def __init__(self, tmp: Path, config: GatewayConfig) -> None:
        self.tmp = tmp
        self.config = config
        self.tokens: dict[str, str] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Server | None = None
        self.gateway: GatewayServer | None = None
        self.native_port = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="gateway-world", daemon=True)

    # -- lifecycle (test thread) ------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("the world did not start")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def run(self, coro: Awaitable[T], timeout: float = 20.0) -> T:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    @property
    def url(self) -> str:
        assert self.gateway is not None
        return self.gateway.url

    # -- the server (its own thread) ----------------------------------------------

    def _main(self) -> None:
        try:
            asyncio.run(self._amain())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()

    async def _amain(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with open_store(service_store(self.tmp)) as store:
            audit = AuditLog(self.tmp / "audit.log")
            throttle = LoginThrottle(store, max_failures=5, lockout=60)
            now = time.time()
            for name, roles in USERS.items():
                hashed = await PasswordHasher(fast=True).hash(PASSWORD) if name == "carol" else None
                await store.create_user(User(name, roles, hashed, now))
                token = self.tokens[name] = new_token()
                await store.add_token(Token(new_token_id(), hash_token(token), name, "api", "test", now))
            kv = KV(store, KVConfig(sweep_interval=3600))
            await kv.start()
            auth = create_service(store, hasher=PasswordHasher(fast=True), throttle=throttle, audit=audit)
            limiter = RateLimiter(
                RateLimitConfig(rules=[RateRule(method="demo.*", rate=0.001, burst=LIMITED_BURST, role="limited")])
            )
            server = self.server = Server(
                [auth, kv.service, demo],
                authenticator=StoreAuthenticator(store, throttle, audit),
                limiter=limiter,
                audit=audit,
            )
            await server.start("127.0.0.1", 0)
            self.native_port = server.port
            self.gateway = await serve(server, self.config)
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await self.gateway.aclose()
                await server.shutdown(grace=1)
                await kv.aclose()
                audit.close()


def start_world(tmp: Path, config: GatewayConfig | None = None) -> World:
    world = World(tmp, config or GatewayConfig(http_port=0))
    world.start()
    return world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = start_world(tmp_path_factory.mktemp("gateway"))
    yield w
    w.stop()


def http(
    world: World,
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> Reply:
    """One HTTP request with urllib; any status comes back as a Reply (no exception)."""
    data = raw if raw is not None else (msgspec.json.encode(body) if body is not None else None)
    request = urllib.request.Request(world.url + path, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in (headers or {}):
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return _reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as exc:
        return _reply(exc.code, exc.headers, exc.read())


def _reply(status: int, headers: Any, body: bytes) -> Reply:
    return Reply(
        status,
        {k.lower(): v for k, v in headers.items()},
        headers.get_all("set-cookie") or [],
        body,
    )


def bearer(world: World, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {world.tokens[user]}"}


#: The headers every answer of the gateway's carries (an API answer: cache-control too), with their values.
SECURITY_HEADERS = ("content-security-policy", "x-content-type-options", "x-frame-options", "referrer-policy")


def assert_security_headers(world: World, headers: Any) -> None:
    """``headers`` (any mapping with ``get``) carry the same security headers as a normal answer does."""
    normal = http(world, "GET", "/livez").headers
    for name in (*SECURITY_HEADERS, "cache-control"):
        assert headers.get(name) == normal[name], (name, headers.get(name))


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)
