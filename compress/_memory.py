"""Keep resident memory bounded by one block, whatever the depth of the model.

glibc raises its mmap threshold every time a large block is freed (up to 32 MiB). The pipeline
allocates and frees MB-sized activation buffers for every batch of every block, so after the
first frees those buffers land in the heap, fragment it, and RSS creeps up block after block
(measured on SmolLM2: +13 MiB per block). Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``,
which also switches the dynamic adjustment off) keeps large buffers in their own mappings that
are returned to the OS on free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 128 * 1024


@functools.cache
def bound_allocator() -> bool:
    """Fix glibc's mmap threshold once per process; a no-op (False) elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
