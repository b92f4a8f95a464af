#!/usr/bin/env python
"""Train-step time and peak memory of ViT-B/32-size CLIP2Video: a plain implementation vs ours, same run.

Random initialisation (no weights needed), CPU by default, fp32. Three settings, each in its own subprocess
so that the peak resident set size (``ru_maxrss``) belongs to that setting alone:

* ``plain``: the model as a straightforward port would run it: every ``nn.MultiheadAttention`` called with
  ``need_weights=True`` (explicit ``softmax(QKᵀ)V``, no fused attention kernel, as torch 1.7 in the
  original's environment), QuickGELU differentiated by autograd, torch's default (``foreach``) AdamW;
* ``ours``: the model as ``train.py`` runs it (fused SDPA attention inside ``nn.MultiheadAttention``,
  :class:`modules.backbone.QuickGELU` with its one-kernel backward, fused AdamW);
* ``ours+ckpt``: the same with ``--grad_checkpointing`` (each CLIP block recomputed in backward);
* ``ours+bf16``: ``ours`` with ``--precision bf16`` (the towers under ``torch.autocast(bfloat16)`` with SDPA's
  math backend on CPU; the loss, weights, gradients and AdamW in fp32, as ``train.py`` runs it). Fast only
  where the CPU multiplies bf16 natively (AVX512-BF16 / AMX); the bf16 matmul ceiling is printed next to the
  fp32 one.

Reported per setting: ``step_s`` (median wall time of one optimiser step: forward, loss, backward, clip,
AdamW, after a warm-up step), ``peak_rss_gib`` (peak resident memory of the process),
``peak_over_base_gib`` (peak minus the resident memory once the model, gradients and AdamW state exist:
the activations plus backward's working memory and allocator slack) and ``saved_gib`` (the tensors autograd
keeps for backward during one forward, counted through ``saved_tensors_hooks``: exact, unlike RSS). The
last line prints ours/plain time (fp32 and bf16) and ckpt/ours memory.

    python benchmarks/bench_train_step.py                 # 4 videos x 12 frames, ~4.5 minutes on 2 cores
    python benchmarks/bench_train_step.py --batch 12 --steps 1 --settings ours,ours+ckpt   # ~4.5 minutes
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
SETTINGS = ("plain", "ours", "ours+ckpt", "ours+bf16")


def _rss_gib() -> float:
    """Current resident set size (Linux /proc), GiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def matmul_ceiling(torch, device, n: int = 2048, repeats: int = 5, dtype=None) -> float:
    """GFLOP/s of a large matmul (fp32 unless ``dtype``) on this device, best of ``repeats``: the speed limit."""
    dtype = dtype or torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def make_plain(model, torch):
    """Turn our model into the plain baseline in place (explicit attention, autograd QuickGELU)."""
    from torch import nn

    class AutogradQuickGELU(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(1.702 * x)

    for module in list(model.modules()):
        if isinstance(module, nn.MultiheadAttention):
            fused_forward = module.forward

            def explicit(*a, _f=fused_forward, **kw):
                kw["need_weights"] = True  # torch then computes softmax(QK^T)V with bmm, no SDPA kernel
                return _f(*a, **kw)

            module.forward = explicit
        for name, child in module.named_children():
            if type(child).__name__ == "QuickGELU":
                setattr(module, name, AutogradQuickGELU())
    return model


def child(args: argparse.Namespace) -> dict:
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clip2video.modules.network.backbone import ClipConfig
    from clip2video.modules.network.tokenizer import END_ID, PAD_ID, START_ID
    from clip2video.modules.runtime.precision import autocast
    from clip2video.modules.training.loss import global_batch_loss
    from clip2video.modules.training.optim import OptimConfig, build_optimizer, clamp_logit_scale, param_groups
    from clip2video.modules.weights.factory import create_model

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = create_model("tab_tdb", clip_config=ClipConfig.vit_b_32(), mask_layout="per_video").to(device).train()
    cfg = OptimConfig()
    if args.setting == "plain":
        make_plain(model, torch)
        opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    else:
        model.set_grad_checkpointing(args.setting == "ours+ckpt")
        opt = build_optimizer(model, cfg)
    b, t, length = args.batch, args.frames, 32
    ids = torch.randint(1, 49000, (b, length), device=device)
    ids[:, 0], ids[:, 20], ids[:, 21:] = START_ID, END_ID, PAD_ID
    mask = (ids > 0).long()
    frames = torch.randn(b, t, 3, 224, 224, device=device)
    fmask = torch.ones(b, t, dtype=torch.long, device=device)

    # materialise gradients and AdamW state without a forward pass, so "base" holds all persistent memory
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=False)
    base = _rss_gib()

    bf16 = args.setting.endswith("+bf16")

    def forward():
        with autocast(device, "bf16" if bf16 else "fp32", training=True):  # train.py's precision context
            out = model(ids, mask, frames, fmask)
        return global_batch_loss(model, out.text, out.video, out.logit_scale)[0]

    def step(counter=None):
        with counter or contextlib.nullcontext():
            loss = forward()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        clamp_logit_scale(model)
        return loss

    times = []
    for i in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first step is warm-up
            times.append(time.perf_counter() - t0)
    peak = _peak_gib()  # read before the FLOP-counting step below, which holds more memory
    counter = FlopCounterMode(display=False)  # matmul/conv/attention FLOPs of forward + backward
    step(counter)
    # activations autograd keeps for backward (deterministic, unlike RSS): storages packed during one forward
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(x):
        storage = x.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        forward()
    res = {"setting": args.setting, "step_s": statistics.median(times), "gflop": counter.get_total_flops() / 1e9,
           "ceiling_gflops": matmul_ceiling(torch, device, dtype=torch.bfloat16 if bf16 else None),
           "ceiling_dtype": "bf16" if bf16 else "fp32", "peak_rss_gib": peak,
           "base_rss_gib": base, "peak_over_base_gib": peak - base, "loss": float(loss),
           "saved_gib": sum(saved.values()) / 2**30}
    if device.type == "cuda":
        res["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4, help="videos (and captions) per step")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {SETTINGS}")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--setting", default="ours", choices=SETTINGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    settings = [s for s in args.settings.split(",") if s]
    if not settings or any(s not in SETTINGS for s in settings):
        p.error(f"--settings: expected a comma-separated subset of {','.join(SETTINGS)}, got {args.settings!r}")
    print(f"ViT-B/32 CLIP2Video (tab_tdb), {args.batch} videos x {args.frames} frames, {args.device}, "
          f"median of {args.steps} steps after 1 warm-up", flush=True)
    results = {}
    for setting in settings:
        cmd = [sys.executable, __file__, "--child", "--setting", setting, "--batch", str(args.batch),
               "--frames", str(args.frames), "--steps", str(args.steps), "--device", args.device]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        r = results[setting] = json.loads(out)
        print(f"{setting:>10}: step {r['step_s']:.2f} s, peak RSS {r['peak_rss_gib']:.2f} GiB (persistent "
              f"{r['base_rss_gib']:.2f} GiB, peak over it {r['peak_over_base_gib']:.2f} GiB), {r['gflop']:.0f} GFLOP "
              f"= {r['gflop'] / r['step_s']:.0f} GFLOP/s ({r['gflop'] / r['step_s'] / r['ceiling_gflops']:.0%} of the "
              f"{r['ceiling_gflops']:.0f} GFLOP/s {r['ceiling_dtype']} matmul ceiling), saved for backward "
              f"{r['saved_gib']:.2f} GiB, loss {r['loss']:.4f}",
              flush=True)
    parts = []
    if "plain" in results:
        plain = results["plain"]
        floor = plain["gflop"] / plain["ceiling_gflops"]  # the step's matmul FLOPs at the ceiling, nothing else
        print(f"floor: the plain step's {plain['gflop']:.0f} GFLOP at the matmul ceiling take {floor:.2f} s "
              f"= {floor / plain['step_s']:.2f}x the plain step (no fp32 implementation can go below)")
    if "plain" in results and "ours" in results:
        parts.append(f"time ours/plain {results['ours']['step_s'] / results['plain']['step_s']:.2f}x")
    if "plain" in results and "ours+bf16" in results:
        parts.append(f"ours+bf16/plain {results['ours+bf16']['step_s'] / results['plain']['step_s']:.2f}x")
    if "ours" in results and "ours+ckpt" in results:
        on, off = results["ours+ckpt"], results["ours"]
        parts.append(f"checkpointing: time {on['step_s'] / off['step_s']:.2f}x, peak RSS "
                     f"{on['peak_rss_gib'] / off['peak_rss_gib']:.2f}x, peak over persistent "
                     f"{on['peak_over_base_gib'] / max(off['peak_over_base_gib'], 1e-9):.2f}x, saved for backward "
                     f"{on['saved_gib'] / off['saved_gib']:.2f}x")
    print("ratios: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
