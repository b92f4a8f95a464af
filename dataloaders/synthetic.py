"""Synthetic text–video data where the order of frames matters: coloured shapes that move.

Each clip shows one shape of one colour travelling in a straight line (left, right, up, down) or changing
size (grows, shrinks) over a static, lightly textured background, and is captioned "a red circle moves left"
(plus a paraphrase). Every clip has a **time-reversed twin**: the same frames in reverse order, captioned with
the opposite motion. A twin holds exactly the same set of frames, so any model that pools frame features
without regard to order (mean pooling) gives a clip and its twin the same vector and cannot tell "moves left"
from "moves right"; only a temporal model (TDB, temporal transformer) can. ``direction_accuracy`` measures
exactly that distinction.

    python -m clip2video.cli.synthetic OUT --n_videos 200 --seed 0 [--write frames]

Layout written (all at once: built in a temporary sibling folder and renamed to ``OUT``):

    OUT/videos/<video_id>.mp4            (write="mp4"; extract with sample_frame.py --fps <fps>)
    OUT/frames/<video_id>/00000001.jpg   (write="frames"; every frame, no decoding needed)
    OUT/annotations.csv                  video_id,caption,split  (generic annotation format)
    OUT/videos.json                      {video_id: {colour, shape, motion, twin, split, pair, captions}}

Clips are deterministic given the seed, and clip ``k`` does not depend on how many clips are made (each
twin pair draws from its own ``(seed, pair)`` random stream); the train/val/test assignment is a seeded
permutation of the pairs, so twins always share a split.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from clip2video.fileio import atomic_dir

from .video_io import read_frames, write_video

COLOURS: dict[str, tuple[int, int, int]] = {  # BGR, all bright against the dark background
    "red": (40, 40, 230),
    "green": (60, 200, 60),
    "blue": (235, 100, 30),
    "yellow": (40, 225, 235),
    "purple": (200, 60, 160),
    "orange": (20, 140, 250),
    "white": (235, 235, 235),
    "cyan": (225, 215, 40),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "grows": "shrinks", "shrinks": "grows"}
DIRECTIONS = ("left", "right", "up", "down")
CAPTIONS = {  # first template is the canonical caption; the second a paraphrase
    "left": ("{a} {c} {s} moves left", "{a} {c} {s} is moving to the left"),
    "right": ("{a} {c} {s} moves right", "{a} {c} {s} is moving to the right"),
    "up": ("{a} {c} {s} moves up", "{a} {c} {s} is moving upwards"),
    "down": ("{a} {c} {s} moves down", "{a} {c} {s} is moving downwards"),
    "grows": ("{a} {c} {s} grows", "{a} {c} {s} is getting bigger"),
    "shrinks": ("{a} {c} {s} shrinks", "{a} {c} {s} is getting smaller"),
}
SPLITS = ("train", "val", "test")
_SHIFT = 4  # cv2 drawing with 4 fractional bits: sub-pixel positions, so slow motion is still visible


# --------------------------------------------------------------------------------------------- rendering


def captions_for(colour: str, shape: str, motion: str, n: int = 2) -> list[str]:
    """The ``n`` captions (1 or 2) of a clip; "an" before a vowel so the text reads as English."""
    article = "an" if colour[0] in "aeiou" else "a"
    return [t.format(a=article, c=colour, s=shape) for t in CAPTIONS[motion][:n]]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dark, slightly tinted, low-frequency texture: informative enough for JPEG/codec, static over time."""
    base = rng.uniform(25, 80) + rng.uniform(-10, 10, size=3)
    coarse = rng.normal(0.0, 1.0, size=(max(2, size // 8), max(2, size // 8), 3)).astype(np.float32)
    texture = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(base + 7.0 * texture, 0, 255).astype(np.uint8)


def _polygon(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    if shape == "square":
        ang = np.deg2rad([45, 135, 225, 315])
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in ang]
    elif shape == "diamond":
        ang = np.deg2rad([0, 90, 180, 270])
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in ang]
    elif shape == "triangle":
        ang = np.deg2rad([-90, 30, 150])
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in ang]
    elif shape == "star":
        pts = []
        for j in range(10):
            a = math.radians(-90 + 36 * j)
            rr = r if j % 2 == 0 else 0.45 * r
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.round(np.asarray(pts) * (1 << _SHIFT)).astype(np.int32)


def _draw(img: np.ndarray, shape: str, colour: tuple[int, int, int], cx: float, cy: float, r: float) -> None:
    if shape == "circle":
        centre = (round(cx * (1 << _SHIFT)), round(cy * (1 << _SHIFT)))
        cv2.circle(img, centre, round(r * (1 << _SHIFT)), colour, -1, cv2.LINE_AA, _SHIFT)
    else:
        cv2.fillPoly(img, [_polygon(shape, cx, cy, r)], colour, cv2.LINE_AA, _SHIFT)


def render_pair(
    seed: int,
    pair: int,
    *,
    size: int = 64,
    n_frames: int = 20,
    motions: Sequence[str] = DIRECTIONS,
    colours: Sequence[str] = tuple(COLOURS),
    shapes: Sequence[str] = SHAPES,
):
    """Render one clip and describe it; its twin is ``frames[::-1]`` with motion ``OPPOSITE[motion]``.

    Returns:
        ``(frames, attrs)``: a list of ``n_frames`` BGR uint8 ``size×size`` images and
        ``{"colour", "shape", "motion"}`` of the forward clip.
    """
    rng = np.random.default_rng([seed, pair])
    colour = list(colours)[rng.integers(len(colours))]
    shape = list(shapes)[rng.integers(len(shapes))]
    motion = motions[rng.integers(len(motions))]
    bg = _background(rng, size)
    t = np.linspace(0.0, 1.0, n_frames)

    if motion in DIRECTIONS:
        r = np.full(n_frames, rng.uniform(0.10, 0.15) * size)
        margin = r[0] + 1.0
        travel = rng.uniform(0.35, 0.60) * size  # speed varies by clip
        start = rng.uniform(margin, size - margin - travel)  # along the axis of motion, moving +
        across = rng.uniform(margin, size - margin)
        along = start + travel * t
        if motion in ("left", "up"):
            along = along[::-1]
        xs, ys = (along, np.full(n_frames, across)) if motion in ("left", "right") else (
            np.full(n_frames, across), along)
    else:  # grows / shrinks, in place
        r0, r1 = rng.uniform(0.06, 0.09) * size, rng.uniform(0.18, 0.24) * size
        r = r0 + (r1 - r0) * t
        if motion == "shrinks":
            r = r[::-1]
        margin = r1 + 1.0
        xs = np.full(n_frames, rng.uniform(margin, size - margin))
        ys = np.full(n_frames, rng.uniform(margin, size - margin))

    frames = []
    for k in range(n_frames):
        img = bg.copy()
        _draw(img, shape, COLOURS[colour], float(xs[k]), float(ys[k]), float(r[k]))
        frames.append(img)
    return frames, {"colour": colour, "shape": shape, "motion": motion}


# --------------------------------------------------------------------------------------------- dataset


def _split_counts(n_pairs: int, splits: Sequence[float]) -> list[int]:
    """Pairs per split by largest remainder; every split with a positive share gets a pair when possible."""
    raw = [f * n_pairs for f in splits]
    counts = [math.floor(x) for x in raw]
    for j in sorted(range(len(raw)), key=lambda j: raw[j] - counts[j], reverse=True)[: n_pairs - sum(counts)]:
        counts[j] += 1
    for j, f in enumerate(splits):
        if f > 0 and counts[j] == 0:
            donor = max(range(len(counts)), key=lambda i: counts[i])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[j] += 1
    return counts


def _check(n_videos, size, n_frames, fps, write, splits, captions_per_video, motions) -> None:
    if not isinstance(n_videos, int) or n_videos < 2 or n_videos % 2:
        raise ValueError(f"n_videos must be an even number >= 2, as every clip has a reversed twin (got {n_videos})")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels (got {size})")
    if n_frames < 2:
        raise ValueError(f"n_frames must be >= 2, motion needs at least two frames (got {n_frames})")
    if not fps > 0:
        raise ValueError(f"fps must be > 0 (got {fps})")
    if write not in ("mp4", "frames"):
        raise ValueError(f"write must be 'mp4' or 'frames' (got {write!r})")
    if len(splits) != 3 or any(f < 0 for f in splits) or abs(sum(splits) - 1.0) > 1e-6:
        raise ValueError(f"splits must be three non-negative fractions (train, val, test) summing to 1 (got {splits})")
    if captions_per_video not in (1, 2):
        raise ValueError(f"captions_per_video must be 1 or 2 (got {captions_per_video})")
    bad = [m for m in motions if m not in OPPOSITE]
    if not motions or bad:
        raise ValueError(f"motions must be a non-empty subset of {sorted(OPPOSITE)} (got {list(motions)})")


def _write_frames(folder: Path, frames: Sequence[np.ndarray]) -> None:
    folder.mkdir(parents=True)
    for k, f in enumerate(frames, 1):
        ok, buf = cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise OSError(f"{folder}: JPEG encoding failed")
        (folder / f"{k:08d}.jpg").write_bytes(buf.tobytes())


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    *,
    n_videos: int,
    seed: int = 0,
    size: int = 64,
    n_frames: int = 20,
    fps: int = 10,
    write: str = "mp4",
    splits: Sequence[float] = (0.7, 0.1, 0.2),
    captions_per_video: int = 2,
    motions: Sequence[str] = DIRECTIONS,
    colours: Sequence[str] = tuple(COLOURS),
    shapes: Sequence[str] = SHAPES,
    overwrite: bool = False,
) -> dict:
    """Write a synthetic dataset of ``n_videos`` clips (``n_videos / 2`` twin pairs) to ``out_dir``.

    Args:
        out_dir: destination; must not exist or be empty unless ``overwrite``.
        n_videos: number of clips, even (clip ``2p`` and ``2p+1`` are twins).
        seed: everything (clips, splits) follows from it.
        size: frame side in pixels.
        n_frames: frames per clip.
        fps: frame rate of the mp4 files (in frames mode it only documents the intended rate).
        write: ``"mp4"`` (``videos/<id>.mp4``) or ``"frames"`` (``frames/<id>/%08d.jpg``).
        splits: fractions of twin pairs in train, val, test.
        captions_per_video: 1 (canonical caption) or 2 (plus a paraphrase).
        motions: motions drawn for the forward clip of each pair; twins take the opposite.
        colours, shapes: the palette and shapes drawn from. Fewer of them put more clips that differ only in
            their motion into each training batch, which is what makes a contrastive model learn motion.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        Summary: ``{"out_dir", "annotations", "videos_json", "media" (videos/ or frames/ folder), "write",
        "n_videos", "n_captions", "videos_per_split": {split: n}, "seed", "size", "n_frames", "fps"}``.

    Raises:
        ValueError: bad argument. FileExistsError: ``out_dir`` holds files and not ``overwrite``.
        RuntimeError: the mp4 written cannot be read back with the right frame count (broken OpenCV build).
    """
    splits = tuple(float(f) for f in splits)
    motions = tuple(motions)
    _check(n_videos, size, n_frames, fps, write, splits, captions_per_video, motions)
    bad = [c for c in colours if c not in COLOURS] + [sh for sh in shapes if sh not in SHAPES]
    if not colours or not shapes or bad:
        raise ValueError(f"colours must be a non-empty subset of {list(COLOURS)} and shapes of {list(SHAPES)}"
                         f" (unknown: {bad})")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out}: already exists and is not empty (overwrite=True / --overwrite replaces it)")

    n_pairs = n_videos // 2
    counts = _split_counts(n_pairs, splits)
    order = np.random.default_rng([seed, 1 << 30]).permutation(n_pairs)
    split_of_pair: dict[int, str] = {}
    start = 0
    for name, c in zip(SPLITS, counts, strict=True):
        for p in order[start: start + c]:
            split_of_pair[int(p)] = name
        start += c

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, replace=True) as tmp:
        media = tmp / ("videos" if write == "mp4" else "frames")
        media.mkdir()
        meta: dict[str, dict] = {}
        rows: list[tuple[str, str, str]] = []
        for p in range(n_pairs):
            frames, attrs = render_pair(seed, p, size=size, n_frames=n_frames, motions=motions, colours=colours,
                                        shapes=shapes)
            ids = (f"syn{2 * p:05d}", f"syn{2 * p + 1:05d}")
            clips = (
                (ids[0], frames, attrs["motion"], ids[1]),
                (ids[1], frames[::-1], OPPOSITE[attrs["motion"]], ids[0]),
            )
            for vid, fr, motion, twin in clips:
                caps = captions_for(attrs["colour"], attrs["shape"], motion, captions_per_video)
                meta[vid] = {
                    "colour": attrs["colour"],
                    "shape": attrs["shape"],
                    "motion": motion,
                    "twin": twin,
                    "split": split_of_pair[p],
                    "pair": p,
                    "captions": caps,
                }
                rows.extend((vid, c, split_of_pair[p]) for c in caps)
                if write == "mp4":
                    path = media / f"{vid}.mp4"
                    write_video(path, fr, fps)
                    if p == 0 and vid == ids[0]:
                        got = len(read_frames(path))
                        if got != n_frames:
                            raise RuntimeError(
                                f"{path}: wrote {n_frames} frames with the 'mp4v' codec but OpenCV reads back {got};"
                                " use write='frames'"
                            )
                else:
                    _write_frames(media / vid, fr)

        with open(tmp / "annotations.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(("video_id", "caption", "split"))
            w.writerows(rows)
        with open(tmp / "videos.json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.write("\n")

    per_split = {s: sum(1 for m in meta.values() if m["split"] == s) for s in SPLITS}
    return {
        "out_dir": str(out),
        "annotations": str(out / "annotations.csv"),
        "videos_json": str(out / "videos.json"),
        "media": str(out / media.name),
        "write": write,
        "n_videos": n_videos,
        "n_captions": len(rows),
        "videos_per_split": per_split,
        "seed": seed,
        "size": size,
        "n_frames": n_frames,
        "fps": fps,
    }


# --------------------------------------------------------------------------------------------- metric


def direction_accuracy(
    sim: np.ndarray,
    caption_video: np.ndarray,
    video_ids: Sequence[str],
    meta: Mapping[str, Mapping],
    *,
    tie_tol: float = 0.0,
) -> float:
    """Fraction of captions that score their own clip above its time-reversed twin.

    Only the captions whose clip's twin is among the columns count. A clip and its twin differ only in frame
    order, so this isolates what a retrieval metric over all videos dilutes: whether the model sees the
    direction of motion. Chance is 0.5. An exact tie (``|own − twin| <= tie_tol``) counts 0.5, not 0: an
    order-blind model (mean pooling) gives twins equal scores up to float rounding and should read as chance,
    not as always wrong; pass a small ``tie_tol`` (e.g. 1e-6) to absorb that rounding noise.

    Args:
        sim: caption × video similarity, shape ``(n_captions, n_videos)``.
        caption_video: column index of each caption's own clip, shape ``(n_captions,)``.
        video_ids: id of each column.
        meta: per-id attributes with a ``"twin"`` id (``videos.json``).
        tie_tol: score differences up to this are ties.

    Returns:
        Mean over the eligible captions, in [0, 1].

    Raises:
        ValueError: inconsistent shapes or indices, an id missing from ``meta``, or no eligible caption.
    """
    sim = np.asarray(sim)
    caption_video = np.asarray(caption_video)
    if sim.ndim != 2:
        raise ValueError(f"sim must be 2-D (captions × videos), got shape {sim.shape}")
    if caption_video.shape != (sim.shape[0],):
        raise ValueError(f"caption_video must have shape ({sim.shape[0]},), got {caption_video.shape}")
    if len(video_ids) != sim.shape[1]:
        raise ValueError(f"{len(video_ids)} video_ids for {sim.shape[1]} columns of sim")
    if caption_video.size and (caption_video.min() < 0 or caption_video.max() >= sim.shape[1]):
        raise ValueError("caption_video holds a column index outside sim")
    column = {v: j for j, v in enumerate(video_ids)}
    scores = []
    for i, j in enumerate(caption_video.tolist()):
        vid = video_ids[j]
        if vid not in meta:
            raise ValueError(f"video {vid!r} is not in meta")
        twin = meta[vid].get("twin")
        if twin not in column:
            continue
        diff = float(sim[i, j]) - float(sim[i, column[twin]])
        scores.append(0.5 if abs(diff) <= tie_tol else float(diff > 0))
    if not scores:
        raise ValueError("no caption has its clip's twin among the columns of sim")
    return float(np.mean(scores))
