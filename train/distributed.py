"""torchrun integration: read its environment, set up the process group, reduce metrics."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from core.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[Dist, torch.device]:
    """From torchrun's RANK/WORLD_SIZE/LOCAL_RANK: process group (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    d = Dist(rank, world, local)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"run.device={device} but CUDA is not available on this machine; choose "
            "run.device=auto or cpu"
        )
    count = torch.cuda.device_count() if device.startswith("cuda:") else 0
    if device.startswith("cuda:") and int(device.partition(":")[2]) >= count:
        raise ConfigError(
            f"run.device={device} but this machine has {count} CUDA device(s); choose "
            f"run.device=auto, cpu, cuda or one of cuda:0 to cuda:{count - 1}"
        )
    if device.startswith("cuda:") and d.enabled:
        raise ConfigError(
            f"run.device={device} pins every rank to one GPU; under torchrun use "
            "run.device=auto or cuda (each rank takes GPU LOCAL_RANK)"
        )
    if device == "cpu" or not torch.cuda.is_available():
        dev = torch.device("cpu")
    else:
        dev = torch.device(device) if device.startswith("cuda:") else torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if d.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return d, dev


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
