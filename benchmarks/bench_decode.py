"""Direct video reading vs decoding every frame (extraction) vs reading extracted JPEGs, per core.

What one video costs when a model wants 12 sampled frames (``max_frames 12``, virtual extraction at 5 fps,
224×224 CLIP tensors):

* **direct**: ``load_video_file`` — a demux pass for the frame list (no decoding), seeks to the keyframes
  before the 12 sampled frames and decodes only from there, then the exact resize/normalise; the index cache
  is cleared before every call, so the demux pass is counted each time;
* **(a) decode all, OpenCV**: ``cv2.VideoCapture.read`` over every frame, what the original's extraction
  (and any extract-first pipeline) pays per video before anything is written; resize and JPEG writing are
  not counted, so this is a lower bound of extraction;
* **(b) extracted JPEGs**: ``load_video`` on the folder ``sample_frame.py`` wrote (5 fps, quality 95), the
  exact loader: what reading costs once the extraction has been paid (and stored).

Library comparison on the same videos (seek + decode of the 12 sampled frames, RGB arrays, no resize):
PyAV through our ``decode_outputs``; OpenCV with ``CAP_PROP_POS_FRAMES`` seeks (frame-number seeks, its
only kind); TorchCodec ``get_frames_played_at`` when it is importable (it needs FFmpeg installed on the
system; not a dependency). Every method runs in this process on one thread (PyAV 1 decoder thread,
OpenCV's capture ``CAP_PROP_N_THREADS`` 1, ``torch.set_num_threads(1)``), so the figures are frames per second per core;
DataLoader workers multiply them alike. Reported: sampled frames/s (12 / seconds per video) and the
ratio of direct over (a) and (b).

Videos: ``../shared/reference-data/videos`` (real H.264: 1280×720 in one GOP, 640×272 with a keyframe
every ~2 s) when present, and synthetic H.264 clips (480×270, 25 fps, moving shapes over noise) of 5 s, 30 s
and 3 min, each with a short GOP (keyframe every 1 s) and a long one (every 10 s, x264's default); they are
written once into ``--cache`` and reused by later runs.

    python benchmarks/bench_decode.py            # a few minutes on 2 shared cores (first run: + writing clips)
    python benchmarks/bench_decode.py --quick    # 5 s and 30 s clips only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from clip2video.cli import sample_frame
from clip2video.dataloaders import video_io
from clip2video.dataloaders.frames import load_video, load_video_file, sample_positions
from clip2video.dataloaders.video_io import decode_outputs, encode_video, probe

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference-data" / "videos"
FPS, MAX_FRAMES, SIZE = 5.0, 12, 224
ONE_THREAD = [cv2.CAP_PROP_N_THREADS, 1]  # OpenCV's FFmpeg capture otherwise decodes with one thread per core


class _Clip:
    """The frames of a synthetic clip, rendered on demand (a 3-minute clip would not fit in memory)."""

    def __init__(self, seconds: int, w: int = 480, h: int = 270, fps: int = 25) -> None:
        self.n, self.w, self.h = seconds * fps, w, h
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([120 + 60 * np.sin(x / 50), 100 + 50 * np.cos(y / 40), 128 + 40 * np.sin((x + y) / 70)], -1)
        rng = np.random.default_rng(seconds)
        # a few precomputed noise fields, cycled: sensor-like noise without drawing 400k numbers per frame
        self.noisy = [np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8) for _ in range(5)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < self.n:
            raise IndexError(k)
        img = self.noisy[k % len(self.noisy)].copy()
        for s in range(3):
            cx = (k * (3 + s) + 100 * s) % self.w
            cy = int(self.h / 2 + self.h / 3 * np.sin(k / (20 + 7 * s)))
            img[max(0, cy - 25):cy + 25, max(0, cx - 35):cx + 35] = (60 * s + 40, 220 - 50 * s, 90 + 40 * s)
        return img


def synthetic_clip(path: Path, seconds: int, gop: int) -> None:
    """Written once into the cache folder and reused by later runs (same content every time)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        encode_video(path, _Clip(seconds), fps=25, gop=gop, crf=23)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        video_io._index_cache.clear()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _opencv_all(path: Path) -> int:
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, ONE_THREAD)
    n = 0
    while True:
        ok, _ = cap.read()
        if not ok:
            break
        n += 1
    cap.release()
    return n


def _opencv_seek(path: Path, frames: list[int]) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, ONE_THREAD)
    out = []
    for i in frames:
        cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        ok, f = cap.read()
        if ok:
            out.append(f[..., ::-1])
    cap.release()
    return out


def _torchcodec():
    try:
        from torchcodec.decoders import VideoDecoder
    except Exception:  # noqa: BLE001 - not installed, or no system FFmpeg: the column is left out
        return None
    return VideoDecoder


