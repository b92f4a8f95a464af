"""The on-disk format of a search index: folder layout, manifest, vector shards, generations, SQLite rows.

Folder layout (``FORMAT_VERSION`` 1)::

    OUT/CURRENT                       name of the live generation (a small file, replaced atomically)
    OUT/gen-<stamp>/manifest.json     format version, model fingerprint and record (``ModelRecord``), encoding
                                      settings, index type, vector shards used
    OUT/gen-<stamp>/meta.sqlite       one row per video: id, path, kind, size, mtime, duration, frames,
                                      thumbnails, and where its vector lives (shard, row); in an index of
                                      segments (manifest ``segments``) also table ``segments``: one row per
                                      vector (its video, start and end in seconds, its thumbnails)
    OUT/gen-<stamp>/faiss.index       the FAISS index; FAISS id = row of meta.sqlite (of ``segments`` if present)
    OUT/shards/<name>.npy + .json     immutable float32 vector shards and the items they hold
    OUT/thumbs/<key>/<i>.jpg          small JPEGs for display

Crash safety: a build writes shards first (each ``.npy`` then its ``.json``, each under a temporary name and
renamed), then a whole new generation folder, and only then replaces ``CURRENT``. A kill at any moment leaves
the previous ``CURRENT`` pointing at a complete generation; the shards encoded before the kill are found
again by the next build (by their ``.json``), so the re-run does not encode them twice. Files no generation
refers to are removed after a successful switch. The same write-new-then-switch-a-pointer idea as
LMDB/Git refs; rclip's SQLite index inspired the incremental part (size + mtime per file).

This module knows files only: the builder (``build.py``) decides what goes in, the reader (``index.py``)
answers queries from it.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clip2video.fileio import TMP_PREFIX, atomic_path, atomic_write_bytes

FORMAT_VERSION = 1
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
META_DB = "meta.sqlite"
FAISS_FILE = "faiss.index"
SHARDS = "shards"
THUMBS = "thumbs"


class IndexFormatError(ValueError):
    """An index folder that is missing, truncated, damaged or of another format version (one line)."""



@dataclass
class Item:
    """One indexed video as the builder sees it (also the JSON form stored beside each shard)."""

    video_id: str
    path: str
    kind: str
    size: int
    mtime_ns: int
    duration: float | None = None
    frames: int | None = None
    thumbnails: list[str] = field(default_factory=list)  # relative to the index folder
    start: float | None = None  # a segment's time range in seconds (None: the whole video)
    end: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Item:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# ----------------------------------------------------------------------------------------------- index types
def auto_index_type(n: int) -> tuple[str, str]:
    """(FAISS factory string, search parameters) for ``n`` vectors, chosen by size like autofaiss.

    Exact flat inner product while a full scan stays cheap; above that an inverted file with 8-bit scalar
    quantised codes (a quarter of the float32 memory); the codes' candidates are re-scored with the exact
    vectors by :meth:`SearchIndex.search`. The thresholds and probe counts come from
    ``benchmarks/bench_search.py`` (see ``benchmarks/README.md``).
    """
    if n <= EXACT_MAX:
        return "Flat", ""
    nlist = int(2 ** round(np.log2(max(2 * np.sqrt(n), 256))))
    nlist = min(nlist, max(n // 64, 1))
    return f"IVF{nlist},SQ8", f"nprobe={max(nlist // 32, 16)}"


EXACT_MAX = 50_000


def build_faiss(vectors: np.ndarray, factory: str, *, seed: int = 0, train_size: int | None = None):
    """A FAISS inner-product index over ``vectors`` (rows become ids 0..n−1)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise ValueError(f"--index_type {factory}: not a FAISS index_factory description (e.g. Flat, IVF1024,SQ8, "
                         "HNSW32)") from None
    if not index.is_trained:
        if n == 0:
            raise ValueError(f"index type {factory} needs training vectors; the collection is empty")
        if hasattr(faiss, "extract_index_ivf"):
            try:
                ivf = faiss.extract_index_ivf(index)
                ivf.cp.seed = seed
                # unit-norm centroids: with inner products, k-means' unnormalised centroids of different
                # norms pull most vectors into a few lists (unbalanced lists, low recall)
                ivf.cp.spherical = True
                ivf.cp.niter = 8
                # k-means on up to 256 vectors per list: with few, the samples of one underlying cluster are
                # split over many lists and recall drops (measured in benchmarks/bench_search.py)
                ivf.cp.max_points_per_centroid = 256
            except RuntimeError:
                pass
        m = train_size or n
        rng = np.random.default_rng(seed)
        sample = vectors if m >= n else vectors[np.sort(rng.choice(n, size=m, replace=False))]
        index.train(sample)
    if n:
        index.add(vectors)
    return index


