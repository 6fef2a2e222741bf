"""Plain counters the server bumps on its hot path; read at scrape time.

Theory of operation. Counting a call must cost next to nothing next to the
call itself, so nothing here touches prometheus-client: a session keeps the
call's method index and start time, and when the call answers it calls
``CallStats.record`` -- two list increments, one ``bisect`` and one float
addition. Measured with the bookkeeping around it (a dict entry per call,
two clock reads): about 0.6 µs per call on a loaded 2-core machine, against
4.5 µs for prometheus-client's Counter and Histogram with their label
children cached and 7-14 µs with ``.labels()`` looked up per call.
metrics.py turns these lists into Prometheus metric families only when
/metrics is scraped.

Labels stay low-cardinality by construction: methods are the server's own
method table plus ``"other"`` (where every name not in the table is counted,
so a client sending random method names cannot grow anything), statuses are
the 17 wire codes, store operations are a fixed handful of kinds.

``snapshot()`` and ``merge()`` give the same numbers as plain JSON-able
dicts keyed by name (never by index), so the workers of ``bastion serve
--workers N`` can publish theirs and any of them can add them all up
(metrics.py, ``WorkerSnapshots``).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import Any

from bastion.status import Status

__all__ = ["LATENCY_BUCKETS", "OTHER", "STORE_KINDS", "CallStats", "Timings", "merge"]

#: Upper bounds (seconds) of the latency histograms' buckets; +Inf is implied.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
#: The method label of calls to names the method table does not have.
OTHER = "other"
#: Store operations timed (bastion/store/observe.py): SQLite writes and reads, PostgreSQL calls.
STORE_KINDS = ("write", "read", "call")


class Timings:
    """Histograms of durations, one per name: counts per bucket (not cumulative) and sums."""

    def __init__(self, names: Iterable[str], buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.names = tuple(names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.buckets = buckets
        #: counts[i][j]: durations of name i in (buckets[j-1], buckets[j]]; the last one is above every bound.
        self.counts = [[0] * (len(buckets) + 1) for _ in self.names]
        self.sums = [0.0] * len(self.names)

    def observe(self, i: int, seconds: float) -> None:
        self.counts[i][bisect_left(self.buckets, seconds)] += 1
        self.sums[i] += seconds

    def observe_named(self, name: str, seconds: float) -> None:
        """Observe under ``name``; names not in the set are ignored."""
        i = self.index.get(name)
        if i is not None:
            self.observe(i, seconds)

    def snapshot(self) -> dict[str, list[float]]:
        """``{name: [count per bucket..., sum]}`` for every name observed at least once."""
        return {n: [*c, s] for n, c, s in zip(self.names, self.counts, self.sums, strict=True) if any(c)}


class CallStats:
    """Calls by method and status, and their latency by method, for one server.

    ``index`` maps a method name to its row (``method_index`` maps unknown
    names to the ``other`` row). ``record(i, status, seconds)`` counts one
    answered call. ``store`` times store operations (see STORE_KINDS).
    """

    def __init__(self, methods: Iterable[str]) -> None:
        self.methods = (*sorted(set(methods) - {OTHER}), OTHER)
        self.index = {name: i for i, name in enumerate(self.methods)}
        self.other = len(self.methods) - 1
        self.calls = [[0] * len(Status) for _ in self.methods]
        self.latency = Timings(self.methods)
        self.store = Timings(STORE_KINDS)

    def method_index(self, name: str) -> int:
        return self.index.get(name, self.other)

    def record(self, method: int, status: int, seconds: float) -> None:
        """One call of method row ``method`` answered with ``status`` after ``seconds``."""
        self.calls[method][status] += 1
        latency = self.latency  # Timings.observe inlined: this runs once per call
        latency.counts[method][bisect_left(latency.buckets, seconds)] += 1
        latency.sums[method] += seconds

    def record_since(self, method: int, status: int, started: float) -> None:
        """``record`` with the duration since ``started`` (a ``time.perf_counter()`` reading)."""
        seconds = time.perf_counter() - started
        self.calls[method][status] += 1
        latency = self.latency
        latency.counts[method][bisect_left(latency.buckets, seconds)] += 1
        latency.sums[method] += seconds

    def record_together(self, answered: list[tuple[int, int]], started: float) -> None:
        """Count calls answered together -- those one read brought and the session answered at
        once, whose answers leave in one write -- each ``(method row, status)``, timed as one
        from ``started`` (a ``time.perf_counter()`` reading: the read's arrival)."""
        seconds = time.perf_counter() - started
        calls, latency = self.calls, self.latency
        counts, sums = latency.counts, latency.sums
        bucket = bisect_left(latency.buckets, seconds)
        for method, status in answered:
            calls[method][status] += 1
            counts[method][bucket] += 1
            sums[method] += seconds

    def observe_store(self, kind: str, seconds: float) -> None:
        """The store's timing hook (bastion/store/observe.py)."""
        self.store.observe_named(kind, seconds)

    def snapshot(self) -> dict[str, Any]:
        """The counts as JSON-able dicts keyed by name (only what is not zero)."""
        statuses = [s.name for s in Status]
        calls = {
            method: {statuses[code]: n for code, n in enumerate(row) if n}
            for method, row in zip(self.methods, self.calls, strict=True)
            if any(row)
        }
        return {"calls": calls, "latency": self.latency.snapshot(), "store": self.store.snapshot()}


def merge(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Add snapshots up: numbers are summed, lists element by element, dicts key by key."""
    out: dict[str, Any] = {}
    for snapshot in snapshots:
        _add_into(out, snapshot)
    return out


def _add_into(out: dict[str, Any], more: Mapping[str, Any]) -> None:
    for key, value in more.items():
        if isinstance(value, Mapping):
            _add_into(out.setdefault(key, {}), value)
        elif isinstance(value, list):
            have = out.get(key)
            if isinstance(have, list) and len(have) == len(value):
                out[key] = [a + b for a, b in zip(have, value, strict=True)]
            else:
                out[key] = list(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = out.get(key, 0) + value
