"""The Prometheus metrics of a server (``GET /metrics`` on the gateway).

Theory of operation. Nothing is counted here: the server counts in plain
integers as it works (``Server.counters``, ``Server.metrics`` -- a
``CallStats``, bastion/observability/stats.py -- and the scheduler's own
counts), and a scrape turns those numbers into metric families. That keeps
prometheus-client off the hot path: ``server_snapshot`` reads everything
into one JSON-able dict, ``render`` builds a throw-away registry around a
``SnapshotCollector`` and returns the text exposition format.

Metrics (every label value comes from a fixed set -- the server's own
method table plus ``other``, the 17 status names, the reasons below -- never
from a request)::

    bastion_build_info{version,python}                  1
    bastion_calls_total{method,status}                  answered calls
    bastion_call_duration_seconds{method}               histogram: from the Call to its answer
    bastion_calls_in_flight                             admitted calls not yet answered
    bastion_scheduler_queue_length{priority}            calls waiting for a slot
    bastion_scheduler_running                           calls holding a slot
    bastion_scheduler_overloaded{priority}              1 while the level sheds (interactive, batch)
    bastion_rejections_total{reason}                    connections and calls refused for a limit
    bastion_connections_open                            accepted connections (handshaking ones too)
    bastion_connections_total                           connections accepted since start
    bastion_connections_closed_total{reason}            idle, abuse, slow_reader, handshake_timeout
    bastion_stream_buffer_bytes                         client-stream items received, not yet taken by handlers
    bastion_stream_buffer_limit_bytes                   limits.max_stream_buffer_total (summed over workers)
    bastion_stream_buffer_paused_connections            connections not read from for that limit now
    bastion_stream_buffer_pauses_total                  times a connection was paused for it
    bastion_auth_failures_total{reason}                 credentials, throttled, denied
    bastion_gateway_tls_handshake_failures_total{reason} the gateway's (HTTPS) port: gateway/_tls.py REASONS
    bastion_store_operation_duration_seconds{operation} histogram: write, read (SQLite), call (PostgreSQL)
    bastion_backups_total{trigger,result}               backups taken: on_demand/scheduled, ok/failed
    bastion_memory_trims_total                          heap trims after connection storms (server/memtrim.py)
    bastion_memory_trimmed_bytes_total                  bytes the resident size fell by across them
    bastion_workers                                     processes these numbers add up

Rejection reasons: connection_limit, source_connection_limit,
source_handshake_limit (at accept: limits.max_handshakes_per_source),
reserved_connections (an anonymous handshake refused: limits.reserved_connections),
proxy_header, tls (a TLS handshake that failed or timed out, an ALPN other
than bastion/1, a revoked client certificate), rate_limited, inflight (a
call past the connection's limits.max_inflight, refused by the protocol
core), the scheduler's queue_full, principal_limit, shed and deadline, and
the gateway's gateway_connection_limit and gateway_source_connection_limit
(a connection to the gateway's port past ``gateway.max_connections`` or
``max_connections_per_source``: gateway/_gate.py).
Auth failures: ``credentials`` (a handshake with a bad, expired or revoked
token or password), ``throttled`` (a handshake or an auth.login refused by
the login throttle), ``denied`` (a call refused UNAUTHENTICATED or
PERMISSION_DENIED, by its method's roles or by the service's own check: a
kv namespace, a file share, auth.login's password).

Several workers (``bastion serve --workers N``). Each worker counts on its
own, and a scrape reaches one of them, so each worker publishes its
snapshot as a file ``worker-<index>.json`` in a directory the supervisor
empties at start (``<data_dir>/metrics``): every second when it changed,
and at every scrape it answers. A scrape adds the scraped worker's fresh
snapshot to the others' published ones (``WorkerSnapshots.gather``), so
other workers' numbers are at most a second old. Counters never go
backwards: a worker writes its own snapshot before it reads the others', so
no later scrape can see less than an earlier one did, and a worker
restarted after a crash starts from its predecessor's last published
counts (``baseline``). prometheus-client's multiprocess mode was the
alternative; it is not used because it writes every increment to an mmap
under a lock (several µs per call with labels), cannot serve custom
collectors, and needs per-metric gauge modes.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from bastion._version import __version__
from bastion.observability.stats import LATENCY_BUCKETS, merge
from bastion.server.server import Server

__all__ = ["CONTENT_TYPE", "SnapshotCollector", "WorkerSnapshots", "render", "server_snapshot"]

#: The Content-Type of the text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: (metric reason, Server.counters / scheduler key) for bastion_rejections_total.
_REJECTIONS = (
    ("source_connection_limit", "rejected_connections_per_source"),
    ("source_handshake_limit", "rejected_handshakes_per_source"),
    ("reserved_connections", "rejected_connections_reserved"),
    ("proxy_header", "rejected_proxy_header"),
    ("tls", "tls_refused"),
    ("rate_limited", "rejected_rate_limited"),
    ("args_memory", "rejected_args_memory"),
    ("inflight", "rejected_inflight"),
    ("queue_full", "scheduler_rejected_queue_full"),
    ("principal_limit", "scheduler_rejected_principal_limit"),
    ("shed", "scheduler_rejected_shed"),
    ("deadline", "scheduler_rejected_deadline"),
    ("gateway_connection_limit", "gateway_rejected_connections"),
    ("gateway_source_connection_limit", "gateway_rejected_connections_per_source"),
)
#: The refusals counted in ``rejected_connections`` for a limit other than max_connections.
_NOT_OVER_TOTAL = ("rejected_connections_per_source", "rejected_handshakes_per_source", "rejected_connections_reserved")
_CLOSED = (
    ("idle", "closed_idle"),
    ("abuse", "closed_abuse"),
    ("slow_reader", "closed_slow_reader"),
    ("slow_sender", "closed_slow_sender"),
    ("handshake_timeout", "closed_handshake_timeout"),
)
_AUTH = (
    ("credentials", "auth_failures_credentials"),
    ("throttled", "auth_failures_throttled"),
    ("denied", "auth_failures_denied"),
)
_PRIORITIES = ("control", "interactive", "batch")  # the scheduler's levels (Level), as stats() names them
_SHEDDABLE = ("interactive", "batch")  # the levels it may shed (control is never shed)
#: (metric reason, Server.counters key) for bastion_gateway_tls_handshake_failures_total (gateway/_tls.py
#: counts them; the reasons are spelled here too, so that this module does not import the gateway's).
_GATEWAY_TLS = tuple(
    (reason, f"gateway_tls_{reason}")
    for reason in ("timeout", "closed", "plaintext_http", "certificate_rejected", "protocol", "other")
)


def server_snapshot(server: Server) -> dict[str, Any]:
    """Everything /metrics shows of ``server``, read now, as a JSON-able dict (see ``stats.merge``)."""
    snapshot = server.metrics.snapshot()
    counters = {key: value for key, value in server.counters.items() if value}
    scheduler = server.scheduler.stats()
    for key, value in scheduler.items():
        if key.startswith("rejected_") and value:
            counters[f"scheduler_{key}"] = int(value)
    stats = server.stats()
    gauges: dict[str, float] = {
        "calls_in_flight": stats["calls_in_flight"],
        "connections_open": stats["connections_open"],
        "scheduler_running": scheduler.get("running", 0),
        "stream_buffer_bytes": server.stream_bytes,
        "stream_buffer_limit_bytes": server.limits.max_stream_buffer_total,
        "stream_buffer_paused_connections": len(server.stream_waiting),
        "workers": 1,
    }
    for level in _PRIORITIES:
        gauges[f"queued_{level}"] = scheduler.get(f"queued_{level}", 0)
    for level in _SHEDDABLE:
        gauges[f"overloaded_{level}"] = scheduler.get(f"overloaded_{level}", 0)
    snapshot["counters"] = counters
    snapshot["gauges"] = gauges
    return snapshot


class SnapshotCollector(Collector):
    """Metric families from a snapshot (``server_snapshot``, or several merged)."""

    def __init__(self, snapshot: Mapping[str, Any]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        counters: Mapping[str, int] = snap.get("counters", {})
        gauges: Mapping[str, float] = snap.get("gauges", {})

        info = GaugeMetricFamily("bastion_build_info", "bastion version and Python", labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield info

        calls = CounterMetricFamily(
            "bastion_calls", "Calls answered, by method and status", labels=["method", "status"]
        )
        for method, by_status in sorted(snap.get("calls", {}).items()):
            for status, n in sorted(by_status.items()):
                calls.add_metric([method, status], n)
        yield calls

        yield _histogram(
            "bastion_call_duration_seconds",
            "Seconds from a call's arrival to its answer, by method",
            "method",
            snap.get("latency", {}),
        )

        yield _gauge("bastion_calls_in_flight", "Calls admitted and not yet answered", gauges.get("calls_in_flight"))
        queued = GaugeMetricFamily(
            "bastion_scheduler_queue_length", "Calls waiting for a slot, by priority", labels=["priority"]
        )
        for level in _PRIORITIES:
            queued.add_metric([level], gauges.get(f"queued_{level}", 0))
        yield queued
        yield _gauge("bastion_scheduler_running", "Calls holding a scheduler slot", gauges.get("scheduler_running"))
        shedding = GaugeMetricFamily(
            "bastion_scheduler_overloaded",
            "1 while a level is overloaded and shedding (workers shedding, added up), by priority",
            labels=["priority"],
        )
        for level in _SHEDDABLE:
            shedding.add_metric([level], gauges.get(f"overloaded_{level}", 0))
        yield shedding

        rejections = CounterMetricFamily(
            "bastion_rejections", "Connections and calls refused for a limit, by reason", labels=["reason"]
        )
        over_total = counters.get("rejected_connections", 0) - sum(counters.get(key, 0) for key in _NOT_OVER_TOTAL)
        rejections.add_metric(["connection_limit"], max(0, over_total))
        for reason, key in _REJECTIONS:
            rejections.add_metric([reason], counters.get(key, 0))
        yield rejections

        yield _gauge("bastion_connections_open", "Accepted connections not yet closed", gauges.get("connections_open"))
        total = CounterMetricFamily("bastion_connections", "Connections accepted")
        total.add_metric([], counters.get("connections", 0))
        yield total
        yield _counter_by(
            "bastion_connections_closed", "Connections closed by the server, by reason", counters, _CLOSED
        )
        yield _gauge(
            "bastion_stream_buffer_bytes",
            "Bytes of client-stream items received and not yet taken by their handlers",
            gauges.get("stream_buffer_bytes"),
        )
        yield _gauge(
            "bastion_stream_buffer_limit_bytes",
            "limits.max_stream_buffer_total: past it, connections over their share are not read from",
            gauges.get("stream_buffer_limit_bytes"),
        )
        yield _gauge(
            "bastion_stream_buffer_paused_connections",
            "Connections not read from now because the stream buffer total is reached",
            gauges.get("stream_buffer_paused_connections"),
        )
        pauses = CounterMetricFamily(
            "bastion_stream_buffer_pauses", "Times a connection was not read from for the stream buffer total"
        )
        pauses.add_metric([], counters.get("stream_buffer_paused", 0))
        yield pauses
        yield _counter_by("bastion_auth_failures", "Failed authentications and denied calls", counters, _AUTH)
        yield _counter_by(
            "bastion_gateway_tls_handshake_failures",
            "TLS handshakes on the gateway's port that failed, by reason",
            counters,
            _GATEWAY_TLS,
        )

        yield _histogram(
            "bastion_store_operation_duration_seconds",
            "Seconds per store operation, by kind",
            "operation",
            snap.get("store", {}),
        )
        backups = CounterMetricFamily(
            "bastion_backups", "Backups the server took, by trigger and result", labels=["trigger", "result"]
        )
        for trigger in ("on_demand", "scheduled"):
            for result in ("ok", "failed"):
                backups.add_metric([trigger, result], counters.get(f"backups_{trigger}_{result}", 0))
        yield backups
        trims = CounterMetricFamily("bastion_memory_trims", "Heap trims after connection storms (malloc_trim)")
        trims.add_metric([], counters.get("memory_trims", 0))
        yield trims
        trimmed = CounterMetricFamily(
            "bastion_memory_trimmed_bytes", "Bytes the resident size fell by across the heap trims"
        )
        trimmed.add_metric([], counters.get("memory_trimmed_bytes", 0))
        yield trimmed
        yield _gauge("bastion_workers", "Server processes whose numbers are added up here", gauges.get("workers", 1))


def _gauge(name: str, documentation: str, value: float | None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value or 0)


def _counter_by(
    name: str, documentation: str, counters: Mapping[str, int], reasons: Iterable[tuple[str, str]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    for reason, key in reasons:
        family.add_metric([reason], counters.get(key, 0))
    return family


def _histogram(name: str, documentation: str, label: str, series: Mapping[str, list[float]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=[label])
    for key, values in sorted(series.items()):
        *counts, total = values
        if len(counts) != len(LATENCY_BUCKETS) + 1:
            continue  # published by a different version: skip rather than misreport
        buckets: list[tuple[str, float]] = []
        running = 0.0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        family.add_metric([key], buckets, sum_value=total)
    return family


def render(snapshot: Mapping[str, Any]) -> bytes:
    """The text exposition format of ``snapshot``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return generate_latest(registry)


