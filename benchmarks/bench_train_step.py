#!/usr/bin/env python
"""Train-step time and peak memory with and without gradient checkpointing, ViT-B/32-size CLIP2Video.

Random initialisation (no weights needed), CPU by default. Each setting runs in its own subprocess so that
the peak resident set size (``ru_maxrss``) belongs to that setting alone. Reported per setting:

* ``step_s``: median wall time of one optimiser step (forward, loss, backward, clip, AdamW) after a warm-up;
* ``peak_rss_gib``: peak resident memory of the process;
* ``peak_over_base_gib``: peak minus the resident memory once the model, gradients and AdamW state exist,
  i.e. roughly the activations kept for backward (what checkpointing is meant to cut).

The last line prints the checkpointing/plain ratios. Usage::

    python benchmarks/bench_train_step.py [--batch 4 --frames 12 --steps 3 --device cpu --precision fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_gib() -> float:
    """Current resident set size (Linux /proc), GiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from modules.backbone import ClipConfig
    from modules.loss import global_batch_loss
    from modules.optim import OptimConfig, build_optimizer, clamp_logit_scale

    torch.manual_seed(0)
    device = torch.device(args.device)
    from modules.model import create_model

    model = create_model("tab_tdb", clip_config=ClipConfig.vit_b_32(), mask_layout="per_video").to(device).train()
    model.set_grad_checkpointing(args.checkpointing)
    opt = build_optimizer(model, OptimConfig())
    b, t, length = args.batch, args.frames, 32
    ids = torch.randint(1, 49000, (b, length), device=device)
    ids[:, 0], ids[:, 20], ids[:, 21:] = 49406, 49407, 0
    mask = (ids > 0).long()
    frames = torch.randn(b, t, 3, 224, 224, device=device)
    fmask = torch.ones(b, t, dtype=torch.long, device=device)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.precision]

    # materialise gradients and AdamW state without a forward pass, so "base" holds all persistent memory
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=False)
    base = _rss_gib()

    times = []
    for i in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(ids, mask, frames, fmask)
        loss, _ = global_batch_loss(model, out.text, out.video, out.logit_scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        clamp_logit_scale(model)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first step is warm-up
            times.append(time.perf_counter() - t0)
    res = {"checkpointing": args.checkpointing, "step_s": statistics.median(times), "peak_rss_gib": _peak_gib(),
           "base_rss_gib": base, "peak_over_base_gib": _peak_gib() - base, "loss": float(loss)}
    if device.type == "cuda":
        res["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4, help="videos (and captions) per step")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    results = {}
    for ckpt in (False, True):
        cmd = [sys.executable, __file__, "--child", "--batch", str(args.batch), "--frames", str(args.frames),
               "--steps", str(args.steps), "--device", args.device, "--precision", args.precision]
        if ckpt:
            cmd.append("--checkpointing")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[ckpt] = json.loads(out)
        r = results[ckpt]
        print(f"grad checkpointing {'on ' if ckpt else 'off'}: step {r['step_s']:.2f} s, peak RSS "
              f"{r['peak_rss_gib']:.2f} GiB (persistent {r['base_rss_gib']:.2f} GiB, peak over it "
              f"{r['peak_over_base_gib']:.2f} GiB), loss {r['loss']:.4f}", flush=True)
    off, on = results[False], results[True]
    print(f"ViT-B/32 CLIP2Video (tab_tdb), {args.batch} videos × {args.frames} frames, {args.device} {args.precision}")
    print(f"ratio checkpointing/plain: time {on['step_s'] / off['step_s']:.2f}x, peak RSS "
          f"{on['peak_rss_gib'] / off['peak_rss_gib']:.2f}x, peak over persistent "
          f"{on['peak_over_base_gib'] / max(off['peak_over_base_gib'], 1e-9):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
