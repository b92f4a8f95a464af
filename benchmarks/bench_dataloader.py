"""Frame loading speed: our loader vs a straightforward PIL + torchvision per-frame loader, in the same run.

The baseline is what the original did per frame (``Image.open → convert("RGB") → T.Resize(S, BICUBIC) →
T.CenterCrop(S) → T.ToTensor() → T.Normalize``), with the same sampled positions. Both run in this process
on one thread, so the figures are per-core throughput (DataLoader workers multiply both alike). Frames are
generated JPEG folders (gradients + moving shapes + noise, quality 90) of several sizes, ~40 files per video.

Measured: evaluation (each video once, ``load_video``) and training (jittered positions, ``PairDataset`` with
the tokenizer), in ``exact`` and ``fast`` mode; ``exact`` is asserted bit-identical to the baseline, ``fast``
reports its pixel difference. Decoding the sampled JPEGs and nothing else (with the decoder ``exact`` uses:
torchvision's libjpeg-turbo call where it gives Pillow's pixels, else Pillow) is timed as well: a loader
that must return these pixels cannot beat its decoder, so that ratio bounds ``exact``. The last line is the
frames/s ratio of ``exact`` over the baseline.

    python benchmarks/bench_dataloader.py            # ~1 minute on 2 cores
    python benchmarks/bench_dataloader.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw

from clip2video.dataloaders.dataset import PairDataset
from clip2video.dataloaders.frames import (
    CLIP_MEAN,
    CLIP_STD,
    _decode_rgb,
    jitter_positions,
    load_video,
    sample_positions,
)
from clip2video.modules.network.tokenizer import ClipTokenizer


def make_video(folder: Path, w: int, h: int, n: int, seed: int) -> None:
    """A frame folder with slowly moving shapes over a gradient (compresses like real frames)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([120 + 100 * np.sin(3 * x + seed), 90 + 80 * np.cos(4 * y), 128 + 60 * np.sin(5 * (x + y))], -1)
    shapes = [(rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * w, rng.uniform(-4, 4),
               rng.uniform(-3, 3), tuple(int(c) for c in rng.integers(0, 256, 3))) for _ in range(4)]
    for i in range(n):
        a = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
        im = Image.fromarray(a)
        d = ImageDraw.Draw(im)
        for cx, cy, r, vx, vy, col in shapes:
            px, py = cx + vx * i * w / 320, cy + vy * i * h / 240
            d.ellipse((px, py, px + r, py + r * 0.7), fill=col)
        im.save(folder / f"{i + 1:08d}.jpg", "JPEG", quality=90)


