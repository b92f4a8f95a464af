#!/usr/bin/env python
"""The whole pipeline on synthetic videos: videos → frames → training → evaluation → table + picture.

No CLIP weights, no dataset, no GPU needed. Coloured shapes move left/right/up/down; every clip has a
time-reversed twin with the opposite caption. Small CLIP2Video models are trained from scratch (random tiny
CLIP) for mean pooling, TDB and TDB+TAB (and CLIP-ViP), each evaluated with infer_retrieval.py on the test split.
Besides the usual R@K, the table reports the accuracy on direction-only distinctions: how often a caption
scores its own clip above the clip's reversed twin. The twins show the same 12 frames in opposite order, so mean
pooling (blind to order) can only separate them through video-compression noise and sits near 50%; temporal
models can do better. The demo ends by indexing the test clips with the TDB + TAB model (``search.py build``)
and running three text queries against that index (top-5, every clip with that caption marked), then joins
several test clips into one long video, indexes it as segments (``--segment_seconds``) and shows two queries
finding the right time range (printed next to the clip's true range).

    python scripts/demo.py [--out demo_out] [--quick] [--seed 0] [--epochs 12] [--variants meanP,tdb,tab_tdb,vip]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

LABELS = {"meanP": "mean pooling", "tdb": "TDB", "tab_tdb": "TDB + TAB", "vip": "CLIP-ViP proxies",
          "seqTransf": "temporal transformer"}


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--videos", type=int, default=400, help="number of clips (twin pairs × 2)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--variants", default="meanP,tdb,tab_tdb,vip")
    ap.add_argument("--colours", default="red,blue", help="palette of the synthetic shapes")
    ap.add_argument("--shapes", default="circle,square")
    ap.add_argument("--workers", type=int, default=0, help="data-loading processes during training")
    ap.add_argument("--quick", action="store_true", help="a few seconds: tiny data, one epoch (for tests)")
    a = ap.parse_args(argv)
    if a.quick:
        a.videos, a.epochs = 40, 1
    variants = [v for v in a.variants.split(",") if v]

    from clip2video.cli import infer_retrieval, sample_frame, train
    from clip2video.dataloaders.annotations import load_eval_set
    from clip2video.dataloaders.synthetic import direction_accuracy, make_synthetic_dataset
    from clip2video.fileio import atomic_write_text
    from clip2video.modules.evaluation.metrics import markdown_row

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    synth = out / "synthetic"
    if not (synth / "annotations.csv").exists():
        log(f"generating {a.videos} synthetic clips in {synth}")
        # 23 frames: the 12 sampled positions (0, 2, ..., 22) are symmetric, so a clip and its reversed twin
        # show the same set of frames and only their order differs
        # A small palette puts clips that differ only in their motion into every batch: the contrastive
        # loss then has to use the motion, not only colour and shape.
        make_synthetic_dataset(synth, n_videos=a.videos, seed=a.seed, size=64, n_frames=23, fps=10, write="mp4",
                               colours=a.colours.split(","), shapes=a.shapes.split(","))
    frames = out / "frames"
    log("extracting frames with sample_frame.py")
    rc = sample_frame.main(["--input_path", str(synth / "videos"), "--output_path", str(frames), "--fps", "10",
                            "--workers", "2"])
    if rc != 0:
        log("frame extraction failed")
        return rc
    ann = synth / "annotations.csv"
    meta = json.loads((synth / "videos.json").read_text())
    rset = load_eval_set("generic", data_path=str(ann), features_path=str(frames), split="test")

    common = ["--datatype", "generic", "--data_path", str(ann), "--features_path", str(frames),
              "--max_words", "16", "--max_frames", "12", "--feature_framerate", "1",
              "--num_thread_reader", str(a.workers)]
    rows = []
    for v in variants:
        run = out / "runs" / v
        t0 = time.perf_counter()
        log(f"training {LABELS.get(v, v)} ({a.epochs} epochs, tiny random CLIP)")
        rc = train.main(common + ["--train_split", "train", "--val_split", "val", "--tiny_clip", "--variant", v,
                                  "--batch_size", str(a.batch_size), "--epochs", str(a.epochs), "--lr", str(a.lr),
                                  "--coef_lr", "1.0", "--warmup_proportion", "0.05", "--seed", str(a.seed),
                                  "--eval_every", "2", "--output_dir", str(run), "--no_progress", "--no_export"])
        if rc != 0:
            log(f"training {v} failed (exit {rc})")
            return rc
        t_train = time.perf_counter() - t0
        sim_path, metrics_path = run / "test_sim.npy", run / "test_metrics.json"
        eval_argv = common + ["--split", "test", "--checkpoint", str(run / "best.pt"), "--save_sim", str(sim_path),
                              "--metrics_json", str(metrics_path), "--output_dir", str(run / "eval.log")]
        if v == "tab_tdb":
            eval_argv += ["--visualize", "6", str(out / "retrieval_tab_tdb.png")]
        rc = infer_retrieval.main(eval_argv)
        if rc != 0:
            log(f"evaluating {v} failed (exit {rc})")
            return rc
        metrics = json.loads(metrics_path.read_text())
        sim = np.load(sim_path)
        acc = direction_accuracy(sim, rset.caption_video, rset.video_ids, meta)
        rows.append((v, metrics, acc, t_train))

    n_cap, n_vid = len(rset.captions), len(rset.video_ids)
    head = (f"{'model':22s}{'T2V R@1':>9s}{'R@5':>7s}{'R@10':>7s}{'MdR':>6s}{'MnR':>7s}   "
            f"{'V2T R@1':>8s}{'R@5':>7s}{'R@10':>7s}   {'direction acc':>13s}{'train s':>9s}")
    lines = [f"Synthetic test split: {n_cap} captions × {n_vid} clips (seed {a.seed}); direction accuracy = "
             "caption scores its own clip above the reversed twin (chance 50%)", head, "-" * len(head)]
    for v, m, acc, t_train in rows:
        t, r = m["t2v"], m["v2t"]
        lines.append(f"{LABELS.get(v, v):22s}{t['R1']:9.1f}{t['R5']:7.1f}{t['R10']:7.1f}{t['MdR']:6.1f}"
                     f"{t['MnR']:7.1f}   {r['R1']:8.1f}{r['R5']:7.1f}{r['R10']:7.1f}   {100 * acc:12.1f}%"
                     f"{t_train:9.0f}")
    table = "\n".join(lines)
    print("\n" + table + "\n", flush=True)

    md = ["# clip2video demo report", "",
          f"Synthetic moving-shape clips, tiny CLIP2Video models trained from scratch on CPU; seed {a.seed}, "
          f"{a.epochs} epochs, {a.videos} clips. Test split: {n_cap} captions × {n_vid} clips.", "",
          "| model | T2V R@1 | R@5 | R@10 | MdR | MnR | V2T R@1 | R@5 | R@10 | MdR | MnR | direction acc |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v, m, acc, _ in rows:
        md.append(markdown_row(LABELS.get(v, v), m)[:-1] + f"| {100 * acc:.1f}% |")
    md += ["", "Direction accuracy: share of test captions whose own clip scores above its time-reversed twin "
           "(same frames, reversed order, opposite caption). Mean pooling cannot separate the twins (50%).", ""]
    if (out / "retrieval_tab_tdb.png").exists():
        md += ["![top-5 retrievals of the TDB + TAB model](retrieval_tab_tdb.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    log(f"report: {out / 'report.md'}")
    if (out / "retrieval_tab_tdb.png").exists():
        log(f"picture: {out / 'retrieval_tab_tdb.png'} (top-5 clips per query, ground truth framed green)")
    if "tab_tdb" in variants:
        rc = search_step(out, frames, rset, a.workers)
        if rc != 0:
            return rc
        rc = moments_step(out, synth, rset, meta, a.workers)
        if rc != 0:
            return rc
    log(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


def search_step(out: Path, frames: Path, rset, workers: int) -> int:
    """Index the test clips with the TDB + TAB model and run three text queries against the index."""
    import os
    import shutil

    from clip2video.cli import search
    from clip2video.search.index import SearchIndex

    test_frames, index = out / "test_frames", out / "index"
    if test_frames.exists():
        shutil.rmtree(test_frames)
    test_frames.mkdir()
    for v in rset.video_ids:  # hard links: the test clips' frame folders without copying the JPEGs
        shutil.copytree(frames / v, test_frames / v, copy_function=os.link)
    log(f"indexing the {len(rset.video_ids)} test clips with the TDB + TAB model (search.py build)")
    rc = search.main(["build", "--features_path", str(test_frames), "--index", str(index),
                      "--checkpoint", str(out / "runs" / "tab_tdb" / "best.pt"), "--max_words", "16",
                      "--max_frames", "12", "--feature_framerate", "1", "--num_thread_reader", str(workers),
                      "--no_progress"])
    if rc != 0:
        log(f"indexing failed (exit {rc})")
        return rc
    ix = SearchIndex.open(index)
    picks = sorted({len(rset.captions) * i // 3 for i in range(3)})
    queries = [rset.captions[i] for i in picks]
    clips_of = captioned_clips(rset)
    for q, hits in zip(queries, ix.query(queries, 5), strict=True):
        truth = clips_of[q]  # the synthetic set gives several clips the same caption: each is a correct hit
        print(f"query: {q!r} (ground truth {', '.join(sorted(truth))})")
        for r, h in enumerate(hits, 1):
            print(f"  {r}. {h.score:8.3f}  {h.video_id}{'  <- ground truth' if h.video_id in truth else ''}")
    log(f"serve the index in a browser: python search.py serve --index {index}")
    return 0


def captioned_clips(rset) -> dict[str, set[str]]:
    """caption text → every clip that has it."""
    out: dict[str, set[str]] = {}
    for text, v in zip(rset.captions, rset.caption_video, strict=True):
        out.setdefault(text, set()).add(rset.video_ids[v])
    return out


LONG_CLIPS = 12
"""Test clips joined into the demo's long video."""


