"""Segments: a long video indexed as many short ones, so that a search finds *when* something happens.

``search.py build --segment_seconds S [--segment_stride T]`` cuts every video into windows ``[k·T, k·T + S)``
(the last one ends at the video's end; a video not longer than S is one segment); ``--segments scenes`` cuts at
shot boundaries instead (:class:`ShotCutter`). What a segment *is* is fixed by the data side
(``dataloaders/frames.py``, ``segment_frames`` / ``segment_positions``): the output frames ``k`` of an
extraction at ``--video_fps`` F whose time ``k/F`` lies in ``[s, e)``, sampled among themselves by the usual
``--max_frames`` / ``--feature_framerate`` rule and encoded with ``per_video`` masks. So a segment's score is
the score ``infer_retrieval.py`` gives a frame folder holding just those frames.

Why it stays cheap for long videos: the image tower is the expensive part, and a frame's CLIP feature does not
depend on the segment it is used in. The reader (:func:`stream_segments`, run in data-loading workers) reads a
video once, front to back, decoding each frame once and preprocessing only the frames some segment samples;
the encoder (:class:`SegmentEncoder`, in the main process) runs the image tower once per such frame and then
only the temporal heads per segment. Both keep only the frames and features that a segment not yet encoded
still needs, so memory does not grow with the length of the video.

Default stride: half the segment length (:data:`DEFAULT_STRIDE_SHARE`), so a moment that straddles one
window's boundary lies whole inside the next. The scene mode's detector is a content score in the manner of
PySceneDetect's ``ContentDetector`` (mean absolute change of hue, saturation and value between consecutive
frames, on a small copy of each frame), written here for the frames the reader decodes anyway.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

MODES = ("fixed", "scenes")
DEFAULT_STRIDE_SHARE = 0.5
"""``--segment_stride`` defaults to this share of ``--segment_seconds``."""
DEFAULT_SCENE_SECONDS = 10.0
"""Longest shot of ``--segments scenes`` when ``--segment_seconds`` is not given (longer ones are split)."""
DEFAULT_MIN_SECONDS = 1.0
"""Shortest shot kept on its own in ``--segments scenes`` (a cut sooner after the previous one is ignored)."""
DEFAULT_SCENE_THRESHOLD = 15.0
"""Content score (0–255 scale) from which consecutive frames may be a cut; measured in
``benchmarks/bench_moments.py``."""
SCENE_RATIO = 2.5
"""A cut's score must also be this many times the mean score of its :data:`SCENE_WINDOW` neighbours on each side
(PySceneDetect's adaptive detector compares with neighbours the same way): steady motion is no cut."""
SCENE_WINDOW = 2
THUMBS_PER_SEGMENT = 3
CHUNK_FRAMES = 32
"""Preprocessed frames per message from a reader to the encoder (and per image-tower call)."""
HEAD_BATCH = 64
"""Segments whose temporal heads run in one call (they wait for it with their 12 frame features)."""


class SegmentError(ValueError):
    """Bad segment settings (one line naming the flag)."""


@dataclass(frozen=True)
class SegmentSettings:
    """How videos are cut: ``fixed`` windows of ``seconds`` every ``stride`` seconds, or ``scenes`` (shots of at
    least ``min_seconds`` and at most ``seconds``, cut where the content score reaches ``threshold``)."""

    mode: str = "fixed"
    seconds: float = DEFAULT_SCENE_SECONDS
    stride: float | None = None
    min_seconds: float = DEFAULT_MIN_SECONDS
    threshold: float = DEFAULT_SCENE_THRESHOLD

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SegmentError(f"--segments must be one of {', '.join(MODES)}, got {self.mode!r}")
        s = _finite(self.seconds, "--segment_seconds")
        if not s > 0:
            raise SegmentError(f"--segment_seconds must be > 0, got {self.seconds:g}")
        if self.mode == "fixed":
            t = s * DEFAULT_STRIDE_SHARE if self.stride is None else _finite(self.stride, "--segment_stride")
            if not 0 < t <= s:
                raise SegmentError(f"--segment_stride must be > 0 and at most --segment_seconds ({s:g}), got {t:g}")
            object.__setattr__(self, "stride", float(t))
        else:
            if self.stride is not None:
                raise SegmentError("--segment_stride applies to fixed windows, not to --segments scenes")
            m = _finite(self.min_seconds, "--min_segment_seconds")
            if not 0 <= m < s:
                raise SegmentError(f"--min_segment_seconds must be >= 0 and below --segment_seconds ({s:g}), "
                                   f"got {m:g}")
            if not _finite(self.threshold, "--scene_threshold") > 0:
                raise SegmentError(f"--scene_threshold must be > 0, got {self.threshold:g}")
        object.__setattr__(self, "seconds", float(s))

    def to_dict(self) -> dict[str, Any]:
        """What the index records (and what its encoding key covers): another setting re-encodes."""
        if self.mode == "fixed":
            return {"mode": "fixed", "seconds": self.seconds, "stride": self.stride}
        return {"mode": "scenes", "seconds": self.seconds, "min_seconds": float(self.min_seconds),
                "threshold": float(self.threshold)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmentSettings:
        return cls(**{k: d[k] for k in ("mode", "seconds", "stride", "min_seconds", "threshold") if k in d})


def _finite(x: Any, flag: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise SegmentError(f"{flag} must be a number, got {x!r}") from None
    if not math.isfinite(v):
        raise SegmentError(f"{flag} must be a finite number, got {x!r}")
    return v


def _rational(x: float | Fraction) -> Fraction:
    return x if isinstance(x, Fraction) else Fraction(x).limit_denominator(1_000_000)


# ----------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Segment:
    """One segment of a video: its time range, the output frames ``[first, stop)`` it holds, the frames its
    vector samples (``positions``) and those its thumbnails show (``thumbs``)."""

    start: Fraction
    end: Fraction
    first: int
    stop: int
    positions: tuple[int, ...]
    thumbs: tuple[int, ...]


def make_segment(start: Fraction, end: Fraction, first: int, stop: int, *, framerate: int,
                 max_frames: int) -> Segment:
    from clip2video.dataloaders.frames import segment_positions

    pos = tuple(int(p) for p in segment_positions(first, stop, framerate, max_frames))
    thumbs = tuple(sorted({pos[i] for i in (0, len(pos) // 2, len(pos) - 1)}))[:THUMBS_PER_SEGMENT]
    return Segment(_rational(start), _rational(end), int(first), int(stop), pos, thumbs)


def fixed_segments(duration: Fraction, n_frames: int, fps: float | Fraction, seconds: float, stride: float, *,
                   framerate: int = 1, max_frames: int = 12) -> list[Segment]:
    """Windows ``[k·stride, k·stride + seconds)``, the last one ending at the video's end (its ``duration``).

    A final window too short to sample (fewer than ``framerate`` frames) is merged into the one before it.

    Raises:
        FrameError: the whole video holds fewer than ``framerate`` frames.
    """
    from clip2video.dataloaders.frames import segment_frames

    d, s, t, f = _rational(duration), _rational(seconds), _rational(stride), _rational(fps)
    spans: list[tuple[Fraction, Fraction]] = []
    k = 0
    while True:
        a, b = k * t, k * t + s
        spans.append((a, min(b, d)))
        if b >= d:
            break
        k += 1
    while len(spans) > 1:
        first, stop = segment_frames(*spans[-1], f, n_frames)
        if stop - first >= framerate:
            break
        spans.pop()
        spans[-1] = (spans[-1][0], d)
    return [make_segment(a, b, *segment_frames(a, b, f, n_frames), framerate=framerate, max_frames=max_frames)
            for a, b in spans]


class ShotCutter:
    """Shots found online, one frame at a time, as a reader decodes them.

    A cut lies before frame k when the content score of frames k−1 → k (mean absolute change of hue,
    saturation and value, 0–255, on a copy about 64 pixels wide) reaches ``threshold`` and :data:`SCENE_RATIO`
    times the mean score of its neighbours (:data:`SCENE_WINDOW` frames before and after, so the decision on
    frame k waits for frame k + SCENE_WINDOW), and the current shot is at least ``min_seconds`` long; a shot
    reaching ``seconds`` is closed there. A last shot shorter than
    ``min_seconds`` is merged into the one before it where the two together are not longer than ``seconds``
    (always when it is too short to sample), so a closed shot is handed out only once the next one is known:
    at most two shots of frames are held.
    """

    def __init__(self, fps: float | Fraction, seconds: float, min_seconds: float, threshold: float,
                 framerate: int = 1):
        self.fps = _rational(fps)
        self.max_len = _rational(seconds)
        self.min_len = _rational(min_seconds)
        self.threshold = float(threshold)
        self.framerate = int(framerate)
        self.start = 0  # first frame of the open shot
        self.held: tuple[int, int] | None = None  # closed, not yet handed out
        self.prev: np.ndarray | None = None
        self.scores: list[float] = []  # score of frame k vs k−1 (0 for the first)
        self.decided = 0  # frames before this one have had their cut decided

    def _length(self, first: int, stop: int) -> Fraction:
        return Fraction(stop - first) / self.fps

    def score(self, rgb: np.ndarray) -> float | None:
        import cv2

        h, w = rgb.shape[:2]
        scale = max(1, w // 64)
        small = cv2.resize(np.ascontiguousarray(rgb), (max(1, w // scale), max(1, h // scale)),
                           interpolation=cv2.INTER_AREA)
        hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV).astype(np.int16)
        prev, self.prev = self.prev, hsv
        if prev is None:
            return None
        return float(np.abs(hsv - prev).mean())

    def push(self, k: int, rgb: np.ndarray) -> list[tuple[int, int]]:
        """Feed output frame ``k`` (in order, from 0); returns the shots ``(first, stop)`` now final."""
        sc = self.score(rgb)
        self.scores.append(sc if sc is not None else 0.0)
        out: list[tuple[int, int]] = []
        while self.decided + SCENE_WINDOW <= k:
            out += self._decide(self.decided)
            self.decided += 1
        return out

    def _decide(self, j: int) -> list[tuple[int, int]]:
        """Whether a shot ends before frame ``j`` (a cut, or the open shot reached its longest)."""
        if j <= self.start:
            return []
        near = self.scores[max(1, j - SCENE_WINDOW) : j] + self.scores[j + 1 : j + 1 + SCENE_WINDOW]
        steady = SCENE_RATIO * (sum(near) / len(near)) if near else 0.0
        cut = self.scores[j] >= max(self.threshold, steady) and self._length(self.start, j) >= self.min_len
        if cut or self._length(self.start, j) >= self.max_len:
            return self._close(j)
        return []

    def _close(self, stop: int) -> list[tuple[int, int]]:
        out = [self.held] if self.held is not None else []
        self.held, self.start = (self.start, stop), stop
        return out

    def finish(self, n_frames: int) -> list[tuple[int, int]]:
        """The shots still held once the video's ``n_frames`` frames have been pushed."""
        out: list[tuple[int, int]] = []
        while self.decided < n_frames:
            out += self._decide(self.decided)
            self.decided += 1
        return out + self._last(n_frames)

    def _last(self, n_frames: int) -> list[tuple[int, int]]:
        last = (self.start, n_frames)
        if self.held is None:
            return [last] if n_frames > self.start else []
        unsampled = last[1] - last[0] < self.framerate
        short = self._length(*last) < self.min_len and self._length(self.held[0], n_frames) <= self.max_len
        if unsampled or short:
            return [(self.held[0], n_frames)]
        return [self.held, last]


# ----------------------------------------------------------------------------------------------- reading
def _frames_of(kind: str, path: str, fps: float, wanted: list[int] | None, image_size: int, mode: str,
               threads: int) -> tuple[int, Fraction, Callable[[], Iterator[tuple[int, np.ndarray]]]]:
    """(number of output frames, duration, iterator of ``(k, RGB)`` over the wanted ones, in order)."""
    from clip2video.dataloaders.frames import FrameError, list_frame_files, read_frame_rgb
    from clip2video.dataloaders.video_io import FrameResampler, VideoReadError, probe

    if kind == "frames":
        files = list_frame_files(path)
        if not files:
            raise FrameError(f"{path}: frame folder is empty")
        n = len(files)

        def folder(ks: list[int] | None) -> Iterator[tuple[int, np.ndarray]]:
            for k in (range(n) if ks is None else ks):
                yield k, read_frame_rgb(os.path.join(path, files[k]), image_size, mode)

        return n, Fraction(n) / _rational(fps), lambda ks=wanted: folder(ks)
    try:
        index = probe(path)
    except VideoReadError as e:
        raise FrameError(str(e)) from None

    def video(ks: list[int] | None) -> Iterator[tuple[int, np.ndarray]]:
        try:
            yield from FrameResampler(path, fps, bgr=False, threads=threads).outputs(ks)
        except VideoReadError as e:
            raise FrameError(str(e)) from None

    return index.n_output(fps), index.duration, lambda ks=wanted: video(ks)


def stream_segments(kind: str, path: str, *, settings: SegmentSettings, fps: float, max_frames: int,
                    framerate: int, image_size: int, mode: str, thumb: Callable[[int, np.ndarray], Any],
                    threads: int = 1, chunk: int = CHUNK_FRAMES) -> Iterator[dict[str, Any]]:
    """Read one video for its segments; yields messages for :class:`SegmentEncoder`.

    ``{"kind": "start", "duration", "frames"}``, then ``{"kind": "segments", "segments": [Segment]}`` before
    the frames those segments sample, ``{"kind": "frames", "ks", "frames" (n, 3, S, S), "thumbs": {k: path},
    "seconds"}`` in frame order, and ``{"kind": "end"}``. ``thumb(k, rgb)`` writes frame k's thumbnail and
    returns what the index records of it (None: no thumbnail).

    Raises:
        FrameError (a ValueError): the video cannot be read or is too short to sample.
    """
    import torch

    from clip2video.dataloaders.frames import FrameError, preprocess_rgb

    n, duration, frames = _frames_of(kind, path, fps, None, image_size, mode, threads)
    if n < framerate:
        raise FrameError(f"{path}: {n} frame(s) at {fps:g} fps with feature_framerate {framerate} leave no frame "
                         "to sample")
    yield {"kind": "start", "duration": float(duration), "frames": n}
    buf_k: list[int] = []
    buf_x: list[torch.Tensor] = []
    buf_t: dict[int, str] = {}
    t0 = time.perf_counter()

    def flush() -> Iterator[dict[str, Any]]:
        nonlocal t0
        if buf_k:
            yield {"kind": "frames", "ks": list(buf_k), "frames": torch.stack(buf_x), "thumbs": dict(buf_t),
                   "seconds": time.perf_counter() - t0}
            buf_k.clear(), buf_x.clear(), buf_t.clear()
            t0 = time.perf_counter()

    def take(k: int, x: torch.Tensor, pic: np.ndarray, thumbnail: bool) -> Iterator[dict[str, Any]]:
        """Frame k joins the next message (with its thumbnail when one is wanted); a full message goes out."""
        buf_k.append(k)
        buf_x.append(x)
        if thumbnail and (rel := thumb(k, pic)):
            buf_t[k] = rel
        if len(buf_k) >= chunk:
            yield from flush()

    if settings.mode == "fixed":
        plan = fixed_segments(duration, n, fps, settings.seconds, settings.stride, framerate=framerate,
                              max_frames=max_frames)
        yield {"kind": "segments", "segments": plan}
        needed = sorted({p for s in plan for p in s.positions})
        shown = {p for s in plan for p in s.thumbs}
        for k, rgb in frames(needed):
            yield from take(k, preprocess_rgb(rgb, image_size), rgb, k in shown)
        yield from flush()
        yield {"kind": "end"}
        return

    cutter = ShotCutter(fps, settings.seconds, settings.min_seconds, settings.threshold, framerate)
    held: dict[int, tuple[torch.Tensor, np.ndarray]] = {}  # frames of the shots not yet handed out

    def hand_out(shots: list[tuple[int, int]], end_frame: int) -> Iterator[dict[str, Any]]:
        for first, stop in shots:
            end = duration if stop >= end_frame else Fraction(stop) / _rational(fps)
            seg = make_segment(Fraction(first) / _rational(fps), end, first, stop, framerate=framerate,
                               max_frames=max_frames)
            yield {"kind": "segments", "segments": [seg]}
            for k in seg.positions:
                x, small = held[k]
                yield from take(k, x, small, k in seg.thumbs)
            yield from flush()
            for k in [k for k in held if k < stop]:
                del held[k]

    for k, rgb in frames(None):
        held[k] = (preprocess_rgb(rgb, image_size), _small(rgb))
        yield from hand_out(cutter.push(k, rgb), n)
    yield from hand_out(cutter.finish(n), n)
    yield {"kind": "end"}


def _small(rgb: np.ndarray, side: int = 320) -> np.ndarray:
    """A copy at most ``side`` pixels wide, kept for a thumbnail while a shot is still open."""
    h, w = rgb.shape[:2]
    if w <= side:
        return rgb.copy()
    step = -(-w // side)
    return np.ascontiguousarray(rgb[::step, ::step])


# ----------------------------------------------------------------------------------------------- encoding
class SegmentEncoder:
    """Turns reader messages into segment vectors: the image tower once per frame, the heads once per segment.

    Messages of several videos may interleave (several readers); each video is tracked by its key. A frame's
    feature is kept until no segment still waiting needs it. ``timings`` sums the seconds spent in the image
    tower and in the temporal heads.
    """

    def __init__(self, model, *, device: torch.device | str = "cpu", precision: str = "fp32", max_frames: int = 12,
                 head_batch: int = HEAD_BATCH):
        import torch

        self.model = model
        self.device = torch.device(device)
        self.precision = precision
        self.max_frames = int(max_frames)
        self.per_frame = model.config.video_encoder != "vip"  # CLIP-ViP has no per-frame features
        # segments wait for their heads in batches (features only: small); CLIP-ViP's wait with their frames
        self.head_batch = int(head_batch) if self.per_frame else min(int(head_batch), 4)
        self.videos: dict[Any, dict[str, Any]] = {}
        self.timings = {"tower_s": 0.0, "heads_s": 0.0, "frames": 0, "segments": 0}
        self.peak_features = 0  # most frame features held at once (all videos), and per video
        self.peaks: dict[Any, int] = {}

    def feed(self, key: Any, msg: dict[str, Any]) -> list[tuple[Segment, np.ndarray, list[str]]] | None:
        """Take one message of video ``key``; at its ``end``, returns its segments with their vectors and
        thumbnail paths, in time order."""
        kind = msg["kind"]
        if kind == "start":
            self.videos[key] = {"pending": deque(), "feats": {}, "ready": [], "done": [], "thumbs": {}}
            return None
        st = self.videos[key]
        if kind == "segments":
            st["pending"].extend(msg["segments"])
        elif kind == "frames":
            st["thumbs"].update(msg["thumbs"])
            self._frames(st, msg["ks"], msg["frames"])
            self.peaks[key] = max(self.peaks.get(key, 0), len(st["feats"]))
            self.peak_features = max(self.peak_features, sum(len(v["feats"]) for v in self.videos.values()))
            self._advance(st)
        elif kind == "end":
            self._advance(st, final=True)
            del self.videos[key]
            if st["pending"]:
                raise RuntimeError(f"{len(st['pending'])} segment(s) never got their frames")
            return [(seg, vec, [st["thumbs"][k] for k in seg.thumbs if k in st["thumbs"]])
                    for seg, vec in st["done"]]
        return None

    def drop(self, key: Any) -> None:
        self.videos.pop(key, None)

    def _frames(self, st: dict[str, Any], ks: list[int], frames: torch.Tensor) -> None:
        import torch

        from clip2video.modules.runtime.precision import autocast

        if not self.per_frame:
            st["feats"].update(zip(ks, frames, strict=True))
            return
        t0 = time.perf_counter()
        x = frames.to(self.device)[None]  # (1, n, 3, S, S)
        with torch.no_grad(), autocast(self.device, self.precision):
            f = self.model.encode_frames(x, torch.ones(x.shape[:2], dtype=torch.int64, device=self.device))[0]
        st["feats"].update(zip(ks, f.float(), strict=True))
        self.timings["tower_s"] += time.perf_counter() - t0
        self.timings["frames"] += len(ks)

    def _advance(self, st: dict[str, Any], final: bool = False) -> None:
        """Move the segments whose frames are all in to the heads' queue (with their features), run the heads
        once a batch is full (or at the video's end), and drop features no waiting segment needs."""
        import torch

        pending, feats, ready = st["pending"], st["feats"], st["ready"]
        while pending and all(p in feats for p in pending[0].positions):
            seg = pending.popleft()
            ready.append((seg, torch.stack([feats[p] for p in seg.positions])))
        while len(ready) >= self.head_batch or (final and ready):
            batch, ready[:] = ready[: self.head_batch], ready[self.head_batch :]
            st["done"] += zip([seg for seg, _ in batch], self._heads(batch), strict=True)
        low = pending[0].first if pending else math.inf
        for k in [k for k in feats if k < low]:
            del feats[k]

    def _heads(self, batch: list[tuple[Segment, torch.Tensor]]) -> np.ndarray:
        """Video vectors of a batch of segments from their sampled frames' features (or frames, CLIP-ViP),
        padded as a frame folder is."""
        import torch

        from clip2video.modules.runtime.precision import autocast

        t0 = time.perf_counter()
        b, t = len(batch), self.max_frames
        mask = torch.zeros(b, t, dtype=torch.int64)
        for i, (s, _) in enumerate(batch):
            mask[i, : len(s.positions)] = 1
        mask = mask.to(self.device)
        m = self.model
        with torch.no_grad(), autocast(self.device, self.precision):
            if self.per_frame:
                pad = m.zero_frame_feature(self.device, torch.float32).float()
                x = pad.expand(b, t, -1).clone()  # (B, T, D): padded slots hold the zero frame's feature
                for i, (_, f) in enumerate(batch):
                    x[i, : len(f)] = f
                emb = m.encode_video_features(x, mask)
            else:
                first = batch[0][1]
                x = torch.zeros(b, t, *first.shape[1:], dtype=first.dtype)
                for i, (_, f) in enumerate(batch):
                    x[i, : len(f)] = f
                emb = m.encode_video(x.to(self.device), mask)
            v = m.video_vector(emb).float().cpu().numpy()
        self.timings["heads_s"] += time.perf_counter() - t0
        self.timings["segments"] += b
        return v


__all__ = ["DEFAULT_MIN_SECONDS", "DEFAULT_SCENE_SECONDS", "DEFAULT_SCENE_THRESHOLD", "DEFAULT_STRIDE_SHARE",
           "MODES", "Segment", "SegmentEncoder", "SegmentError", "SegmentSettings", "ShotCutter", "fixed_segments",
           "make_segment", "stream_segments"]