def apply_search_params(index, params: str) -> None:
    """Search-time parameters ``name=value,...``: ``k_factor`` of a refine wrapper, the rest through FAISS's
    ParameterSpace on the index inside it (``nprobe``, ``efSearch``)."""
    if not params:
        return
    import faiss

    rest = []
    for part in params.split(","):
        name, _, value = part.partition("=")
        if name.strip() == "k_factor":
            if not hasattr(index, "k_factor"):
                raise ValueError(f"search parameter {part!r}: the index has no refinement stage")
            index.k_factor = float(value)
        elif part.strip():
            rest.append(part.strip())
    if rest:
        target = faiss.downcast_index(index.base_index) if hasattr(index, "base_index") else index
        faiss.ParameterSpace().set_index_parameters(target, ",".join(rest))


# ----------------------------------------------------------------------------------------------- writing
def write_shard(folder: Path, name: str, vectors: np.ndarray, items: Sequence[Item], encoding_key: str) -> str:
    """An immutable shard: ``name.npy`` (vectors) then ``name.json`` (its items); the ``.json`` marks it whole."""
    d = Path(folder) / SHARDS
    d.mkdir(parents=True, exist_ok=True)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) != len(items):
        raise ValueError(f"shard {name}: {len(vectors)} vectors for {len(items)} items")
    with atomic_path(d / f"{name}.npy") as tmp:
        np.save(tmp, vectors)
    side = {"format_version": FORMAT_VERSION, "encoding_key": encoding_key, "rows": len(items),
            "dim": int(vectors.shape[1]) if vectors.ndim == 2 else 0, "items": [it.to_dict() for it in items]}
    atomic_write_bytes(d / f"{name}.json", json.dumps(side).encode(), durable=True)
    return name


