"""Process group set-up for `torchrun`, and the few collective helpers the loop needs.

One process per GPU with PyTorch's own DistributedDataParallel: NCCL on CUDA, gloo on the CPU.
A run started without torchrun is a world of one and every helper here is a no-op.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistState:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """'auto' -> this process's CUDA device if there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_spec: str = "auto") -> DistState:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(
                    f"rank {rank} wants {device} but this machine has {torch.cuda.device_count()} GPU(s); "
                    "launch with --nproc_per_node at most the number of GPUs"
                )
            torch.cuda.set_device(device)
        # Rank 0 alone scores the dev set, and puts the teacher cache's shares together, while the
        # others wait in a barrier: NCCL's default 10-minute timeout could abort either at scale.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=COLLECTIVE_TIMEOUT_HOURS))
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    return DistState(rank=rank, world_size=world_size, device=device)


COLLECTIVE_TIMEOUT_HOURS = 2


def all_reduce_min(tensor: torch.Tensor, state: DistState) -> torch.Tensor:
    """Min of a tensor over ranks (a decision every rank must take alike, e.g. stop on a NaN)."""
    if not state.enabled:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out


_host_group = None  # a gloo group beside NCCL: host-side decisions without waiting for the GPU


def max_over_ranks(value: int, state: DistState) -> int:
    """The largest of a small host integer over ranks (e.g. a stop request), on the CPU: under NCCL
    through a gloo group of its own, so no rank waits for its GPU to drain."""
    global _host_group
    if not state.enabled:
        return value
    if _host_group is None and dist.get_backend() != "gloo":
        _host_group = dist.new_group(backend="gloo")  # every rank comes here at the same step
    out = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=_host_group)
    return int(out.item())


def barrier(state: DistState) -> None:
    if state.enabled:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor, state: DistState) -> torch.Tensor:
    """Mean of a tensor over ranks (for logging the global loss)."""
    if not state.enabled:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / state.world_size


def broadcast_object(obj, state: DistState):
    """Rank 0's value of a small picklable object on every rank."""
    if not state.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_object(obj, state: DistState) -> list:
    """Every rank's value of a small picklable object, in rank order, on every rank."""
    if not state.enabled:
        return [obj]
    gathered = [None] * state.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def check_ranks_in_sync(model, state: DistState) -> list[float]:
    """Every rank must end with the same parameters; a silent divergence would corrupt the run."""
    checksum = torch.stack([p.detach().double().pow(2).sum() + p.detach().double().sum()
                            for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(state.world_size)]
    dist.all_gather(gathered, checksum)
    values = [float(g) for g in gathered]
    if len(set(values)) != 1:
        raise RuntimeError(f"data-parallel ranks ended with different parameters (checksums {values})")
    return values


def cleanup(state: DistState) -> None:
    global _host_group
    _host_group = None
    if state.enabled and dist.is_initialized():
        dist.destroy_process_group()
