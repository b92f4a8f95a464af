"""Clip export: a time range of an indexed video as its own MP4 (``search.py export``, ``GET /api/clip``).

Two ways, both with PyAV (no ffmpeg binary):

- **re-encoded, frame-exact** (default): the source frames on screen from ``start`` up to just before ``end``
  (the frame shown at ``start`` is the first, the last frame whose time is before ``end`` the last; the same
  timing rule as everywhere else, ``dataloaders/video_io.py``) are decoded and encoded again with H.264
  (CRF 18), their timestamps shifted so the clip starts at 0. A clip lasts ``end − start`` and holds exactly
  those frames; decoding and encoding stream, so a long clip is never held in memory.
- **stream copy** (``copy=True``): the compressed packets are copied, whole groups of pictures, from the
  keyframe at or before ``start`` to the keyframe at or after ``end`` (or the video's end). Fast and lossless,
  but it holds the keyframe-aligned range, which :class:`Clip` reports (``exact`` False).

A video indexed as a frame folder is exported from its frames (the frames ``k/F`` in ``[start, end)``,
encoded at F fps; copying does not apply). Only the video stream is written (no audio). Bad ranges are one
:class:`ExportError` line each: ``start >= end``, a range outside the video.
"""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from clip2video.fileio import atomic_path

CRF = 18
PRESET = "veryfast"


class ExportError(ValueError):
    """A clip that cannot be cut as asked (one line naming the video and the range)."""


@dataclass(frozen=True)
class Clip:
    """A written clip: the range of the source it holds (seconds), its frame count, and whether it is the
    frame-exact re-encoding (True) or a keyframe-aligned stream copy (False)."""

    path: Path
    start: float
    end: float
    frames: int
    exact: bool

    def describe(self, asked: tuple[float, float] | None = None) -> str:
        how = "re-encoded, frame-exact" if self.exact else "stream copy, cut at keyframes"
        extra = ""
        if asked is not None and not self.exact:
            extra = f"; asked {asked[0]:.3f}–{asked[1]:.3f} s"
        return f"{self.path}: {self.start:.3f}–{self.end:.3f} s, {self.frames} frames ({how}{extra})"


def check_range(start: float, end: float, duration: float | Fraction | None, what: str) -> None:
    """ExportError unless ``0 <= start < end <= duration`` (finite numbers)."""
    for name, x in (("start", start), ("end", end)):
        if not isinstance(x, (int, float, Fraction)) or not math.isfinite(float(x)):
            raise ExportError(f"{what}: {name} must be a number of seconds, got {x!r}")
    if start >= end:
        raise ExportError(f"{what}: start {start:g} s is not before end {end:g} s")
    if start < 0:
        raise ExportError(f"{what}: start {start:g} s is before the video's beginning (0 s)")
    if duration is not None and (end > float(duration) + 1e-6 or start >= float(duration)):
        raise ExportError(f"{what}: range {start:g}–{end:g} s is outside the video (0–{float(duration):.3f} s)")


def _rational(x: float) -> Fraction:
    return Fraction(x).limit_denominator(1_000_000) if not isinstance(x, Fraction) else x


def export_clip(source: str | os.PathLike, out: str | os.PathLike, start: float, end: float, *,
                kind: str = "file", fps: float | None = None, copy: bool = False, what: str | None = None) -> Clip:
    """Cut ``[start, end)`` seconds of ``source`` (a video file, or a frame folder with ``kind="frames"`` at
    ``fps`` frames per second) into ``out`` (written under a temporary name, then renamed).

    Raises:
        ExportError: a bad range, or ``copy`` of a frame folder.
        VideoReadError / FrameError: the source cannot be read.
    """
    what = what or os.fspath(source)
    if kind == "frames":
        if copy:
            raise ExportError(f"{what}: indexed as a frame folder; --copy needs a video file (export re-encodes "
                              "its frames)")
        return _export_frames(Path(source), Path(out), start, end, float(fps or 5.0), what)
    from clip2video.dataloaders.video_io import probe

    index = probe(source)
    check_range(start, end, index.duration, what)
    if copy:
        return _copy(Path(source), Path(out), start, end, index)
    return _reencode(Path(source), Path(out), start, end, index)


def _even(n: int) -> int:
    return max(2, n - n % 2)


def _encoder(container, rate: Fraction, width: int, height: int, time_base: Fraction):
    stream = container.add_stream("libx264", rate=rate)
    stream.width, stream.height, stream.pix_fmt = _even(width), _even(height), "yuv420p"
    stream.time_base = stream.codec_context.time_base = time_base
    stream.options = {"crf": str(CRF), "preset": PRESET}
    return stream


def _to_yuv(frame, width: int, height: int):
    """A decoded frame as the encoder takes it: upright, yuv420p, even size."""
    import av

    from clip2video.dataloaders.video_io import frame_rgb

    if getattr(frame, "rotation", 0):
        frame = av.VideoFrame.from_ndarray(frame_rgb(frame), format="rgb24")
    return frame.reformat(width=_even(width), height=_even(height), format="yuv420p")


