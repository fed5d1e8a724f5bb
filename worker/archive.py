"""Directory <-> tar archive, for checkpoints and adapters moving through storage."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path


def tar_directory(source: Path, target: Path) -> Path:
    """Write source's files (sorted, so archives are reproducible) into an uncompressed tar.

    Not compressed: safetensors weights barely compress and gzip would cost minutes on large models."""
    with tarfile.open(target, "w") as tar:
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(source)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(path, "rb") as f:
                tar.addfile(info, f)
    return target


def extract_tar(chunks: Iterator[bytes], target: Path) -> Path:
    """Extract an archive streamed from storage; the "data" filter refuses links and absolute paths."""
    target.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    for chunk in chunks:
        buffer.write(chunk)
    buffer.seek(0)
    with tarfile.open(fileobj=buffer, mode="r:") as tar:
        tar.extractall(target, filter="data")
    return target


def file_chunks(path: Path, size: int = 1024 * 1024) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk
