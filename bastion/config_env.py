"""The environment as a layer of the configuration: ``BASTION_<KEY>``, ``BASTION_<SECTION>__<KEY>``.

Theory of operation. ``overlay(Config, environ)`` turns the variables that
name a configuration key into the nested dict ``load_config`` merges over
the file's. Which names exist is read off the config structs themselves: a
field whose type is a struct is a section, and each ``__`` goes one level
down (``BASTION_LIMITS__MAX_FRAME``, ``BASTION_MESSAGES__TOPICS__MAX_SUBSCRIBERS``).
Values stay strings; msgspec's lax conversion then reads each as its
field's type, so ``BASTION_TLS__MIN_VERSION=1.2`` is the string "1.2" and
``BASTION_DATA_DIR=2024`` a directory name (guessing numbers from the text
made both type errors). A list of strings is split at commas.

Unknown keys are errors here as in the file: a variable naming a section
but no key of it (a typo such as ``BASTION_LIMITS__MAX_FRAMES``), or a key
the environment cannot express (a list of tables such as
``rate_limits.rules``), is refused, naming the variable. A ``BASTION_*``
variable whose first part names no key at all (``BASTION_TOKEN``,
``BASTION_CA``, ``BASTION_BACKUP_PASSPHRASE``...) belongs to another part of
bastion and is left alone.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from bastion.exceptions import UsageError

__all__ = ["merge", "overlay"]

PREFIX = "BASTION_"


def overlay(config_type: type[msgspec.Struct], environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The keys ``environ`` sets, nested by section, and for each its msgspec path -> variable name.

    The second mapping lets a validation error about ``$.limits.max_frame``
    name the variable it came from.
    """
    out: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for variable, value in environ.items():
        if not variable.startswith(PREFIX):
            continue
        path = variable[len(PREFIX) :].lower().split("__")
        struct: type[msgspec.Struct] = config_type
        target = out
        for depth, name in enumerate(path):
            kinds = {field.name: field.type for field in msgspec.structs.fields(struct)}
            where = ".".join(path[: depth + 1])
            if name not in kinds:
                if depth == 0:
                    break  # not a configuration variable
                raise UsageError(f"{variable}: {'.'.join(path[:depth])} has no key {name!r}")
            kind = kinds[name]
            last = depth == len(path) - 1
            if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
                if last:
                    raise UsageError(f"{variable}: {where} is a section; set its keys as {variable}__<KEY>")
                struct, target = kind, target.setdefault(name, {})
                continue
            if not last:
                raise UsageError(f"{variable}: {where} is a single value, not a section")
            if typing.get_origin(kind) is list and typing.get_args(kind) == (str,):
                target[name] = value.split(",")
            elif _scalar(kind):
                target[name] = value
            else:
                raise UsageError(f"{variable}: {where} cannot be set from the environment; set it in the config file")
            origins[f"$.{where}"] = variable
    return out, origins


def _scalar(kind: Any) -> bool:
    """Whether a field of type ``kind`` can be read from one string."""
    if kind in (int, float, bool, str, type(None)):
        return True
    origin = typing.get_origin(kind)
    if origin is Literal:
        return True
    if origin is typing.Union or origin is types.UnionType:
        return all(_scalar(arg) for arg in typing.get_args(kind))
    return False


def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base``: sections merge key by key, and a None (an unset flag) changes nothing."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        elif value is not None:
            out[key] = value
    return out
