#!/usr/bin/env python
"""Moments: indexing long videos as segments, against cutting the segments into files first; peak memory
against video length; the shot detector; moment accuracy of the demo's trained model.

1. **Throughput** on synthetic 480p H.264 (854×480, 30 fps, a new scene every 8 s, moving textured content),
   once with a keyframe every 2 s and once every 10 s, at the default segment settings
   (``--segment_seconds 10``, stride 5), ViT-B/32-size towers with random weights, 12 frames per segment at
   5 fps:
   - *ours*: ``build_from_folder(..., segments=...)`` on the file: one decoding pass, each sampled frame through
     the image tower once, the temporal heads per segment (``read`` = decoding + preprocessing, ``tower``,
     ``heads`` are measured inside the build);
   - *baseline*, measured in the same run: the same segments cut out as separate files (``export_clip``,
     re-encoded frame-exact, as ``search.py export`` does), then indexed as separate videos (``build_from_folder``
     without segments).
   Printed: seconds each, the ratio, hours of footage indexed per hour of compute, and the shares.
2. **Peak memory** (RSS of a fresh process building the index) for a short and a long video (default 1 and 6
   minutes: the 10-vs-60-minute comparison scaled down; ``--memory_minutes`` changes it).
3. **Shot detector** (``--segments scenes``): cuts found against the true scene changes of the synthetic
   480p video and of the demo's joined clips (a cut counts when within one frame at 5 / 10 fps).
4. **Moment accuracy** with the demo's trained TDB + TAB model (``--demo_out``, from ``bash scripts/demo.sh``):
   the test clips joined into long videos (10 clips each, no clip next to its reversed twin), indexed as
   segments; for every distinct test caption, does the top hit overlap a clip with that caption by IoU ≥ 0.5?
   Next to the same model's clip-level R@1 on the clips themselves for the same captions (a clip with that
   caption ranked first: what the moment metric counts) and the demo's strict R@1 (the caption's own clip).

    python benchmarks/bench_moments.py [--minutes 6] [--gops 2,10] [--demo_out demo_out] [--skip throughput,...]

The machine is shared: the first line says whether it was idle (load average against its cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
W, H, FPS = 854, 480, 30
SCENE_SECONDS = 8


def log(msg: str) -> None:
    print(msg, flush=True)


def machine_state() -> str:
    load = os.getloadavg()[0]
    cores = len(os.sched_getaffinity(0))
    return f"load average {load:.2f} on {cores} cores ({'idle' if load < 0.5 else 'NOT idle: shared'})"


# ----------------------------------------------------------------------------------------------- data
def make_480p(path: Path, minutes: float, gop_seconds: float, seed: int = 0) -> list[float]:
    """Synthetic 480p H.264 with a new scene every SCENE_SECONDS (returns the scene change times)."""
    import av

    from clip2video.fileio import atomic_path

    rng = np.random.default_rng(seed)
    n = int(minutes * 60 * FPS)
    cuts = [t for t in range(SCENE_SECONDS, int(minutes * 60), SCENE_SECONDS)]
    y, x = np.mgrid[0:H, 0:W]
    with atomic_path(path) as tmp, av.open(os.fspath(tmp), "w", format="mp4") as out:
        st = out.add_stream("libx264", rate=FPS)
        st.width, st.height, st.pix_fmt = W, H, "yuv420p"
        st.codec_context.gop_size = int(gop_seconds * FPS)
        st.options = {"crf": "23", "preset": "veryfast", "sc_threshold": "0"}  # keyframes exactly every GOP
        bg = None
        for i in range(n):
            if i % (SCENE_SECONDS * FPS) == 0:
                base = rng.integers(20, 230, 3)
                tex = rng.integers(0, 40, (H // 8 + 1, W // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:H, :W]
                bg = np.clip(base + tex, 0, 255).astype(np.uint8)
                cx, cy, vx, vy, r = rng.uniform(100, 700), rng.uniform(100, 380), *rng.uniform(-4, 4, 2), 40
                colour = rng.integers(0, 255, 3).astype(np.uint8)
            frame = np.roll(bg, i % (SCENE_SECONDS * FPS), axis=1)  # a slow pan
            px, py = int(cx + vx * (i % 240)) % W, int(cy + vy * (i % 240)) % H
            frame = frame.copy()
            frame[max(0, py - r):py + r, max(0, px - r):px + r] = colour
            noise = rng.integers(0, 12, (H // 4 + 1, W // 4 + 1, 1), dtype=np.uint8).repeat(4, 0).repeat(4, 1)[:H, :W]
            vf = av.VideoFrame.from_ndarray(frame + noise, format="rgb24")
            for p in st.encode(vf):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    return [float(c) for c in cuts]


def vit_model():
    import torch

    from clip2video.modules.network.backbone import ClipConfig
    from clip2video.modules.weights.factory import create_model
    from clip2video.modules.weights.identity import describe_model
    from clip2video.modules.weights.spec import ModelSpec

    torch.manual_seed(0)
    model = create_model("tab_tdb", clip_config=ClipConfig(text_layers=1)).eval()
    model.config.mask_layout = "per_video"
    return model, describe_model(model, ModelSpec(zero_shot=True))


# ----------------------------------------------------------------------------------------------- 1. throughput
def throughput(video: Path, work: Path, model, record, settings) -> dict:
    from clip2video.dataloaders.video_io import DEFAULT_VIDEO_FPS, probe
    from clip2video.search.build import build_from_folder
    from clip2video.search.export import export_clip
    from clip2video.search.segments import fixed_segments

    folder = work / "ours_src"
    folder.mkdir()
    os.link(video, folder / video.name)
    t0 = time.perf_counter()
    res = build_from_folder(folder, work / "ours_ix", model, record, max_frames=12, framerate=1, progress=False,
                            segments=settings, num_workers=0)
    ours = time.perf_counter() - t0
    index = probe(video)
    plan = fixed_segments(index.duration, index.n_output(DEFAULT_VIDEO_FPS), DEFAULT_VIDEO_FPS, settings.seconds,
                          settings.stride, framerate=1, max_frames=12)
    clips = work / "clips"
    clips.mkdir()
    t0 = time.perf_counter()
    for j, s in enumerate(plan):
        export_clip(video, clips / f"seg{j:05d}.mp4", float(s.start), float(s.end))
    cut = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = build_from_folder(clips, work / "base_ix", model, record, max_frames=12, framerate=1, progress=False,
                             num_workers=0)
    base_build = time.perf_counter() - t0
    assert base.count == len(plan) == res.vectors, (base.count, len(plan), res.vectors)
    return {"ours_s": ours, "cut_s": cut, "base_build_s": base_build, "baseline_s": cut + base_build,
            "segments": len(plan), "timings": res.timings, "video_s": float(index.duration)}


# ----------------------------------------------------------------------------------------------- 2. memory
MEMORY_CHILD = """
import os, sys, threading, time
sys.path.insert(0, {root!r})
from benchmarks.bench_moments import vit_model
from clip2video.search.build import build_from_folder
from clip2video.search.segments import SegmentSettings

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

