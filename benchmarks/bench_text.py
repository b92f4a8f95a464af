#!/usr/bin/env python
"""Caption encoding: real tokens only (equal-length batches, cut to the longest caption) vs all 32 positions.

Captions are the 1,000 sentences of MSR-VTT 1k-A (``../shared/reference-data/msrvtt_data/
MSRVTT_JSFUSION_test.csv``; synthetic captions of MSR-VTT-like lengths where that file is absent). The model
is the paper's TAB-TDB with a full-size text tower (width 512, 8 heads; ``--text_layers 12`` as ViT-B/32,
default 4 as the parity fixture) and random weights.

* baseline: the previous way: captions in their order, batches of ``--batch`` (512 = the evaluation's
  8 × ``batch_size_val`` 64), every batch run over all ``max_words`` positions;
* ours: ``modules.evaluation.encode_captions`` (equal-length batches; ``encode_text`` cuts each to its real
  length).

Both are timed in the same run, interleaved, best of ``--repeats``; the vectors of both are compared (max abs
difference, global and TAB). The last line printed is the speed-up.

    python benchmarks/bench_text.py [--repeats 3] [--text_layers 4] [--threads N]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch

from clip2video.modules.evaluation.engine import encode_captions
from clip2video.modules.network.backbone import ClipConfig
from clip2video.modules.network.model import TextEmbedding
from clip2video.modules.network.tokenizer import ClipTokenizer
from clip2video.modules.weights.factory import create_model

ROOT = Path(__file__).resolve().parents[1]
MSRVTT_CSV = ROOT.parent / "shared" / "reference-data" / "msrvtt_data" / "MSRVTT_JSFUSION_test.csv"


def msrvtt_captions() -> tuple[list[str], str]:
    """The 1k-A test sentences, or 1,000 synthetic ones with a similar spread of lengths."""
    if MSRVTT_CSV.is_file():
        with open(MSRVTT_CSV, newline="") as f:
            return [r["sentence"] for r in csv.DictReader(f)], str(MSRVTT_CSV.name)
    rng = np.random.default_rng(0)
    words = "a man woman person is playing talking about the video of in on with cooking car song dog".split()
    lengths = np.clip(rng.normal(9.5, 3.5, 1000).round().astype(int), 3, 40)
    return [" ".join(rng.choice(words, n)) for n in lengths], "synthetic (reference data absent)"


@torch.no_grad()
def encode_all_positions(model, captions, tokenizer, batch: int) -> TextEmbedding:
    """The previous path: captions in order, each batch over every position (the tower call without cut)."""
    from clip2video.modules.network.alignment import align_tokens
    from clip2video.modules.network.temporal import l2n

    g, a = [], []
    for s in range(0, len(captions), batch):
        ids, mask = tokenizer.batch(captions[s : s + batch])
        tokens = model.text_tokens(ids)  # all max_words positions
        g.append(l2n(tokens[torch.arange(ids.shape[0]), ids.argmax(-1)]))
        tab = mask.clone()
        tab[:, 0] = 0
        a.append(align_tokens(tokens, tab, model.weight_center, model.emb_center))
    return TextEmbedding(torch.cat(g), torch.cat(a))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--text_layers", type=int, default=4)
    ap.add_argument("--max_words", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    clip = ClipConfig(vision_width=64, vision_layers=1, text_layers=a.text_layers)
    model = create_model("tab_tdb", clip_config=clip).eval()
    captions, source = msrvtt_captions()
    tok = ClipTokenizer(a.max_words)
    _, mask = tok.batch(captions)
    lengths = mask.sum(1).float()
    print(f"{len(captions)} captions from {source}: {lengths.mean():.2f} tokens on average "
          f"(start and end included), max {int(lengths.max())}; max_words {a.max_words}; "
          f"text tower width 512 × {a.text_layers} layers; torch threads {torch.get_num_threads()}")
    encode_captions(model, captions[:8], tok)  # warm-up (BPE vocabulary, kernels)
    base_t, ours_t = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        base = encode_all_positions(model, captions, tok, a.batch)
        t1 = time.perf_counter()
        ours = encode_captions(model, captions, tok, batch_size=a.batch)
        t2 = time.perf_counter()
        base_t.append(t1 - t0)
        ours_t.append(t2 - t1)
    dg = float((base.global_ - ours.global_).abs().max())
    da = float((base.aligned - ours.aligned).abs().max())
    b, o = min(base_t), min(ours_t)
    print(f"baseline (all {a.max_words} positions, batch {a.batch}): {b:.2f} s = {len(captions) / b:.0f} captions/s")
    print(f"ours (real tokens, equal-length batches):     {o:.2f} s = {len(captions) / o:.0f} captions/s")
    print(f"max |Δ| global {dg:.2e}, TAB {da:.2e}")
    print(f"text encoding speed-up: {b / o:.2f}x (same run, best of {a.repeats})")


if __name__ == "__main__":
    main()
