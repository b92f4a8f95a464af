"""Process-group set-up from torchrun's environment, in one function; nothing happens at import time.

Launch modes (see ``train.py``):

* ``python train.py ...``: no ``WORLD_SIZE`` in the environment → one process, no process group.
* ``torchrun --nproc_per_node N train.py ...``: torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR``/``MASTER_PORT``; we join the group with NCCL when the device is a GPU and gloo otherwise.
* several nodes: the same command on every node with ``--nnodes M --rdzv_backend c10d
  --rdzv_endpoint HOST:PORT``; nothing else changes here (``LOCAL_RANK`` picks the GPU of the node).

Only rank 0 logs and writes files (``DistInfo.is_main``). There is no barrier inside ``forward``: the only
collectives of a training step are the feature gather in the loss (modules/training/loss.py) and DDP's gradient
all-reduce. Structure after open_clip's ``training/distributed.py`` (idea only, no code copied).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 .. world_size-1).
        local_rank: rank within the node (picks the GPU).
        world_size: number of processes.
        device: the device this process computes on.
        backend: ``nccl`` / ``gloo`` or ``""`` without a process group.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = ""

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``--device`` → a torch device; ``None`` means the node's GPU ``local_rank`` when there is one, else CPU.

    With several processes per node, a bare ``cuda`` becomes ``cuda:<local_rank>`` so that processes do not
    share a GPU.
    """
    if device is None or device == "":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes (or none for a single process).

    Args:
        device: ``--device`` (``cpu``, ``cuda``, ``cuda:1``) or None for automatic.
        timeout_s: collective timeout; long because rank 0 may evaluate while the others wait.

    Returns:
        this process's ``DistInfo``.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistInfo(0, 0, 1, dev, "")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        from datetime import timedelta

        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
    info = DistInfo(rank, local_rank, world_size, dev, backend)
    if info.is_main:
        logger.info("distributed: %d processes, backend %s", world_size, backend)
    return info


def cleanup_distributed() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """``obj`` of rank ``src`` on every rank (used for decisions only rank 0 can make, e.g. a resume path)."""
    if not info.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(info: DistInfo) -> None:
    """Wait for every rank (between phases only, never inside ``forward``)."""
    if info.is_distributed:
        dist.barrier()