def _reencode(src: Path, out: Path, start: float, end: float, index) -> Clip:
    import av

    from clip2video.dataloaders.video_io import frame_rgb, source_frames

    tb, t0 = index.time_base, index.pts[0]
    s_ts = t0 + _rational(start) / tb  # in time-base units (exact)
    e_ts = t0 + _rational(end) / tb
    first = max(0, bisect.bisect_right(index.pts, s_ts) - 1)  # the frame on screen at start
    stop = bisect.bisect_left(index.pts, e_ts)  # frames whose time is before end
    stop = max(stop, first + 1)
    rate = _rational(index.rate) if index.rate else Fraction(25)
    clip_end = round(e_ts - s_ts)  # the last frame stays on screen until end: the clip lasts end − start
    final = [None]  # output pts of the last frame, once known

    def mux(packets) -> None:
        for packet in packets:
            if final[0] is not None and packet.pts == final[0]:
                packet.duration = max(1, clip_end - final[0])
            oc.mux(packet)

    n = 0
    with atomic_path(out) as tmp, av.open(os.fspath(tmp), "w", format="mp4") as oc:
        stream = None
        last = -1
        for i, frame in source_frames(src, first, stop, index=index):
            if stream is None:
                h, w = frame_rgb(frame).shape[:2] if getattr(frame, "rotation", 0) else (frame.height, frame.width)
                stream = _encoder(oc, rate, w, h, tb)
                size = (w, h)
            vf = _to_yuv(frame, *size)
            pts = 0 if i == first else max(round(index.pts[i] - s_ts), last + 1)
            vf.pts, vf.time_base, last = pts, tb, pts
            if i == stop - 1:
                final[0] = pts
            mux(stream.encode(vf))
            n += 1
        if stream is None:
            raise ExportError(f"{src}: no frame in {start:g}–{end:g} s")
        mux(stream.encode())
    return Clip(out, float(start), float(end), n, True)


def _copy(src: Path, out: Path, start: float, end: float, index) -> Clip:
    import av

    from clip2video.dataloaders.video_io import _open

    tb, t0 = index.time_base, index.pts[0]
    s_ts = t0 + _rational(start) / tb
    e_ts = t0 + _rational(end) / tb
    keys = index.keyframe_pts or (index.pts[0],)
    first_frame = index.pts[max(0, bisect.bisect_right(index.pts, s_ts) - 1)]
    k0 = keys[max(0, bisect.bisect_right(keys, first_frame) - 1)]
    j = bisect.bisect_left(keys, e_ts)
    k1 = keys[j] if j < len(keys) else None  # None: to the end of the video
    n = 0
    container, stream = _open(src)
    try:
        with atomic_path(out) as tmp, av.open(os.fspath(tmp), "w", format="mp4") as oc:
            ost = oc.add_stream_from_template(stream)
            container.seek(int(k0), stream=stream, backward=True, any_frame=False)
            started = False
            for packet in container.demux(stream):
                if packet.dts is None or not packet.size:
                    continue
                if not started:
                    if not (packet.is_keyframe and packet.pts is not None and packet.pts >= k0):
                        continue  # the seek landed a group of pictures early
                    started = True
                if k1 is not None and packet.is_keyframe and packet.pts is not None and packet.pts >= k1:
                    break
                packet.pts = None if packet.pts is None else packet.pts - k0
                packet.dts -= k0
                packet.stream = ost
                oc.mux(packet)
                n += 1
    finally:
        container.close()
    held_end = index.duration if k1 is None else (k1 - t0) * tb
    return Clip(out, float((k0 - t0) * tb), float(held_end), n, False)


def _export_frames(folder: Path, out: Path, start: float, end: float, fps: float, what: str) -> Clip:
    import av

    from clip2video.dataloaders.frames import list_frame_files, read_frame_rgb, segment_frames

    files = list_frame_files(folder)
    rate = _rational(fps)
    check_range(start, end, Fraction(len(files)) / rate, what)
    first, stop = segment_frames(start, end, rate, len(files))
    if stop <= first:
        raise ExportError(f"{what}: no frame in {start:g}–{end:g} s at {fps:g} fps")
    tb = 1 / rate
    with atomic_path(out) as tmp, av.open(os.fspath(tmp), "w", format="mp4") as oc:
        stream = None
        for k in range(first, stop):
            rgb = read_frame_rgb(folder / files[k])
            if stream is None:
                stream = _encoder(oc, rate, rgb.shape[1], rgb.shape[0], tb)
                size = (rgb.shape[1], rgb.shape[0])
            vf = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(width=_even(size[0]),
                                                                           height=_even(size[1]), format="yuv420p")
            vf.pts, vf.time_base = k - first, tb
            for packet in stream.encode(vf):
                oc.mux(packet)
        for packet in stream.encode():
            oc.mux(packet)
    return Clip(out, float(Fraction(first) / rate), float(min(Fraction(stop) / rate, _rational(end))), stop - first,
                True)


__all__ = ["Clip", "ExportError", "check_range", "export_clip"]
