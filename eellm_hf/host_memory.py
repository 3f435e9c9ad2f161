"""Keep the memory of freed large CPU tensors in the process, instead of returning it to the OS at every free.

glibc's malloc serves every block above its mmap threshold (32 MiB at most) with a fresh ``mmap`` and unmaps it
on ``free``, so each large tensor a step allocates is new memory that the kernel zeroes page by page on first
touch. With a 49,152-token vocabulary one micro-batch's logits are 100 MB, and an EE-Tuning step of SmolLM2 spent
a third of its time in those page faults (``sys`` time). :func:`keep_freed_memory` makes malloc take large
blocks from its heap and never trim it, so the next step reuses the same pages; the process's peak footprint
stays what its tensors need at once. It is what ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` in the
environment would do, set from inside the process (the trainer's workers are started by ``torchrun``). The
trainer's ``run`` calls it in every worker, and so do the command lines that score or generate over batches
(``eellm-eval``, ``eellm-sweep``, ``eellm-calibrate``, the demos); a library call never changes its caller's
allocator.

A leaf module (it imports only the standard library); on a C library other than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt() parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_ONLY_ABOVE = 2**31 - 1  # bytes free at the heap's top before malloc trims it: the largest int mallopt takes


@functools.cache
def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and keep freed memory for reuse (once per process); whether the C
    library took the settings (False where it is not glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    no_mmap = mallopt(_M_MMAP_MAX, 0)
    no_trim = mallopt(_M_TRIM_THRESHOLD, _TRIM_ONLY_ABOVE)
    return bool(no_mmap and no_trim)


__all__ = ["keep_freed_memory"]
