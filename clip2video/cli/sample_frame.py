"""Extract JPEG (or PNG) frames from a folder of videos: ``FRAMES/<video_id>/00000001.jpg, ...``.

    python sample_frame.py --input_path VIDEOS --output_path FRAMES [--fps 5] [--workers N] [--quality 95]
                           [--format jpg|png]

The original CLIP2Video called the ffmpeg binary at 5 fps; this decodes with the project's one decoder
(``dataloaders/video_io.py``, PyAV: no binary, no shell, so any file name works) and picks frames by
presentation time so that the output rate is ``--fps`` whatever the source rate (a source without
timestamps or a usable fps is assumed to run at ``--fallback_fps``, 25 by default, and the summary says so per
video). Evaluation and training can also read the videos directly with the same decoder; ``--format png``
stores the decoded pixels losslessly, so those frames equal what direct reading sees, byte for byte.

Each video is written into ``FRAMES/.tmp-<video_id>-<pid>`` and renamed to ``FRAMES/<video_id>`` once
complete: a final folder is always a whole video, so a re-run skips every existing one and an interrupted run
leaves only temp folders, which the next run removes (those whose process is gone). Broken videos are listed
with a reason at the end; the exit status is 1 if any failed, 2 for bad flags.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import cv2
from tqdm import tqdm

from clip2video.cli.common import OneLineParser, UsageError
from clip2video.dataloaders.video_io import (
    DEFAULT_FALLBACK_FPS,
    DEFAULT_VIDEO_FPS,
    FrameResampler,
    VideoReadError,
    quiet_backend,
)
from clip2video.fileio import TMP_PREFIX, atomic_dir

DEFAULT_EXTS = ".mp4,.avi,.mkv,.webm,.mov,.m4v,.mpg,.mpeg,.wmv,.flv,.3gp,.ogv"
STALE_AFTER_S = 3600.0
"""A temp folder untouched this long is stale even if its pid is alive again (pid reuse)."""
FORMATS = {"jpg": ".jpg", "png": ".png"}
"""``--format`` → frame file extension (PNG: lossless, the decoder's pixels exactly)."""


@dataclass
class Outcome:
    """What happened to one video (returned from worker processes, so plain data)."""

    name: str
    status: str  # "done" | "skipped" | "failed"
    frames: int = 0
    reason: str = ""
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------- one video


def _write_frame(path: Path, frame, quality: int) -> None:
    """Encode in memory and write with Python I/O: ``cv2.imwrite`` fails on some non-ASCII paths elsewhere.

    The encoder follows the file's extension: ``.png`` is lossless (``quality`` unused), anything else JPEG.
    """
    if path.suffix == ".png":
        ok, buf = cv2.imencode(".png", frame, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise OSError(f"{path}: {path.suffix[1:].upper()} encoding failed")
    with open(path, "wb") as f:
        f.write(buf.tobytes())


def _extract(
    path: Path,
    out_dir: Path,
    fps: float,
    quality: int,
    *,
    fallback_fps: float = DEFAULT_FALLBACK_FPS,
    allow_truncated: bool = False,
    ext: str = ".jpg",
) -> tuple[int, list[str]]:
    """``extract_video`` returning the warnings too (unknown source fps, kept truncated part)."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: already exists")  # before decoding, not after
    with atomic_dir(out_dir) as tmp:  # no final folder unless the video is complete
        reader = FrameResampler(path, fps, fallback_fps=fallback_fps, allow_truncated=allow_truncated)
        n = 0
        for frame in reader:
            n += 1
            _write_frame(tmp / f"{n:08d}{ext}", frame, quality)
        if n == 0:  # the reader raises first; kept so that no code path can publish an empty folder
            raise VideoReadError(f"{path}: no frames written")
    return n, reader.warnings


def extract_video(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    fps: float = DEFAULT_VIDEO_FPS,
    quality: int = 95,
    *,
    fallback_fps: float = DEFAULT_FALLBACK_FPS,
    allow_truncated: bool = False,
    fmt: str = "jpg",
) -> int:
    """Write the frames of one video at ``fps`` as ``out_dir/00000001.jpg, ...``, all or nothing.

    Frames go to a temporary sibling folder that is renamed to ``out_dir`` only once the video is complete, so
    ``out_dir`` exists iff the extraction finished (an exception or interrupt removes the temp folder).

    Args:
        path: video file.
        out_dir: final frame folder; must not exist yet (or be empty).
        fps: output frames per second (> 0).
        quality: JPEG quality 1..100.
        fallback_fps: source rate assumed when the file reports none.
        allow_truncated: keep the decodable part of a file that stops short of its header's frame count.
        fmt: ``"jpg"`` or ``"png"`` (lossless: the decoder's pixels exactly).

    Returns:
        Number of frames written.

    Raises:
        VideoReadError: unreadable, empty, truncated or zero-frame video.
        FileExistsError: ``out_dir`` already holds files.
        OSError: the output cannot be written.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FORMATS)} (got {fmt!r})")
    n, _ = _extract(
        Path(path), Path(out_dir), fps, quality, fallback_fps=fallback_fps, allow_truncated=allow_truncated,
        ext=FORMATS[fmt],
    )
    return n


def _job(path: str, out_dir: str, fps: float, quality: int, fallback_fps: float, allow_truncated: bool,
         ext: str = ".jpg") -> Outcome:
    """Extract one video, never raising (except interrupts): failures become an ``Outcome`` with a reason."""
    name = Path(path).name
    t0 = time.perf_counter()
    try:
        n, warnings = _extract(
            Path(path), Path(out_dir), fps, quality, fallback_fps=fallback_fps, allow_truncated=allow_truncated,
            ext=ext,
        )
    except FileExistsError as e:
        return Outcome(name, "skipped", reason=str(e), seconds=time.perf_counter() - t0)
    except VideoReadError as e:
        return Outcome(name, "failed", reason=_strip_path(str(e), path), seconds=time.perf_counter() - t0)
    except Exception as e:  # disk full, permissions, codec crash surfacing as cv2.error: report, keep going
        return Outcome(name, "failed", reason=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
    return Outcome(name, "done", n, warnings=warnings, seconds=time.perf_counter() - t0)


def _strip_path(msg: str, path: str) -> str:
    """The summary already names the file: drop the ``<path>: `` prefix of reader errors."""
    prefix = f"{path}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def _init_worker(quiet: bool) -> None:
    # One decoder thread per process: the pool already uses every core, and OpenCV's own threads would
    # oversubscribe them.
    cv2.setNumThreads(1)
    if quiet:
        quiet_backend()


# --------------------------------------------------------------------------------------------- the batch


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # nothing of ours is running while a batch starts
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except (OverflowError, ValueError, OSError):
        return False
    return True


def clean_stale_temps(output_path: Path) -> list[str]:
    """Remove temp folders left by interrupted runs; return their names.

    A temp folder belongs to a live run if its pid (the last ``-`` field) is alive on this host and it was
    touched within ``STALE_AFTER_S``; those are left alone so that two runs can share an output folder.
    """
    removed = []
    for entry in output_path.iterdir():
        if not entry.name.startswith(TMP_PREFIX) or not entry.is_dir():
            continue
        pid_text = entry.name.rsplit("-", 1)[-1]
        pid = int(pid_text) if pid_text.isdigit() else -1
        try:
            age = time.time() - entry.stat().st_mtime
        except FileNotFoundError:
            continue
        if pid > 0 and _pid_alive(pid) and age < STALE_AFTER_S:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    return removed


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # vanished since listing: its job reports it
        return 0


def _show(text: str) -> str:
    """Printable form of a file name that may hold undecodable bytes (surrogate escapes)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _positive_float(flag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{flag} must be a number (got {text!r})") from None
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{flag} must be > 0 (got {text})")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_path", required=True, help="folder of video files (not searched recursively)")
    p.add_argument("--output_path", required=True, help="folder that receives one frame folder per video")
    p.add_argument("--fps", default=f"{DEFAULT_VIDEO_FPS:g}",
                   help=f"output frames per second (default {DEFAULT_VIDEO_FPS:g}, as the original)")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="processes (default: cores)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality 1..100 (default 95)")
    p.add_argument("--format", default="jpg", choices=sorted(FORMATS),
                   help="jpg (default, quality --quality) or png (lossless: equal to direct reading's pixels)")
    p.add_argument("--ext", default=DEFAULT_EXTS, help="comma-separated video extensions, case-insensitive")
    p.add_argument(
        "--fallback_fps",
        default=str(DEFAULT_FALLBACK_FPS),
        help="source rate assumed for files that report no fps (default 25)",
    )
    p.add_argument(
        "--allow_truncated",
        action="store_true",
        help="keep the decodable part of files that stop short of their header's frame count (default: fail)",
    )
    p.add_argument("--verbose", action="store_true", help="let OpenCV/FFmpeg print their own decoder messages")
    return p


def _check_args(args: argparse.Namespace) -> tuple[Path, Path, float, float, list[str]]:
    inp = Path(args.input_path)
    if not inp.exists():
        raise UsageError(f"--input_path {args.input_path!r} does not exist")
    if not inp.is_dir():
        raise UsageError(f"--input_path {args.input_path!r} is not a folder")
    out = Path(args.output_path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_path {args.output_path!r} exists and is not a folder")
    inp_r, out_r = inp.resolve(), out.resolve()
    if out_r == inp_r or inp_r in out_r.parents:
        raise UsageError(f"--output_path {args.output_path!r} is inside --input_path {args.input_path!r}")
    fps = _positive_float("--fps", args.fps)
    fallback = _positive_float("--fallback_fps", args.fallback_fps)
    if not 1 <= args.quality <= 100:
        raise UsageError(f"--quality must be in 1..100 (got {args.quality})")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1 (got {args.workers})")
    exts = [e.strip().lower() for e in args.ext.split(",") if e.strip()]
    exts = [e if e.startswith(".") else "." + e for e in exts]
    if not exts:
        raise UsageError(f"--ext names no extension (got {args.ext!r})")
    return inp, out, fps, fallback, exts


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 some videos failed, 2 bad flags)."""
    prog = "sample_frame.py"
    try:
        args = build_parser().parse_args(argv)
        inp, out, fps, fallback, exts = _check_args(args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)

    try:
        videos = sorted(p for p in inp.iterdir() if p.suffix.lower() in exts and p.is_file())
    except OSError as e:
        print(f"{prog}: error: --input_path {str(inp)!r} cannot be listed ({e.strerror or e})", file=sys.stderr)
        return 2
    if not videos:
        print(f"{prog}: error: --input_path {str(inp)!r} holds no files with --ext {','.join(exts)}", file=sys.stderr)
        return 2
    if not args.verbose:
        quiet_backend()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"{prog}: error: --output_path {str(out)!r} cannot be created ({e.strerror or e})", file=sys.stderr)
        return 2
    stale = clean_stale_temps(out)
    if stale:
        print(f"removed {len(stale)} unfinished folder(s) of an interrupted run", file=sys.stderr)

    outcomes: list[Outcome] = []
    todo: list[Path] = []
    first_of: dict[str, str] = {}
    for v in videos:
        vid = v.stem
        if vid in first_of:
            outcomes.append(Outcome(v.name, "failed", reason=f"video id {vid!r} already taken by {first_of[vid]}"))
            continue
        first_of[vid] = v.name
        if vid.startswith(TMP_PREFIX):
            outcomes.append(Outcome(v.name, "failed", reason=f"video id may not start with {TMP_PREFIX!r}"))
            continue
        final = out / vid
        if final.is_dir() and any(final.iterdir()):
            outcomes.append(Outcome(v.name, "skipped", reason="frames already extracted"))
        else:
            todo.append(v)

    # Largest first: the long videos start early instead of one of them running alone at the end.
    todo.sort(key=_size, reverse=True)
    jobs = [(os.fspath(v), os.fspath(out / v.stem), fps, args.quality, fallback, args.allow_truncated,
             FORMATS[args.format]) for v in todo]
    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), unit="video", desc="frames", file=sys.stderr, disable=None)
    try:
        if args.workers == 1 or len(jobs) <= 1:
            for job in jobs:
                outcomes.append(_job(*job))
                bar.update()
        else:
            with ProcessPoolExecutor(
                max_workers=min(args.workers, len(jobs)), initializer=_init_worker, initargs=(not args.verbose,)
            ) as pool:
                futures = {pool.submit(_job, *job): Path(job[0]).name for job in jobs}
                for fut in as_completed(futures):
                    try:
                        outcomes.append(fut.result())
                    except Exception as e:  # a worker died (e.g. killed for memory): the batch goes on
                        outcomes.append(Outcome(futures[fut], "failed", reason=f"worker crashed: {e!r}"))
                    bar.update()
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0

    done = [o for o in outcomes if o.status == "done"]
    skipped = [o for o in outcomes if o.status == "skipped"]
    failed = sorted((o for o in outcomes if o.status == "failed"), key=lambda o: o.name)
    for o in sorted(done, key=lambda o: o.name):
        for w in o.warnings:
            print(f"WARNING {_show(o.name)}: {_show(w)}", file=sys.stderr)
    for o in failed:
        print(f"FAILED {_show(o.name)}: {_show(o.reason)}", file=sys.stderr)
    n_frames = sum(o.frames for o in done)
    rate = f", {n_frames / elapsed:.0f} frames/s" if done and elapsed > 0 else ""
    print(
        f"{len(videos)} videos: done {len(done)} ({n_frames} frames in {elapsed:.1f}s{rate}), "
        f"skipped {len(skipped)}, failed {len(failed)}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
