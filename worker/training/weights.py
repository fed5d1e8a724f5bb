"""A model's safetensors read with pread, a block at a time, in the dtype each weight is loaded in.

transformers maps every checkpoint file whole and copies (and converts) each tensor out of the mapping, so
the file pages it touched count in the process's memory until loading ends: loading a model peaks at its
loaded size plus its file's size. A QLoRA load of an fp32 file (most full fine-tunes are saved in fp32) is
the worst case: a 4-bit model that peaks at the size of the fp32 file. Here each weight is read from the file
when transformers materialises it, straight into a tensor of the dtype transformers asks for, through one
READ_BLOCK_BYTES staging buffer when it converts; nothing is mapped, so the peak is the loaded model plus that
buffer (docs/training.md, "Loading a base model").

The tensors are handed to transformers as the lazy state dict of `from_pretrained(None, config=...,
state_dict=...)`, in place of the safetensors slices it builds itself: it materialises each one with
`tensor[...]` and then `.to(device, dtype)` (transformers/core_model_loading.py, _materialize_copy). Anything
else asked of a pending read reads the tensor in the file's dtype first, so a transformers that materialises
differently still loads the same weights, only without the saving.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

# One block of a converting read: the staging buffer's size in bytes.
READ_BLOCK_BYTES = 16 << 20
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
# safetensors' dtype names for the dtypes read here; a checkpoint holding any other (integer, fp8, pre-quantized
# 4-bit) is left to transformers' own loading.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def checkpoint_files(model_dir: Path) -> list[Path] | None:
    """The model's safetensors files (one, or the shards its index names); None when it has neither."""
    index = model_dir / _INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / name for name in names]
    single = model_dir / _SINGLE_FILE
    return [single] if single.is_file() else None


def _read_header(fd: int) -> tuple[dict[str, Any], int]:
    """The file's tensor table and the offset where its data begins (the safetensors format: an 8-byte
    little-endian header length, the JSON header, then the tensors' bytes)."""
    (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    header = json.loads(os.pread(fd, length, 8))
    header.pop("__metadata__", None)
    return header, 8 + length


def _pread_into(fd: int, out: torch.Tensor, offset: int) -> None:
    """Fill the contiguous tensor with the file's bytes from offset (pread may return fewer bytes than asked)."""
    view = memoryview(out.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]  # numpy's stub
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"unexpected end of the checkpoint file at byte {offset + done}")
        done += got


class FileTensor:
    """One tensor of a checkpoint file, read when it is materialised."""

    def __init__(self, fd: int, *, dtype: torch.dtype, shape: list[int], offset: int) -> None:
        self.fd, self.dtype, self.shape, self.offset = fd, dtype, torch.Size(shape), offset

    def __getitem__(self, index: Any) -> Any:
        if index is Ellipsis:
            return PendingRead(self)
        return self.read(self.dtype)[index]

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        """The tensor in dtype: read straight into it when that is the file's dtype, else a block at a time
        through a staging buffer and converted."""
        out = torch.empty(self.shape, dtype=dtype)
        if dtype == self.dtype:
            _pread_into(self.fd, out, self.offset)
            return out
        flat, size = out.view(-1), self.dtype.itemsize
        block = torch.empty(max(1, min(out.numel(), READ_BLOCK_BYTES // size)), dtype=self.dtype)
        for start in range(0, out.numel(), block.numel()):
            part = block[:min(block.numel(), out.numel() - start)]
            _pread_into(self.fd, part, self.offset + start * size)
            flat[start:start + part.numel()].copy_(part)
        return out


class PendingRead:
    """What `tensor[...]` of a FileTensor gives: the read happens at `.to(device, dtype)`, in that dtype."""

    def __init__(self, tensor: FileTensor) -> None:
        self._tensor = tensor
        self._read: torch.Tensor | None = None

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
        if self._read is None and dtype is not None:
            device = kwargs.get("device") or next((a for a in args if not isinstance(a, torch.dtype)), None)
            loaded = self._tensor.read(dtype)
            return loaded if device is None else loaded.to(device)
        return self._materialised().to(*args, **kwargs)

    def _materialised(self) -> torch.Tensor:
        if self._read is None:
            self._read = self._tensor.read(self._tensor.dtype)
        return self._read

    def __getattr__(self, name: str) -> Any:
        return getattr(self._materialised(), name)


@contextmanager
def read_checkpoint(model_dir: Path) -> Iterator[dict[str, FileTensor] | None]:
    """The model's weights as a lazy state dict, its files open while the block runs; None when the model has no
    safetensors checkpoint, holds a dtype read here does not cover, or a tensor whose byte range does not match its
    shape (transformers then loads it itself, and safetensors says what is wrong with the file)."""
    files = checkpoint_files(model_dir)
    if files is None:
        yield None
        return
    fds: list[int] = []
    try:
        state: dict[str, FileTensor] = {}
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            fds.append(fd)
            header, data_start = _read_header(fd)
            for name, entry in header.items():
                dtype = _DTYPES.get(entry["dtype"])
                begin, end = entry["data_offsets"]
                if dtype is None or end - begin != math.prod(entry["shape"]) * dtype.itemsize:
                    yield None  # a byte range that does not hold its shape: safetensors reports the corrupt file
                    return
                state[name] = FileTensor(fd, dtype=dtype, shape=entry["shape"], offset=data_start + begin)
        yield state
    finally:
        for fd in fds:
            os.close(fd)