# -- several workers ------------------------------------------------------------------------------


_KEPT_ACROSS_RESTARTS = ("calls", "latency", "store", "counters")


class WorkerSnapshots:
    """The snapshots the workers of one supervisor publish in ``directory`` (see the module docstring).

    ``index`` is this worker's, ``count`` how many there are. ``baseline`` is
    the counting this worker's predecessor published (a restart continues
    from it); every snapshot this worker publishes or gathers includes it.
    """

    def __init__(self, directory: Path, index: int, count: int) -> None:
        self.directory = directory
        self.index = index
        self.count = count
        self._last: bytes | None = None
        previous = self._read(index)
        self.baseline = {k: v for k, v in (previous or {}).items() if k in _KEPT_ACROSS_RESTARTS}

    def _path(self, index: int) -> Path:
        return self.directory / f"worker-{index}.json"

    def _read(self, index: int) -> dict[str, Any] | None:
        try:
            data = msgspec.json.decode(self._path(index).read_bytes())
        except (OSError, msgspec.DecodeError):
            return None  # not published yet, or being replaced (os.replace is atomic: never half a file)
        return data if isinstance(data, dict) else None

    def own(self, current: Mapping[str, Any]) -> dict[str, Any]:
        """``current`` (this worker's ``server_snapshot``) plus the baseline."""
        return merge([self.baseline, current])

    def publish(self, current: Mapping[str, Any]) -> None:
        """Write this worker's snapshot (if it changed since the last write)."""
        body = msgspec.json.encode(self.own(current))
        if body == self._last:
            return
        path = self._path(self.index)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            os.replace(temporary, path)
        except OSError:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        self._last = body

    def gather(self, current: Mapping[str, Any]) -> dict[str, Any]:
        """Every worker's numbers added up: this one's ``current`` (published first), the others' files."""
        mine = self.own(current)
        with contextlib.suppress(OSError):
            self.publish(current)
        others = [self._read(i) for i in range(self.count) if i != self.index]
        found = [snapshot for snapshot in others if snapshot is not None]
        return merge([mine, *found])