def long_video_clips(rset, meta: dict, n: int = LONG_CLIPS) -> list[str]:
    """Test clips for the long video: distinct captions, and no clip next to its time-reversed twin (twins share
    their background, so a cut between them is only a jump of the shape)."""
    chosen: list[str] = []
    seen: set[str] = set()
    for v in rset.video_ids:
        cap = meta[v]["captions"][0]
        if cap in seen or (chosen and meta[v]["twin"] == chosen[-1]):
            continue
        chosen.append(v)
        seen.add(cap)
        if len(chosen) == n:
            break
    return chosen


def make_long_video(synth: Path, clips: list[str], path: Path) -> list[tuple[str, float, float]]:
    """Join the clips' MP4 files into one H.264 video; returns (clip, start, end) in seconds."""
    from clip2video.dataloaders.video_io import encode_video, probe, read_frames

    frames, spans, t = [], [], 0.0
    rate = None
    for v in clips:
        src = synth / "videos" / f"{v}.mp4"
        got = [f[..., ::-1] for f in read_frames(src)]  # BGR → RGB
        rate = rate or probe(src).rate
        spans.append((v, t, t + len(got) / rate))
        t += len(got) / rate
        frames += got
    path.parent.mkdir(parents=True, exist_ok=True)
    encode_video(path, frames, fps=rate, gop=int(2 * rate))  # a keyframe every 2 s
    return spans


def iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


MOMENT_FLAGS = ("--segment_seconds", "2.3", "--segment_stride", "0.5", "--video_fps", "10")
"""Windows as long as one clip (23 frames at 10 fps), one every half second."""


def moments_step(out: Path, synth: Path, rset, meta: dict, workers: int) -> int:
    """Join test clips into one long video, index it as segments, and find two clips' time ranges by text."""
    from clip2video.cli import search
    from clip2video.search.index import SearchIndex

    clips = long_video_clips(rset, meta)
    spans = make_long_video(synth, clips, out / "long" / "long.mp4")
    log(f"moments: {len(clips)} test clips joined into one {spans[-1][2]:.1f} s video (long/long.mp4), indexed "
        f"as segments ({' '.join(MOMENT_FLAGS)})")
    index = out / "moments_index"
    rc = search.main(["build", "--features_path", str(out / "long"), "--index", str(index),
                      "--checkpoint", str(out / "runs" / "tab_tdb" / "best.pt"), "--max_words", "16",
                      "--max_frames", "12", "--feature_framerate", "1", "--num_thread_reader", str(workers),
                      "--no_progress", *MOMENT_FLAGS])
    if rc != 0:
        log(f"indexing the long video failed (exit {rc})")
        return rc
    ix = SearchIndex.open(index)
    picks = [spans[len(spans) // 4], spans[(3 * len(spans)) // 4]]
    queries = [meta[v]["captions"][0] for v, _, _ in picks]
    for (v, s, e), q, (hit,) in zip(picks, queries, ix.query(queries, 1), strict=True):
        print(f"moment query: {q!r}")
        print(f"  found {hit.start:5.1f}–{hit.end:5.1f} s in {hit.video_id} (score {hit.score:.3f}); "
              f"true range {s:5.1f}–{e:5.1f} s ({v}); IoU {iou((hit.start, hit.end), (s, e)):.2f}")
    log(f"serve it: python search.py serve --index {index} (the player opens at the moment found)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
