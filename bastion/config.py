"""One typed configuration: built-in defaults < TOML file < environment < flags.

Read only at the entry points (the CLI, or a program constructing a Server);
everything below receives the finished, validated, frozen objects. Unknown
keys are errors, not silently ignored. Environment variables are
``BASTION_<KEY>`` for top-level keys and ``BASTION_<SECTION>__<KEY>`` for
keys in a section (e.g. ``BASTION_LIMITS__MAX_FRAME``).

Every limit is listed with its default and the attack it blunts in
docs/security.md.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from bastion.exceptions import UsageError

__all__ = ["DEFAULT_PORT", "Config", "ServerLimits", "load_config"]

DEFAULT_PORT = 7400
ENV_PREFIX = "BASTION_"


class ServerLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-connection and per-server limits.

    max_frame: largest frame body after the handshake (bytes).
    handshake_max_frame: largest frame before authentication (bytes).
    max_inflight: calls one connection may have open at once.
    window: stream items a peer may send per call before it needs credit.
    handshake_timeout: seconds from accept to a finished bastion handshake.
    ping_interval: seconds of silence before the server pings a connection.
    ping_timeout: seconds to wait for the Pong before closing.
    grace_period: seconds a draining server lets in-flight calls finish.
    threads: worker threads for synchronous handlers.
    write_high_water: bytes buffered for a slow reader before senders wait.
    """

    max_frame: int = 1_048_576
    handshake_max_frame: int = 16_384
    max_inflight: int = 1024
    window: int = 16
    handshake_timeout: float = 5.0
    ping_interval: float = 30.0
    ping_timeout: float = 20.0
    grace_period: float = 30.0
    threads: int = 32
    write_high_water: int = 1_048_576

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            if getattr(self, name) <= 0:
                raise UsageError(f"limits.{name} must be positive, got {getattr(self, name)!r}")
        if self.handshake_max_frame > self.max_frame:
            raise UsageError("limits.handshake_max_frame must not exceed limits.max_frame")
        if self.max_frame > 2**32 - 1:
            raise UsageError("limits.max_frame must be below 4 GiB")


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything ``bastion serve`` needs."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: str = "bastion-data"
    services: list[str] = []  # "module:attribute" of extra Service objects
    log_level: str = "info"
    limits: ServerLimits = ServerLimits()

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UsageError(f"port must be 0..65535, got {self.port}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise UsageError(f"log_level must be debug, info, warning or error, got {self.log_level!r}")


def _env_overlay(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sections = {"limits": ServerLimits.__struct_fields__}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key in ("BASTION_TOKEN", "BASTION_TOKEN_FILE", "BASTION_CA"):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if "__" in name:
            section, _, sub = name.partition("__")
            if section in sections and sub in sections[section]:
                out.setdefault(section, {})[sub] = _scalar(value)
        elif name in Config.__struct_fields__ and name != "limits":
            out[name] = value.split(",") if name == "services" else _scalar(value)
    return out


def _scalar(value: str) -> Any:
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    return value


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        elif value is not None:
            out[key] = value
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective Config: defaults < file < environment < overrides (flags)."""
    data: dict[str, Any] = {}
    env = os.environ if environ is None else environ
    path = path or env.get("BASTION_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    data = _merge(data, _env_overlay(env))
    data = _merge(data, overrides or {})
    try:
        return msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise UsageError(f"invalid configuration: {exc}") from None
