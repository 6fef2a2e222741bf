"""A bastion client pointed at the gateway's HTTP port says so, instead of "frame of 1213486160 bytes"
(the four bytes "HTTP" of the gateway's 400, read as a frame length)."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import pytest

import bastion
from bastion.exceptions import ConnectError, ConnectionClosed
from tests.gateway.conftest import World

HINT = "the server answered in HTTP: this is an HTTP port"


def test_a_client_pointed_at_the_gateways_http_port_is_told_so(world: World) -> None:
    address = urlsplit(world.url).netloc  # the plaintext gateway's host:port

    with (
        pytest.raises((ConnectError, ConnectionClosed), match=HINT),
        bastion.SyncClient(address, insecure=True, token="bst_not-checked", retry=None) as client,
    ):
        client.call("admin.ready")

    async def call() -> None:
        async with bastion.Client(address, insecure=True, token="bst_not-checked", retry=None) as client:
            await client.call("admin.ready", timeout=10)

    with pytest.raises((ConnectError, ConnectionClosed), match=HINT):
        asyncio.run(call())
