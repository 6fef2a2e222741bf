"""Mailboxes against real ``bastion serve`` processes: exactly-once delivery through kill -9, on both stores.

Issue 9's acceptance: 10 clients exchange mailbox messages; each is
delivered exactly once to its recipient's mailbox, in order per sender;
the server gets SIGKILL part way through and is restarted on the same
store, and no acknowledged message is lost and none is duplicated. Each
client sends its messages one after another, each with a client_id; a send
that fails because the server died is retried, with the same client_id,
against the restarted server -- whether or not the first attempt was
stored, the mailbox ends up with exactly one copy. The CI run exchanges
2,000 messages; ``-m slow`` runs the full 10,000.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import defaultdict
from pathlib import Path

import pytest

from bastion import SyncClient
from bastion.client.aio import Client
from bastion.exceptions import BastionError
from tests.support.server import ServerProcess, start_server

CLIENTS = 10
LOAD_ENV = {"BASTION_RATE_LIMITS__ENABLED": "false", "BASTION_MESSAGES__SEND_RATE": "0"}
USERS = [f"u{i}" for i in range(CLIENTS)]


def _make_users(server: ServerProcess) -> dict[str, str]:
    """Create the users; each one's token."""
    with SyncClient(server.address, token_file=str(server.token_file), timeout=10) as root:
        tokens = {}
        for name in USERS:
            root.auth.create_user(name=name, roles=["user"])
            tokens[name] = root.auth.create_token(user=name)["token"]
        return tokens


def _plan(sender: int, per_client: int) -> list[tuple[int, str]]:
    """What client ``sender`` sends: (seq, recipient), round robin over the others."""
    others = [u for i, u in enumerate(USERS) if i != sender]
    return [(seq, others[seq % len(others)]) for seq in range(per_client)]


async def _send_all(
    address: str,
    tokens: dict[str, str],
    per_client: int,
    progress: dict[str, int],
    kill: tuple[ServerProcess, int] | None,
) -> int:
    """Each client sends its plan from ``progress[user]`` on; returns how many sends were acknowledged.

    With ``kill``, SIGKILL the server once that many sends were acknowledged; a client whose send then
    fails stops, leaving ``progress`` at the first send not acknowledged.
    """
    acked = 0
    killed = asyncio.Event()

    async def client(i: int) -> None:
        nonlocal acked
        user = USERS[i]
        async with Client(address, token=tokens[user], timeout=10) as cl:
            for seq, to in _plan(i, per_client)[progress[user] :]:
                try:
                    await cl.messages.send(to=[to], subject=f"{user}:{seq:05}", body=b"m" * (seq % 64),
                                           client_id=f"{user}-{seq}")  # fmt: skip
                except BastionError:
                    assert killed.is_set(), "a send failed before the server was killed"
                    return
                progress[user] = seq + 1
                acked += 1
                if kill is not None and acked == kill[1]:
                    kill[0].signal(signal.SIGKILL)
                    killed.set()

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    return acked


async def _verify(address: str, tokens: dict[str, str], per_client: int) -> None:
    expected: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, sender in enumerate(USERS):
        for seq, to in _plan(i, per_client):
            expected[to][sender].append(seq)
    for user in USERS:
        async with Client(address, token=tokens[user], timeout=30) as cl:
            got: dict[str, list[int]] = defaultdict(list)
            cursor = None
            while True:
                page = await cl.messages.inbox(oldest_first=True, cursor=cursor)
                for m in page["messages"]:  # in id order: the order they reached the mailbox
                    sender, seq = m["subject"].split(":")
                    assert m["sender"] == sender
                    got[sender].append(int(seq))
                cursor = page["next"]
                if cursor is None:
                    break
            assert got == expected[user], f"{user}'s mailbox differs: lost, duplicated or out of order"
            info = await cl.messages.unread()
            assert info["total"] == info["unread"] == sum(len(s) for s in expected[user].values())


def _exchange(tmp_path: Path, store_url: str, total: int) -> float:
    """Run the exchange with a kill -9 half way through; the seconds it took."""
    per_client = total // CLIENTS
    env = {**LOAD_ENV, "BASTION_STORE": store_url}
    workdir = tmp_path / "mail"
    server = start_server(workdir, env=env)
    try:
        tokens = _make_users(server)
        progress = dict.fromkeys(USERS, 0)
        started = time.monotonic()
        acked = asyncio.run(_send_all(server.address, tokens, per_client, progress, (server, total // 2)))
        assert acked >= total // 2
        server.process.wait(10)
        assert server.process.returncode == -signal.SIGKILL
        server.stop()
        server = start_server(workdir, env=env)  # same data directory and store
        # Every client retries its first unacknowledged send (same client_id), then carries on.
        asyncio.run(_send_all(server.address, tokens, per_client, progress, None))
        elapsed = time.monotonic() - started
        assert progress == dict.fromkeys(USERS, per_client)
        asyncio.run(_verify(server.address, tokens, per_client))
        return elapsed
    finally:
        assert server.stop() == 0


def test_ten_clients_exchange_mail_exactly_once_through_a_kill_9(tmp_path: Path, store_url: str) -> None:
    _exchange(tmp_path, store_url, 2_000)


@pytest.mark.slow
def test_ten_clients_exchange_10000_messages_through_a_kill_9(tmp_path: Path, store_url: str) -> None:
    elapsed = _exchange(tmp_path, store_url, 10_000)
    print(f"10,000 messages exchanged by 10 clients (kill -9 included) in {elapsed:.1f} s")
