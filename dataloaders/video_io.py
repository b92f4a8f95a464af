"""The one video decoder: frames picked by presentation time, for extraction and for direct reading.

Frame extraction (``sample_frame.py``), direct reading of video files in evaluation and training
(:func:`decode_outputs` through ``dataloaders/frames.py``) and indexing all decode here, with PyAV (FFmpeg's
libraries, bundled in its wheels), so "extract the frames, then read them" and "read the video directly" see the
same pixels. OpenCV is kept only to *write* test clips (:func:`write_video`). Why PyAV: it gives each packet's
presentation timestamp and keyframe flag without decoding (so a clip's frame list costs a demux pass, no
decode) and seeks to a keyframe exactly; OpenCV seeks by frame number with a backend-dependent accuracy and
reports no timestamps; TorchCodec needs FFmpeg installed on the system, which ``pip install`` cannot provide.
The library comparison is in ``benchmarks/bench_decode.py`` and ``benchmarks/README.md``.

Timing rule (:class:`VideoIndex`): source frame ``i`` is on screen from its presentation time ``t_i`` until
``t_{i+1}`` (the last one for its packet duration); times are measured from the first frame, so a stream that
starts late (an offset, an edit list) still starts at output frame 0. Output frame ``k`` at rate ``F`` is the
source frame on screen at time ``k/F``, and a video lasting ``D`` seconds gives ``ceil(D·F)`` output frames.
For a constant-rate source of ``n`` frames at ``src`` fps that is ``ceil(n·F/src)`` (:func:`expected_output_frames`)
and frame ``floor(k·src/F)``; a variable-rate source is timed by its timestamps. Times are exact rationals in
the stream's time base, so no rounding drift picks a neighbouring frame. Asking for more than the source
rate repeats frames, as ffmpeg's ``fps`` filter does. Files without timestamps are timed by frame number at
their nominal rate (or ``fallback_fps`` when they report none).

Rotation metadata (a phone held upright) is applied, as ffmpeg and OpenCV do by default. The frame count
comes from the packets, never from the header alone: a header that claims fewer frames than the file holds
is overruled (with a warning), one that claims clearly more marks a truncated file (an error unless
``allow_truncated``). Every failure is a :class:`VideoReadError` whose message starts with the file name;
nothing here returns a black or made-up frame.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from clip2video.fileio import atomic_path

DEFAULT_VIDEO_FPS = 5.0
"""Frames per second of extraction and of direct reading unless told otherwise: the original CLIP2Video
extracted at 5 fps, so its checkpoints saw frames at this rate (``sample_frame.py --fps``, ``--video_fps``)."""

DEFAULT_FALLBACK_FPS = 25.0
"""Source rate assumed when the container reports none (0, negative, NaN or absurd): the PAL/web default."""

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
"""Extensions read as video files where a folder of frame folders is expected (``--features_path``)."""

_MAX_PLAUSIBLE_FPS = 1000.0
_INDEX_CACHE_SIZE = 4096


class VideoReadError(RuntimeError):
    """A video that cannot give frames: missing, empty, unreadable, truncated, or decoding to nothing."""


def quiet_backend() -> None:
    """Silence OpenCV's and FFmpeg's own stderr logging.

    Broken inputs are reported once, in our words, per file; the backend's lines ("moov atom not found",
    "marker does not match f_code" once per damaged frame) would otherwise bury the summary of a large batch.
    Respects a value the user already set, so ``OPENCV_FFMPEG_LOGLEVEL=32`` still brings them back. OpenCV
    reads the FFmpeg level when its FFmpeg backend first starts in the process, so call this before any
    capture or writer is created (the CLIs do). PyAV keeps FFmpeg's log off unless asked.
    """
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET; read when a capture is opened
    if "OPENCV_LOG_LEVEL" not in os.environ:
        import cv2  # only the writer needs OpenCV; decoding is PyAV's

        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


def expected_output_frames(n_source: int, source_fps: float, fps: float) -> int:
    """Number of output frames of a constant-rate video of ``n_source`` frames (see the module rule)."""
    if n_source <= 0:
        return 0
    src, out = _as_fraction(source_fps), _as_fraction(fps)
    return math.ceil(Fraction(n_source) * out / src)


def _as_fraction(x: float | Fraction) -> Fraction:
    # Exact rational arithmetic makes the frame choice free of rounding drift: with floats, 29.97 fps sources
    # pick a different frame now and then depending on the order of operations.
    return x if isinstance(x, Fraction) else Fraction(x).limit_denominator(1_000_000)


def decoder_threads(workers: int) -> int:
    """Decoder threads per process when ``workers`` processes decode at once (0 = the main process alone).

    The cores this process may use, shared out so that workers × threads never exceeds them.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(workers)))


