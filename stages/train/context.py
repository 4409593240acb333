"""Who a training process is: its rank, the world size and its device — read from one source.

Ray Train and ``torchrun`` both initialise torch.distributed's default process group before the
training function runs; rank and world size come from that group and nowhere else. The device
is the launcher's business (Ray Train assigns GPUs, ``torchrun`` sets ``LOCAL_RANK``), so each
launcher passes it in.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["WorkerContext", "current_worker", "torchrun_device"]


@dataclass(frozen=True)
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device
    node: str  # where it runs: the Ray node id, or the host name outside Ray

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_worker(device: torch.device, node: str | None = None) -> WorkerContext:
    """This process, from the initialised default process group; makes ``device`` current for CUDA."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: start training through Ray Train or torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and DeepSpeed use the current device
    return WorkerContext(dist.get_rank(), dist.get_world_size(), device, node or socket.gethostname())


def torchrun_device() -> torch.device:
    """The device ``torchrun`` intends for this process: GPU ``LOCAL_RANK`` when there is one."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
