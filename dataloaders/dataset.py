"""Torch datasets over frame folders or video files: one video per item (evaluation) and one caption–video pair
(training).

``features_path`` holds, per video id, a frame folder ``<id>/`` or a video file ``<id>.mp4`` (any of
:data:`~dataloaders.video_io.VIDEO_EXTS`), read directly as if extracted at ``video_fps``
(:func:`~dataloaders.frames.load_video_file`); a folder holding both resolves per video, frame folder first,
and the log says how many of each were used. Decoder threads per process are the cores divided by the
DataLoader workers, so workers × threads never oversubscribes the machine.

Both are plain, picklable objects (paths, ids and a tokenizer), so ``DataLoader`` workers can be spawned or
forked. Randomness never comes from worker or global state: a training sample's jitter is drawn from
``np.random.default_rng([seed, epoch, index])``, so a run gives the same frames whatever the number of
workers or processes (the same idea as open_clip/webdataset's per-sample seeding derived from the epoch).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .frames import MODES, FrameError, check_video, check_video_file, load_video, load_video_file
from .video_io import DEFAULT_VIDEO_FPS, decoder_threads, list_video_files

logger = logging.getLogger(__name__)

Tokenizer = Callable[[str], tuple[np.ndarray, np.ndarray]]


def _check_common(features_path: str | os.PathLike, max_frames: int, framerate: int, mode: str,
                  video_fps: float = DEFAULT_VIDEO_FPS) -> Path:
    root = Path(features_path)
    if not root.is_dir():
        raise FileNotFoundError(f"--features_path {root}: no such folder (folder of frame folders or video files)")
    if not (video_fps > 0 and math.isfinite(video_fps)):
        raise ValueError(f"--video_fps must be a positive number, got {video_fps}")
    if max_frames < 1:
        raise ValueError(f"--max_frames must be >= 1, got {max_frames}")
    if framerate < 1:
        raise ValueError(f"--feature_framerate must be an integer >= 1 (a decimation factor), got {framerate}")
    if mode not in MODES:
        raise ValueError(f"--image_mode must be one of {MODES}, got {mode!r}")
    return root


def resolve_sources(root: Path, video_ids: Sequence[str], video_fps: float) -> list[tuple[Path, bool]]:
    """(path, is_video_file) per id: the frame folder ``root/<id>`` if there is one, else ``root/<id>.<ext>``.

    An id with neither maps to its (missing) folder, whose read then fails naming it. Logs the counts.
    """
    videos: dict[str, Path] | None = None
    out = []
    for v in video_ids:
        folder = root / v
        if folder.is_dir():
            out.append((folder, False))
            continue
        if videos is None:
            videos = list_video_files(root)  # listed once, only when some id has no folder
        out.append((videos[v], True) if v in videos else (folder, False))
    n_files = sum(f for _, f in out)
    if n_files:
        logger.info("%s: %d frame folders, %d video files (read directly at %g fps)", root, len(out) - n_files,
                    n_files, video_fps)
    return out


def _worker_threads() -> int:
    """Decoder threads for this process: the cores shared by the DataLoader's workers."""
    info = torch.utils.data.get_worker_info()
    return decoder_threads(info.num_workers if info is not None else 0)


def _load(source: tuple[Path, bool], *, video_fps: float, **kw) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    path, is_file = source
    if is_file:
        return load_video_file(path, fps=video_fps, threads=_worker_threads(), **kw)
    return load_video(path, **kw)


