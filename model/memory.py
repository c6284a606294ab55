"""This process's memory, as training and the soak test see it: hand freed heap
pages back to the OS, and read the resident set size."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)  # glibc only


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS. True if any went back; False if
    none did, or where the C library is not glibc (there this does nothing).

    glibc keeps freed pages between live blocks: training's generated audio (~200 MB
    a batch, freed once binned) grew one `train` to 24 GB RSS, and without a trim the
    soak test's RSS wanders by megabytes with heap fragmentation."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def resident_bytes() -> int | None:
    """This process's resident set size (Linux; None where /proc has no VmRSS)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