class BaselineLoader:
    """The straightforward per-frame loader (torchvision transforms on PIL images)."""

    def __init__(self, size: int = 224):
        self.size = size
        self.tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                             T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])

    def __call__(self, folder: Path, positions: np.ndarray, max_frames: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
        files = sorted(os.listdir(folder))
        video = torch.zeros(max_frames, 3, self.size, self.size)
        mask = torch.zeros(max_frames, dtype=torch.long)
        for slot, p in enumerate(positions):
            video[slot] = self.tf(Image.open(folder / files[p]).convert("RGB"))
            mask[slot] = 1
        return video, mask


def decode_only(folder: Path, positions: np.ndarray) -> None:
    """Decoding the sampled frames to RGB arrays as the exact loader does, and nothing else: its floor."""
    files = sorted(os.listdir(folder))
    for p in positions:
        _decode_rgb(str(folder / files[p]), 224, "exact")


def phase_runs(phase: str, root: Path, vids: list[str], pos: np.ndarray, n_files: int, baseline: BaselineLoader,
               tok: ClipTokenizer) -> dict:
    """The three timed callables (baseline, exact, fast) of one phase on one folder of videos."""
    if phase == "eval":
        return {
            "decode": lambda: [decode_only(root / v, pos) for v in vids],
            "base": lambda: [baseline(root / v, pos) for v in vids],
            "exact": lambda: [load_video(root / v, mode="exact") for v in vids],
            "fast": lambda: [load_video(root / v, mode="fast") for v in vids],
        }
    pairs = [(v, f"a caption about video {v}") for v in vids]
    dsets = {m: PairDataset(pairs, root, tok, mode=m, seed=0) for m in ("exact", "fast")}

    def base_train() -> None:
        for i, (v, c) in enumerate(pairs):  # the same jitter draw as PairDataset (seed 0, epoch 0, index i)
            baseline(root / v, jitter_positions(pos, n_files, np.random.default_rng([0, 0, i])))
            tok(c)

    return {"base": base_train,
            "exact": lambda: [dsets["exact"][i] for i in range(len(pairs))],
            "fast": lambda: [dsets["fast"][i] for i in range(len(pairs))]}


def best_of(runs: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each callable; repetitions are interleaved so that load drift hits all alike."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 videos per size, 2 repetitions (a few seconds)")
    ap.add_argument("--videos", type=int, default=6, help="videos per frame size")
    ap.add_argument("--files", type=int, default=40, help="frame files per video")
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions (best is kept)")
    ap.add_argument("--sizes", default="320x240,640x480,1280x720", help="frame sizes WxH, comma-separated")
    args = ap.parse_args(argv)
    if args.quick:
        args.videos, args.repeats, args.sizes = 2, 2, "320x240,640x480"
    torch.set_num_threads(1)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    baseline, tok = BaselineLoader(224), ClipTokenizer(32)
    tok("warm up the BPE")
    totals = {k: [0, 0.0] for k in ("base", "exact", "fast")}  # frames, seconds
    bound = [0.0, 0.0]  # eval phase: baseline seconds, decode-only seconds
    print(f"torch {torch.__version__}, 1 thread, {args.videos} videos x {args.files} files per size, "
          f"12 frames sampled per video, best of {args.repeats}")
    print(f"{'frames':>10} {'phase':>5} {'baseline f/s':>13} {'exact f/s':>10} {'x':>6} {'fast f/s':>9} {'x':>6} "
          f"{'fast-exact |d| levels max/mean':>31} {'decode-only f/s':>16}")
    with tempfile.TemporaryDirectory() as tmp:
        for w, h in sizes:
            root = Path(tmp) / f"{w}x{h}"
            vids = [f"v{k}" for k in range(args.videos)]
            for k, v in enumerate(vids):
                make_video(root / v, w, h, args.files, seed=k)
            pos = sample_positions(args.files, 1, 12)
            n_frames = len(pos) * len(vids)
            # correctness first: exact == baseline bit for bit; fast difference in uint8 levels
            diffs = []
            for v in vids:
                ref, _ = baseline(root / v, pos)
                ex, _, _ = load_video(root / v, mode="exact")
                fa, _, _ = load_video(root / v, mode="fast")
                assert torch.equal(ref, ex), f"exact mode differs from the baseline on {w}x{h}"
                std = torch.tensor(CLIP_STD)[:, None, None]
                diffs.append(((fa - ex).abs() * std * 255).flatten())
            d = torch.cat(diffs)
            dtxt = f"{d.max():.1f} / {d.mean():.3f}"
            for phase in ("eval", "train"):
                runs = phase_runs(phase, root, vids, pos, args.files, baseline, tok)
                t = best_of(runs, args.repeats)
                fps = {k: n_frames / t[k] for k in t}
                for k in totals:
                    totals[k][0] += n_frames
                    totals[k][1] += t[k]
                if phase == "eval":
                    bound[0] += t["base"]
                    bound[1] += t["decode"]
                dec = f"{fps['decode']:.0f} ({fps['decode'] / fps['base']:.2f}x)" if phase == "eval" else ""
                print(f"{w}x{h:<6} {phase:>5} {fps['base']:13.0f} {fps['exact']:10.0f} "
                      f"{fps['exact'] / fps['base']:5.2f}x {fps['fast']:9.0f} {fps['fast'] / fps['base']:5.2f}x "
                      f"{dtxt if phase == 'eval' else '':>31} {dec:>16}")
    fps = {k: f / s for k, (f, s) in totals.items()}
    print(f"all sizes: baseline {fps['base']:.0f} frames/s, exact {fps['exact']:.0f}, fast {fps['fast']:.0f} "
          f"(fast/baseline {fps['fast'] / fps['base']:.2f}x)")
    print(f"bound for exact mode (eval, its JPEG decoding alone vs the baseline): {bound[0] / bound[1]:.2f}x")
    print(f"ratio exact/baseline frames/s: {fps['exact'] / fps['base']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
