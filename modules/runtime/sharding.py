"""Split an encoding job over the ranks of a ``torchrun`` job and put the pieces back together.

Evaluation (caption and video vectors) and index building (video vectors) use the same two steps: each rank
takes a deterministic, contiguous share of a list of work items (:func:`shard`), encodes it, and
:func:`gather_rows` returns every rank's rows concatenated in item order, so N processes produce exactly the
arrays one process would. Items are whatever must stay together: single captions, single videos, or the
original mask layout's evaluation batch groups (a group is never split across ranks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from .distributed import DistInfo

T = TypeVar("T")


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s contiguous share of ``n`` items; shares differ in size by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(items: Sequence[T], info: DistInfo | None) -> Sequence[T]:
    """This rank's share of ``items`` (all of them in a single process)."""
    if info is None or not info.is_distributed:
        return items
    start, stop = shard_bounds(len(items), info.rank, info.world_size)
    return items[start:stop]


def gather_rows(local: torch.Tensor | np.ndarray, info: DistInfo | None) -> torch.Tensor | np.ndarray:
    """Concatenate every rank's rows in rank order (the order of :func:`shard`), on every rank.

    Goes through ``all_gather_object`` (CPU pickles), which works with gloo and NCCL alike and allows shares
    of different lengths; vectors are small next to the encoding that produced them.
    """
    if info is None or not info.is_distributed:
        return local
    is_tensor = isinstance(local, torch.Tensor)
    payload = local.detach().cpu().numpy() if is_tensor else np.asarray(local)
    parts: list[np.ndarray | None] = [None] * info.world_size
    dist.all_gather_object(parts, payload)
    out = np.concatenate([p for p in parts if p is not None], axis=0)
    return torch.from_numpy(out).to(local.device) if is_tensor else out
