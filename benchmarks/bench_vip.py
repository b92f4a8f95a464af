#!/usr/bin/env python
"""CLIP-ViP encoding time per video against the per-frame image tower, 12 frames, ViT-B/32 size.

Three ways to encode a 12-frame video, same random ViT-B/32 image tower, same run:
  * per-frame: the CLIP image tower on each frame (what CLIP2Video's heads start from);
  * vip blocked: proxy-guided attention computed per block (modules/network/vip.py);
  * vip dense: the same attention through one dense (P+T·N)² boolean mask (the straightforward way).
The blocked and dense results are checked to agree. The last line is the vip/per-frame time ratio.

    python benchmarks/bench_vip.py [--videos 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from clip2video.modules.network.backbone import ClipConfig
from clip2video.modules.network.vip import VideoProxyEncoder
from clip2video.modules.weights.factory import create_model


def dense_attention(self, attn, x, t, n, key_mask):
    """Reference: one (P+T·N)² mask, True where attention is allowed."""
    b, length, w = x.shape
    p = self.num_proxies
    frame = torch.cat([torch.full((p,), -1), torch.arange(t).repeat_interleave(n)])
    allowed = (frame[:, None] == frame[None, :]) | (frame[None, :] == -1) | (frame[:, None] == -1)
    mask = allowed[None, None] & key_mask[:, None, None, :]
    h = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(b, length, 3, h, w // h)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.out_proj(out.transpose(1, 2).reshape(b, length, w))


def timed(fn, repeats):
    """Best of ``repeats`` after a warm-up (the minimum is the least disturbed by other processes)."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    model = create_model("vip", clip_config=ClipConfig(text_layers=1)).eval()  # ViT-B/32 image tower
    frames = torch.randn(a.videos, a.frames, 3, 224, 224)
    mask = torch.ones(a.videos, a.frames)
    per_frame, _ = timed(lambda: model.clip.visual(frames.flatten(0, 1)), a.repeats)
    blocked, vb = timed(lambda: model.vip(model.clip.visual, frames, mask), a.repeats)
    original = VideoProxyEncoder.attention
    VideoProxyEncoder.attention = dense_attention
    try:
        dense, vd = timed(lambda: model.vip(model.clip.visual, frames, mask), a.repeats)
    finally:
        VideoProxyEncoder.attention = original
    err = (vb - vd).abs().max().item()
    print(f"{a.videos} videos × {a.frames} frames, ViT-B/32, {torch.get_num_threads()} threads")
    print(f"per-frame tower : {per_frame / a.videos * 1e3:8.1f} ms/video")
    print(f"vip blocked     : {blocked / a.videos * 1e3:8.1f} ms/video")
    print(f"vip dense mask  : {dense / a.videos * 1e3:8.1f} ms/video   (max |blocked - dense| = {err:.1e})")
    print(f"vip blocked / dense = {blocked / dense:.2f}")
    print(f"vip (blocked) / per-frame tower time per video = {blocked / per_frame:.2f}")


if __name__ == "__main__":
    main()