# ------------------------------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class VideoIndex:
    """What a demux pass (no decoding) tells about a video's frames, and the timing rule on top of it.

    ``pts`` are the frames' presentation timestamps in ``time_base`` units, sorted; ``keyframe_pts`` the
    keyframes' pts (what containers seek by: seeking to a keyframe's dts lands a GOP early in MP4);
    ``start_seek`` the smallest timestamp of the stream;
    ``end`` the time the last frame leaves the screen. Untimed files (no timestamps) use frame numbers with
    ``time_base = 1/rate``.
    """

    path: str
    pts: tuple[int, ...]
    keyframe_pts: tuple[int, ...]
    time_base: Fraction
    end: int
    timed: bool
    rate: float
    header_frames: int
    start_seek: int = 0
    warnings: tuple[str, ...] = field(default=())

    @property
    def n_source(self) -> int:
        return len(self.pts)

    @property
    def duration(self) -> Fraction:
        """Seconds from the first frame's start to the last frame's end."""
        return (self.end - self.pts[0]) * self.time_base

    def n_output(self, fps: float | Fraction) -> int:
        """Frames an extraction at ``fps`` writes: one per ``1/fps`` s of the video's duration."""
        return math.ceil(self.duration * _as_fraction(fps))

    def source_of(self, k: int, fps: float | Fraction) -> int:
        """Position in ``pts`` of the source frame on screen at time ``k/fps`` (output frame ``k``)."""
        limit = self.pts[0] + math.floor(Fraction(int(k)) / (_as_fraction(fps) * self.time_base))
        return max(0, bisect.bisect_right(self.pts, limit) - 1)

    def keyframes_in(self, first: int, last: int) -> int:
        """Keyframes with a pts in ``[first, last]`` (how many GOPs a decode of that span starts)."""
        return bisect.bisect_right(self.keyframe_pts, last) - bisect.bisect_left(self.keyframe_pts, first)


