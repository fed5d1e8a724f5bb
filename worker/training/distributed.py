"""Data-parallel training over several processes of one host, started by torchrun.

Every process runs the whole recipe on its share of each batch. DDP keeps a full replica of the
weights in each process and averages gradients; FSDP (torch's fully_shard) splits weights, gradients
and optimizer state across the processes and gathers a layer's weights only while it runs. Rank 0
alone talks to the caller (events, metrics, checkpoints); the others follow its decisions.

On GPUs the processes talk over NCCL, one GPU each; on a CPU over gloo, which is how the tests run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

# A rank waits this long for the others (a slow checkpoint upload, a long evaluation) before failing.
COLLECTIVE_TIMEOUT = timedelta(hours=2)
Strategy = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class ProcessGroup:
    """Where this process stands in a torchrun launch; world_size 1 when it is alone."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> ProcessGroup:
    """The process group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (alone if it does not)."""
    return ProcessGroup(rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1")),
                        local_rank=int(os.environ.get("LOCAL_RANK", "0")))  # fmt: skip


def start(group: ProcessGroup, device: torch.device) -> None:
    """Join the launch's process group (NCCL on GPUs, gloo on a CPU); nothing to do when alone."""
    import torch
    import torch.distributed as dist

    if not group.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)


def stop(group: ProcessGroup) -> None:
    """Leave the process group (after the last collective)."""
    import torch.distributed as dist

    if group.enabled and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(group: ProcessGroup, values: list[float]) -> list[float]:
    """Element-wise sum of `values` over every process (float64, so token counts stay exact)."""
    if not group.enabled:
        return list(values)
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_max(group: ProcessGroup, value: int) -> int:
    """The largest `value` over every process."""
    if not group.enabled:
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def broadcast(group: ProcessGroup, value: Any) -> Any:
    """Rank 0's `value` (any picklable object) in every process."""
    if not group.enabled:
        return value
    import torch.distributed as dist

    box = [value if group.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(group: ProcessGroup, value: Any) -> list[Any]:
    """Every process's `value`, in rank order."""
    if not group.enabled:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * group.world_size
    dist.all_gather_object(out, value)
    return out


def barrier(group: ProcessGroup) -> None:
    if group.enabled:
        import torch.distributed as dist

        dist.barrier()


def wrap(model: torch.nn.Module, *, group: ProcessGroup, strategy: Strategy, device: torch.device) -> torch.nn.Module:
    """The module the training step calls: DDP around the model, or the model sharded in place by FSDP."""
    if not group.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # DDP broadcasts rank 0's weights at construction: fresh LoRA matrices start equal everywhere.
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    # One FSDP unit per transformer block: a block's full weights exist only while it runs.
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module)
    fully_shard(model)
    return model


@contextlib.contextmanager
def accumulate(wrapped: torch.nn.Module, *, group: ProcessGroup, strategy: Strategy, sync: bool) -> Iterator[None]:
    """Forward and backward of one micro-batch; gradients cross processes only when `sync` (the last one)."""
    if not group.enabled or sync:
        if group.enabled and strategy == "fsdp":
            wrapped.set_requires_gradient_sync(True)  # type: ignore[operator]
        yield
        return
    if strategy == "ddp":
        with wrapped.no_sync():  # type: ignore[operator]
            yield
        return
    wrapped.set_requires_gradient_sync(False)  # type: ignore[operator]
    yield


def full_state_dict(model: torch.nn.Module, *, group: ProcessGroup, strategy: Strategy) -> dict[str, Any] | None:
    """Every weight, unsharded, on the CPU, in rank 0 (None elsewhere); a collective under FSDP."""
    if group.enabled and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if group.is_main else None
    return {k: v.detach().cpu() for k, v in model.state_dict().items()} if group.is_main else None


def load_full_state_dict(model: torch.nn.Module, state: dict[str, Any], *, group: ProcessGroup,
                         strategy: Strategy) -> None:
    """Load unsharded weights (a subset is fine: adapter weights) into every process's model."""
    if group.enabled and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    missing_ok = model.load_state_dict(state, strict=False)
    if missing_ok.unexpected_keys:
        raise ValueError(f"weights not in the model: {missing_ok.unexpected_keys[:5]}")


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, group: ProcessGroup,
                    strategy: Strategy) -> dict[str, Any] | None:
    """The optimizer's state, unsharded, in rank 0 (None elsewhere); a collective under FSDP."""
    if group.enabled and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if group.is_main else None
    return optimizer.state_dict() if group.is_main else None


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], *,
                         group: ProcessGroup, strategy: Strategy) -> None:
    """Inverse of optimizer_state, in every process (each keeps its own shard under FSDP)."""
    if group.enabled and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)
