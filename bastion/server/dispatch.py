"""Dispatch: the method table, built once, and the checks before a handler runs.

``MethodTable`` maps ``"service.method"`` to an ``Entry`` holding the spec and
a ready msgspec decoder for its arguments. ``admit`` performs, in order, the
checks every call passes before dispatch: the method exists (UNIMPLEMENTED),
the caller may call it (UNAUTHENTICATED for anonymous callers of non-public
methods, PERMISSION_DENIED for missing roles), and the arguments match the
method's hints (INVALID_ARGUMENT naming the field). Nothing here runs a
handler.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from bastion.exceptions import (
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unimplemented,
    UsageError,
)
from bastion.security.principal import Principal
from bastion.service import MethodKind, MethodSpec, Service

__all__ = ["Entry", "MethodTable"]


class Entry:
    """One method, ready to dispatch."""

    __slots__ = ("decoder", "fields", "input_decoder", "spec", "streams_out")

    def __init__(self, spec: MethodSpec) -> None:
        self.spec = spec
        self.decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(spec.args_type)
        self.fields: tuple[str, ...] = spec.args_type.__struct_fields__
        self.input_decoder: msgspec.msgpack.Decoder[Any] | None = (
            msgspec.msgpack.Decoder(spec.input_type) if spec.input_param is not None else None
        )
        self.streams_out = spec.kind in (MethodKind.SERVER_STREAM, MethodKind.BIDI_STREAM)

    def decode_args(self, raw: msgspec.Raw) -> dict[str, Any]:
        try:
            args = self.decoder.decode(raw)
        except msgspec.ValidationError as exc:
            raise InvalidArgument(f"{self.spec.full_name}: {_describe(exc)}") from None
        except msgspec.DecodeError as exc:
            raise InvalidArgument(f"{self.spec.full_name}: arguments are not a map: {exc}") from None
        return {name: getattr(args, name) for name in self.fields}


def _describe(exc: msgspec.ValidationError) -> str:
    # msgspec says "... - at `$.field`"; name the argument the way a caller wrote it.
    text = str(exc)
    return text.replace("`$.", "argument `").replace("Object missing required field", "missing argument")


class MethodTable:
    """Every method the server offers, by full name."""

    def __init__(self, services: Iterable[Service]) -> None:
        self.entries: dict[str, Entry] = {}
        self.services: dict[str, Service] = {}
        for service in services:
            if service.name in self.services:
                raise UsageError(f"service {service.name!r} is registered twice")
            self.services[service.name] = service
            for spec in service.methods.values():
                self.entries[spec.full_name] = Entry(spec)

    def admit(self, method: str, principal: Principal) -> Entry:
        """The entry for ``method`` if ``principal`` may call it; else raise."""
        entry = self.entries.get(method)
        spec = entry.spec if entry is not None else None
        if spec is None or not (spec.public or principal.authenticated):
            if not principal.authenticated:
                # Do not tell an anonymous caller which methods exist.
                raise Unauthenticated(f"{method} requires authentication")
            raise Unimplemented(f"unknown method {method!r}")
        if spec.roles and not principal.has_roles(spec.roles):
            raise PermissionDenied(f"{method} requires role {', '.join(sorted(spec.roles))}")
        assert entry is not None
        return entry

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "name": service.name,
                "doc": service.doc,
                "methods": [spec.describe() for spec in service.methods.values()],
            }
            for service in self.services.values()
        ]
