#!/usr/bin/env python
"""Similarity phase at MSR-VTT-full scale: encode-once vs the original's per-block recomputation.

Inputs are random features of ViT-B/32 size (no towers run): 59,800 captions × 32 token features and
2,990 videos × 12 frame features, 512-d, with the paper's TAB-TDB heads (random weights).

* ours: TAB text vectors once per caption, temporal heads once per video, then chunked matrix products and
  the metrics (``modules.evaluation``);
* baseline: what the original's evaluation loop did: for every (caption batch, video batch) pair of
  ``batch_size_val``, re-run the video heads and the caption TAB, then one block of scores. There are
  ceil(59,800/64)·ceil(2,990/64) = 44,180 such pairs; a sample of them is timed and the total extrapolated
  (the full loop would take hours on CPU).

    python benchmarks/bench_eval_similarity.py [--quick] [--sample_pairs 12] [--threads N]

The last line printed is the speed-up.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from clip2video.modules.evaluation.engine import encode_video_heads, score
from clip2video.modules.network.alignment import align_tokens
from clip2video.modules.network.backbone import ClipConfig
from clip2video.modules.network.model import TextEmbedding
from clip2video.modules.network.temporal import l2n
from clip2video.modules.weights.factory import create_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--captions", type=int, default=59_800)
    ap.add_argument("--videos", type=int, default=2_990)
    ap.add_argument("--batch_size_val", type=int, default=64)
    ap.add_argument("--sample_pairs", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="1/10 of the captions and videos")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.quick:
        a.captions, a.videos = a.captions // 10, a.videos // 10
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    cfg = ClipConfig(embed_dim=512, vision_width=64, vision_layers=1, text_width=512, text_layers=1)
    model = create_model("tab_tdb", clip_config=cfg, mask_layout="per_video").eval()
    d, t, length = 512, 12, 32
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(a.videos, t, d, generator=g)
    vmask = torch.ones(a.videos, t, dtype=torch.long)
    vmask[::7, 8:] = 0  # some short videos
    lengths = torch.randint(6, length, (a.captions,), generator=g)
    tmask = (torch.arange(length)[None] < lengths[:, None]).long()
    tmask_tab = tmask.clone()
    tmask_tab[:, 0] = 0
    chunk = 2048
    tokens = [torch.randn(min(chunk, a.captions - s), length, d, generator=g) for s in range(0, a.captions, chunk)]
    eot = torch.cat([tk[torch.arange(len(tk)), lengths[s : s + chunk] - 1] for s, tk in
                     zip(range(0, a.captions, chunk), tokens, strict=True)])
    caption_video = np.sort(np.random.default_rng(0).integers(0, a.videos, a.captions))
    caption_video[: a.videos] = np.arange(a.videos)  # every video has a caption
    caption_video.sort()
    print(f"captions {a.captions}, videos {a.videos}, batch_size_val {a.batch_size_val}, threads "
          f"{torch.get_num_threads()}")

    # ---------------- ours
    t0 = time.perf_counter()
    aligned = torch.cat([align_tokens(tk, tmask_tab[s : s + len(tk)], model.weight_center, model.emb_center)
                         for s, tk in zip(range(0, a.captions, chunk), tokens, strict=True)])
    text = TextEmbedding(l2n(eot), aligned)
    video = encode_video_heads(model, feats, vmask, batch_size=256)
    metrics, _, _ = score(model, text, video, caption_video, True)
    ours = time.perf_counter() - t0
    print(f"ours: {ours:.2f} s (text TAB + heads once per video + chunked scores + metrics), "
          f"T2V R@1 {metrics['t2v']['R1']:.2f} (random)")

    # ---------------- baseline: per-block recomputation, timed on a sample of block pairs
    bs = a.batch_size_val
    n_tb, n_vb = math.ceil(a.captions / bs), math.ceil(a.videos / bs)
    pairs = n_tb * n_vb
    rng = np.random.default_rng(0)
    sample = [(int(rng.integers(n_tb)), int(rng.integers(n_vb))) for _ in range(a.sample_pairs)]
    flat_tokens = torch.cat(tokens[:2])  # blocks are drawn from the first 4096 captions (same cost)
    t0 = time.perf_counter()
    for tb, vb in sample:
        tb = tb % (len(flat_tokens) // bs)
        ts, vs = slice(tb * bs, (tb + 1) * bs), slice(vb * bs, (vb + 1) * bs)
        v = model.encode_video_features(feats[vs], vmask[vs])
        ta = align_tokens(flat_tokens[ts], tmask_tab[ts], model.weight_center, model.emb_center)
        tg = l2n(flat_tokens[ts][torch.arange(flat_tokens[ts].shape[0]), lengths[ts] - 1])
        s = model.logit_scale.exp() * (0.5 * tg @ v.global_.T + 0.5 * ta @ v.aligned.T)
        s.numpy()
    per_pair = (time.perf_counter() - t0) / len(sample)
    baseline = per_pair * pairs
    print(f"baseline: {per_pair * 1e3:.1f} ms per block pair × {pairs} pairs = {baseline:.0f} s (extrapolated "
          f"from {len(sample)} timed pairs)")
    print(f"speed-up of the similarity phase: {baseline / ours:.0f}x")


if __name__ == "__main__":
    main()
