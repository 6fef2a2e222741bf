"""Whom a client certificate speaks as: only a user the store keeps.

Real TLS on loopback with the in-process ``Server`` and the store authenticator (bastion/security/authn.py):
a verified certificate whose subject names no user is refused in the handshake (UNAUTHENTICATED, audited)
unless ``tls.client_subjects = "any"``, and a user deleted while a certificate's connection is open ends it
at revalidation.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import bastion
from bastion import Client, Unauthenticated
from bastion.config import TLSConfig
from bastion.exceptions import UsageError
from bastion.security.audit import AuditLog
from bastion.security.authn import StoreAuthenticator
from bastion.security.credentials import User
from bastion.security.throttle import LoginThrottle
from bastion.store import Store, open_store
from tests.security.test_tls import MTLS, mtls_server, run

whoami = bastion.Service("who")


@whoami.method()
async def me(ctx: bastion.Context) -> list[Any]:
    return [ctx.principal.name, sorted(ctx.principal.roles), ctx.principal.mechanism]


class World:
    def __init__(self, m: MTLS, store: Store, audit: Path) -> None:
        self.m, self.store, self.audit_path = m, store, audit

    def client(self, cert: Path, key: Path) -> Client:
        return Client(self.m.address, ca=self.m.ca, cert=cert, key=key, timeout=5, retry=None)

    def audit(self, event: str) -> list[dict[str, Any]]:
        lines = self.audit_path.read_text().splitlines() if self.audit_path.exists() else []
        return [record for record in map(json.loads, lines) if record.get("event") == event]


def _scene(tmp_path: Path, **authn: Any) -> Any:
    import contextlib

    @contextlib.asynccontextmanager
    async def scene() -> AsyncIterator[World]:
        async with open_store(tmp_path / "s.db") as store:
            audit = AuditLog(tmp_path / "audit.log")
            authenticator = StoreAuthenticator(store, LoginThrottle(store), audit, cache_seconds=0, **authn)
            kwargs: dict[str, Any] = {"authenticator": authenticator, "revalidate_interval": 0.1}
            try:
                async with mtls_server(tmp_path, TLSConfig(client_auth="required"), [whoami], **kwargs) as m:
                    yield World(m, store, tmp_path / "audit.log")
            finally:
                audit.close()

    return scene()


async def _ended(client: Client) -> None:
    """Wait (deadline 5 s) until ``client``'s connection no longer serves ``who.me``."""
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        try:
            await client.call("who.me")
        except (Unauthenticated, bastion.ConnectError, bastion.Unavailable, bastion.PermissionDenied):
            return
        assert asyncio.get_running_loop().time() < deadline, "the connection is still served"
        await asyncio.sleep(0.05)


def test_a_certificate_naming_no_user_is_refused_with_a_coded_error_and_an_audit_record(tmp_path: Path) -> None:
    async def main() -> None:
        async with _scene(tmp_path) as w:
            await w.store.create_user(User("alice", frozenset({"ops"}), None, time.time() - 60))
            ghost, ghost_key, ghost_serial = w.m.client_cert("ghost")
            with pytest.raises(Unauthenticated, match="'ghost' names no user") as refused:
                async with w.client(ghost, ghost_key) as client:
                    await client.call("who.me")
            assert refused.value.status is bastion.Status.UNAUTHENTICATED
            (record,) = w.audit("auth.failure")
            assert record["mechanism"] == "mtls" and record["subject"] == "ghost"
            assert record["serial"] == f"0x{ghost_serial:x}" and record["reason"] == "no such user"
            assert "BEGIN" not in w.audit_path.read_text()  # no certificate or key material
            # The server goes on serving everyone else: a certificate of a user speaks as that user.
            cert, key, _ = w.m.client_cert("alice")
            async with w.client(cert, key) as client:
                assert await client.call("who.me") == ["alice", ["ops"], "mtls"]

    run(main())


def test_client_subjects_any_admits_certificates_of_services_without_users(tmp_path: Path) -> None:
    async def main() -> None:
        async with _scene(tmp_path, client_subjects="any") as w:
            cert, key, _ = w.m.client_cert("sensor-7")
            async with w.client(cert, key) as client:
                assert await client.call("who.me") == ["sensor-7", [], "mtls"]
            assert w.audit("auth.failure") == []

    run(main())


def test_the_client_subjects_setting_is_checked() -> None:
    assert TLSConfig().client_subjects == "users"
    assert TLSConfig(client_subjects="any").client_subjects == "any"
    with pytest.raises(UsageError, match=r'tls\.client_subjects must be "users" or "any"'):
        TLSConfig(client_subjects="services")


def test_a_user_deleted_while_connected_by_certificate_loses_the_connection(tmp_path: Path) -> None:
    async def main() -> None:
        async with _scene(tmp_path) as w:
            await w.store.create_user(User("bob", frozenset({"ops"}), None, time.time() - 60))
            cert, key, _ = w.m.client_cert("bob")
            async with w.client(cert, key) as client:
                assert await client.call("who.me") == ["bob", ["ops"], "mtls"]
                assert await w.store.delete_user("bob")
                await _ended(client)
            with pytest.raises(Unauthenticated, match="names no user"):
                async with w.client(cert, key) as again:
                    await again.call("who.me")

    run(main())
