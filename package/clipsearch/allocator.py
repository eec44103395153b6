"""Let glibc's malloc keep freed blocks for reuse instead of handing them back to the kernel.

A training step or an encoding batch on the CPU allocates and frees the same activation-sized
tensors (a few to tens of MB each) over and over. By default glibc serves blocks above its mmap threshold with fresh `mmap`s
and returns them on free, so every such tensor page-faults in anew and the kernel zeroes each
page: on ViT-Small-16 at batch 64 on 2 cores that was about a tenth of the step (BENCHMARKS.md,
"Training: where the time goes"); encoding webdataset tars with "our" model spent half of its CPU
time in the kernel (75 of 148 s), and ran a third slower, before this. Raising the mmap threshold to glibc's maximum and keeping the
freed top of the heap turns those tensors into reused heap blocks. The cost is that memory freed
after the peak stays with the process; the peak itself does not grow.
"""
from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above 32 MB on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
_MMAP_THRESHOLD_MAX = 32 << 20
_TRIM_THRESHOLD = 1 << 30
_TOP_PAD = 64 << 20

_applied: bool | None = None


def reuse_freed_memory() -> bool:
    """Tune this process's malloc as above; True when it took effect (glibc), False elsewhere.

    Call it before the work that allocates; DataLoader workers forked later inherit it.
    """
    global _applied
    if _applied is None:
        _applied = _mallopt_all()
    return _applied


def _mallopt_all() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # macOS, Windows, musl builds without mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_TOP_PAD, _TOP_PAD))
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)
