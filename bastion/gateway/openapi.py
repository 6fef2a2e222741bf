"""OpenAPI 3.1 and OpenRPC documents, generated from the server's method table.

Both come from the same place the native ``admin.methods`` listing does: each
method's argument type (a msgspec Struct) and result type, turned into JSON
Schema by ``msgspec.json.schema_components`` with every named type once
under ``components/schemas``. A type JSON Schema cannot express gets an
empty schema (anything). Each unary method is ``POST /v1/{service}/{method}``
(its argument object as the body, its result as the 200 body; the body is
optional when every parameter has a default, as the gateway reads an empty
body as ``{}``); stream
methods are listed for /ws in OpenRPC only.

Each describes only what ``principal`` may call, exactly as ``admin.methods``
lists it (``Principal.may_call``): an anonymous caller sees the public
methods and nothing else -- not the admin-only methods, their documentation,
argument types or roles -- and a service none of whose methods it may call
is not named either. (``x-bastion-roles`` / ``x-bastion-public`` still say
what each listed method needs; the server enforces it call by call.) The
gateway caches the documents by the set of methods shown (app.py).
"""

from __future__ import annotations

from typing import Any

import msgspec

from bastion._version import __version__
from bastion.gateway._cookies import HOST_PREFIX, SESSION_COOKIE
from bastion.security.principal import Principal
from bastion.server.dispatch import MethodTable
from bastion.service import MethodKind, MethodSpec

__all__ = ["openapi_document", "openrpc_document", "visible_methods"]

_REF = "#/components/schemas/{name}"
_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "status": {"type": "string"},
                "code": {"type": "integer"},
                "message": {"type": "string"},
                "details": {"type": "object"},
            },
            "required": ["status", "code", "message"],
        }
    },
    "required": ["error"],
}
# HTTP status -> description, for the error responses every method may give.
_ERRORS = {
    "400": "Invalid argument, failed precondition or out of range",
    "401": "Authentication required or credentials invalid",
    "403": "Permission denied (or a missing CSRF token)",
    "404": "No such method",
    "409": "Already exists or aborted (a version mismatch)",
    "413": "Body too large",
    "429": "Rate limited (see Retry-After)",
    "500": "Internal error",
    "503": "Unavailable",
    "504": "Deadline exceeded",
}


def _components(specs: list[MethodSpec]) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], dict[str, Any]]:
    """(params schema, result schema) per spec, and the shared components."""
    types: list[Any] = []
    for spec in specs:
        types += [spec.args_type, spec.result_type]
    schemas: list[dict[str, Any]] = []
    components: dict[str, Any] = {}
    try:
        found, components = msgspec.json.schema_components(types, ref_template=_REF)
        schemas = list(found)
    except TypeError:  # one type cannot be expressed: do each alone, giving that one {}
        for tp in types:
            try:
                (schema,), more = msgspec.json.schema_components([tp], ref_template=_REF)
            except TypeError:
                schema, more = {}, {}
            schemas.append(schema)
            components.update(more)
    return [(schemas[2 * i], schemas[2 * i + 1]) for i in range(len(specs))], components


def visible_methods(table: MethodTable, principal: Principal) -> frozenset[str]:
    """The full names of the methods ``principal`` may call: what the documents show it."""
    entries = table.entries.items()
    return frozenset(name for name, entry in entries if principal.may_call(entry.spec.public, entry.spec.roles))


def _specs(table: MethodTable, shown: frozenset[str]) -> list[MethodSpec]:
    return [spec for service in table.services.values() for spec in service.methods.values() if spec.full_name in shown]


def openapi_document(
    table: MethodTable,
    shown: frozenset[str],
    *,
    title: str = "bastion",
    session_cookie: str = HOST_PREFIX + SESSION_COOKIE,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``POST /v1/{service}/{method}`` of the unary methods in ``shown``
    (``visible_methods``); ``session_cookie`` is the session cookie's name on this gateway
    (``__Host-bastion_session`` when cookies are Secure, gateway/_cookies.py)."""
    specs = [spec for spec in _specs(table, shown) if spec.kind is MethodKind.UNARY]
    pairs, components = _components(specs)
    paths: dict[str, Any] = {}
    for spec, (params, result) in zip(specs, pairs, strict=True):
        responses: dict[str, Any] = {
            "200": {"description": "The result", "content": {"application/json": {"schema": result}}}
        }
        for code in _ERRORS:
            responses[code] = {"$ref": f"#/components/responses/E{code}"}
        operation: dict[str, Any] = {
            "operationId": spec.full_name,
            "summary": spec.doc.split("\n", 1)[0],
            "description": spec.doc,
            "tags": [spec.service],
            "requestBody": {
                "required": any(field.required for field in msgspec.structs.fields(spec.args_type)),
                "content": {"application/json": {"schema": params}},
            },
            "responses": responses,
            "x-bastion-roles": sorted(spec.roles),
            "x-bastion-public": spec.public,
            "x-bastion-idempotent": spec.idempotent,
        }
        if spec.public:
            operation["security"] = [{}, {"bearer": []}, {"cookie": []}]
        paths[f"/v1/{spec.service}/{spec.name}"] = {"post": operation}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": __version__},
        "paths": paths,
        "security": [{"bearer": []}, {"cookie": []}],
        "tags": [
            {"name": name, "description": service.doc}
            for name, service in table.services.items()
            if any(spec.service == name for spec in specs)
        ],
        "components": {
            "schemas": {**components, "Error": _ERROR_SCHEMA},
            "responses": {
                f"E{code}": {
                    "description": text,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
                for code, text in _ERRORS.items()
            },
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "cookie": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": session_cookie,
                    "description": "set by POST /v1/auth/login; every request it authenticates must echo "
                    "the CSRF cookie (named as this one, with csrf for session) in X-CSRF-Token",
                },
            },
        },
    }


def openrpc_document(table: MethodTable, shown: frozenset[str], *, title: str = "bastion") -> dict[str, Any]:
    """The OpenRPC 1.2 document ``rpc.discover`` answers: the methods in ``shown`` (streams are for /ws)."""
    specs = _specs(table, shown)
    pairs, components = _components(specs)
    methods = []
    for spec, (params, result) in zip(specs, pairs, strict=True):
        resolved = components.get(spec.args_type.__name__, params)
        props: dict[str, Any] = resolved.get("properties", {})
        required = set(resolved.get("required", []))
        methods.append(
            {
                "name": spec.full_name,
                "summary": spec.doc.split("\n", 1)[0],
                "description": spec.doc,
                "paramStructure": "either",
                "params": [
                    {"name": name, "required": name in required, "schema": schema} for name, schema in props.items()
                ],
                "result": {"name": "result", "schema": result},
                "x-bastion-kind": spec.kind.value,
                "x-bastion-roles": sorted(spec.roles),
                "x-bastion-public": spec.public,
            }
        )
    return {
        "openrpc": "1.2.6",
        "info": {"title": title, "version": __version__},
        "methods": methods,
        "components": {"schemas": components},
    }
