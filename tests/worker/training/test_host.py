from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.training.host import CPU_KERNEL_CACHE_CAPACITY, MKL_BUFFER_POOLS, release_freed_memory
from worker.training.model import cpu_bf16

ROOT = Path(__file__).resolve().parents[3]

# bf16 products of 3 x 120 distinct shapes (forward and backward), in a fresh process that imports worker.training
# first; prints how much malloc'd memory the second and third 120 shapes added.
KERNEL_CACHES = """
import ctypes
import worker.training
import torch

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info

def held():
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20

weight = torch.randn(256, 256, dtype=torch.bfloat16, requires_grad=True)
def products(rows):
    for m in rows:
        (torch.randn(m, 256, dtype=torch.bfloat16, requires_grad=True) @ weight).sum().backward()

products(range(1, 121))
first = held()
products(range(121, 241))
second = held()
products(range(241, 361))
print(second - first, held() - second)
"""


def _kernel_cache_growth(env: dict[str, str]) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", KERNEL_CACHES], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    second, third = (float(x) for x in out.stdout.split()[-2:])
    return second, third


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads glibc's mallinfo2")
@pytest.mark.skipif(cpu_bf16() == "none", reason="no bf16 instructions: torch runs bf16 products without oneDNN")
def test_the_kernel_cache_cap_halves_bf16_growth_and_an_operators_capacity_wins() -> None:
    env = {k: v for k, v in os.environ.items() if k not in CPU_KERNEL_CACHE_CAPACITY}
    capped = _kernel_cache_growth(env)
    # ideep's default (1,024 computations): every new shape adds kernels to both caches.
    uncapped = _kernel_cache_growth({**env, **{name: "1024" for name in CPU_KERNEL_CACHE_CAPACITY}})
    assert min(uncapped) > 40, uncapped
    # oneDNN's own primitive cache (left at its default) still fills; ideep's cache stops at 64.
    assert sum(capped) < 0.75 * sum(uncapped), (capped, uncapped)


# fp32 products of the shapes of a checkpointed pass's MLP, for changing token counts, in a fresh process that imports
# the worker package first (as every worker process does) and then torch; prints how much resident memory they left.
MKL_POOLS = """
import worker
import torch

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

up, down = torch.randn(4864, 896), torch.randn(896, 4864)
before = anon()
for tokens in (64, 300, 700, 128, 512, 1000):
    (torch.randn(tokens, 896) @ up.t()) @ down.t()
print(anon() - before)
"""


def _left_by_products(env: dict[str, str]) -> float:
    out = subprocess.run([sys.executable, "-c", MKL_POOLS], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_process_runs_fp32_products_without_mkls_buffer_pools_and_an_operators_value_wins() -> None:
    import torch

    if not torch.backends.mkl.is_available():
        pytest.skip("this torch runs its fp32 products without MKL")
    env = {k: v for k, v in os.environ.items() if k not in MKL_BUFFER_POOLS}
    without = _left_by_products(env)
    # An empty value is MKL's own default: its per-thread pools keep the packed operands' buffers after the products.
    kept = _left_by_products({**env, **{name: "" for name in MKL_BUFFER_POOLS}})
    assert kept - without > 8, (kept, without)


def _anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim, read from /proc")
def test_release_freed_memory_hands_freed_heap_back() -> None:
    import torch

    # 256 MB of 64 KB tensors (glibc's heap, under its mmap threshold); all freed but the last, which keeps the
    # heap's top in use so free() alone cannot give any of it back.
    tensors = [torch.ones(16384) for _ in range(4096)]
    last = tensors[-1]
    del tensors
    held = _anon_mb()
    release_freed_memory()
    assert held - _anon_mb() > 128
    assert last.sum().item() == 16384


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim, read from /proc")
def test_a_release_with_min_growth_waits_until_resident_memory_grew_that_much() -> None:
    import torch

    release_freed_memory()  # what the growth counts from
    tensors = [torch.ones(16384) for _ in range(4096)]  # 256 MB on glibc's heap, as above
    last = tensors[-1]
    del tensors
    held = _anon_mb()
    release_freed_memory(min_growth_mb=1024)  # it grew about 256 MB: kept
    assert held - _anon_mb() < 32
    release_freed_memory(min_growth_mb=128)
    assert held - _anon_mb() > 128
    assert last.sum().item() == 16384


def test_the_last_level_cache_is_the_highest_level_the_cpu_reports(tmp_path: Path) -> None:
    """sysfs's caches of the first CPU, sizes as Linux writes them: the highest level's size; none reported, None."""
    from worker.training.host import last_level_cache_bytes

    for index, (level, size) in enumerate([(1, "32K"), (1, "32K"), (3, "32768K"), (2, "1024K")]):
        (tmp_path / "cpu" / f"index{index}").mkdir(parents=True)
        (tmp_path / "cpu" / f"index{index}" / "level").write_text(f"{level}\n")
        (tmp_path / "cpu" / f"index{index}" / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(tmp_path / "cpu") == 32 * 2**20
    (tmp_path / "none").mkdir()
    assert last_level_cache_bytes(tmp_path / "none") is None
