"""``bastion topics pub|sub`` against a real ``bastion serve``."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bastion.client.aio import Client
from tests.support.server import bastion_cli, clean_env


def test_pub_and_sub_from_the_shell(server_factory: Any, tmp_path: Path) -> None:
    config = tmp_path / "bastion.toml"
    config.write_text('[[messages.topics.durable]]\npattern = "orders.>"\n')
    server = server_factory(env={"BASTION_CONFIG": str(config)})
    addr, token = server.address, ["--token-file", str(server.token_file)]

    async def whoami() -> str:
        async with Client(addr, token=server.token) as client:
            return str((await client.auth.whoami())["name"])

    me = asyncio.run(whoami())
    (tmp_path / "blob").write_bytes(bytes(range(256)))
    assert bastion_cli("topics", "pub", addr, "orders.eu", "hello", *token).stdout.strip() == "1"
    assert bastion_cli("topics", "pub", addr, "orders.eu", '{"a": [1, 2]}', "--data", *token).stdout.strip() == "2"
    published = bastion_cli("topics", "pub", addr, "orders.eu", f"@{tmp_path / 'blob'}", "--header", "k=v", *token)
    assert published.stdout.strip() == "3", published.stderr
    live = bastion_cli("topics", "pub", addr, "chat.lobby", "-", "--json", *token, stdin="piped")
    assert live.returncode == 0 and json.loads(live.stdout) == {"topic": "chat.lobby", "offset": None}
    bad = bastion_cli("topics", "pub", addr, "orders..eu", "x", *token)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr
    bad_data = bastion_cli("topics", "pub", addr, "orders.eu", "{not json", "--data", *token)
    assert bad_data.returncode == 2 and "not valid JSON" in bad_data.stderr

    lines = _first_lines(["topics", "sub", addr, "orders.eu", "--from-offset", "1", *token], 3)
    assert lines == [
        f"orders.eu\t1\t{me}\thello",
        f'orders.eu\t2\t{me}\t{{"a":[1,2]}}',
        f"orders.eu\t3\t{me}\t<256 bytes>",
    ]
    start, message = map(
        json.loads, _first_lines(["topics", "sub", addr, "orders.eu", "--from-offset", "3", "--json", *token], 2)
    )
    assert start["type"] == "start"
    assert (message["offset"], message["headers"], message["publisher"]) == (3, {"k": "v"}, me)
    assert base64.b64decode(message["payload"]) == bytes(range(256))
    wide = bastion_cli("topics", "sub", addr, "orders.*", "--from-offset", "1", *token)
    assert wide.returncode == 1 and "one durable topic" in wide.stderr


def _first_lines(args: list[str], n: int) -> list[str]:
    """The first ``n`` lines a long-running command prints, then it is stopped."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bastion", *args], env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        return [process.stdout.readline().rstrip("\n") for _ in range(n)]
    finally:
        process.kill()
        process.wait(10)