model, record = vit_model()
before, peak, done = rss(), [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
build_from_folder(sys.argv[1], sys.argv[2], model, record, max_frames=12, framerate=1, progress=False,
                  segments=SegmentSettings(seconds=10), num_workers=0)
done.set()
print(before, max(peak[0], rss()), time.perf_counter() - t0)
"""


def peak_memory(video: Path, work: Path) -> tuple[float, float, float]:
    """(RSS after loading the model, highest RSS during the build (sampled every 20 ms), build seconds), MiB,
    in a fresh process."""
    folder = work / f"mem_{video.stem}"
    folder.mkdir()
    os.link(video, folder / video.name)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", MEMORY_CHILD.format(root=str(ROOT)), str(folder),
                        str(work / f"mem_ix_{video.stem}")], capture_output=True, text=True, env=env, check=True)
    before, peak, secs = r.stdout.split()[-3:]
    return int(before) / 1024, int(peak) / 1024, float(secs)


# ----------------------------------------------------------------------------------------------- 3. shots
def detect_cuts(video: Path, fps: float, settings) -> list[float]:
    """Times of the shots the scene mode finds (each shot's start but the first)."""
    from clip2video.dataloaders.video_io import FrameResampler
    from clip2video.search.segments import ShotCutter

    cutter = ShotCutter(fps, settings.seconds, settings.min_seconds, settings.threshold)
    shots = []
    n = 0
    for k, rgb in FrameResampler(video, fps, bgr=False).outputs():
        shots += cutter.push(k, rgb)
        n = k + 1
    shots += cutter.finish(n)
    return [a / fps for a, _ in shots[1:]]


def cut_scores(found: list[float], true: list[float], tol: float) -> tuple[float, float]:
    """(precision, recall) of cut times within ``tol`` seconds."""
    hit_f = sum(any(abs(f - t) <= tol for t in true) for f in found)
    hit_t = sum(any(abs(f - t) <= tol for f in found) for t in true)
    return (hit_f / len(found) if found else 1.0), (hit_t / len(true) if true else 1.0)


# ----------------------------------------------------------------------------------------------- 4. accuracy
def moment_accuracy(demo_out: Path, work: Path, per_video: int = 10) -> dict:
    import importlib.util

    from clip2video.cli import search
    from clip2video.dataloaders.annotations import load_eval_set
    from clip2video.search.index import SearchIndex
    from clip2video.search.segments import SegmentSettings

    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    synth = demo_out / "synthetic"
    rset = load_eval_set("generic", data_path=str(synth / "annotations.csv"), features_path=str(demo_out / "frames"),
                         split="test")
    meta = json.loads((synth / "videos.json").read_text())
    clips_of = demo.captioned_clips(rset)
    # every test clip, in groups of ``per_video``, no clip next to its twin
    order = list(rset.video_ids)
    groups, cur = [], []
    while order:
        pick = next((v for v in order if not cur or meta[v]["twin"] != cur[-1]), order[0])
        order.remove(pick)
        cur.append(pick)
        if len(cur) == per_video:
            groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    videos = work / "long"
    spans = {}  # clip → (long video id, start, end)
    true_cuts = {}
    for g, clips in enumerate(groups):
        name = f"long{g:02d}"
        for v, s, e in demo.make_long_video(synth, clips, videos / f"{name}.mp4"):
            spans[v] = (name, s, e)
        true_cuts[name] = [spans[v][1] for v in clips[1:]]
    ckpt = demo_out / "runs" / "tab_tdb" / "best.pt"
    out = {}
    settings = {"windows (demo: 2.3 s every 0.5 s)": list(demo.MOMENT_FLAGS),
                "shots (--segments scenes)": ["--segments", "scenes", "--segment_seconds", "10",
                                              "--video_fps", "10"]}
    queries = sorted(clips_of)
    for label, flags in settings.items():
        ix = work / f"ix_{len(out)}"
        assert search.main(["build", "--features_path", str(videos), "--index", str(ix), "--checkpoint", str(ckpt),
                            "--max_words", "16", "--max_frames", "12", "--feature_framerate", "1",
                            "--num_thread_reader", "0", "--no_progress", *flags]) == 0
        index = SearchIndex.open(ix)
        hits = index.query(queries, 1)
        good = 0
        for q, (h,) in zip(queries, hits, strict=True):
            ok = any(spans[v][0] == h.video_id and demo.iou((h.start, h.end), spans[v][1:]) >= 0.5
                     for v in clips_of[q])
            good += ok
        out[label] = {"accuracy": good / len(queries), "segments": index.n_rows}
    # clip level, same model: its saved similarity matrix on the test clips
    sim = np.load(demo_out / "runs" / "tab_tdb" / "test_sim.npy")
    metrics = json.loads((demo_out / "runs" / "tab_tdb" / "test_metrics.json").read_text())
    top = sim.argmax(1)
    row_of = {c: i for i, c in enumerate(rset.captions)}  # rows of one caption text are the same
    any_clip = np.mean([rset.video_ids[top[row_of[q]]] in clips_of[q] for q in queries])
    scenes = SegmentSettings(mode="scenes", seconds=10)
    found = {name: detect_cuts(videos / f"{name}.mp4", 10, scenes) for name in true_cuts}
    prec = np.mean([cut_scores(found[n], true_cuts[n], 0.1)[0] for n in true_cuts])
    rec = np.mean([cut_scores(found[n], true_cuts[n], 0.1)[1] for n in true_cuts])
    return {"moments": out, "queries": len(queries), "clip_r1_strict": metrics["t2v"]["R1"] / 100,
            "clip_r1_any": float(any_clip), "long_videos": len(groups), "shot_precision": prec, "shot_recall": rec}


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=6.0, help="length of the throughput videos (target: 60)")
    ap.add_argument("--memory_minutes", default="1,6", help="short,long video for the memory comparison")
    ap.add_argument("--gops", default="2,10", help="keyframe intervals in seconds")
    ap.add_argument("--demo_out", default="demo_out")
    ap.add_argument("--skip", default="", help="comma list of: throughput, memory, shots, accuracy")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    a = ap.parse_args()
    import torch

    from clip2video.search.segments import SegmentSettings

    if a.threads:
        torch.set_num_threads(a.threads)
    skip = set(filter(None, a.skip.split(",")))
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-moments-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"machine: {machine_state()}; torch threads {torch.get_num_threads()}")
    settings = SegmentSettings(seconds=10)  # the default stride: 5 s
    try:
        videos = {}
        if not {"throughput", "shots"} <= skip:
            for gop in (float(g) for g in a.gops.split(",")):
                p = work / f"v{a.minutes:g}min_gop{gop:g}.mp4"
                t0 = time.perf_counter()
                videos[gop] = (p, make_480p(p, a.minutes, gop))
                log(f"made {p.name} in {time.perf_counter() - t0:.0f} s")
        if "throughput" not in skip:
            model, record = vit_model()
            for gop, (p, _) in videos.items():
                w = work / f"tp_gop{gop:g}"
                w.mkdir()
                r = throughput(p, w, model, record, settings)
                t = r["timings"]
                total = r["ours_s"]
                log(f"throughput, {a.minutes:g} min 480p, keyframe every {gop:g} s, {r['segments']} segments "
                    f"(10 s, stride 5 s): ours {total:.1f} s = {r['video_s'] / 3600 / (total / 3600):.1f} hours of "
                    f"footage per compute hour (read {100 * t['read_s'] / total:.0f}%, tower "
                    f"{100 * t['tower_s'] / total:.0f}%, heads {100 * t['heads_s'] / total:.1f}%; "
                    f"{int(t['frames'])} frames through the tower); baseline {r['baseline_s']:.1f} s (cutting "
                    f"{r['cut_s']:.1f} s + indexing the files {r['base_build_s']:.1f} s): "
                    f"{r['baseline_s'] / total:.2f}x")
        if "memory" not in skip:
            peaks, growth = [], []
            for m in (float(x) for x in a.memory_minutes.split(",")):
                p = work / f"mem{m:g}.mp4"
                make_480p(p, m, 2.0, seed=1)
                before, peak, secs = peak_memory(p, work)
                peaks.append(peak)
                log(f"memory, {m:g} min video: RSS {before:.0f} MiB after loading the model, peak {peak:.0f} MiB "
                    f"during the build (+{peak - before:.0f} MiB; {secs:.0f} s)")
                growth.append(peak - before)
            log(f"memory: peak RSS long / short = {peaks[-1] / peaks[0]:.3f}; growth during the build "
                f"{growth[0]:.0f} → {growth[-1]:.0f} MiB")
        if "shots" not in skip:
            scenes = SegmentSettings(mode="scenes", seconds=10)
            p, cuts = videos[min(videos)]
            found = detect_cuts(p, 5, scenes)
            prec, rec = cut_scores(found, cuts, 0.2)
            log(f"shots, synthetic 480p ({len(cuts)} scene changes): precision {prec:.3f}, recall {rec:.3f} "
                f"({len(found)} shots cut; splits at 10 s count as false cuts)")
        if "accuracy" not in skip:
            demo_out = Path(a.demo_out)
            if not (demo_out / "runs" / "tab_tdb" / "best.pt").is_file():
                log(f"accuracy: skipped, no trained demo model in {demo_out} (run bash scripts/demo.sh first)")
            else:
                w = work / "acc"
                w.mkdir()
                r = moment_accuracy(demo_out, w)
                for label, m in r["moments"].items():
                    log(f"moment accuracy, {label}: {100 * m['accuracy']:.1f}% of {r['queries']} test captions "
                        f"have a top hit with IoU >= 0.5 ({r['long_videos']} long videos, {m['segments']} segments)")
                log(f"clip-level R@1 of the same model on the {r['queries']} "
                    f"captions: {100 * r['clip_r1_any']:.1f}% (any clip with that caption; the demo's table, "
                    f"own clip only, all 160 captions: {100 * r['clip_r1_strict']:.1f}%)")
                log(f"shots on the joined clips: precision {r['shot_precision']:.3f}, recall {r['shot_recall']:.3f}")
        log(f"machine at the end: {machine_state()}; peak RSS of this process "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