def measure(path: Path, jpeg_root: Path, repeats: int, tc) -> dict:
    index = probe(path)
    n_out = index.n_output(FPS)
    pos = [int(p) for p in sample_positions(n_out, 1, MAX_FRAMES)]
    src = [index.source_of(k, FPS) for k in pos]
    folder = jpeg_root / path.stem
    if not folder.is_dir():
        assert sample_frame.extract_video(path, folder, FPS, 95) == n_out
    h, w = decode_outputs(path, [0], FPS)[0].shape[:2]
    row = {"name": path.name, "frames": index.n_source, "keyframes": len(index.keyframe_pts),
           "seconds": float(index.duration), "size": f"{w}x{h}"}
    row["direct"] = _best(lambda: load_video_file(path, fps=FPS, max_frames=MAX_FRAMES, image_size=SIZE), repeats)
    row["all_cv"] = _best(lambda: _opencv_all(path), repeats)
    row["jpeg"] = _best(lambda: load_video(folder, max_frames=MAX_FRAMES, image_size=SIZE), repeats)
    row["seek_av"] = _best(lambda: decode_outputs(path, pos, FPS), repeats)
    row["seek_cv"] = _best(lambda: _opencv_seek(path, src), repeats)
    # equality notes: OpenCV's frame-number seeks against the exact frames
    ours = decode_outputs(path, pos, FPS)
    cv_frames = _opencv_seek(path, src)
    row["cv_seek_exact"] = len(cv_frames) == len(ours) and all(
        np.array_equal(a, b) for a, b in zip(ours, cv_frames, strict=True))
    if tc is not None:
        times = [float(index.pts[i] * index.time_base) for i in src]  # each frame's own presentation time

        def tc_run():
            d = tc(str(path), seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC")
            return d.get_frames_played_at(times).data

        row["seek_tc"] = _best(tc_run, repeats)
        got = tc_run().numpy()
        row["tc_exact"] = all(np.array_equal(a, b) for a, b in zip(ours, got, strict=True))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 s and 30 s synthetic clips only")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "clip2video-bench-decode"),
                    help="folder that keeps the synthetic clips between runs")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    video_io.quiet_backend()
    tc = _torchcodec()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        videos = []
        if REFERENCE.is_dir():
            videos += [REFERENCE / "bigbuckbunny.mp4", REFERENCE / "bikes.mp4"]
        lengths = [5, 30] if args.quick else [5, 30, 180]
        t0 = time.perf_counter()
        for s in lengths:
            for gop, tag in ((25, "gop1s"), (250, "gop10s")):
                p = Path(args.cache) / f"synthetic_{s}s_{tag}.mp4"
                synthetic_clip(p, s, gop)
                videos.append(p)
        print(f"wrote {len(videos) - (2 if REFERENCE.is_dir() else 0)} synthetic clips in "
              f"{time.perf_counter() - t0:.0f} s; TorchCodec: {'yes' if tc else 'not importable'}", file=sys.stderr)
        for v in videos:
            rows.append(measure(v, tmp / "jpeg", 1 if "180s" in v.name else args.repeats, tc))
            r = rows[-1]
            print(f"  {r['name']}: direct {MAX_FRAMES / r['direct']:.1f} f/s", file=sys.stderr)

    k = MAX_FRAMES
    print("\nsampled frames/s per core (12 frames per video; higher is better)")
    head = (f"{'video':28} {'size':>9} {'len':>5} {'GOPs':>4} | {'direct':>7} {'(a) all':>7} {'(b) jpeg':>8} | "
            f"{'dir/(a)':>7} {'dir/(b)':>7} | seek+decode only: {'PyAV':>6} {'OpenCV':>6}"
            + ("  TorchCodec" if tc else ""))
    print(head)
    for r in rows:
        line = (f"{r['name']:28} {r['size']:>9} {r['seconds']:5.0f} {r['keyframes']:>4} | {k / r['direct']:7.1f} "
                f"{k / r['all_cv']:7.1f} {k / r['jpeg']:8.1f} | {r['all_cv'] / r['direct']:6.2f}× "
                f"{r['jpeg'] / r['direct']:6.2f}× | {'':17} {k / r['seek_av']:6.1f} {k / r['seek_cv']:6.1f}"
                f"{'' if r['cv_seek_exact'] else '*'}")
        if tc:
            line += f"  {k / r['seek_tc']:9.1f}{'' if r['tc_exact'] else '*'}"
        print(line)
    print("* = frames differ from the exact ones (the frame-number seek landed elsewhere)")
    geo_a = float(np.exp(np.mean([np.log(r["all_cv"] / r["direct"]) for r in rows])))
    geo_b = float(np.exp(np.mean([np.log(r["jpeg"] / r["direct"]) for r in rows])))
    print(f"direct vs (a) decode-all: {geo_a:.2f}x (geometric mean; range "
          f"{min(r['all_cv'] / r['direct'] for r in rows):.2f}-{max(r['all_cv'] / r['direct'] for r in rows):.2f}x); "
          f"direct vs (b) extracted JPEGs: {geo_b:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