def _check_file(path: Path) -> int:
    """File-level checks with a reason each; returns the size."""
    if not path.exists():
        raise VideoReadError(f"{path}: file does not exist")
    if not path.is_file():
        raise VideoReadError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise VideoReadError(f"{path}: empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise VideoReadError(f"{path}: file is not readable (permissions)")
    return size


def _open(path: Path, threads: int = 1) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    """Open the file's first video stream with ``threads`` decoder threads, or say what is wrong."""
    size = _check_file(path)
    try:
        container = av.open(os.fspath(path), metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise VideoReadError(f"{path}: cannot open as a video ({size} bytes; corrupt, truncated or unknown "
                             f"format: {_reason(e)})") from None
    if not container.streams.video:
        audio = bool(container.streams.audio)
        container.close()
        if audio:
            raise VideoReadError(f"{path}: no video stream (audio only)")
        raise VideoReadError(f"{path}: cannot open as a video ({size} bytes; no video stream found: corrupt, "
                             "truncated or unknown format)")
    stream = container.streams.video[0]
    stream.codec_context.thread_count = max(1, int(threads))
    stream.codec_context.thread_type = "AUTO" if threads > 1 else "SLICE"
    return container, stream


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return str(text).splitlines()[0]


def _nominal_rate(stream: av.video.stream.VideoStream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and 0 < float(rate) <= _MAX_PLAUSIBLE_FPS:
            return float(rate)
    return None


Packet = tuple[int | None, int | None, bool, int]
"""(pts, dts, is_keyframe, duration) of one demuxed packet."""


def _demux(container, stream) -> tuple[list[Packet], str | None]:
    """The video stream's packets (no decoding) and, if demuxing stopped on an error, its reason."""
    packets: list[Packet] = []
    try:
        for p in container.demux(stream):
            if p.size:  # the empty packet at the end only flushes the decoder
                packets.append((p.pts, p.dts, bool(p.is_keyframe), int(p.duration or 0)))
    except (av.error.FFmpegError, OSError) as e:
        return packets, _reason(e)
    return packets, None


def _build_index(container, stream, path: Path, fallback_fps: float, allow_truncated: bool) -> VideoIndex:
    """Demux the video stream once and turn its packets into a :class:`VideoIndex`."""
    packets, damaged = _demux(container, stream)
    tb = Fraction(stream.time_base.numerator, stream.time_base.denominator) if stream.time_base else Fraction(1)
    return index_from_packets(path, packets, tb, _nominal_rate(stream), int(stream.frames or 0),
                              fallback_fps=fallback_fps, allow_truncated=allow_truncated, damaged=damaged)


def index_from_packets(path: str | os.PathLike, packets: Sequence[Packet], time_base: Fraction,
                       rate: float | None, header: int, *, fallback_fps: float = DEFAULT_FALLBACK_FPS,
                       allow_truncated: bool = False, damaged: str | None = None) -> VideoIndex:
    """The timing rule applied to demuxed packets (pure; the file-independent part of :func:`probe`).

    Raises:
        VideoReadError: no packets, or a truncated/damaged stream without ``allow_truncated``.
    """
    path = Path(path)
    warnings: list[str] = []
    if not packets:
        raise VideoReadError(f"{path}: holds no video frames" + (f" ({damaged})" if damaged else ""))
    n = len(packets)
    short = header - n > max(2, round(0.02 * header)) if header else False
    if damaged or short:
        what = (f"holds only {n} of the {header} frames its header reports" if short
                else f"is damaged after {n} frames ({damaged})")
        msg = f"{path}: {what} (truncated, corrupt or a wrong header)"
        if not allow_truncated:
            raise VideoReadError(msg + "; --allow_truncated keeps the decodable part")
        warnings.append(msg + "; kept the decodable part")
    elif header and n > header:
        warnings.append(f"header reports {header} frames, the file holds {n}: all {n} used")

    timed = all(p[0] is not None or p[1] is not None for p in packets)
    if timed:
        stamps = sorted({p[0] if p[0] is not None else p[1] for p in packets})
        timed = len(stamps) == n  # duplicate timestamps cannot order frames
    if timed:
        tb = time_base
        last = max(packets, key=lambda p: p[0] if p[0] is not None else p[1])
        gaps = np.diff(stamps)
        step = last[3] or (int(np.median(gaps)) if len(gaps) else 0)
        if step <= 0:
            step = max(1, round(1 / ((rate or fallback_fps) * tb)))
        keys = sorted(p[0] if p[0] is not None else p[1] for p in packets if p[2])
        start = min(x for p in packets for x in (p[0], p[1]) if x is not None)
        return VideoIndex(os.fspath(path), tuple(stamps), tuple(keys), tb, stamps[-1] + step, True, rate or 0.0,
                          header, start, tuple(warnings))
    if rate is None:
        warnings.append(f"no timestamps and no usable fps; assumed {fallback_fps:g}")
    r = _as_fraction(rate or fallback_fps)
    return VideoIndex(os.fspath(path), tuple(range(n)), (), 1 / r, n, False, rate or 0.0, header, 0,
                      tuple(warnings))


_index_cache: OrderedDict[tuple, VideoIndex] = OrderedDict()


def probe(path: str | os.PathLike, *, fallback_fps: float = DEFAULT_FALLBACK_FPS,
          allow_truncated: bool = False) -> VideoIndex:
    """The :class:`VideoIndex` of a file (cached per process by path, size and modification time).

    Raises:
        VideoReadError: missing, empty, unreadable, no video stream, no frames, or truncated.
    """
    path = Path(path)
    _check_file(path)
    st = path.stat()
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, float(fallback_fps), bool(allow_truncated))
    hit = _index_cache.get(key)
    if hit is not None:
        _index_cache.move_to_end(key)
        return hit
    container, stream = _open(path)
    try:
        index = _build_index(container, stream, path, fallback_fps, allow_truncated)
    finally:
        container.close()
    _index_cache[key] = index
    if len(_index_cache) > _INDEX_CACHE_SIZE:
        _index_cache.popitem(last=False)
    return index


# ------------------------------------------------------------------------------------------------- decoding


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """(H, W, 3) uint8 RGB, upright (the stream's rotation applied)."""
    rgb = frame.to_ndarray(format="rgb24")
    turns = round((frame.rotation or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def _decode_error(path, e: BaseException, where: str) -> VideoReadError:
    return VideoReadError(f"{path}: cannot decode {where} ({_reason(e)}; truncated or corrupt)")


def decode_outputs(
    path: str | os.PathLike,
    outputs: Sequence[int],
    fps: float,
    *,
    threads: int = 1,
    index: VideoIndex | None = None,
    fallback_fps: float = DEFAULT_FALLBACK_FPS,
) -> list[np.ndarray]:
    """RGB frames (H, W, 3) uint8 of output frames ``outputs`` of an extraction at ``fps``, decoding only those.

    Each wanted source frame is reached by seeking to the last keyframe shown at or before it and decoding
    forward; a target in the GOP being decoded is reached without a new seek. The pixels are those of a full
    sequential decode (the decoder restarts at a keyframe, as extraction's decoder did).

    Raises:
        VideoReadError: the file cannot be opened or indexed, an output lies past its end, or a wanted frame
            cannot be decoded.
    """
    path = Path(path)
    index = index or probe(path, fallback_fps=fallback_fps)
    n_out = index.n_output(fps)
    bad = [k for k in outputs if not 0 <= int(k) < n_out]
    if bad:
        raise VideoReadError(f"{path}: output frame {bad[0]} asked for, the video gives {n_out} at {fps:g} fps")
    want_pos = [index.source_of(int(k), fps) for k in outputs]
    targets = sorted(set(want_pos))
    got: dict[int, np.ndarray] = {}
    container, stream = _open(path, threads)
    try:
        if index.timed:
            _decode_timed(container, stream, index, [index.pts[i] for i in targets], got, path)
            by_pos = {i: got[index.pts[i]] for i in targets}
        else:
            _decode_in_order(container, stream, set(targets), got, path)
            by_pos = got
    finally:
        container.close()
    return [by_pos[i] for i in want_pos]


class _Cursor:
    """A decoder position: the frame iterator since the last seek and the pts of the last frame it gave."""

    def __init__(self, container, stream) -> None:
        self.container, self.stream = container, stream
        self.frames: Iterator[av.VideoFrame] | None = None
        self.last: int | None = None

    def seek(self, timestamp: int) -> None:
        self.container.seek(int(timestamp), stream=self.stream, backward=True, any_frame=False)
        self.frames, self.last = self.container.decode(self.stream), None

    def decode_until(self, t: int, wanted: set[int], got: dict[int, np.ndarray]) -> bool:
        """Decode up to pts ``t``, keeping wanted frames on the way; False if the seek overshot or it ended."""
        fresh = self.last is None
        for frame in self.frames:
            p = frame.pts
            if p is None:
                continue
            if fresh and p > t:
                return False  # the seek landed after the target
            fresh, self.last = False, p
            if p in wanted and p not in got:
                got[p] = _to_rgb(frame)
            if p >= t:
                return t in got
        return False


def _seek_points(index: VideoIndex, t: int) -> list[tuple[int, int]]:
    """(keyframe pts, seek timestamp) to try for target ``t``: its keyframe, the one before, the start."""
    j = bisect.bisect_right(index.keyframe_pts, t) - 1
    points = [(index.keyframe_pts[i], index.keyframe_pts[i]) for i in (j, j - 1) if i >= 0]
    points.append((index.pts[0], index.start_seek))
    return list(dict.fromkeys(points))


def _decode_timed(container, stream, index: VideoIndex, targets: list[int], got: dict, path: Path) -> None:
    """Fill ``got[pts]`` for every pts in ``targets`` (sorted), seeking only where it saves decoding."""
    wanted = set(targets)
    cur = _Cursor(container, stream)
    for t in targets:
        if t in got:
            continue
        try:
            for attempt, (key_pts, seek_to) in enumerate(_seek_points(index, t)):
                # keep decoding when the target's keyframe is behind the decoder (same GOP or just ahead)
                if attempt or cur.frames is None or cur.last is None or key_pts > cur.last:
                    cur.seek(seek_to)
                if cur.decode_until(t, wanted, got):
                    break
                cur.frames = None
            else:
                raise VideoReadError(f"{path}: the frame at {float((t - index.pts[0]) * index.time_base):.3f}s "
                                     "cannot be decoded (truncated or corrupt)")
        except (av.error.FFmpegError, OSError) as e:
            raise _decode_error(path, e, f"the frame at {float((t - index.pts[0]) * index.time_base):.3f}s") \
                from None


def _decode_in_order(container, stream, targets: set[int], got: dict, path: Path) -> None:
    """Untimed files: decode from the start, frames numbered in output order."""
    last = max(targets)
    try:
        for i, frame in enumerate(container.decode(stream)):
            if i in targets:
                got[i] = _to_rgb(frame)
            if i >= last:
                return
    except (av.error.FFmpegError, OSError) as e:
        raise _decode_error(path, e, f"frame {len(got)}") from None
    raise VideoReadError(f"{path}: decodes to fewer frames than it holds (truncated or corrupt)")


def source_frames(path: str | os.PathLike, first: int, stop: int, *, index: VideoIndex | None = None,
                  threads: int = 1) -> Iterator[tuple[int, av.VideoFrame]]:
    """``(i, frame)`` for the source frames at positions ``[first, stop)`` of ``index.pts``, in order, decoded
    from the keyframe before ``first`` (one seek) and handed over one at a time (for cutting clips: the
    frames go straight to an encoder, a long clip is never held).

    Raises:
        VideoReadError: the file cannot be opened or a frame of the range cannot be decoded.
    """
    path = Path(path)
    index = index or probe(path)
    if not 0 <= first < stop <= index.n_source:
        raise VideoReadError(f"{path}: source frames [{first}, {stop}) asked for, the video holds {index.n_source}")
    container, stream = _open(path, threads)
    try:
        if not index.timed:  # no timestamps: decode from the start, frames numbered in order
            for i, frame in enumerate(container.decode(stream)):
                if i >= first:
                    yield i, frame
                if i + 1 >= stop:
                    return
            raise VideoReadError(f"{path}: decodes to fewer frames than it holds (truncated or corrupt)")
        target, last = index.pts[first], index.pts[stop - 1]
        for _key_pts, seek_to in _seek_points(index, target):
            container.seek(int(seek_to), stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
            head = next((f for f in frames if f.pts is not None), None)
            if head is None or head.pts > target:
                continue  # the seek landed after the first frame wanted: an earlier keyframe
            for frame in itertools.chain([head], frames):
                pts = frame.pts  # read before handing the frame out: the caller may restamp it
                if pts is None or pts < target:
                    continue
                i = bisect.bisect_left(index.pts, pts)
                if i >= len(index.pts) or index.pts[i] != pts:
                    continue
                yield i, frame
                if pts >= last:
                    return
            break
        raise VideoReadError(f"{path}: the frames from {float((target - index.pts[0]) * index.time_base):.3f}s "
                             "cannot be decoded (truncated or corrupt)")
    except (av.error.FFmpegError, OSError) as e:
        raise _decode_error(path, e, "a clip's frames") from None
    finally:
        container.close()


def frame_rgb(frame: av.VideoFrame) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a decoded frame, upright (as every reader here sees it)."""
    return _to_rgb(frame)


class FrameResampler:
    """Iterate over the BGR frames of a video at ``fps`` frames per second, decoding the file once (extraction).

    Frames are BGR (H, W, 3) uint8 for OpenCV's encoders (``bgr=False``: RGB; the same pixels). After
    iteration the attributes describe what happened, for the extraction summary: ``source_fps`` (nominal
    rate), ``fps_known`` (False when the file had no timestamps and ``fallback_fps`` was assumed),
    ``reported_frames`` (frame count in the header, 0 if none), ``decoded_frames``, ``written`` (frames
    yielded) and ``warnings``.

    Args:
        path: video file.
        fps: output rate, > 0.
        fallback_fps: source rate assumed for a file without timestamps that reports no rate.
        allow_truncated: keep the frames of a file that holds or decodes to clearly fewer frames than its
            header reports (a warning instead of an error).
        bgr: yield BGR (default) or RGB.
        threads: decoder threads.

    Raises (during iteration):
        VideoReadError: the file cannot be opened, holds no frames, or (unless ``allow_truncated``) is
            truncated or stops decoding early.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float,
        *,
        fallback_fps: float = DEFAULT_FALLBACK_FPS,
        allow_truncated: bool = False,
        bgr: bool = True,
        threads: int = 1,
    ) -> None:
        if not fps > 0 or not math.isfinite(fps):
            raise ValueError(f"fps must be a positive number (got {fps})")
        if not fallback_fps > 0 or not math.isfinite(fallback_fps):
            raise ValueError(f"fallback_fps must be a positive number (got {fallback_fps})")
        self.path = Path(path)
        self.fps = float(fps)
        self.fallback_fps = float(fallback_fps)
        self.allow_truncated = allow_truncated
        self.bgr, self.threads = bool(bgr), int(threads)
        self.source_fps = 0.0
        self.fps_known = False
        self.reported_frames = 0
        self.decoded_frames = 0
        self.written = 0
        self.warnings: list[str] = []

    def __iter__(self) -> Iterator[np.ndarray]:
        for _, frame in self.outputs():
            yield frame

    def outputs(self, wanted: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(k, frame)`` for the output frames ``k`` in ``wanted`` (all when None), in order, in one decoding pass.

        Only the wanted outputs are converted to RGB, and decoding stops after the last one: a long video whose
        segments need a few frames per second is read once, front to back, holding one frame at a time.
        """
        index = probe(self.path, fallback_fps=self.fallback_fps, allow_truncated=self.allow_truncated)
        self.warnings = list(index.warnings)
        self.source_fps = index.rate or self.fallback_fps
        self.fps_known = index.timed or bool(index.rate)
        self.reported_frames = index.header_frames
        n_out = index.n_output(self.fps)
        want = None if wanted is None else {int(k) for k in wanted if 0 <= int(k) < n_out}
        if want is not None and not want:
            return
        container, stream = _open(self.path, self.threads)
        try:
            yield from self._frames(container, stream, index, n_out, want)
        finally:
            container.close()

    def _frames(self, container, stream, index: VideoIndex, n_out: int,
                want: set[int] | None) -> Iterator[tuple[int, np.ndarray]]:
        k = 0  # next output frame; it shows source frame index.source_of(k)
        due = index.source_of(0, self.fps)
        stop = n_out if want is None else max(want) + 1  # outputs after the last wanted one are not decoded
        try:
            for i, frame in enumerate(container.decode(stream)):
                if index.timed:
                    if frame.pts is None:
                        continue
                    pos = bisect.bisect_left(index.pts, frame.pts)
                    if pos >= len(index.pts) or index.pts[pos] != frame.pts:
                        continue  # not a frame of the index (cannot happen for a consistent file)
                else:
                    pos = i
                self.decoded_frames += 1
                if pos > due:  # the frame due was never output by the decoder
                    raise VideoReadError(f"{self.path}: frame {due} of {index.n_source} did not decode "
                                         "(truncated or corrupt)")
                if pos < due:
                    continue
                out = None
                while k < n_out and due == pos:
                    if want is None or k in want:
                        if out is None:
                            out = _to_rgb(frame)
                            if self.bgr:
                                out = np.ascontiguousarray(out[..., ::-1])
                        self.written += 1
                        yield k, out
                    k += 1
                    due = index.source_of(k, self.fps) if k < n_out else index.n_source
                if k >= stop:
                    return
        except (av.error.FFmpegError, OSError) as e:
            err = _decode_error(self.path, e, f"past frame {self.decoded_frames}")
            if not self.allow_truncated or self.written == 0:
                raise err from None
            self.warnings.append(f"{err}; kept the decodable part")
            return
        if self.written == 0:
            raise VideoReadError(f"{self.path}: opens but decodes to zero frames")
        if k < n_out:
            msg = f"{self.path}: decoded only {self.decoded_frames} of the {index.n_source} frames it holds"
            if not self.allow_truncated:
                raise VideoReadError(msg + " (truncated or corrupt); --allow_truncated keeps the decodable part")
            self.warnings.append(msg + "; kept the decodable part")


def read_frames(path: str | os.PathLike) -> list[np.ndarray]:
    """Every decodable frame of a video as BGR, in order (for checks and small synthetic clips, not datasets).

    Raises:
        VideoReadError: the file cannot be opened.
    """
    container, stream = _open(Path(path))
    frames: list[np.ndarray] = []
    try:
        for frame in container.decode(stream):
            frames.append(np.ascontiguousarray(_to_rgb(frame)[..., ::-1]))
    except (av.error.FFmpegError, OSError):
        pass  # the decodable part, as documented
    finally:
        container.close()
    return frames


def list_video_files(folder: str | os.PathLike) -> dict[str, Path]:
    """``{video_id: file}`` for the files of ``folder`` whose extension is in :data:`VIDEO_EXTS` (any case).

    The id is the name without its extension. Two files with the same id (``a.mp4``, ``a.avi``) are an error.

    Raises:
        VideoReadError: two video files share an id.
    """
    found: dict[str, Path] = {}
    with os.scandir(folder) as it:
        for e in it:
            stem, ext = os.path.splitext(e.name)
            if ext.lower() in VIDEO_EXTS and e.is_file():
                if stem in found:
                    raise VideoReadError(f"{folder}: video id {stem!r} is taken by both {found[stem].name} and "
                                         f"{e.name}")
                found[stem] = Path(e.path)
    return found


def encode_video(
    path: str | os.PathLike,
    frames: Sequence[np.ndarray],
    *,
    fps: float = 25.0,
    times: Sequence[float] | None = None,
    codec: str = "libx264",
    gop: int = 25,
    rotation: int = 0,
    faststart: bool = False,
    crf: int = 18,
) -> None:
    """Encode RGB uint8 frames with PyAV (H.264 by default, with B-frames), atomically; for tests and benchmarks.

    Unlike :func:`write_video` (OpenCV: constant rate, every codec's defaults) this controls what real files
    vary in: ``times`` (seconds per frame: variable rate, start offset), the keyframe interval ``gop``, a
    display ``rotation`` in degrees (as phones store it) and ``faststart`` (index before the data, so a cut
    file still opens).
    """
    if len(frames) == 0:
        raise ValueError(f"{path}: no frames to write")
    h, w = frames[0].shape[:2]
    times = list(times) if times is not None else [k / fps for k in range(len(frames))]
    if len(times) != len(frames) or any(b <= a for a, b in zip(times, times[1:], strict=False)):
        raise ValueError(f"{path}: times must be one increasing value per frame")
    tb = Fraction(1, 90000)
    options = {"movflags": "faststart"} if faststart else {}
    with atomic_path(path) as tmp:
        with av.open(os.fspath(tmp), "w", format=None, options=options) as out:
            stream = out.add_stream(codec, rate=_as_fraction(fps))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.time_base = stream.codec_context.time_base = tb
            stream.codec_context.gop_size = int(gop)
            if codec == "libx264":
                stream.options = {"crf": str(crf), "preset": "veryfast", "bf": "2"}
            if rotation:
                stream.set_display_rotation(float(rotation))
            for f, t in zip(frames, times, strict=True):
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
                vf.pts, vf.time_base = round(t * 90000), tb
                for packet in stream.encode(vf):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)


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
    import cv2  # imported here: evaluation and indexing never write videos

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
