"""bastion.allocator: large buffers are reused from the heap instead of faulted in afresh."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocate four buffers of a 256 KiB chunk's size and free them, 200 times (as a stream's read, joined frame
# and decoded item come and go); print the page faults it cost.
PROBE = """
import resource, sys
from bastion.allocator import tune
tuned = tune()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    buffers = [bytes(256 * 1024 + 100) for _ in range(4)]
    del buffers
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only"
)


def probe(**env: str) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


def test_tuned_process_reuses_large_buffers() -> None:
    tuned, faults = probe()
    untuned, faults_untuned = probe(BASTION_MALLOC_TUNING="0")
    assert tuned and not untuned
    # Untuned, glibc hands freed memory back to the kernel again and again and faults it
    # in afresh (zeroed) page by page; tuned, the buffers come back from the heap.
    assert faults_untuned > 10 * max(faults, 100)


def test_settle_gc_freezes_startup_state_and_collects_young_objects_less_often() -> None:
    code = (
        "import gc; from bastion.allocator import settle_gc, YOUNG_GC_THRESHOLD; "
        "state = [[i] for i in range(1000)]; settle_gc(); "
        "print(gc.get_freeze_count() >= 1000, gc.get_threshold()[0] == YOUNG_GC_THRESHOLD, "
        "not any(o is state for o in gc.get_objects()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "True"]


def test_trim_hands_the_holes_of_a_fragmented_heap_back_to_the_kernel() -> None:
    # 64 MiB in 16 KiB blocks, every one freed but one in 64 (as a storm of connections leaves the
    # heap): glibc keeps the freed ones resident, as its heap's top is in use; trim() returns them.
    code = (
        "import ctypes; from bastion.allocator import tune, trim; from bastion.server.memtrim import resident_bytes; "
        "tune(); blocks = [ctypes.create_string_buffer(16 * 1024) for _ in range(4096)]; "
        "kept = blocks[::64]; del blocks; before = resident_bytes(); released = trim(); "
        "print(released, (before - resident_bytes()) // 1024 // 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True"
    assert int(out[1]) >= 32, out  # MiB
