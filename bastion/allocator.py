"""Memory settings for server processes: the C allocator and Python's garbage collector.

``tune()``: the C allocator, for processes that move large frames.

A stream of 256 KiB chunks allocates and frees buffers of that size
thousands of times a second. glibc's malloc serves blocks above its
``mmap`` threshold with fresh ``mmap`` calls and returns free memory at the
top of the heap to the kernel past its trim threshold, so each such buffer
costs page faults on zeroed pages -- on this project's streaming benchmark,
most of the CPU time of a 1 GiB upload. ``tune()`` fixes the ``mmap``
threshold at 4 MiB and the trim threshold at 16 MiB, so those buffers are
reused from the heap: a 1 GiB upload then takes a third of the server CPU.
The price is that up to 16 MiB of freed memory may stay with the process.

``bastion serve`` and the CLI call ``tune()`` at start; a program using the
client library for bulk transfers may call it too. ``BASTION_MALLOC_TUNING=0``
in the environment turns it off. It does nothing where the C library is not
glibc.

``settle_gc()``: the garbage collector, once a server has started. Python's
oldest generation is collected every few dozen young collections, and each
such pass walks every object the process holds -- modules, configuration,
services: tens of milliseconds, stalling every call in flight (the p99 of a
busy server). ``gc.freeze()`` moves what exists after start-up out of the
collector's sight, and a young-generation threshold of 7,000 allocations
(Python's default is 700; calls free what they allocate, so few cycles form)
makes young passes a tenth as frequent. ``bastion serve`` calls it once
listening; an application embedding ``bastion.Server`` may call it after its
own start-up.

``trim()``: glibc's ``malloc_trim(0)``, which hands the free pages anywhere in
the heap back to the kernel, not only the free space at its top (all glibc
does by itself). A storm of connections (thousands opened and dropped at
once, or TLS handshakes left halfway) leaves the heap full of holes between
the few blocks still in use: a test server held 327 MB once 20,000 such
connections from 100 addresses had closed (75 MB before), though nothing
leaked and the holes are reused by the next storm; ``trim()`` took it back to
94 MB. The server calls it from a thread after such storms
(bastion/server/memtrim.py). It does nothing (returns None) where
the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "YOUNG_GC_THRESHOLD", "settle_gc", "trim", "trim_supported", "tune"]

MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 16 * 1024 * 1024
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
YOUNG_GC_THRESHOLD = 7000

_tuned = False


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (musl and macOS have no ``mallopt`` or ``malloc_trim`` to call)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        try:  # glibc's soname: find_library would run `ldconfig -p` (a process, on every CLI command) to say so
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def trim_supported() -> bool:
    """Whether ``trim()`` does anything here (glibc)."""
    return _glibc() is not None


def trim() -> bool | None:
    """Give the heap's free pages back to the kernel (glibc's ``malloc_trim(0)``); whether any were,
    or None where the C library is not glibc. It walks the whole heap, holding each arena's lock:
    call it off the event loop (1.5 ms on a heap of 93 MB, a tenth of a second on one of 330 MB)."""
    libc = _glibc()
    return None if libc is None else bool(libc.malloc_trim(0))


def tune() -> bool:
    """Apply the settings once per process; True if they are in effect."""
    global _tuned
    if _tuned:
        return True
    if os.environ.get("BASTION_MALLOC_TUNING", "1") == "0" or (libc := _glibc()) is None:
        return False
    mallopt = libc.mallopt
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned


def settle_gc() -> None:
    """Collect once, freeze what is left (start-up state), collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, middle, old)
