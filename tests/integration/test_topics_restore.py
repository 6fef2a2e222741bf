"""A restore of an older backup over a real ``bastion serve``'s data never hands a topic offset out again.

Before, the restored store went on from the archive's offsets: offsets 3 and
4, handed out after the backup, were handed out anew to other messages, and
a subscriber resuming ``from_offset=3`` from before the restore got those,
not the ones it had been given under them. Then the topic was restored
empty after the replaced store's last offset (OUT_OF_RANGE for the resume),
losing the archive's messages of it. Now it keeps the archive's messages
and the replaced store's after them, so the resume gets the very messages
it had under those offsets, and publishing goes on after the replaced
store's last (bastion/store/restore_topics.py).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from bastion.client.aio import Client
from tests.support.server import bastion_cli, start_server


def test_a_resume_from_before_a_restore_gets_the_messages_it_had(server_factory: Any, tmp_path: Path) -> None:
    config = tmp_path / "bastion.toml"
    config.write_text('[[messages.topics.durable]]\npattern = "orders.>"\n')
    env = {"BASTION_CONFIG": str(config)}
    server = server_factory(env=env)

    async def publish(address: str, token: str, payloads: list[str]) -> list[int]:
        async with Client(address, token=token, timeout=10) as client:
            return [await client.messages.publish(topic="orders.eu", payload=p) for p in payloads]

    assert asyncio.run(publish(server.address, server.token, ["one", "two"])) == [1, 2]
    made = bastion_cli("backup", "--address", server.address, "--token-file", str(server.token_file))
    assert made.returncode == 0, made.stderr
    archive = server.data_dir / "backups" / json.loads(made.stdout)["name"]
    assert asyncio.run(publish(server.address, server.token, ["three", "four"])) == [3, 4]
    assert server.stop() == 0

    done = bastion_cli("restore", str(archive), "--data-dir", str(server.data_dir))
    assert done.returncode == 0, done.stderr
    restored = start_server(tmp_path / "restored-server", data_dir=server.data_dir, env=env)
    try:

        async def main() -> None:
            offsets = await publish(restored.address, server.token, ["five"])
            async with Client(restored.address, token=server.token, timeout=10) as client:
                got = []
                async with asyncio.timeout(10):
                    async for event in client.stream("messages.subscribe", pattern="orders.eu", from_offset=1):
                        if event["type"] == "start":
                            continue
                        got.append((event["offset"], event["payload"]))
                        if len(got) == 5:
                            break
            # never "five" under offset 3, nor the archive's messages dropped
            assert got == [(1, "one"), (2, "two"), (3, "three"), (4, "four"), (5, "five")]
            assert offsets == [5]

        asyncio.run(main())
    finally:
        assert restored.stop() == 0
