"""The performance suite's report: medians and spreads of repeated samples, markdown tables, the targets.

Every point is sampled ``--repeat`` times; a figure is printed as its median
with the spread in brackets (min-max), e.g. ``25.1 (24.8-26.0)``. Tables are
markdown, so a run's output pastes straight into bench/README.md.

``targets`` turns the results into the issue's ratios, each with its bound
and PASS/FAIL (or ``n/a`` when a point it needs did not run or failed).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Target", "fmt", "markdown_table", "summarize", "targets"]


def summarize(samples: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """For each key: its median over ``samples`` and the (min, max) spread, as ``key`` and ``key_range``."""
    out: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in samples if s.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
            out[f"{key}_range"] = (min(values), max(values))
    return out


def fmt(row: dict[str, Any], key: str, digits: int = 1, scale: float = 1.0) -> str:
    """``row[key]`` (median) with its min-max spread when the samples differ; ``-`` if absent."""
    if row.get(key) is None:
        return "-"
    text = f"{row[key] * scale:,.{digits}f}"
    low, high = row.get(f"{key}_range", (row[key], row[key]))
    if high > low:
        text += f" ({low * scale:,.{digits}f}-{high * scale:,.{digits}f})"
    return text


def markdown_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    if not rows:
        return ""
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class Target:
    """One of the issue's targets: a ratio computed from the results, its bound, and the verdict."""

    def __init__(self, name: str, bound: str, value: float | None, ok: Callable[[float], bool] | None) -> None:
        self.name = name
        self.bound = bound
        self.value = value
        self.passed = None if value is None or ok is None else ok(value)

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "info" if self.value is not None else "n/a"
        return "PASS" if self.passed else "FAIL"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bound": self.bound, "value": self.value, "verdict": self.verdict}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _sqlite_bound(engine: dict[str, Any]) -> float | None:
    """bench/kv.py's ``sqlite_bound`` of the "sqlite alone" point's medians."""
    ops, cpu = engine.get("ops"), engine.get("server_cpu_us")
    return min(ops, 1e6 / cpu) if ops and cpu else None


def targets(results: dict[str, Any]) -> list[Target]:
    """The issue's targets (full stack = bastion over TLS), from one run's results."""
    unary = {(r["server"], r["point"]): r for r in results.get("unary", [])}

    def get(server: str, point: str, key: str) -> float | None:
        row = unary.get((server, point))
        return None if row is None else row.get(key)

    cpu, client = "server_cpu_us_per_call", "client_cpu_us_per_call"
    stream = {r["server"]: r for r in results.get("stream", [])}
    idle = {r["server"]: r for r in results.get("idle", [])}
    kv = results.get("kv", {})
    at = "c=16"
    return [
        # The issue's floor is "a minimal raw asyncio+uvloop+msgspec length-prefixed echo
        # server" at "~16 µs" with TLS: floor-minimal, a write per answer. floor (a write per
        # read) is a stronger floor of our own making; its ratios are reported beside.
        Target(
            f"server CPU/call bastion+tls / the issue's minimal floor+tls ({at})",
            "<= 1.5x",
            _ratio(get("bastion+tls", at, cpu), get("floor-minimal+tls", at, cpu)),
            lambda x: x <= 1.5,
        ),
        Target(
            f"server CPU/call bastion+tls / floor+tls, a write per read ({at})",
            "info",
            _ratio(get("bastion+tls", at, cpu), get("floor+tls", at, cpu)),
            None,
        ),
        Target(
            f"server CPU/call grpc+tls / bastion+tls ({at})",
            ">= 10x",
            _ratio(get("grpc+tls", at, cpu), get("bastion+tls", at, cpu)),
            lambda x: x >= 10,
        ),
        Target(
            "server CPU/call bastion+tls / the issue's minimal floor+tls (pipelined)",
            "<= 1.5x",
            _ratio(get("bastion+tls", "pipelined", cpu), get("floor-minimal+tls", "pipelined", cpu)),
            lambda x: x <= 1.5,
        ),
        Target(
            "server CPU/call bastion / the issue's minimal floor, plaintext (pipelined)",
            "<= 1.5x",
            _ratio(get("bastion", "pipelined", cpu), get("floor-minimal", "pipelined", cpu)),
            lambda x: x <= 1.5,
        ),
        Target(
            "server CPU/call bastion+tls / floor+tls, a write per read (pipelined)",
            "info",
            _ratio(get("bastion+tls", "pipelined", cpu), get("floor+tls", "pipelined", cpu)),
            None,
        ),
        Target(
            f"client CPU/call bastion.Client+tls / floor client+tls ({at})",
            "<= 1.5x",
            _ratio(get("bastion+tls", at, client), get("floor+tls", at, client)),
            lambda x: x <= 1.5,
        ),
        Target(
            "p99 / p50 bastion+tls (c=128)",
            "<= 3x",
            _ratio(get("bastion+tls", "c=128", "p99_us"), get("bastion+tls", "c=128", "p50_us")),
            lambda x: x <= 3,
        ),
        Target(
            "streamed MB/s bastion, plaintext", ">= 1000", stream.get("bastion", {}).get("mb_s"), lambda x: x >= 1000
        ),
        Target("streamed MB/s bastion+tls", ">= 400", stream.get("bastion+tls", {}).get("mb_s"), lambda x: x >= 400),
        Target(
            "RSS/idle conn bastion+tls (authenticated) / floor+tls",
            "<= 1.5x",
            _ratio(
                idle.get("bastion+tls", {}).get("kib_per_connection"),
                idle.get("floor+tls", {}).get("kib_per_connection"),
            ),
            lambda x: x <= 1.5,
        ),
        Target(
            "kv.put (64 callers) / redis SET appendfsync always",
            ">= 0.5x",
            _ratio(kv.get("put", {}).get("ops"), kv.get("redis_set", {}).get("ops")),
            lambda x: x >= 0.5,
        ),
        # The store's writer commits one transaction at a time (64 puts at most, with 64 callers), on
        # one core: SQLite alone bounds the puts/s of any server committing to it (bench/kv.py).
        Target(
            "kv.put bound by SQLite alone (no server: the lower of its puts/s and 1e6 / its CPU µs) / redis SET",
            "info",
            _ratio(_sqlite_bound(kv.get("sqlite_alone", {})), kv.get("redis_set", {}).get("ops")),
            None,
        ),
        Target(
            "bastion serve --workers 2 / --workers 1 (calls/s)", "info", results.get("workers", {}).get("ratio"), None
        ),
    ]
