"""Turning ``key=value`` command-line words into typed call arguments.

Each value is converted to the type the method's JSON Schema declares for
that argument, so ``value=007`` stays the string "007" where a string is
expected and becomes 7 where an integer is. ``key=@file`` reads the value
from a file (raw bytes where the schema wants bytes). Without a schema, a
value that parses as JSON is taken as JSON, anything else as a string.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bastion.exceptions import UsageError

__all__ = ["parse_arguments"]


def parse_arguments(words: list[str], params: Mapping[str, Any] | None) -> dict[str, Any]:
    """``["a=1", "b=@x.txt"]`` -> ``{"a": 1, "b": "..."}`` using the params schema."""
    properties: Mapping[str, Any] = (params or {}).get("properties", {})
    out: dict[str, Any] = {}
    for word in words:
        key, sep, text = word.partition("=")
        if not sep or not key:
            raise UsageError(f"argument {word!r} is not key=value")
        if key in out:
            raise UsageError(f"argument {key!r} is given twice")
        schema = properties.get(key) if params is not None else None
        if params is not None and schema is None:
            known = ", ".join(sorted(properties)) or "none"
            raise UsageError(f"unknown argument {key!r} (the method takes: {known})")
        out[key] = _convert(key, text, schema)
    return out


def _read(key: str, path: str, binary: bool) -> str | bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"argument {key!r}: cannot read {path}: {exc.strerror}") from None
    if binary:
        return data
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise UsageError(f"argument {key!r}: {path} is not UTF-8 text") from None


def _types(schema: Mapping[str, Any]) -> set[str]:
    found: set[str] = set()
    kind = schema.get("type")
    if isinstance(kind, str):
        found.add(kind)
    elif isinstance(kind, list):
        found.update(k for k in kind if isinstance(k, str))
    for option in schema.get("anyOf", []) + schema.get("oneOf", []):
        if isinstance(option, Mapping):
            found |= _types(option)
    if schema.get("contentEncoding") == "base64":
        found.add("bytes")
    return found


def _convert(key: str, text: str, schema: Mapping[str, Any] | None) -> Any:
    types = _types(schema) if schema is not None else set()
    if text.startswith("@") and len(text) > 1:
        return _read(key, text[1:], "bytes" in types)
    if schema is None or not types:
        try:
            return json.loads(text)
        except ValueError:
            return text
    if "bytes" in types:
        return text.encode()
    if "string" in types and not types & {"integer", "number", "boolean", "array", "object"}:
        return text
    if text == "null" and "null" in types:
        return None
    if "integer" in types:
        try:
            return int(text)
        except ValueError:
            pass
    if "number" in types:
        try:
            return float(text)
        except ValueError:
            pass
    if "boolean" in types and text.lower() in ("true", "false", "yes", "no", "1", "0"):
        return text.lower() in ("true", "yes", "1")
    if types & {"array", "object"}:
        try:
            return json.loads(text)
        except ValueError as exc:
            raise UsageError(f"argument {key!r}: not valid JSON: {exc}") from None
    if "string" in types:
        return text
    raise UsageError(f"argument {key!r}: {text!r} is not a valid {' or '.join(sorted(types))}")
