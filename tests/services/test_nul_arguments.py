"""Text holding NUL in any argument of any built-in method: one answer, INVALID_ARGUMENT naming it, on every store.

PostgreSQL text cannot hold NUL (U+0000) and SQLite's can, so such an argument used to be answered by
whatever reached the store first: PostgreSQL's own data error ("store: value rejected: ..."), or on SQLite
NOT_FOUND, an empty page, or a row kept -- unless the method had a guard of its own, and some had none
(``kv.set_access`` with a NUL in the name: INVALID_ARGUMENT on PostgreSQL, NOT_FOUND on SQLite). The rule is
now the dispatcher's, for every method of a ``refuse_nul`` service. This walks every built-in method and every
text its arguments may hold (nested ones too), puts NUL there, and asks for that answer on each backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest

import bastion
from bastion.config import JobsConfig, KVConfig
from bastion.security.audit import AuditLog
from bastion.security.passwords import PasswordHasher
from bastion.security.throttle import LoginThrottle
from bastion.service import OPAQUE_TEXT_KEY, MethodKind, MethodSpec, Service
from bastion.services.admin import create_service as create_admin_service
from bastion.services.auth import create_service as create_auth_service
from bastion.services.backup import Backups
from bastion.services.files import Files
from bastion.services.jobs import Jobs
from bastion.services.kv import KV
from bastion.services.messages import Messages
from bastion.store import open_store
from bastion.testing import TESTER, MemoryServer
from tests.support.stores import service_store

pytestmark = pytest.mark.usefixtures("service_backend")

NUL_TEXT = "a\x00b"
Maker = Callable[[str], Any]  # a value of some type with the given text in one of its text positions


@asynccontextmanager
async def builtin_services(tmp_path: Path) -> AsyncIterator[list[Service]]:
    """Every built-in service over one store, composed as ``bastion serve`` composes them (started)."""
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(open_store(service_store(tmp_path)))
        audit = AuditLog(tmp_path / "audit.log")
        stack.callback(audit.close)
        files_dir = tmp_path / "files"
        backups = Backups(store, data_dir=tmp_path, files_dir=files_dir)
        hosted = [
            KV(store, KVConfig(sweep_interval=3600)),
            Files(store, files_dir),
            Jobs(store, [], JobsConfig(concurrency=1, poll_interval=0.2)),
            Messages(store, relay=False),
        ]
        for component in hosted:
            await component.start()
            stack.push_async_callback(component.aclose)
        auth = create_auth_service(store, hasher=PasswordHasher(fast=True), throttle=LoginThrottle(store), audit=audit)
        yield [create_admin_service(backups), auth, *(c.service for c in hosted)]


def _default(info: mi.Type) -> Any:
    """A value of type ``info`` that decodes (its text: "x")."""
    if isinstance(info, mi.Metadata):
        return _default(info.type)
    if isinstance(info, mi.UnionType):
        return _default(next(t for t in info.types if not isinstance(t, mi.NoneType)))
    if isinstance(info, mi.StructType | mi.DataclassType | mi.TypedDictType):
        return {
            f.encode_name if hasattr(f, "encode_name") else f.name: _default(f.type) for f in info.fields if f.required
        }
    simple: dict[type, Any] = {
        mi.StrType: "x", mi.IntType: 1, mi.FloatType: 1.0, mi.BoolType: False, mi.BytesType: b"", mi.DictType: {},
    }  # fmt: skip
    if isinstance(info, mi.CollectionType):
        return []
    if isinstance(info, mi.LiteralType):
        return info.values[0]
    return simple.get(type(info))


def _text_positions(info: mi.Type) -> Iterator[tuple[str, Maker]]:
    """Each place a value of type ``info`` holds text of the caller's (not ``OpaqueText``), as where it is
    (``"[0].key"``) and a maker of such a value with the given text there."""
    if isinstance(info, mi.Metadata):
        if not (info.extra or {}).get(OPAQUE_TEXT_KEY):
            yield from _text_positions(info.type)
    elif isinstance(info, mi.StrType):
        yield "", lambda text: text
    elif isinstance(info, mi.UnionType):
        for member in info.types:
            yield from _text_positions(member)
    elif isinstance(info, mi.CollectionType):
        for where, make in _text_positions(info.item_type):
            yield f"[0]{where}", lambda text, make=make: [make(text)]
    elif isinstance(info, mi.DictType):
        for where, make in _text_positions(info.key_type):
            yield f" key{where}", lambda text, make=make: {make(text): _default(info.value_type)}
        for where, make in _text_positions(info.value_type):
            yield f"['x']{where}", lambda text, make=make: {"x": make(text)}
    elif isinstance(info, mi.StructType):
        for field in info.fields:
            for where, make in _text_positions(field.type):
                yield (
                    f".{field.name}{where}",
                    lambda text, field=field, make=make: {**_default(info), field.encode_name: make(text)},
                )


def cases(services: list[Service]) -> Iterator[tuple[MethodSpec, str, dict[str, Any]]]:
    """(method, the argument holding NUL, the arguments) for every text of every built-in method."""
    for service in services:
        for spec in service.methods.values():
            info = mi.type_info(spec.args_type)
            assert isinstance(info, mi.StructType)
            for field in info.fields:
                for where, make in _text_positions(field.type):
                    yield spec, field.name + where, {**_default(info), field.encode_name: make(NUL_TEXT)}


async def answer(client: bastion.Client, spec: MethodSpec, args: dict[str, Any]) -> BaseException | None:
    try:
        if spec.kind is MethodKind.UNARY:
            await client.invoke(spec.full_name, args)
        elif spec.kind is MethodKind.SERVER_STREAM:
            stream = client.stream(spec.full_name, **args)
            await anext(aiter(stream))
        else:
            await client.upload(spec.full_name, [], **args)
    except Exception as exc:
        return exc
    return None


def test_every_text_argument_of_every_builtin_method_refuses_nul_alike(tmp_path: Path) -> None:
    async def main() -> None:
        async with builtin_services(tmp_path) as services, MemoryServer(services) as server:
            admin = server.client(principal=TESTER)  # every method's roles: the rule is looked at, not access
            seen = set()
            for spec, where, args in cases(services):
                seen.add(spec.service)
                got = await asyncio.wait_for(answer(admin, spec, args), 10)
                assert isinstance(got, bastion.InvalidArgument), (spec.full_name, where, got)
                assert f"{spec.full_name}: argument {where.split(' ')[0]}" in got.message, got.message
                assert "must not contain NUL characters" in got.message, got.message
            assert seen == {"auth", "kv", "files", "jobs", "messages"}  # admin's methods take no text (yet)

    asyncio.run(main())


#: Cursors that are JSON text, decoded by the method after the dispatcher's rule has looked at them: JSON's
#: ``\u0000`` escape is NUL only once decoded, so the walk above (which puts a real NUL in the JSON text) does not
#: reach them. Each with cursors of its form holding such an escape in each of its texts.
JSON_CURSORS = {
    "files.uploads": ['[0.0, "a\\u0000b"]'],
    "files.list": ['["a\\u0000b", "x"]', '["x", "a\\u0000b"]'],
}
#: Cursors that are the text itself (a key, a job id): the walk covers them.
TEXT_CURSORS = {"kv.list", "jobs.list"}


def test_a_json_cursor_decoding_to_nul_is_refused_as_the_rule_refuses_nul(tmp_path: Path) -> None:
    """``files.uploads``' cursor holding an escaped NUL reached the store: an empty page on SQLite, PostgreSQL's
    own data error ("store: value rejected: CharacterNotInRepertoireError ...") on PostgreSQL; ``files.list``'s
    answered an empty page. Both now answer what the dispatcher's rule answers for a NUL, on every store."""

    async def main() -> None:
        async with builtin_services(tmp_path) as services, MemoryServer(services) as server:
            admin = server.client(principal=TESTER)
            specs = {spec.full_name: spec for service in services for spec in service.methods.values()}
            cursors = {spec.full_name for spec, where, _ in cases(services) if where == "after"}
            assert cursors == set(JSON_CURSORS) | TEXT_CURSORS, "a new cursor argument: is it JSON text?"
            for method, afters in JSON_CURSORS.items():
                assert msgspec.json.decode(afters[0])  # the form of the method's own cursors
                for after in afters:
                    got = await asyncio.wait_for(answer(admin, specs[method], {"after": after}), 10)
                    assert isinstance(got, bastion.InvalidArgument), (method, after, got)
                    assert got.message == f"{method}: argument after must not contain NUL characters", got.message

    asyncio.run(main())


def test_every_builtin_service_refuses_nul_and_passwords_are_opaque(tmp_path: Path) -> None:
    async def main() -> None:
        async with builtin_services(tmp_path) as services:
            assert [s.name for s in services if not s.refuse_nul] == []
            where = {(spec.full_name, w) for spec, w, _ in cases(services)}
            assert not {w for w in where if "password" in w[1]}, "passwords take any text: only a hash is stored"
            assert ("kv.set_access", "name") in where and ("kv.put_many", "items[0].content_type") in where

    asyncio.run(main())


def test_a_password_holding_nul_is_still_a_password(tmp_path: Path) -> None:
    """Passwords are ``OpaqueText``: only their hash is stored, so one holding NUL is set and logs in as before."""

    async def main() -> None:
        async with builtin_services(tmp_path) as services, MemoryServer(services) as server:
            admin = server.client(principal=TESTER)
            password = "correct horse\x00battery"
            await admin.auth.create_user(name="ada", password=password)
            anonymous = server.client()
            assert (await anonymous.auth.login(username="ada", password=password))["user"] == "ada"
            with pytest.raises(bastion.Unauthenticated):
                await anonymous.auth.login(username="ada", password="correct horse")

    asyncio.run(main())
