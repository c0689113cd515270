"""The process group for data-parallel training under ``torchrun`` (DDP).

``torchrun --nproc_per_node N`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` in each process; :func:`init_distributed` reads them and joins the group (nccl on
cuda, gloo on cpu). A single process (no ``WORLD_SIZE`` or 1) runs without a group: every helper
here is then the identity, so the loop is written once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "all_reduce_mean", "barrier", "init_distributed", "shutdown_distributed"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group described by the environment (or none for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a tensor over the ranks (in place); the identity for one process."""
    if info.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world_size
    return values


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
