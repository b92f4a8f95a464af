#!/usr/bin/env python
"""Frame-encoding throughput of the ViT-B/32 image tower against this machine's matmul ceiling.

The ceiling is a large fp32 matmul (4096³) measured in the same run, interleaved with the tower runs so that
both see the same machine state (shared CPUs drift); the bf16 configuration is measured against a bf16 matmul
of the same size instead (on CPUs with AVX512-BF16 or AMX it is several times the fp32 one). FLOPs per image
are counted analytically (2 per multiply-add: patch embedding, q/k/v, attention, output projection, MLP,
final projection).

Configurations (best of --repeats runs each):
  baseline      open_clip ViT-B/32 as shipped, fp32, torch.no_grad, batch 32
  inference     the same under torch.inference_mode
  batch N       inference_mode with other batch sizes
  bf16          --precision bf16: torch.autocast(bfloat16) (fast only on CPUs with AMX/AVX512-BF16)
  compile       torch.compile (with --compile; the first call compiles, ~1 min)

    python benchmarks/bench_image_tower.py [--repeats 3] [--compile] [--threads N]

The last line is the best fp32 configuration's fraction of the fp32 ceiling, then bf16's frames/s against the
baseline's.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from clip2video.modules.network.backbone import ClipConfig, build_clip
from clip2video.modules.runtime.precision import autocast


def vit_flops(cfg: ClipConfig) -> float:
    w, n_layers, patches = cfg.vision_width, cfg.vision_layers, (cfg.image_size // cfg.patch_size) ** 2
    tokens = patches + 1
    per_layer = tokens * w * 3 * w + 2 * tokens * tokens * w + tokens * w * w + 2 * tokens * w * 4 * w
    macs = w * 3 * cfg.patch_size**2 * patches + n_layers * per_layer + w * cfg.embed_dim
    return 2.0 * macs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = ClipConfig(text_layers=1)
    vis = build_clip(cfg).visual.eval()
    flops = vit_flops(cfg)
    big = {dt: (torch.randn(4096, 4096, dtype=dt), torch.randn(4096, 4096, dtype=dt))
           for dt in (torch.float32, torch.bfloat16)}

    def ceiling(dtype: torch.dtype) -> float:
        x_big, y_big = big[dtype]
        t0 = time.perf_counter()
        x_big @ y_big
        return 2 * 4096**3 / (time.perf_counter() - t0) / 1e9

    def run(fn, batch: int, dtype: torch.dtype) -> tuple[float, float]:
        x = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
        fn(x)  # warm-up
        best_t, ceil = float("inf"), 0.0
        for _ in range(a.repeats):
            ceil = max(ceil, ceiling(dtype))
            t0 = time.perf_counter()
            fn(x)
            best_t = min(best_t, time.perf_counter() - t0)
        return batch / best_t, ceil

    def no_grad(x):
        with torch.no_grad():
            return vis(x)

    def inference(x, ctx=contextlib.nullcontext):
        with torch.inference_mode(), ctx():
            return vis(x)

    def bf16(x):  # --precision bf16 as infer_retrieval.py runs it
        return inference(x, lambda: autocast(torch.device("cpu"), "bf16"))

    f32, b16 = torch.float32, torch.bfloat16
    configs = [("baseline (open_clip, no_grad, batch 32)", no_grad, 32, f32),
               ("inference_mode, batch 32", inference, 32, f32), ("inference_mode, batch 8", inference, 8, f32),
               ("inference_mode, batch 64", inference, 64, f32), ("bf16 autocast, batch 32", bf16, 32, b16)]
    if a.compile:
        compiled = torch.compile(vis)

        def comp(x):
            with torch.inference_mode():
                return compiled(x)

        t0 = time.perf_counter()
        comp(torch.randn(32, 3, cfg.image_size, cfg.image_size))
        print(f"torch.compile: first call {time.perf_counter() - t0:.0f} s")
        configs.append(("torch.compile, batch 32", comp, 32, f32))
    print(f"ViT-B/32 image tower, {flops / 1e9:.2f} GFLOP/image, {torch.get_num_threads()} threads")
    results = []
    for name, fn, batch, dtype in configs:
        ips, ceil = run(fn, batch, dtype)
        frac = ips * flops / 1e9 / ceil
        results.append((frac, name, ips, dtype))
        print(f"{name:42s} {ips:7.2f} frames/s  {ips * flops / 1e9:7.1f} GFLOP/s  {str(dtype)[6:]:>8} ceiling "
              f"{ceil:6.1f}  = {100 * frac:5.1f}% of ceiling")
    best = max(r for r in results if r[3] == f32)
    bf = next(r for r in results if r[3] == b16)
    print(f"best fp32: {best[1]} at {100 * best[0]:.1f}% of the fp32 matmul ceiling (baseline "
          f"{100 * results[0][0]:.1f}%); bf16 autocast: {bf[2] / results[0][2]:.2f}x the baseline's frames/s "
          f"({100 * bf[0]:.1f}% of the bf16 ceiling)")


if __name__ == "__main__":
    main()
