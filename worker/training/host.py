"""The training process's host memory: caps on the CPU math libraries' caches, handing freed heap back to the system,
and the size of the CPU's last-level cache. Imports no torch (worker/__init__.py applies the caps before any worker
process imports torch)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from pathlib import Path
from typing import Any

# oneDNN, which runs torch's bf16 matrix products on a CPU, compiles a kernel for every input shape and caches it
# twice: in ideep's computation cache (LRU_CACHE_CAPACITY) and in oneDNN's primitive cache, 1,024 entries each by
# default, some of them about a megabyte. A micro-batch's token count changes from one forward to the next, so a bf16
# job's memory grew with every step until both were full: 613 -> 1,290 MB malloc'd over 45 steps of qwen2-152k LoRA;
# with ideep's cache capped, 613 -> about 965 MB (docs/benchmarks.md, issue 18). oneDNN's keeps its default:
# capping it at 256 as well held the job at about 715 MB, but made the 64 steps take 155 s instead of 126 s and bf16
# DPO 9% slower. An operator's own values win.
CPU_KERNEL_CACHE_CAPACITY = {"LRU_CACHE_CAPACITY": "64"}
# MKL, which runs torch's fp32 matrix products on an x86 CPU, keeps the buffers it packs operands into in per-thread
# pools for reuse, and a checkpointed pass's products of changing shapes leave them holding tens of megabytes more
# at some moments than others: qwen2-152k QLoRA's training-loop peak in fp32 on a Zen 3 was 1,282-1,412 MB over 25
# runs with the pools and 1,273-1,319 over 13 without, in the same time (docs/benchmarks.md, issue 18, stop 47).
# MKL reads this when torch loads it, so it must be in the environment before torch is imported; any value but an
# empty one turns the pools off, and an operator's `MKL_DISABLE_FAST_MM=` keeps them.
MKL_BUFFER_POOLS = {"MKL_DISABLE_FAST_MM": "1"}


def cap_cpu_library_caches() -> None:
    """Set the caps in this process's environment (and its children's) unless set already. oneDNN reads its caps
    when it first makes a kernel, MKL its own when torch loads it: this runs when the `worker` package is imported,
    before any worker process imports torch, and the processes a worker starts inherit them."""
    for name, value in {**CPU_KERNEL_CACHE_CAPACITY, **MKL_BUFFER_POOLS}.items():
        os.environ.setdefault(name, value)


# With gradient checkpointing train_step releases freed heap before a forward pass and before its backward once
# resident memory grew this much since the last release (without checkpointing it releases after each step only:
# docs/benchmarks.md, issue 18, stop 45).
# Releasing before every pass cut qwen2-152k's QLoRA peak in bf16 from 1,440 to 1,275 MB and LoRA's from 1,579 to
# about 1,500; 128 MB keeps nearly all of that (1,265 / 1,498) while the release and the page faults after it no
# longer slow the small passes of bf16 DPO (3.55-3.60 pairs/s, 3.60-3.66 without; 3.40-3.73 releasing every pass).
PASS_RELEASE_GROWTH_MB = 128.0

_libc: Any = None
_resident_after_release = 0.0


def release_freed_memory(*, min_growth_mb: float = 0.0) -> None:
    """Return the heap that freed tensors left to the system (glibc's malloc_trim; nothing elsewhere). glibc keeps
    freed chunks for reuse, and tensors of changing shapes fragment them: between two steps of a bf16 LoRA job on
    qwen2-152k it held about 150 MB more than the step needed. A release takes milliseconds and the pages it hands
    back fault in again when reused, so with `min_growth_mb` it releases only when the process's resident memory
    grew that much since the last release (reading it takes microseconds)."""
    global _libc, _resident_after_release
    if _libc is None:
        _libc = False
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6")
            _libc = libc.malloc_trim
    if not _libc:
        return
    if min_growth_mb and resident_mb() - _resident_after_release < min_growth_mb:
        return
    _libc(0)
    _resident_after_release = resident_mb()


def resident_mb() -> float:
    """This process's resident memory (0 where /proc is not there to read it)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}


@functools.cache
def last_level_cache_bytes(cpu: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """The size of the highest-level cache the first CPU reports (Linux's sysfs: index*/level and size, such as
    "32768K"), or None where it reports none."""
    caches = []
    for index in cpu.glob("index*"):
        with contextlib.suppress(OSError, ValueError):
            size = (index / "size").read_text().strip()
            scale = _UNITS.get(size[-1:].upper(), 1)
            caches.append((int((index / "level").read_text()), int(size.rstrip("KMGkmg")) * scale))
    return max(caches)[1] if caches else None
