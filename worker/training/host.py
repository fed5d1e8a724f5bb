"""The training process's host memory: a cap on a CPU kernel cache, and handing freed heap back to the system.
Imports no torch (worker/training/__init__.py applies the cap before torch runs anything)."""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Any

# oneDNN, which runs torch's bf16 matrix products on a CPU, compiles a kernel for every input shape and caches it
# twice: in ideep's computation cache (LRU_CACHE_CAPACITY) and in oneDNN's primitive cache, 1,024 entries each by
# default, some of them about a megabyte. A micro-batch's token count changes from one forward to the next, so a bf16
# job's memory grew with every step until both were full: 613 -> 1,290 MB malloc'd over 45 steps of qwen2-152k LoRA;
# with ideep's cache capped, 613 -> about 965 MB (docs/benchmarks.md, issue 18). oneDNN's keeps its default:
# capping it at 256 as well held the job at about 715 MB, but made the 64 steps take 155 s instead of 126 s and bf16
# DPO 9% slower. An operator's own values win.
CPU_KERNEL_CACHE_CAPACITY = {"LRU_CACHE_CAPACITY": "64"}


def cap_cpu_kernel_caches() -> None:
    """Set the caps in this process's environment (and its children's) unless set already; oneDNN reads them when
    it first makes a kernel, so this must run before torch's first matrix product."""
    for name, value in CPU_KERNEL_CACHE_CAPACITY.items():
        os.environ.setdefault(name, value)


_libc: Any = None


def release_freed_memory() -> None:
    """Return the heap that freed tensors left to the system (glibc's malloc_trim; nothing elsewhere). glibc keeps
    freed chunks for reuse, and tensors of changing shapes fragment them: between two steps of a bf16 LoRA job on
    qwen2-152k it held about 150 MB more than the step needed. Milliseconds; train_step calls it before each forward
    pass and the loop after each step."""
    global _libc
    if _libc is None:
        _libc = False
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6")
            _libc = libc.malloc_trim
    if _libc:
        _libc(0)
