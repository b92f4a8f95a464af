"""Numeric precision of the towers: one table of names and the autocast context built from it.

Both evaluation and training run the CLIP towers under the same context, so they share this module rather
than one of them owning it.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {list(PRECISIONS)}, got {precision!r}")


def autocast(device: torch.device, precision: str, training: bool = False) -> contextlib.AbstractContextManager:
    """torch.autocast for bf16/fp16, a no-op context for fp32.

    With ``training`` on CPU, reduced-precision attention also uses SDPA's math backend: torch's CPU
    flash-attention kernel is slower than the math path in bf16 forward + backward at CLIP's short sequences
    (measured by ``benchmarks/bench_train_step.py``). In fp32, and for inference, the default kernel is as
    fast or faster.
    """
    check_precision(precision)
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
    if training and device.type == "cpu":
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack
