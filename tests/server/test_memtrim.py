"""HeapTrimmer's rule: after churn, after growth, not too often (the storm itself: integration/test_memory_trim.py)."""

from __future__ import annotations

import asyncio

import pytest

import bastion
from bastion import allocator
from bastion.server.memtrim import TRIM_AFTER_CLOSED, TRIM_GROWTH, TRIM_INTERVAL, HeapTrimmer, memory_stats

MIB = 1024 * 1024


def test_trims_only_after_connections_closed_and_the_heap_grew_and_not_twice_in_an_interval() -> None:
    server = bastion.Server([])
    trimmer = HeapTrimmer(server)
    trimmer._resident_at_trim = 100 * MIB  # as at start
    grown = 100 * MIB + TRIM_GROWTH
    assert not trimmer.due(0.0, grown)  # no connection has closed: growth that came with no churn
    server.counters["connections"] += TRIM_AFTER_CLOSED - 1
    assert not trimmer.due(0.0, grown)
    server.counters["connections"] += 1
    assert trimmer.due(0.0, grown)
    assert not trimmer.due(0.0, grown - 1)  # churn, but the heap has not grown enough to be worth it
    assert not trimmer.due(0.0, None)  # the resident size cannot be read: nothing to go by

    trimmer._last_trim, trimmer._closed_at_trim = 0.0, trimmer._closed()
    server.counters["connections"] += TRIM_AFTER_CLOSED
    assert not trimmer.due(TRIM_INTERVAL - 1, grown)  # too soon after the last trim
    assert trimmer.due(TRIM_INTERVAL, grown)
    trimmer._closed_at_trim = trimmer._closed()
    assert not trimmer.due(TRIM_INTERVAL, grown)  # no churn since the last trim
    server.executor.shutdown()


def test_a_trim_that_released_little_raises_the_mark_one_that_released_much_keeps_it() -> None:
    server = bastion.Server([])
    trimmer = HeapTrimmer(server)
    trimmer._resident_at_trim = 100 * MIB
    # Mid-storm: much released, but the storm's open connections still hold memory. The mark stays
    # at the start's, so the holes they leave once closed are trimmed after the storm.
    trimmer.trimmed(40 * MIB, 130 * MIB)
    assert trimmer._resident_at_trim == 100 * MIB
    trimmer.trimmed(40 * MIB, 90 * MIB)  # ... and never above where a trim got down to
    assert trimmer._resident_at_trim == 90 * MIB
    # Little released: the memory is in use, and is not trimmed for again until the heap grows past it.
    trimmer.trimmed(TRIM_GROWTH // 2 - 1, 150 * MIB)
    assert trimmer._resident_at_trim == 150 * MIB
    trimmer.trimmed(0, None)  # the resident size cannot be read: the mark stays
    assert trimmer._resident_at_trim == 150 * MIB
    server.executor.shutdown()


def test_a_trim_is_counted_for_admin_stats() -> None:
    server = bastion.Server([])
    assert memory_stats(server) == {
        "memory_trims_total": 0,
        "memory_trimmed_bytes_total": 0,
        "memory_trim_seconds_total": 0.0,
    }
    released = asyncio.run(HeapTrimmer(server).trim())
    counted = memory_stats(server)
    assert counted["memory_trims_total"] == 1
    assert counted["memory_trimmed_bytes_total"] == released >= 0
    assert counted["memory_trim_seconds_total"] > 0
    server.executor.shutdown()


def test_trimming_is_turned_off_by_its_switch_or_the_allocator_settings_one(monkeypatch: pytest.MonkeyPatch) -> None:
    glibc = allocator.trim_supported()
    assert HeapTrimmer.available() is glibc
    monkeypatch.setenv("BASTION_MALLOC_TRIM", "0")
    assert not HeapTrimmer.available()
    monkeypatch.delenv("BASTION_MALLOC_TRIM")
    monkeypatch.setenv("BASTION_MALLOC_TUNING", "0")
    assert not HeapTrimmer.available()


def test_trims_that_leave_the_heap_high_come_less_and_less_often() -> None:
    """Memory in use with churn's holes on top: each trim releases the holes (much, so the mark stays)
    but leaves the heap high; trimming every interval for good would stall the loop for nothing."""
    server = bastion.Server([])
    trimmer = HeapTrimmer(server)
    trimmer._resident_at_trim = 100 * MIB
    waits = []
    for _ in range(6):
        trimmer.trimmed(TRIM_GROWTH, 160 * MIB)  # 8 MiB of holes released, 60 MiB still in use
        waits.append(trimmer.wait)
    # The first may be a storm's, still going on: the trim after it comes at the interval.
    assert waits == [TRIM_INTERVAL * n for n in (1, 2, 4, 8, 16, 16)]
    trimmer.trimmed(60 * MIB, 101 * MIB)  # the storm's holes all given back: the interval again
    assert trimmer.wait == TRIM_INTERVAL
    server.executor.shutdown()
