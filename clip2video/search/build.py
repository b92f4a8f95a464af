"""Building a search index: list the videos, encode what is new, write a generation (format: ``store.py``).

Steps of :func:`build_from_folder`:

1. :func:`list_videos` walks the folder: a sub-folder holding image files is one video (a frame folder, as
   ``sample_frame.py`` writes it); files with a video extension (``dataloaders.video_io.VIDEO_EXTS``) are
   videos read by the direct decoder. :func:`read_source` is the one function that turns a listed video into
   frames, so pointing indexing at another decoder is a change in one place.
2. Each video's (size, mtime) is compared with the vectors already on disk (the live generation and any
   shard an interrupted build left behind, encoded with the same model and settings); only the rest is encoded.
3. Under ``torchrun`` the videos to encode go round by round through ``modules.sharding`` (each rank its
   contiguous share, ``gather_rows`` to put the rows back in order); rank 0 writes each round's shard and, at
   the end, the generation. Rows are sorted by video id, so N processes build the same index as one.

Video vectors always use the ``per_video`` mask layout: an index needs a vector that depends on the video
alone, while the ``original`` layout (released checkpoints) makes it depend on the other videos of a batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip2video import fileio
from clip2video.fileio import atomic_dir, sha256_file
from clip2video.modules.weights.identity import ModelRecord
from clip2video.search.files import IMAGE_EXTS, id_problem, scan_frame_folder, scan_video_file
from clip2video.search.qb import BankRequest, bank_writer, encode_bank
from clip2video.search.segments import SegmentSettings
from clip2video.search.store import (
    CURRENT,
    FORMAT_VERSION,
    SHARDS,
    THUMBS,
    IndexFormatError,
    IndexWriteError,
    Item,
    build_step,
    list_shards,
    read_manifest,
    read_shard_items,
    remove_stale_temps,
    shard_intact,
    write_generation,
    write_shard,
)

logger = logging.getLogger("clip2video.cli.search")

THUMB_SIZE = 160


# ----------------------------------------------------------------------------------------------- listing
@dataclass
class Source:
    video_id: str
    path: str  # a real path (links resolved, or none on the way)
    kind: str  # "frames" | "file"
    size: int
    mtime_ns: int
    frames: int | None
    root: str = ""  # every file served for this video must lie under it (``files.py``)
    files: list[list[Any]] = field(default_factory=list)  # [name relative to path, size, mtime_ns]


def list_videos(root: str | os.PathLike, *, follow_symlinks: bool = False,
                refused: list[tuple[str, str]] | None = None) -> list[Source]:
    """Every video under ``root``, sorted by id (relative path; a video file's id drops its extension).

    Symbolic links (to folders, to video files, inside frame folders) are followed only with
    ``follow_symlinks``; otherwise each is skipped with one log line. Videos whose id is unsafe
    (``files.id_problem``) are skipped; they and the skipped links are appended to ``refused`` as (id or
    path, reason) when it is given.
    """
    from clip2video.dataloaders.video_io import VIDEO_EXTS

    root = os.path.realpath(os.fspath(root))
    out: dict[str, Source] = {}
    seen: set[str] = set()  # real folders already walked (links can make loops)

    def refuse(what: str, why: str) -> None:
        if refused is not None:
            refused.append((what, why))  # the caller reports it (one line)
        else:
            logger.warning("%s: not indexed: %s", what, why)

    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            if not follow_symlinks and os.path.islink(os.path.join(dirpath, d)):
                refuse(os.path.join(dirpath, d), "a symbolic link to a folder; links are not followed unless "
                       "the build is given --follow_symlinks")
                continue
            keep.append(d)
        dirnames[:] = keep
        rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
        if dirpath != root and any(f.lower().endswith(IMAGE_EXTS) for f in filenames):
            dirnames[:] = []
            why = id_problem(rel)
            if why:
                refuse(repr(rel), f"video id {why}")
                continue
            rec, why = scan_frame_folder(dirpath, follow_symlinks=follow_symlinks)
            if rec is None:
                refuse(rel, why)
                continue
            out[rel] = Source(rel, rec["path"], "frames", rec["size"], rec["mtime_ns"], rec["count"],
                              rec["root"] or root, rec["files"])
            continue
        for f in sorted(filenames):
            if f.lower().endswith(VIDEO_EXTS) and not f.startswith("."):
                p = os.path.join(dirpath, f)
                vid = (f if rel == "." else f"{rel}/{f}").rsplit(".", 1)[0]
                why = id_problem(vid)
                if why:
                    refuse(repr(vid), f"video id {why}")
                    continue
                if vid in out:
                    logger.warning("%s: skipped, id %r is already taken by %s", p, vid, out[vid].path)
                    continue
                rec, why = scan_video_file(p, follow_symlinks=follow_symlinks)
                if rec is None:
                    refuse(p, why)
                    continue
                out[vid] = Source(vid, rec["path"], "file", rec["size"], rec["mtime_ns"], None, rec["root"] or root,
                                  rec["files"])
    return [out[k] for k in sorted(out)]


def read_source(src: Source, *, max_frames: int, framerate: int, image_size: int, mode: str,
                video_fps: float | None = None) -> tuple[torch.Tensor, torch.Tensor, list[Any], dict[str, Any]]:
    """A listed video → (frames (T, 3, S, S), mask (T,), thumbnail sources, info {duration, frames}).

    Thumbnail sources are image paths (frame folders) or HxWx3 uint8 arrays (decoded videos).
    """
    from clip2video.dataloaders.frames import load_video

    if src.kind == "frames":
        frames, mask, chosen = load_video(src.path, max_frames=max_frames, framerate=framerate,
                                          image_size=image_size, mode=mode)
        picks = [chosen[i] for i in sorted({0, len(chosen) // 2, len(chosen) - 1})]
        duration = src.frames / video_fps if video_fps and src.frames else None
        return frames, mask, [os.path.join(src.path, c) for c in picks], {"duration": duration, "frames": src.frames}
    from clip2video.dataloaders.frames import load_video_file
    from clip2video.dataloaders.video_io import DEFAULT_VIDEO_FPS, decode_outputs, probe

    # the frames an extraction at ``fps`` followed by reading the folder would give
    fps = video_fps or DEFAULT_VIDEO_FPS
    frames, mask, names = load_video_file(src.path, fps=fps, max_frames=max_frames, framerate=framerate,
                                          image_size=image_size, mode=mode)
    index = probe(src.path)
    pos = [int(n) - 1 for n in names]
    picks = [pos[i] for i in sorted({0, len(pos) // 2, len(pos) - 1})] if pos else []
    thumbs = decode_outputs(src.path, picks, fps, index=index) if picks else []
    return frames, mask, list(thumbs), {"duration": float(index.duration), "frames": int(index.n_output(fps))}


def write_thumbnails(index_dir: Path, key: str, sources: Sequence[Any],
                     names: Sequence[str] | None = None) -> tuple[list[str], list[list[Any]]]:
    """Small JPEGs (longest side ``THUMB_SIZE``) under ``thumbs/<key>/`` named ``names`` (default 0, 1, ...):
    (paths relative to the index folder, [size, mtime_ns, sha256] of each, the record the server checks before
    serving one).

    An image that cannot be read is a ValueError/OSError for the caller to report; a failed write (a full
    disk) is an IndexWriteError that stops the build.
    """
    from PIL import Image

    d = index_dir / THUMBS / key
    rels, stats = [], []
    for i, s in enumerate(sources):
        name = names[i] if names is not None else str(i)
        im = Image.open(s).convert("RGB") if isinstance(s, str) else Image.fromarray(np.asarray(s))
        im.thumbnail((THUMB_SIZE, THUMB_SIZE))
        with build_step("writing a thumbnail", d / f"{name}.jpg"):
            d.mkdir(parents=True, exist_ok=True)
            with fileio.atomic_path(d / f"{name}.jpg") as tmp:
                im.save(tmp, quality=85)
            st = (d / f"{name}.jpg").lstat()
            stats.append([st.st_size, st.st_mtime_ns, sha256_file(d / f"{name}.jpg")])
        rels.append(f"{THUMBS}/{key}/{name}.jpg")
    return rels, stats


class _SourceDataset(torch.utils.data.Dataset):
    """Videos for encoding; a video that cannot be read becomes an error item, not an exception."""

    def __init__(self, sources: Sequence[Source], settings: dict[str, Any]):
        self.sources, self.settings = list(sources), settings

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            frames, mask, thumbs, info = read_source(self.sources[i], **self.settings)
        except (ValueError, OSError, RuntimeError) as e:
            return {"index": i, "error": _first_line(e)}
        return {"index": i, "frames": frames, "mask": mask, "thumbs": thumbs, "info": info}


class _SegmentStream(torch.utils.data.IterableDataset):
    """Videos read for their segments (``segments.stream_segments``): each reader process takes every n-th
    video and sends its messages tagged with the video's position; a video that cannot be read ends with an
    ``error`` message instead of an exception (the segments already sent for it are dropped). A thumbnail
    that cannot be written for lack of space stops the build, as in a build without segments."""

    def __init__(self, sources: Sequence[Source], settings: dict[str, Any], index_dir: Path, workers: int):
        from clip2video.dataloaders.video_io import decoder_threads

        self.sources, self.settings, self.index_dir = list(sources), settings, index_dir
        self.threads = decoder_threads(workers)

    def __iter__(self):
        from clip2video.search.segments import stream_segments

        info = torch.utils.data.get_worker_info()
        mine = range(len(self.sources)) if info is None else range(info.id, len(self.sources), info.num_workers)
        for i in mine:
            src = self.sources[i]
            key = thumb_key(src)
            try:
                for msg in stream_segments(src.kind, src.path, **self.settings, threads=self.threads,
                                           thumb=lambda k, rgb, key=key: _one_thumbnail(self.index_dir, key, k, rgb)):
                    yield dict(msg, index=i)
            except IndexWriteError:
                raise
            except (ValueError, OSError, RuntimeError) as e:
                yield {"kind": "error", "index": i, "error": _first_line(e)}


def thumb_key(src: Source) -> str:
    """Thumbnail folder of a video's state (a changed file gets new thumbnails)."""
    return hashlib.sha1(f"{src.video_id}|{src.size}|{src.mtime_ns}".encode()).hexdigest()[:20]


def _one_thumbnail(index_dir: Path, key: str, k: int, rgb: np.ndarray) -> tuple[str, list[Any]] | None:
    """Frame k's thumbnail: (path relative to the index folder, its record), or None where it cannot be made."""
    try:
        rels, stats = write_thumbnails(index_dir, key, [rgb], names=[str(k)])
    except IndexWriteError:
        raise
    except (OSError, ValueError) as e:
        logger.warning("thumbnail of frame %d in %s not written (%s)", k, key, e)
        return None
    return rels[0], stats[0]


def _first_line(exc: BaseException) -> str:
    """An exception as the one line a skipped video is reported with."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


# ----------------------------------------------------------------------------------------------- build
@dataclass
class BuildResult:
    index: Path
    count: int  # videos
    encoded: int
    reused: int
    removed: int
    failed: list[tuple[str, str]]
    vectors: int = 0  # rows of the index: videos, or segments
    timings: dict[str, float] = field(default_factory=dict)  # segmented builds: seconds reading, in the tower, heads


def encoding_key(fingerprint: str, settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([fingerprint, settings], sort_keys=True).encode()).hexdigest()[:20]


def _reusable(folder: Path, key: str) -> dict[str, list[tuple[Item, str, int]]]:
    """video id → [(item, shard, row)] (one per segment) for the vectors on disk encoded under ``key``; a video's
    vectors all come from one shard (the live generation's first).

    A shard whose ``.npy`` no longer has the size and SHA-256 recorded when it was written is not reused (one
    log line): its videos are encoded again, so a re-run repairs a damaged index.
    """
    found: dict[str, list[tuple[Item, str, int]]] = {}
    live: list[str] = []
    try:
        _, manifest = read_manifest(folder)
        live = list(manifest["shards"])
    except IndexFormatError:
        pass
    names = [s for s in list_shards(folder) if s not in live] + live  # live shards win (applied last)
    for name in names:
        got = read_shard_items(folder, name)
        if got is None or got[0] != key:
            continue
        if not shard_intact(folder, name):
            logger.warning("%s: damaged since it was written (size or SHA-256 differs); its %d videos are encoded "
                           "again", folder / SHARDS / f"{name}.npy", len(got[1]))
            continue
        here: dict[str, list[tuple[Item, str, int]]] = {}
        for row, it in enumerate(got[1]):
            here.setdefault(it.video_id, []).append((it, name, row))
        found.update(here)
    return found


def _with_record(entry: tuple[Item, str, int], src: Source, index_dir: Path) -> tuple[Item, str, int]:
    """A reused entry with this build's file record (root, files) and its thumbnails' record, taken now for
    items of shards written before thumbnails were recorded; thumbnails no longer on disk are left out."""
    it, shard_name, row = entry
    thumbs, stats = list(it.thumbnails), list(it.thumb_stats)
    if len(stats) != len(thumbs):
        thumbs, stats = [], []
        for t in it.thumbnails:
            try:
                st = (index_dir / t).lstat()
                stats.append([st.st_size, st.st_mtime_ns, sha256_file(index_dir / t)])
                thumbs.append(t)
            except OSError:
                continue
    return replace(it, root=src.root, files=src.files, thumbnails=thumbs, thumb_stats=stats), shard_name, row


LOCK = ".build.lock"


def _lock(folder: Path):
    """An exclusive lock on the index folder for one build (released when the process ends, also on kill -9)."""
    import fcntl

    with build_step("creating the build lock", folder / LOCK):
        f = open(folder / LOCK, "a")  # noqa: SIM115 - held for the whole build
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ValueError(f"--index {folder}: another build is writing this index") from None
    return f


def _check_target(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--index {folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        ours = (folder / CURRENT).exists() or (folder / SHARDS).is_dir() or (folder / LOCK).exists()
        if not ours:
            raise ValueError(f"--index {folder}: folder is not empty and holds no search index; refusing to write "
                             "into it")


def build_from_folder(*args, **kwargs) -> BuildResult | None:
    """Index every video under ``features_path`` into ``index_dir``: :func:`_build_from_folder`, with the build
    lock released however it ends (an exception, a full disk)."""
    held: list = []
    try:
        return _build_from_folder(*args, _held_locks=held, **kwargs)
    finally:
        for f in held:
            f.close()


def _build_from_folder(
    features_path: str | os.PathLike,
    index_dir: str | os.PathLike,
    model,
    record: ModelRecord,
    *,
    max_frames: int = 12,
    framerate: int = 1,
    image_mode: str = "exact",
    precision: str = "fp32",
    video_fps: float | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    round_size: int = 64,
    index_type: str = "auto",
    search_params: str | None = None,
    max_index_bytes: int | None = None,
    device: torch.device | str = "cpu",
    info=None,
    progress: bool = True,
    on_encoded: Callable[[int], None] | None = None,
    query_bank: BankRequest | None = None,
    follow_symlinks: bool = False,
    segments: SegmentSettings | None = None,
    _held_locks: list | None = None,
) -> BuildResult | None:
    """Index every video under ``features_path`` into ``index_dir`` (incrementally; see the module doc).

    ``model`` runs in the ``per_video`` layout; ``record`` (``identity.describe_model``) is what the index
    records about it. ``follow_symlinks``: index through symbolic links (recorded resolved; ``files.py``).
    With ``segments`` each video becomes several vectors, one per segment (``segments.py``); the settings are
    part of the encoding key, so other settings re-encode every video.
    Videos that are refused (unsafe ids, links not followed) or cannot be read are in ``failed``.

    ``query_bank`` says what to do with the QB-Norm query bank (``qb.py``; None: keep the stored one, if any);
    its captions are encoded on rank 0 before the videos.

    ``on_encoded(n)`` is called after each written shard with the number of videos encoded so far (tests
    use it to interrupt a build). Returns the result on rank 0, None on other ranks.
    """
    from tqdm import tqdm

    from clip2video.modules.runtime.distributed import barrier, broadcast_object
    from clip2video.modules.runtime.precision import autocast
    from clip2video.modules.runtime.sharding import gather_rows, shard

    index_dir = Path(index_dir).resolve()
    is_main = info is None or info.is_main
    device = torch.device(device)
    settings = {"max_frames": max_frames, "framerate": framerate, "image_mode": image_mode, "precision": precision,
                "mask_layout": "per_video", "image_size": model.config.clip.image_size}
    if segments is not None:  # frame times depend on the rate: it is part of what a segment is
        from clip2video.dataloaders.video_io import DEFAULT_VIDEO_FPS

        settings.update(segments=segments.to_dict(), video_fps=float(video_fps or DEFAULT_VIDEO_FPS))
    key = encoding_key(record.fingerprint, settings)
    plan = None
    if is_main:
        _check_target(index_dir)
        with build_step("creating the index folder", index_dir):
            index_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock(index_dir)
        if _held_locks is not None:
            _held_locks.append(lock)  # closed by build_from_folder whatever happens
        remove_stale_temps(index_dir)  # of an earlier build killed outright
        try:
            extra = bank_writer(index_dir, query_bank, fingerprint=record.fingerprint,
                                text={"max_words": int(record.max_words), "precision": precision},
                                scale=float(record.logit_scale),
                                encode=lambda caps: encode_bank(model, caps, max_words=int(record.max_words),
                                                                precision=precision, device=device))
        except BaseException:
            lock.close()
            raise
        refused: list[tuple[str, str]] = []
        sources = list_videos(features_path, follow_symlinks=follow_symlinks, refused=refused)
        have = _reusable(index_dir, key)
        reuse, todo = [], []
        for s in sources:
            h = have.get(s.video_id)
            if h and h[0][0].path == s.path and h[0][0].size == s.size and h[0][0].mtime_ns == s.mtime_ns:
                reuse += [_with_record(e, s, index_dir) for e in h]
            else:
                todo.append(s)
        try:
            _, old = read_manifest(index_dir)
            old_count = old["count"]
        except IndexFormatError:
            old_count = 0
        plan = (todo, reuse, old_count, len(sources), refused)
        logger.info("%d videos under %s: %d to encode, %d unchanged", len(sources), features_path, len(todo),
                    len(reuse))
    if info is not None and info.is_distributed:
        plan = broadcast_object(plan, info)
    todo, reuse, old_count, n_sources, refused = plan

    read_settings = {"max_frames": max_frames, "framerate": framerate, "image_size": model.config.clip.image_size,
                     "mode": image_mode, "video_fps": video_fps}
    world = info.world_size if info is not None and info.is_distributed else 1
    per_round = round_size * world
    new_entries: list[tuple[Item, str, int]] = []
    failed: list[tuple[str, str]] = list(refused)
    bar = tqdm(total=len(todo), desc="indexing", disable=not (progress and is_main), unit="video")
    encoded = 0
    timings: dict[str, float] = {}
    for r0 in range(0, len(todo), per_round):
        round_items = todo[r0 : r0 + per_round]
        mine = list(shard(round_items, info))
        vecs, metas, errs = [], [], []
        loader = []
        if segments is None:
            loader = torch.utils.data.DataLoader(_SourceDataset(mine, read_settings), batch_size=batch_size,
                                                 num_workers=num_workers, collate_fn=_collate)
        else:
            vecs, metas, errs = _encode_segmented(mine, model, segments, read_settings, index_dir, num_workers,
                                                  device, precision, timings,
                                                  lambda n: bar.update(n * world) if is_main else None)
        for batch in loader:
            good = [b for b in batch if "error" not in b]
            errs += [(mine[b["index"]].video_id, b["error"]) for b in batch if "error" in b]
            if not good:
                continue
            frames = torch.stack([b["frames"] for b in good]).to(device)  # (B, T, 3, S, S)
            mask = torch.stack([b["mask"] for b in good]).to(device)  # (B, T)
            with torch.no_grad(), autocast(device, precision):
                v = model.video_vector(model.encode_video(frames, mask)).float().cpu().numpy()
            vecs.append(v)
            for b in good:
                s = mine[b["index"]]
                try:
                    thumbs, thumb_stats = write_thumbnails(index_dir, thumb_key(s), b["thumbs"])
                except IndexWriteError:
                    raise
                except (OSError, ValueError) as e:
                    logger.warning("%s: no thumbnails (%s)", s.path, e)
                    thumbs, thumb_stats = [], []
                metas.append(Item(s.video_id, s.path, s.kind, s.size, s.mtime_ns, b["info"].get("duration"),
                                  b["info"].get("frames"), thumbs, s.root, s.files, thumb_stats).to_dict())
            if is_main:
                bar.update(len(batch) * world)
        dim = int(record.dim)
        local = np.concatenate(vecs) if vecs else np.zeros((0, dim), dtype=np.float32)
        all_vecs = gather_rows(local, info)
        all_meta = gather_rows(_objects(metas), info)
        all_errs = gather_rows(_objects(errs), info)
        failed += [tuple(e) for e in all_errs]
        if is_main and len(all_vecs):
            items = [Item.from_dict(m) for m in all_meta]
            name = f"enc-{key[:8]}-{hashlib.sha1('|'.join(i.video_id for i in items).encode()).hexdigest()[:12]}" \
                   f"-{os.getpid()}-{r0}"
            write_shard(index_dir, name, all_vecs, items, key)
            new_entries += [(it, name, r) for r, it in enumerate(items)]
        encoded += len({m["video_id"] for m in all_meta})
        if on_encoded is not None and is_main:
            on_encoded(encoded)
    bar.close()
    result = None
    if is_main:
        entries = reuse + new_entries
        if not entries and not failed and n_sources == 0:
            logger.warning("no videos under %s (frame folders or video files)", features_path)
        meta = dict(record.to_dict(), mask_layout="per_video")
        # the rate video files were read at, recorded so that a clip query is read the same way (and, for
        # segments, part of the encoding: the resolved rate)
        encoding = dict(settings, key=key, video_fps=settings.get("video_fps", video_fps))
        gen = write_generation(index_dir, entries, model_meta=meta, encoding=encoding,
                               index_type=index_type, search_params=search_params, source=str(features_path),
                               extra=extra, max_index_bytes=max_index_bytes, segments=settings.get("segments"))
        kept = {e[0].video_id for e in entries}
        reused = len({e[0].video_id for e in reuse})
        removed = max(old_count - reused, 0)
        result = BuildResult(gen, len(kept), encoded, reused, removed, failed, len(entries), timings)
    barrier(info) if info is not None else None
    return result


def _encode_segmented(mine: Sequence[Source], model, segments: SegmentSettings, read_settings: dict[str, Any],
                      index_dir: Path, num_workers: int, device, precision: str, timings: dict[str, float],
                      advance: Callable[[int], Any]) -> tuple[list[np.ndarray], list[dict], list[tuple[str, str]]]:
    """This rank's share of a round, segment by segment: (vectors, item dicts, failures); a video's rows are
    contiguous and in time order."""
    from clip2video.dataloaders.video_io import DEFAULT_VIDEO_FPS
    from clip2video.search.segments import SegmentEncoder

    settings = {"settings": segments, "fps": float(read_settings["video_fps"] or DEFAULT_VIDEO_FPS),
                "max_frames": read_settings["max_frames"], "framerate": read_settings["framerate"],
                "image_size": read_settings["image_size"], "mode": read_settings["mode"]}
    loader = torch.utils.data.DataLoader(_SegmentStream(mine, settings, index_dir, num_workers), batch_size=None,
                                         num_workers=min(num_workers, len(mine)), collate_fn=_identity)
    enc = SegmentEncoder(model, device=device, precision=precision, max_frames=read_settings["max_frames"])
    vecs, metas, errs = [], [], []
    info: dict[int, dict[str, Any]] = {}
    read_s = 0.0
    for msg in loader:
        i = msg["index"]
        s = mine[i]
        if msg["kind"] == "error":
            enc.drop(i)
            errs.append((s.video_id, msg["error"]))
            advance(1)
            continue
        if msg["kind"] == "start":
            info[i] = {"duration": msg["duration"], "frames": msg["frames"]}
        read_s += msg.get("seconds", 0.0)
        done = enc.feed(i, msg)
        if done is None:
            continue
        for seg, vec, thumbs in done:  # thumbs: (path, record) of each of the segment's thumbnails
            vecs.append(vec[None])
            metas.append(Item(s.video_id, s.path, s.kind, s.size, s.mtime_ns, info[i]["duration"], info[i]["frames"],
                              [t[0] for t in thumbs], s.root, s.files, [t[1] for t in thumbs],
                              start=float(seg.start), end=float(seg.end)).to_dict())
        info.pop(i, None)
        advance(1)
    for k, v in {"read_s": read_s, **enc.timings}.items():
        timings[k] = timings.get(k, 0.0) + v
    return vecs, metas, errs


def _identity(x):
    return x


def _objects(rows: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(rows), dtype=object)
    for i, r in enumerate(rows):
        out[i] = r
    return out


# ----------------------------------------------------------------------------------------------- embeddings
def write_embeddings(out_dir: str | os.PathLike, text: np.ndarray, video: np.ndarray, text_ids: Sequence[str],
                     video_ids: Sequence[str], meta: dict[str, Any]) -> Path:
    """``--save_embeddings`` output: a folder written under a temporary name, then swapped into place."""
    out = Path(out_dir).resolve()
    with atomic_dir(out, replace=True) as tmp:
        np.save(tmp / "text.npy", np.ascontiguousarray(text, dtype=np.float32))
        np.save(tmp / "video.npy", np.ascontiguousarray(video, dtype=np.float32))
        (tmp / "text_ids.json").write_text(json.dumps(list(text_ids), ensure_ascii=False))
        (tmp / "video_ids.json").write_text(json.dumps(list(video_ids), ensure_ascii=False))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


def build_from_embeddings(emb_dir: str | os.PathLike, index_dir: str | os.PathLike, *, index_type: str = "auto",
                          search_params: str | None = None, query_bank: BankRequest | None = None,
                          device: str | None = None, follow_symlinks: bool = False,
                          max_index_bytes: int | None = None) -> BuildResult:
    """An index from ``video.npy`` + ``video_ids.json`` (+ ``meta.json`` describing the model, optional).

    Every id must be a safe one (``files.id_problem``): an unsafe id is one log line each and the build is
    refused before anything is written. Files are recorded for the ids that are videos under the export's
    ``features_path`` now (listed as ``build --features_path`` lists them); the others are searchable but have
    no files to serve. A query bank's captions need the model ``meta.json`` names (loaded only when they must
    be encoded).
    """
    emb = Path(emb_dir)
    for name in ("video.npy", "video_ids.json"):
        if not (emb / name).is_file():
            raise ValueError(f"--from_embeddings {emb}: no {name}")
    try:
        video = np.load(emb / "video.npy", mmap_mode="r")
        ids = json.loads((emb / "video_ids.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"--from_embeddings {emb}: cannot read video.npy / video_ids.json ({e})") from None
    if video.ndim != 2 or not isinstance(ids, list) or len(ids) != video.shape[0]:
        raise ValueError(f"--from_embeddings {emb}: video.npy has shape {video.shape}, video_ids.json "
                         f"{len(ids) if isinstance(ids, list) else 'is not a list'} ids")
    bad = [(v, why) for v in ids if (why := id_problem(v))]
    for v, why in bad:
        logger.error("%s: video id %s refused: %s", emb / "video_ids.json", repr(v)[:300], why)
    if bad:
        raise ValueError(f"--from_embeddings {emb / 'video_ids.json'}: {len(bad)} unsafe video id(s) refused "
                         f"(first: {repr(bad[0][0])[:100]}: {bad[0][1]}); no index was written")
    if not np.isfinite(np.asarray(video[: min(len(video), 10000)])).all():
        raise ValueError(f"--from_embeddings {emb}: video.npy holds NaN or infinite values")
    meta: dict[str, Any] = {}
    if (emb / "meta.json").is_file():
        meta = json.loads((emb / "meta.json").read_text())
    if meta.get("mask_layout") == "original":
        logger.warning("%s: vectors made with the original mask layout depend on their evaluation batch; "
                       "re-export with --mask_layout per_video for an index", emb)
    meta = dict(meta, dim=int(video.shape[1]))
    meta.setdefault("fingerprint", "")
    meta.setdefault("logit_scale", 1.0)
    meta = ModelRecord.from_dict(meta).to_dict()  # the record's fields, the export's own keys kept
    index_dir = Path(index_dir).resolve()
    _check_target(index_dir)
    with build_step("creating the index folder", index_dir):
        index_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(index_dir)
    record = ModelRecord.from_dict(meta)

    def encode(captions):
        from clip2video.modules.weights.identity import load_recorded

        if not record.loadable:
            raise ValueError(f"--query_bank: {emb} names no model (meta.json with its weights), so the bank's "
                             "captions cannot be encoded")
        return encode_bank(load_recorded(record, device=device), captions, max_words=int(record.max_words))

    try:
        remove_stale_temps(index_dir)
        extra = bank_writer(index_dir, query_bank, fingerprint=record.fingerprint,
                            text={"max_words": int(record.max_words), "precision": "fp32"},
                            scale=float(record.logit_scale), encode=encode)
        feats = meta.get("features_path")
        listed = {}
        if feats and os.path.isdir(feats):
            listed = {s.video_id: s for s in list_videos(feats, follow_symlinks=follow_symlinks)}
        items = []
        for v in ids:
            src = listed.get(v)
            if src is not None:
                items.append(Item(v, src.path, src.kind, src.size, src.mtime_ns, None, src.frames, [], src.root,
                                  src.files))
            else:
                items.append(Item(v, "", "file", 0, 0))
        digest = hashlib.sha1(np.ascontiguousarray(video[: min(len(video), 4096)]).tobytes()).hexdigest()[:12]
        name = f"emb-{digest}-{len(ids)}-{os.getpid()}"
        key = encoding_key(meta["fingerprint"], {"from_embeddings": True})
        write_shard(index_dir, name, np.asarray(video), items, key)
        try:
            _, old = read_manifest(index_dir)
            old_count = old["count"]
        except IndexFormatError:
            old_count = 0
        gen = write_generation(index_dir, [(it, name, r) for r, it in enumerate(items)], model_meta=meta,
                               encoding={"key": key, "from_embeddings": str(emb.resolve())}, index_type=index_type,
                               search_params=search_params, source=str(emb.resolve()), extra=extra,
                               max_index_bytes=max_index_bytes)
    finally:
        lock.close()
    return BuildResult(gen, len(items), 0, 0, old_count, [])


__all__ = ["FORMAT_VERSION", "BuildResult", "Source", "build_from_embeddings", "build_from_folder", "list_videos",
           "read_source", "write_embeddings"]