def read_shard_items(folder: Path, name: str) -> tuple[str, list[Item]] | None:
    """(encoding key, items) of a complete shard, None for an incomplete or unreadable one."""
    d = Path(folder) / SHARDS
    try:
        side = json.loads((d / f"{name}.json").read_text())
        if side.get("format_version") != FORMAT_VERSION or not (d / f"{name}.npy").is_file():
            return None
        return side["encoding_key"], [Item.from_dict(x) for x in side["items"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_shards(folder: Path) -> list[str]:
    d = Path(folder) / SHARDS
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.json") if not p.name.startswith("."))


def new_generation_name() -> str:
    return f"gen-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 1_000_000_000:09d}-{os.getpid()}"


def write_generation(
    folder: str | os.PathLike,
    entries: Sequence[tuple[Item, str, int]],
    *,
    model_meta: dict[str, Any],
    encoding: dict[str, Any],
    index_type: str = "auto",
    search_params: str | None = None,
    source: str | None = None,
    compact_below: float = 0.5,
    segments: dict[str, Any] | None = None,
) -> Path:
    """Write a complete new generation for ``entries`` = (item, shard name, row in shard) and switch to it.

    Rows are sorted by video id (then segment start), so the index does not depend on the order (or the number
    of processes) in which the vectors were encoded. When less than ``compact_below`` of the referenced shard
    rows are live, the live vectors are rewritten into one new shard first. ``segments`` (the segment settings)
    makes an index of segments: several entries per video, each with its ``start``/``end``.

    Returns:
        the new generation folder.
    """
    import faiss

    folder = Path(folder)
    entries = sorted(entries, key=lambda e: (e[0].video_id, e[0].start or 0.0, e[0].end or 0.0))
    ids = [(e[0].video_id, e[0].start, e[0].end) for e in entries]
    if len(set(ids)) != len(ids):
        dup = next(i for i, j in zip(ids, ids[1:], strict=False) if i == j)
        what = f"video id {dup[0]!r}" + (f" (segment {dup[1]:g}–{dup[2]:g} s)" if segments else "")
        raise ValueError(f"{what} appears twice in the collection")
    if not segments and any(e[0].start is not None for e in entries):
        raise ValueError("segment entries given without segment settings")
    mmaps: dict[str, np.ndarray] = {}
    for _, s, _ in entries:
        if s not in mmaps:
            mmaps[s] = np.load(folder / SHARDS / f"{s}.npy", mmap_mode="r")
    dim = int(model_meta.get("dim") or (next(iter(mmaps.values())).shape[1] if mmaps else 0))
    vectors = np.empty((len(entries), dim), dtype=np.float32)
    for r, (_, s, i) in enumerate(entries):
        vectors[r] = mmaps[s][i]
    total_rows = sum(m.shape[0] for m in mmaps.values())
    if entries and len(entries) < compact_below * total_rows:
        name = f"compact-{time.time_ns()}"
        write_shard(folder, name, vectors, [e[0] for e in entries], encoding.get("key", ""))
        entries = [(e[0], name, r) for r, e in enumerate(entries)]
    del mmaps

    if index_type == "auto":
        factory, params = auto_index_type(len(entries))
    else:
        factory, params = index_type, ""
    if search_params is not None:
        params = search_params
    index = build_faiss(vectors, factory)

    gen = new_generation_name()
    tmp = folder / f".{gen}.tmp"
    tmp.mkdir(parents=True)
    faiss.write_index(index, str(tmp / FAISS_FILE))
    db = sqlite3.connect(tmp / META_DB)
    db.execute("CREATE TABLE videos (row INTEGER PRIMARY KEY, video_id TEXT UNIQUE NOT NULL, path TEXT NOT NULL, "
               "kind TEXT NOT NULL, size INTEGER, mtime_ns INTEGER, duration REAL, frames INTEGER, "
               "thumbnails TEXT, shard TEXT NOT NULL, shard_row INTEGER NOT NULL)")
    videos = _video_rows(entries) if segments else entries
    db.executemany("INSERT INTO videos VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                   [(r, it.video_id, it.path, it.kind, it.size, it.mtime_ns, it.duration, it.frames,
                     json.dumps(it.thumbnails), s, i) for r, (it, s, i) in enumerate(videos)])
    if segments:
        _write_segment_rows(db, entries, videos)
    db.commit()
    db.close()
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "count": len(entries),
        "dim": dim,
        "fingerprint": model_meta.get("fingerprint", ""),
        "model": model_meta,
        "encoding": encoding,
        "index_type": factory,
        "search_params": params,
        "shards": sorted({s for _, s, _ in entries}),
        "source": source,
    }
    if segments:
        manifest["segments"] = dict(segments)
        manifest["videos"] = len(videos)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for p in tmp.iterdir():  # everything on disk before the generation becomes visible
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, folder / gen)
    atomic_write_bytes(folder / CURRENT, (gen + "\n").encode(), durable=True)
    collect_garbage(folder)
    return folder / gen


def _thumb_order(rel: str) -> tuple[int, str]:
    stem = Path(rel).stem
    return (int(stem), rel) if stem.isdigit() else (-1, rel)


def _video_rows(entries: Sequence[tuple[Item, str, int]]) -> list[tuple[Item, str, int]]:
    """One entry per video of a segmented collection (entries sorted by video): its first segment's, with the
    thumbnails of all its segments (in frame order) and no time range."""
    out: list[tuple[Item, str, int]] = []
    for it, s, i in entries:
        if out and out[-1][0].video_id == it.video_id:
            out[-1][0].thumbnails.extend(t for t in it.thumbnails if t not in out[-1][0].thumbnails)
            continue
        out.append((Item.from_dict(dict(it.to_dict(), thumbnails=list(it.thumbnails), start=None, end=None)), s, i))
    for it, _, _ in out:
        it.thumbnails.sort(key=_thumb_order)
    return out


