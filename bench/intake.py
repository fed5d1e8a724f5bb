"""Intake benchmark: DatasetValidator throughput against a plain json.loads-per-line pass, same run.

    python -m bench.intake --size-mb 1024      # the figure for the issue (a ~1 GB chat JSONL)
    python -m bench.intake --size-mb 20        # smoke run

Both passes read the file in the same 1 MiB chunks the upload path uses. The figure is the ratio of
validator MB/s to plain MB/s (target >= 0.5) and each pass's peak RSS growth (target < 200 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from app.core.storage import CHUNK_BYTES
from app.services.datasets import DatasetValidator

WORDS = ["the", "model", "learns", "from", "data", "and", "answers", "each", "question", "with", "care",
         "while", "the", "user", "asks", "about", "colours", "codes", "rivers", "cities", "music", "water",
         "light", "paper", "garden", "stone", "cloud", "window"]


def generate(path: Path, *, size_mb: int, seed: int = 0) -> int:
    """Write a chat JSONL of about size_mb MiB (varied, realistic examples); returns its size in bytes."""
    rng = random.Random(seed)
    target = size_mb * 1024 * 1024
    # A pool of distinct examples, written with a varying key so lines are not all identical.
    pool = []
    for i in range(2000):
        def sentence(n: int) -> str:
            return " ".join(rng.choice(WORDS) for _ in range(n))
        messages = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": f"{sentence(rng.randint(5, 40))}?"},
                    {"role": "assistant", "content": sentence(rng.randint(10, 120)) + "."}]
        if i % 5 == 0:
            messages += [{"role": "user", "content": sentence(8)},
                         {"role": "assistant", "content": sentence(30), "weight": 1}]
        pool.append(messages)
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        n = 0
        while written < target:
            block = []
            for _ in range(1000):
                messages = pool[rng.randrange(len(pool))]
                block.append(json.dumps({"messages": [*messages[:-1], {**messages[-1], "content":
                                                                       f"{messages[-1]['content']} #{n}"}]}))
                n += 1
            text = "\n".join(block) + "\n"
            out.write(text)
            written += len(text.encode())
    return path.stat().st_size


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


def plain_pass(path: Path) -> int:
    """Split into lines and json.loads each: the floor any validator pays."""
    pending = b""
    count = 0
    for chunk in _chunks(path):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if line.strip():
                json.loads(line)
                count += 1
    if pending.strip():
        json.loads(pending)
        count += 1
    return count


def validator_pass(path: Path) -> int:
    """The full validation that an upload gets."""
    validator = DatasetValidator()
    for chunk in _chunks(path):
        validator.feed(chunk)
    validator.finish()
    assert validator.error_count == 0, validator.report()["errors"][:3]
    return validator.examples


def measure(run: Callable[[Path], int], path: Path) -> tuple[float, float, int]:
    """(seconds, peak RSS growth in MB, result) for one pass, RSS sampled every 20 ms."""
    process = psutil.Process(os.getpid())
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.02):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    result = run(path)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak = max(peak, process.memory_info().rss)
    return seconds, (peak - baseline) / 1e6, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the generated chat JSONL in MiB")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the file (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "chat.jsonl"
        size = generate(path, size_mb=args.size_mb)
        mb = size / 1e6
        print(f"file: {mb:.1f} MB chat JSONL, cpus: {os.cpu_count()}")
        plain_s, plain_rss, plain_n = measure(plain_pass, path)
        valid_s, valid_rss, valid_n = measure(validator_pass, path)
        assert plain_n == valid_n, (plain_n, valid_n)
        print(f"plain json.loads pass: {mb / plain_s:8.1f} MB/s  ({plain_s:.2f} s, {plain_n} lines, "
              f"peak RSS growth {plain_rss:.1f} MB)")
        print(f"DatasetValidator pass: {mb / valid_s:8.1f} MB/s  ({valid_s:.2f} s, {valid_n} examples, "
              f"peak RSS growth {valid_rss:.1f} MB)")
        print(f"ratio validator/plain: {plain_s / valid_s:.2f}  (target >= 0.5)")


if __name__ == "__main__":
    main()