class VideoDataset(Dataset):
    """One item per video: ``{"frames": (T, 3, S, S) float32, "mask": (T,) long, "index": int}``.

    Evaluation reads every video exactly once (the original decoded a video once per caption). ``index`` is
    the video's position in the ``video_ids`` given to the constructor (its similarity column), also when
    ``skip_bad`` removed some videos.

    Args:
        video_ids: frame folder names (or video file names without extension) under ``features_path``.
        features_path: folder of frame folders and/or video files.
        max_frames: T (the original's ``--max_frames``).
        framerate: the original's ``--feature_framerate`` (decimation factor on the file list).
        image_size: S.
        mode: ``"exact"`` (the original's pixels) or ``"fast"`` (see :mod:`dataloaders.frames`).
        skip_bad: check every folder at construction (:meth:`validate`) and drop bad ones with a logged count;
            without it a bad video raises :class:`FrameError` when read. Never a silent zero tensor.
        video_fps: rate of the virtual extraction for video files (``sample_frame.py --fps``).
    """

    def __init__(
        self,
        video_ids: Sequence[str],
        features_path: str | os.PathLike,
        *,
        max_frames: int = 12,
        framerate: int = 1,
        image_size: int = 224,
        mode: str = "exact",
        skip_bad: bool = False,
        video_fps: float = DEFAULT_VIDEO_FPS,
    ) -> None:
        self.root = _check_common(features_path, max_frames, framerate, mode, video_fps)
        self.video_ids = list(video_ids)
        self.video_fps = float(video_fps)
        self.sources = resolve_sources(self.root, self.video_ids, self.video_fps)
        self.max_frames, self.framerate, self.image_size, self.mode = max_frames, framerate, image_size, mode
        self.indices = list(range(len(self.video_ids)))
        if skip_bad:
            bad = dict(self.validate())
            if bad:
                logger.warning("skipping %d of %d videos with unusable frame folders, e.g. %s", len(bad),
                               len(self.video_ids), next(iter(bad.values())))
                self.indices = [i for i in self.indices if self.video_ids[i] not in bad]

    def validate(self) -> list[tuple[str, str]]:
        """(video_id, reason) for every video whose folder is missing, empty or too short to sample, or whose
        file is unreadable, truncated or too short.

        Cheap (listing, or a demux pass for files; no decoding): unreadable frames still raise when read.
        """
        out = []
        for v, (path, is_file) in zip(self.video_ids, self.sources, strict=True):
            if is_file:
                reason = check_video_file(path, fps=self.video_fps, framerate=self.framerate,
                                          max_frames=self.max_frames)
            else:
                reason = check_video(path, framerate=self.framerate, max_frames=self.max_frames)
            if reason is not None:
                out.append((v, reason))
        return out

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        idx = self.indices[i]
        video_id = self.video_ids[idx]
        try:
            frames, mask, _ = _load(self.sources[idx], video_fps=self.video_fps, max_frames=self.max_frames,
                                    framerate=self.framerate, image_size=self.image_size, mode=self.mode)
        except FrameError as e:  # named as in PairDataset: the id first, then the folder or file
            raise FrameError(f"video {video_id!r}: {e}") from None
        return {"frames": frames, "mask": mask, "index": idx}


class PairDataset(Dataset):
    """One item per (video, caption) pair, for training.

    Item: ``{"input_ids": (L,) long, "attention_mask": (L,) long, "frames": (T, 3, S, S) float32,
    "frame_mask": (T,) long, "index": int}``.

    Args:
        pairs: (video_id, caption) samples (e.g. :class:`dataloaders.annotations.PairSet` ``.pairs``).
        features_path: folder of frame folders.
        tokenizer: caption → (ids, mask) int64 arrays, e.g. ``modules.tokenizer.ClipTokenizer``.
        max_frames, framerate, image_size, mode, video_fps: as in :class:`VideoDataset`.
        seed: base seed of the temporal jitter.
        jitter: apply the original's training-time jitter of frame positions.

    Call :meth:`set_epoch` at the start of every epoch so the jitter changes between epochs while staying a
    function of (seed, epoch, index) only.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        features_path: str | os.PathLike,
        tokenizer: Tokenizer,
        *,
        max_frames: int = 12,
        framerate: int = 1,
        image_size: int = 224,
        mode: str = "exact",
        seed: int = 0,
        jitter: bool = True,
        video_fps: float = DEFAULT_VIDEO_FPS,
    ) -> None:
        self.root = _check_common(features_path, max_frames, framerate, mode, video_fps)
        self.pairs = [(str(v), str(c)) for v, c in pairs]
        if not self.pairs:
            raise ValueError("PairDataset: no (video_id, caption) pairs")
        self.video_fps = float(video_fps)
        ids = list(dict.fromkeys(v for v, _ in self.pairs))
        self.sources = dict(zip(ids, resolve_sources(self.root, ids, self.video_fps), strict=True))
        self.tokenizer = tokenizer
        self.max_frames, self.framerate, self.image_size, self.mode = max_frames, framerate, image_size, mode
        self.seed, self.jitter, self.epoch = int(seed), bool(jitter), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose jitter to draw.

        DataLoader workers copy the dataset when an iterator starts, so call this before iterating each epoch
        (with ``persistent_workers=True`` the workers keep the epoch they were started with).
        """
        self.epoch = int(epoch)

    def rng(self, i: int) -> np.random.Generator | None:
        """The generator of sample ``i`` in the current epoch (None without jitter)."""
        return np.random.default_rng([self.seed, self.epoch, i]) if self.jitter else None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        video_id, caption = self.pairs[i]
        ids, mask = self.tokenizer(caption)
        try:
            frames, frame_mask, _ = _load(self.sources[video_id], video_fps=self.video_fps,
                                          max_frames=self.max_frames, framerate=self.framerate,
                                          image_size=self.image_size, mode=self.mode, rng=self.rng(i))
        except FrameError as e:
            raise FrameError(f"video {video_id!r}: {e}") from None
        return {
            "input_ids": torch.as_tensor(ids, dtype=torch.long),
            "attention_mask": torch.as_tensor(mask, dtype=torch.long),
            "frames": frames,
            "frame_mask": frame_mask,
            "index": i,
        }


__all__ = ["PairDataset", "VideoDataset", "resolve_sources"]