def _write_segment_rows(db: sqlite3.Connection, entries: Sequence[tuple[Item, str, int]],
                        videos: Sequence[tuple[Item, str, int]]) -> None:
    """Table ``segments``: row (= FAISS id), video (row of ``videos``), start_s, end_s, thumbnails (positions in
    the video's thumbnail list), shard, shard_row."""
    db.execute("CREATE TABLE segments (row INTEGER PRIMARY KEY, video INTEGER NOT NULL, start_s REAL NOT NULL, "
               "end_s REAL NOT NULL, thumbnails TEXT, shard TEXT NOT NULL, shard_row INTEGER NOT NULL)")
    number = {it.video_id: v for v, (it, _, _) in enumerate(videos)}
    positions = [{t: j for j, t in enumerate(it.thumbnails)} for it, _, _ in videos]
    rows = []
    for r, (it, s, i) in enumerate(entries):
        v = number[it.video_id]
        pos = positions[v]
        rows.append((r, v, float(it.start), float(it.end), json.dumps([pos[t] for t in it.thumbnails]), s, i))
    db.executemany("INSERT INTO segments VALUES (?,?,?,?,?,?,?)", rows)


def collect_garbage(folder: Path) -> None:
    """Remove what the live generation does not use: old generations, temp files, unused shards/thumbnails.

    Only called by a build that holds the build lock, right after it switched ``CURRENT``; shards of an
    interrupted build (never referenced) are removed here too, after the re-run has reused them.
    """
    folder = Path(folder)
    live = (folder / CURRENT).read_text().strip()
    manifest = json.loads((folder / live / MANIFEST).read_text())
    keep_shards = set(manifest["shards"])
    for p in folder.iterdir():
        if p.name.startswith("gen-") and p.name != live or p.name.startswith(".gen-"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(TMP_PREFIX) and p.is_file():  # a pointer write interrupted by a kill
            p.unlink(missing_ok=True)
    for p in (folder / SHARDS).glob("*") if (folder / SHARDS).is_dir() else []:
        stem = p.name.split(".")[0] if not p.name.startswith(".") else None
        if stem is None or stem not in keep_shards:
            p.unlink(missing_ok=True)
    thumbs = folder / THUMBS
    if thumbs.is_dir():
        db = sqlite3.connect(f"file:{folder / live / META_DB}?mode=ro", uri=True)
        used = {Path(t).parts[1] for (js,) in db.execute("SELECT thumbnails FROM videos") for t in json.loads(js)
                if len(Path(t).parts) > 1}
        db.close()
        for p in thumbs.iterdir():
            if p.name not in used:
                shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- reading
def read_manifest(folder: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(live generation folder, its manifest), or IndexFormatError with one line saying what is wrong."""
    folder = Path(folder)
    if not folder.exists():
        raise IndexFormatError(f"{folder}: no such index folder (build one with: search.py build --index {folder})")
    if not folder.is_dir():
        raise IndexFormatError(f"{folder}: not an index folder (a file)")
    cur = folder / CURRENT
    if not cur.is_file():
        if (folder / "index.faiss").exists() or (folder / MANIFEST).exists():
            raise IndexFormatError(f"{folder}: index of an older format (no {CURRENT} file); rebuild it with "
                                   "search.py build")
        raise IndexFormatError(f"{folder}: not a search index (no {CURRENT} file); build one with search.py build")
    live = cur.read_text().strip()
    gen = folder / live
    if not live or not (gen / MANIFEST).is_file():
        raise IndexFormatError(f"{folder}: truncated index: {CURRENT} names {live!r}, which has no {MANIFEST}")
    try:
        manifest = json.loads((gen / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"{gen / MANIFEST}: truncated or damaged ({type(e).__name__})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise IndexFormatError(f"{folder}: index format version {version}, this version reads {FORMAT_VERSION}; "
                               "rebuild it with search.py build")
    missing = [k for k in ("count", "dim", "fingerprint", "model", "index_type", "shards") if k not in manifest]
    if missing:
        raise IndexFormatError(f"{gen / MANIFEST}: truncated or damaged (missing {', '.join(missing)})")
    return gen, manifest
