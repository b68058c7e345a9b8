"""Keep freed host memory in the process, so that a training step does not page-fault every step.

A CPU training step allocates and frees about a gigabyte of activation temporaries (medium preset).
glibc's malloc serves blocks above a threshold (128 KiB, rising adaptively) with fresh ``mmap``
pages and gives freed memory back to the kernel, so the next step touches brand-new pages again and
the kernel zero-fills every one of them: on a 2-core machine that cost 20-30% of a medium step.

``retain_freed_memory()`` sets glibc's ``M_MMAP_THRESHOLD`` to its maximum (32 MiB on 64-bit
systems; larger blocks are still mapped) and turns trimming off, so freed blocks stay in the heap and
the next step reuses them. It also keeps every thread on the one main heap (``M_ARENA_MAX`` = 1):
the per-thread heaps glibc would give the worker threads of ``data_parallel`` are capped at 64 MiB
each and are unmapped when empty, which brought back ~27,000 page faults per medium step. Our
threads allocate a few large arrays each, so sharing one heap's lock costs nothing measurable.

Peak memory does not grow: the same blocks are reused, not added to. It is a no-op where the C
library is not glibc (macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = (
    -1,
    -3,
    -8,
)  # mallopt parameter numbers, from glibc's <malloc.h>
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems
NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes (an int)


@cache
def retain_freed_memory() -> bool:
    """Tell glibc to keep freed blocks for reuse; True if it did (idempotent, once per process)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, NEVER_TRIM), (M_ARENA_MAX, 1))
    return all(
        [bool(mallopt(parameter, value)) for parameter, value in settings]
    )  # mallopt returns 1 on success
