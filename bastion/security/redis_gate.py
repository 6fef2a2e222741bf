"""How the limits that span replicas ask Redis: scripts by their SHA-1, and a pause after a failure.

Theory of operation. ``RedisGate.ask`` awaits a Redis command while Redis is
healthy. After a failure it is not asked for ``RETRY_AFTER`` seconds (the
command is dropped unawaited and ``Skipped`` raised at once, so that every
call does not wait out a timeout of its own on a Redis that is down); then
one request at a time tries it, the others still skipped, until one gets an
answer. ``run`` runs a Lua script by its SHA-1, loading it the first time
Redis says it does not know it. The call rate limiter (ratelimit_redis.py)
and the login throttle (throttle_redis.py) each keep one.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

__all__ = ["LUA_NOW", "RETRY_AFTER", "RedisGate", "Skipped"]

#: Seconds Redis is not asked after it failed.
RETRY_AFTER: Final = 1.0
#: The opening of a script given the time as ARGV[1] ('': Redis's own TIME): ``now``, in seconds.
LUA_NOW: Final = """
local now = tonumber(ARGV[1])
if not now then
  if redis.replicate_commands then pcall(redis.replicate_commands) end
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

T = TypeVar("T")


class Skipped(OSError):
    """Redis was not asked: it failed moments ago."""


class RedisGate:
    """One client's way to Redis; ``errors``: what counts as Redis failing (``Skipped`` is one of them)."""

    def __init__(self, client: Any, redis_module: Any, on_back: Callable[[], None] = lambda: None) -> None:
        self.client = client
        self.errors: tuple[type[BaseException], ...] = (redis_module.exceptions.RedisError, OSError, TimeoutError)
        self._no_script: type[BaseException] = redis_module.exceptions.NoScriptError
        self._on_back = on_back  # called when Redis answers again after failing
        self._down_until = 0.0  # time.monotonic() before which Redis is not asked (0.0: it is healthy)
        self._probing = False  # a request is trying Redis again after a failure
        self._shas: dict[str, str] = {}

    @property
    def healthy(self) -> bool:
        """Redis has not failed since it last answered (a command would be sent, not skipped)."""
        return not self._down_until

    async def run(self, script: str, keys: Sequence[str], args: Sequence[str]) -> Any:
        """Run the Lua ``script`` (EVALSHA; loaded first if Redis does not know it) through ``ask``."""
        return await self.ask(self._run(script, keys, args))

    async def _run(self, script: str, keys: Sequence[str], args: Sequence[str]) -> Any:
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = hashlib.sha1(script.encode()).hexdigest()
        try:
            return await self.client.evalsha(sha, len(keys), *keys, *args)
        except self._no_script:
            await self.client.script_load(script)
            return await self.client.evalsha(sha, len(keys), *keys, *args)

    async def ask(self, command: Awaitable[T]) -> T:
        """Await ``command`` unless Redis failed in the last ``RETRY_AFTER`` seconds or is being retried;
        skipped, it raises ``Skipped`` at once."""
        if not self._down_until:  # healthy: the usual path, one test
            try:
                return await command
            except self.errors:
                self._down_until = time.monotonic() + RETRY_AFTER
                raise
        if self._probing or time.monotonic() < self._down_until:
            close = getattr(command, "close", None)  # a coroutine never awaited: no "never awaited" warning
            if close is not None:
                close()
            raise Skipped("skipped while Redis is failing")
        self._probing = True
        try:
            result = await command
        except self.errors:
            self._down_until = time.monotonic() + RETRY_AFTER
            raise
        finally:
            self._probing = False
        self._down_until = 0.0
        self._on_back()
        return result
