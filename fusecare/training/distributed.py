"""The DistributedDataParallel plumbing of the training loop; every helper is a no-op outside torchrun.

Under ``torchrun`` every rank draws its own random patches from its own seed stream (the
random-patch equivalent of a distributed sampler); rank 0 validates and writes.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Rank, world size and this rank's device; starts the process group under torchrun.

    On CUDA each process takes the GPU of its ``LOCAL_RANK`` (not the global rank modulo the
    GPU count, which is wrong on several nodes), and sets it current *before* the NCCL group
    starts, so NCCL and the object collectives use that GPU rather than all piling onto GPU 0.
    """
    if not is_distributed():
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def barrier() -> None:
    """Wait for every rank (nothing outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    """Every rank arrives, then the process group ends cleanly (nothing outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def mean_over_ranks(value: float, device: torch.device, world: int) -> float:
    """The mean of ``value`` over ranks (the logged loss is every rank's, not rank 0's)."""
    if world == 1:
        return value
    shared = torch.tensor([value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(shared)
    return float(shared) / world
