"""Video decoding and encoding through OpenCV, with frames picked by timestamp.

Frame extraction (``sample_frame.py``) and the synthetic data (``dataloaders/synthetic.py``) share this module so
that the one place that knows OpenCV's quirks (silent open failures, headers that claim more frames than the
file holds, ``fps == 0`` for some containers, backend log noise) is also the one place that is tested.

Resampling rule (``FrameResampler``): source frame ``i`` is shown during ``[i/src, (i+1)/src)``; output frame
``k`` is the source frame on screen at time ``k/fps``. A video of ``n`` source frames therefore gives
``ceil(n * fps / src)`` output frames (``expected_output_frames``) whatever the source rate; asking for more
than the source rate repeats frames, as ffmpeg's ``fps`` filter does. Times come from the frame index, not the
container's per-frame timestamps, which OpenCV does not report reliably across backends: variable-frame-rate
files are treated as constant-rate at their nominal fps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from ..fileio import atomic_path

DEFAULT_FALLBACK_FPS = 25.0
"""Source rate assumed when the container reports none (0, negative, NaN or absurd): the PAL/web default."""

_MAX_PLAUSIBLE_FPS = 1000.0


class VideoReadError(RuntimeError):
    """A video that cannot give frames: missing, empty, unreadable, truncated, or decoding to nothing."""


def quiet_backend() -> None:
    """Silence OpenCV's and FFmpeg's own stderr logging.

    Broken inputs are reported once, in our words, per file; the backend's lines ("moov atom not found",
    "marker does not match f_code" once per damaged frame) would otherwise bury the summary of a large batch.
    Respects a value the user already set, so ``OPENCV_FFMPEG_LOGLEVEL=32`` still brings them back. OpenCV
    reads the FFmpeg level when its FFmpeg backend first starts in the process, so call this before any
    capture or writer is created (the CLIs do).
    """
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET; read when a capture is opened
    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


def expected_output_frames(n_source: int, source_fps: float, fps: float) -> int:
    """Number of frames ``FrameResampler`` yields for ``n_source`` decodable frames (see the module rule)."""
    if n_source <= 0:
        return 0
    src, out = _as_fraction(source_fps), _as_fraction(fps)
    return math.ceil(Fraction(n_source) * out / src)


def _as_fraction(x: float) -> Fraction:
    # Exact rational arithmetic makes the frame choice free of rounding drift: with floats, 29.97 fps sources
    # pick a different frame now and then depending on the order of operations.
    return Fraction(x).limit_denominator(1_000_000)


def _open(path: Path) -> cv2.VideoCapture:
    """Open a capture, turning OpenCV's silent failures into errors that say what is wrong with the file."""
    if not path.exists():
        raise VideoReadError(f"{path}: file does not exist")
    if not path.is_file():
        raise VideoReadError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise VideoReadError(f"{path}: empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise VideoReadError(f"{path}: file is not readable (permissions)")
    # Absolute path: FFmpeg would read "a:b.mp4" as protocol "a". FFmpeg backend explicitly, so that a name with
    # "%" is never taken for an image-sequence pattern by OpenCV's CAP_IMAGES.
    backend = cv2.CAP_FFMPEG if cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG) else cv2.CAP_ANY
    cap = cv2.VideoCapture(os.path.abspath(path), backend)
    if not cap.isOpened():
        cap.release()
        raise VideoReadError(f"{path}: cannot open as a video ({size} bytes; corrupt, truncated or unknown format)")
    return cap


