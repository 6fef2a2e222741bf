"""Rate limits on a real server: a greedy client is refused with retry-after,
a well-behaved one is not disturbed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import bastion
from bastion import Client, SyncClient
from tests.support.server import ServerProcess

CONFIG = """
[rate_limits]
rules = [{ method = "demo.echo", role = "user", rate = 20, burst = 20 }]
"""


def _tokens(server: ServerProcess) -> tuple[str, str]:
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as root:
        tokens = []
        for name in ("greedy", "nice"):
            root.auth.create_user(name=name, roles=["user"])
            tokens.append(root.auth.create_token(user=name)["token"])
    return tokens[0], tokens[1]


def test_a_greedy_client_is_limited_and_a_nice_one_is_not(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "bastion.toml"
    config.write_text(CONFIG)
    server: ServerProcess = server_factory(args=("--config", str(config)))
    greedy_token, nice_token = _tokens(server)

    async def main() -> tuple[int, list[float], int, int]:
        ok = 0
        retry_afters: list[float] = []
        nice_ok = nice_failed = 0
        async with (
            Client(server.address, token=greedy_token, timeout=10, retry=None) as greedy,
            Client(server.address, token=nice_token, timeout=10, retry=None) as nice,
        ):

            async def hammer() -> None:  # 1000 calls/s for 2 s: 50x the 20/s limit
                nonlocal ok
                for _ in range(40):
                    results = await asyncio.gather(
                        *[greedy.demo.echo(value=i) for i in range(50)], return_exceptions=True
                    )
                    for result in results:
                        if isinstance(result, bastion.ResourceExhausted):
                            assert result.retry_after is not None and result.retry_after > 0
                            retry_afters.append(result.retry_after)
                        elif isinstance(result, BaseException):
                            raise result
                        else:
                            ok += 1
                    await asyncio.sleep(0.05)

            async def behave() -> None:  # 10 calls/s, half its limit
                nonlocal nice_ok, nice_failed
                for i in range(20):
                    try:
                        assert await nice.demo.echo(value=i) == i
                        nice_ok += 1
                    except bastion.CallError:
                        nice_failed += 1
                    await asyncio.sleep(0.1)

            await asyncio.gather(hammer(), behave())
        return ok, retry_afters, nice_ok, nice_failed

    ok, retry_afters, nice_ok, nice_failed = asyncio.run(main())
    assert len(retry_afters) > 1000, "most of the greedy client's calls are refused"
    assert ok <= 20 + 20 * 3 + 10, f"{ok} greedy calls got through in ~2 s at 20/s, burst 20"
    assert nice_ok / (nice_ok + nice_failed) >= 0.99
    with SyncClient(server.address, token=greedy_token, timeout=5) as greedy:
        usage = greedy.auth.whoami()["rate_limits"]
    assert usage["enabled"] is True
    assert any(limit.get("method") == "demo.echo" for limit in usage["limits"])