class FrameResampler:
    """Iterate over the BGR frames of a video at ``fps`` frames per second, decoding the file once.

    After iteration the attributes describe what happened, for the extraction summary: ``source_fps`` (the
    rate used), ``fps_known`` (False when ``fallback_fps`` was assumed), ``reported_frames`` (frame count in
    the header, 0 if none), ``decoded_frames``, ``written`` (frames yielded) and ``warnings``.

    Args:
        path: video file.
        fps: output rate, > 0.
        fallback_fps: source rate assumed when the container reports none.
        allow_truncated: keep the frames of a file that decodes to clearly fewer frames than its header
            reports (a warning instead of an error).

    Raises (during iteration):
        VideoReadError: the file cannot be opened, decodes to zero frames, or (unless ``allow_truncated``)
            stops well short of its header's frame count.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float,
        *,
        fallback_fps: float = DEFAULT_FALLBACK_FPS,
        allow_truncated: bool = False,
    ) -> None:
        if not fps > 0 or not math.isfinite(fps):
            raise ValueError(f"fps must be a positive number (got {fps})")
        if not fallback_fps > 0 or not math.isfinite(fallback_fps):
            raise ValueError(f"fallback_fps must be a positive number (got {fallback_fps})")
        self.path = Path(path)
        self.fps = float(fps)
        self.fallback_fps = float(fallback_fps)
        self.allow_truncated = allow_truncated
        self.source_fps = 0.0
        self.fps_known = False
        self.reported_frames = 0
        self.decoded_frames = 0
        self.written = 0
        self.warnings: list[str] = []

    def __iter__(self) -> Iterator[np.ndarray]:
        cap = _open(self.path)
        try:
            yield from self._frames(cap)
        finally:
            cap.release()

    def _frames(self, cap: cv2.VideoCapture) -> Iterator[np.ndarray]:
        raw_fps = cap.get(cv2.CAP_PROP_FPS)
        if math.isfinite(raw_fps) and 0 < raw_fps <= _MAX_PLAUSIBLE_FPS:
            self.source_fps, self.fps_known = float(raw_fps), True
        else:
            self.source_fps, self.fps_known = self.fallback_fps, False
            self.warnings.append(f"source fps unknown ({raw_fps}); assumed {self.fallback_fps:g}")
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.reported_frames = int(count) if math.isfinite(count) and count > 0 else 0

        src, out = _as_fraction(self.source_fps), _as_fraction(self.fps)
        k = 0  # next output frame; it is due at time k/out
        i = 0  # source frame being read; on screen during [i/src, (i+1)/src)
        while True:
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            self.decoded_frames += 1
            # Emit every output time that falls inside this frame's interval: k/out < (i+1)/src.
            while k * src < (i + 1) * out:
                self.written += 1
                k += 1
                yield frame
            i += 1

        if self.decoded_frames == 0:
            raise VideoReadError(f"{self.path}: opens but decodes to zero frames")
        if self.reported_frames:
            missing = self.reported_frames - self.decoded_frames
            # Headers estimate the count from duration for some containers: allow a little slack.
            if missing > max(2, round(0.02 * self.reported_frames)):
                msg = (
                    f"{self.path}: decoded only {self.decoded_frames} of the {self.reported_frames} frames its "
                    "header reports (truncated or corrupt)"
                )
                if not self.allow_truncated:
                    raise VideoReadError(msg + "; --allow_truncated keeps the decodable part")
                self.warnings.append(msg + "; kept the decodable part")


def read_frames(path: str | os.PathLike) -> list[np.ndarray]:
    """Every decodable BGR frame of a video, in order (for checks and small synthetic clips, not datasets).

    Raises:
        VideoReadError: the file cannot be opened.
    """
    cap = _open(Path(path))
    frames: list[np.ndarray] = []
    try:
        while True:
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            frames.append(frame)
    finally:
        cap.release()
    return frames


def write_video(path: str | os.PathLike, frames: Sequence[np.ndarray], fps: float, fourcc: str = "mp4v") -> None:
    """Encode BGR uint8 frames (all the same H×W×3) to ``path``, atomically.

    Written under a temporary name in the same folder (same extension, so the muxer picks the same
    container) and renamed into place, so a crash never leaves a half-written file under the final name.

    Raises:
        ValueError: no frames, or frames of different shapes / not uint8 H×W×3.
        OSError: OpenCV could not open a writer for this container and codec.
    """
    if len(frames) == 0:
        raise ValueError(f"{path}: no frames to write")
    h, w = frames[0].shape[:2]
    for n, f in enumerate(frames):
        if f.dtype != np.uint8 or f.shape != (h, w, 3):
            raise ValueError(f"{path}: frame {n} is {f.dtype} {f.shape}, expected uint8 {(h, w, 3)}")
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = cv2.VideoWriter(os.fspath(tmp), cv2.VideoWriter_fourcc(*fourcc), float(fps), (w, h))
        try:
            if not writer.isOpened():
                raise OSError(f"{path}: OpenCV cannot open a {fourcc!r} writer for this file type")
            for f in frames:
                writer.write(np.ascontiguousarray(f))
        finally:
            writer.release()
