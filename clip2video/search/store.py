"""The on-disk format of a search index: folder layout, manifest, vector shards, generations, SQLite rows.

Folder layout (``FORMAT_VERSION`` 1)::

    OUT/CURRENT                       name of the live generation (one line ``gen-...``, replaced atomically;
                                      nothing else is accepted: no path, no folder outside OUT)
    OUT/gen-<stamp>/manifest.json     format version, model fingerprint and record (``ModelRecord``), encoding
                                      settings, index type, vector shards used, and the size and SHA-256 of
                                      every file the generation reads (``files``)
    OUT/gen-<stamp>/manifest.sha256   the manifest's own SHA-256 (``sha256sum`` format)
    OUT/gen-<stamp>/meta.sqlite       one row per video: id, path, kind, size, mtime, duration, frames,
                                      thumbnails, and where its vector lives (shard, row); table ``files``: the
                                      root each video's files must lie under, the files recorded at build time
                                      (name, size, mtime) and its thumbnails (path, size, mtime, SHA-256); in
                                      an index of segments (manifest ``segments``) also table ``segments``: one
                                      row per vector (its video, start and end in seconds, its thumbnails)
    OUT/gen-<stamp>/faiss.index       the FAISS index; FAISS id = row of meta.sqlite (of ``segments`` if present)
    OUT/gen-<stamp>/qb_*.npy          only with a query bank: its caption vectors and the per-row QB-Norm
                                      statistics (``qb.py``)
    OUT/shards/<name>.npy + .json     immutable float32 vector shards and the items they hold (the ``.json``
                                      records the ``.npy``'s size and SHA-256)
    OUT/thumbs/<key>/<i>.jpg          small JPEGs for display

Crash safety: a build writes shards first (each ``.npy`` then its ``.json``, each under a temporary name and
renamed), then a whole new generation folder, and only then replaces ``CURRENT``. A kill at any moment leaves
the previous ``CURRENT`` pointing at a complete generation; the shards encoded before the kill are found
again by the next build (by their ``.json``), so the re-run does not encode them twice. Files no generation
refers to are removed after a successful switch, except those of a generation a reader still has open (each
reader holds a shared ``flock`` on its generation's manifest; see :func:`collect_garbage`). A write that fails
(a full disk) is one :class:`IndexWriteError` naming the step and the file; the new generation's folder is
removed and ``CURRENT`` is left as it was. Temporary files of a killed build are removed by the next one
(:func:`remove_stale_temps`). The same write-new-then-switch-a-pointer idea as
LMDB/Git refs; rclip's SQLite index inspired the incremental part (size + mtime per file).

This module knows files only: the builder (``build.py``) decides what goes in, the reader (``index.py``)
answers queries from it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clip2video import fileio  # through the module, so that every write of a build passes one choke point
from clip2video.fileio import TMP_PREFIX, sha256_file
from clip2video.search.index_choice import EXACT_MAX, TRAIN_PER_LIST, choose_index  # noqa: F401 - EXACT_MAX re-exported

FORMAT_VERSION = 2  # 2: checksums (manifest ``files``, manifest.sha256), the ``files`` table, strict CURRENT
SHARD_FORMAT_VERSION = 1  # shard sidecars keep their format: shards of version-1 indexes are reused
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
MANIFEST_SUM = "manifest.sha256"
META_DB = "meta.sqlite"
FAISS_FILE = "faiss.index"
SHARDS = "shards"
THUMBS = "thumbs"
GEN_PREFIX = "gen-"
GEN_NAME = re.compile(r"gen-[0-9A-Za-z][0-9A-Za-z_.-]{0,200}")  # what new_generation_name makes; no separators
MAX_CURRENT_BYTES = 512


class IndexFormatError(ValueError):
    """An index folder that is missing, truncated, damaged or of another format version (one line)."""


class IndexWriteError(OSError):
    """A write of a build failed (disk full, read-only, ...): one line naming the step and the file."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return self.strerror or super().__str__()


@contextlib.contextmanager
def build_step(step: str, path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError or SQLite error raised while doing ``step`` on ``path`` into one IndexWriteError line.

    The callers guarantee the rest: temporary names are removed (``clip2video.fileio``), the new generation's
    folder too (:func:`write_generation`), and ``CURRENT`` changes last, so the previous index still answers.
    """
    try:
        yield
    except IndexWriteError:
        raise
    except (OSError, sqlite3.Error) as e:
        code = getattr(e, "errno", None)
        if isinstance(e, sqlite3.Error):
            code = errno.ENOSPC if "full" in str(e).lower() else code
        why = os.strerror(code) if code else (str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise IndexWriteError(code or errno.EIO, f"{step} {path}: {why}; the previous index is unchanged") from None


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
    # the file policy's record (``files.py``): every file served for this video lies under ``root``; ``files``
    # = [name relative to ``path`` ("" for a video file), size, mtime_ns]; ``thumb_stats`` = [size, mtime_ns,
    # sha256] per thumbnail
    root: str = ""
    files: list[list[Any]] = field(default_factory=list)
    thumb_stats: list[list[Any]] = field(default_factory=list)
    start: float | None = None  # a segment's time range in seconds (None: the whole video)
    end: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Item:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# ----------------------------------------------------------------------------------------------- index types
def auto_index_type(n: int, d: int = 1024) -> tuple[str, str]:
    """(FAISS factory string, search parameters) for ``n`` vectors, chosen by size like autofaiss.

    Exact flat inner product while a full scan stays cheap (``EXACT_MAX``); above that the inverted file
    ``index_choice.choose_index`` rates best (lists of ~128 vectors, 8-bit codes);
    its candidates are re-scored with the exact vectors by :meth:`SearchIndex.search`. The rules and their
    measurements: ``index_choice.py`` and ``benchmarks/README.md``.
    """
    c = choose_index(n, d)
    return c.factory, c.params


def train_centroids(sample: np.ndarray, nlist: int, *, seed: int = 0, niter: int = 10,
                    per_list: int = TRAIN_PER_LIST) -> np.ndarray:
    """(nlist, d) unit centroids for an inverted file: spherical k-means on at most ``TRAIN_PER_LIST`` vectors a
    list of ``sample`` (unit-norm centroids: with inner products, unnormalised centroids of different norms
    pull most vectors into a few lists).

    One flat k-means: a two-level one (√nlist top clusters, then each split) trains ~√nlist times faster but
    splits the collection's natural clusters at the top level, and its lists covered 0.91 of the true top-10
    at nprobe 8 against 0.99 (200k vectors, ``benchmarks/README.md``)."""
    import faiss

    sample = np.ascontiguousarray(sample, dtype=np.float32)
    km = faiss.Kmeans(sample.shape[1], nlist, niter=niter, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=per_list, min_points_per_centroid=1)
    km.train(sample)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


CODE_TRAIN_MAX = 65_536  # vectors the codes (SQ ranges, PQ codebooks) are fitted on


def build_faiss(vectors: np.ndarray, factory: str, *, seed: int = 0, train_size: int | None = None,
                centroids: np.ndarray | None = None):
    """A FAISS inner-product index over ``vectors`` (rows become ids 0..n−1).

    Inverted files are trained on up to ``TRAIN_PER_LIST`` vectors per list (or ``train_size``) with
    :func:`train_centroids` (or take ``centroids`` as given, e.g. shared by several indexes of one benchmark);
    the centroids go into the index's coarse quantizer (flat or HNSW). The codes are fitted on at most
    ``CODE_TRAIN_MAX`` of them (product-quantiser k-means is the slow part of a build and gains nothing from more).
    """
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
        ivf = None
        try:
            ivf = faiss.extract_index_ivf(index)
        except RuntimeError:
            pass
        rng = np.random.default_rng(seed)
        m = train_size or (min(n, TRAIN_PER_LIST * ivf.nlist) if ivf is not None else n)
        sample = vectors if m >= n else vectors[np.sort(rng.choice(n, size=m, replace=False))]
        if ivf is not None:
            if ivf.nlist > n:
                raise ValueError(f"index type {factory}: {ivf.nlist} lists for {n} vectors; use fewer lists")
            cents = train_centroids(sample, ivf.nlist, seed=seed) if centroids is None else centroids
            quantizer = faiss.downcast_index(ivf.quantizer)
            if hasattr(quantizer, "hnsw"):  # each vector goes to its nearest list, not a near one
                quantizer.hnsw.efSearch = max(quantizer.hnsw.efSearch, 128)
            ivf.quantizer.add(cents)
            ivf.quantizer.is_trained = True
            ivf.quantizer_trains_alone = 0
            concrete = faiss.downcast_index(ivf)
            if hasattr(concrete, "pq"):
                # polysemous training (on by default) reorders codes for Hamming filtering, which the search
                # here never uses, and takes minutes: off
                concrete.do_polysemous_training = False
                concrete.pq.cp.niter = 12
        if len(sample) > CODE_TRAIN_MAX:
            sample = sample[np.sort(rng.choice(len(sample), size=CODE_TRAIN_MAX, replace=False))]
        index.train(sample)
    if n:
        _add(index, vectors)
    return index


def _add(index, vectors: np.ndarray) -> None:
    """``index.add``; an inverted file with an HNSW coarse quantizer assigns the vectors to their lists with
    an exact scan of the centroids (a matrix product, and the exact nearest list) instead of one graph search
    per vector, then gets its graph back for queries."""
    import faiss

    ivf = None
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        pass
    graph = faiss.downcast_index(ivf.quantizer) if ivf is not None else None
    if graph is None or not hasattr(graph, "hnsw") or graph.ntotal == 0:
        index.add(vectors)
        return
    flat = faiss.IndexFlat(ivf.d, ivf.metric_type)
    flat.add(graph.reconstruct_n(0, graph.ntotal))
    ivf.quantizer = flat
    try:
        index.add(vectors)
    finally:
        ivf.quantizer = graph


def apply_search_params(index, params: str) -> None:
    """Search-time parameters ``name=value,...``: ``k_factor`` of a refine wrapper, the rest through FAISS's
    ParameterSpace on the index inside it (``nprobe``, ``efSearch``)."""
    if not params:
        return
    import faiss

    rest = []
    for part in params.split(","):
        name, _, value = part.partition("=")
        if name.strip() == "rerank":  # SearchIndex's own: candidates re-scored with the exact vectors
            continue
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
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) != len(items):
        raise ValueError(f"shard {name}: {len(vectors)} vectors for {len(items)} items")
    with build_step("writing the vector shard", d / f"{name}.npy"):
        d.mkdir(parents=True, exist_ok=True)
        with fileio.atomic_path(d / f"{name}.npy") as tmp:
            np.save(tmp, vectors)
            digest = sha256_file(tmp)  # what reached the file, read back before it gets its name
            size = tmp.stat().st_size
    side = {"format_version": SHARD_FORMAT_VERSION, "encoding_key": encoding_key, "rows": len(items),
            "dim": int(vectors.shape[1]) if vectors.ndim == 2 else 0, "npy_size": size, "npy_sha256": digest,
            "items": [it.to_dict() for it in items]}
    with build_step("writing the vector shard's item list", d / f"{name}.json"):
        fileio.atomic_write_bytes(d / f"{name}.json", json.dumps(side).encode(), durable=True)
    return name


def read_shard_side(folder: Path, name: str) -> dict[str, Any] | None:
    """The sidecar ``.json`` of a complete shard, None for an incomplete or unreadable one."""
    d = Path(folder) / SHARDS
    try:
        side = json.loads((d / f"{name}.json").read_text())
        if side.get("format_version") != SHARD_FORMAT_VERSION or not (d / f"{name}.npy").is_file():
            return None
        return side
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def read_shard_items(folder: Path, name: str) -> tuple[str, list[Item]] | None:
    """(encoding key, items) of a complete shard, None for an incomplete or unreadable one."""
    side = read_shard_side(folder, name)
    try:
        return (side["encoding_key"], [Item.from_dict(x) for x in side["items"]]) if side else None
    except (KeyError, TypeError):
        return None


def shard_intact(folder: Path, name: str) -> bool:
    """Whether a shard's ``.npy`` still has the size and SHA-256 its sidecar recorded (True for a shard written
    before sidecars recorded them). A build reuses only intact shards, so that damage is re-encoded, not copied
    into the next generation."""
    side = read_shard_side(folder, name)
    if side is None:
        return False
    p = Path(folder) / SHARDS / f"{name}.npy"
    try:
        if "npy_sha256" not in side:
            return True
        return p.stat().st_size == side["npy_size"] and sha256_file(p) == side["npy_sha256"]
    except OSError:
        return False


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
    max_index_bytes: int | None = None,
    extra: Callable[[Path, np.ndarray], dict[str, Any]] | None = None,
    segments: dict[str, Any] | None = None,
) -> Path:
    """Write a complete new generation for ``entries`` = (item, shard name, row in shard) and switch to it.

    Rows are sorted by video id (then segment start), so the index does not depend on the order (or the number
    of processes) in which the vectors were encoded. When less than ``compact_below`` of the referenced shard
    rows are live, the live vectors are rewritten into one new shard first. ``segments`` (the segment settings)
    makes an index of segments: several entries per video, each with its ``start``/``end``.

    ``index_type`` "auto" picks by size, or by ``max_index_bytes`` when given (``index_choice.choose_index``,
    ValueError when nothing fits); the manifest records the choice with its estimated memory and expected
    recall (``index_choice``).

    ``extra(folder, vectors)``, when given, writes further files of the generation into its (temporary) folder
    from the vectors in row order, and returns entries for the manifest; its files are synced and switched in
    with the rest (the query bank statistics of ``qb.py``).

    Returns:
        the new generation folder.
    """
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

    choice = None
    if index_type == "auto":
        c = choose_index(len(entries), dim, max_index_bytes)
        factory, params = c.factory, c.params
        choice = {"bytes": c.bytes, "recall": c.recall, "budget": max_index_bytes}
    else:
        factory, params = index_type, ""
    if search_params is not None:
        params = search_params
    index = build_faiss(vectors, factory)

    gen = new_generation_name()
    tmp = folder / f".{gen}.tmp"
    final = folder / gen
    switched = False
    try:
        with build_step("creating the new generation folder", tmp):
            tmp.mkdir(parents=True)
        with build_step("writing the FAISS index", tmp / FAISS_FILE):
            import faiss

            fileio.atomic_write_bytes(tmp / FAISS_FILE, faiss.serialize_index(index))
        del index
        videos = _video_rows(entries) if segments else entries
        _write_meta_db(tmp / META_DB, videos, entries if segments else None)
        added: dict[str, Any] = {}
        if extra is not None:
            with build_step("writing the query bank's files", tmp):
                added = extra(tmp, vectors)
        del vectors
        # every file of the generation folder (FAISS index, database, query bank files), then the shards
        files = {f"{gen}/{p.name}": None for p in sorted(tmp.iterdir()) if p.is_file()}
        for s in sorted({s for _, s, _ in entries}):
            files[f"{SHARDS}/{s}.npy"] = None
            files[f"{SHARDS}/{s}.json"] = None
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
            "index_choice": choice,
            "shards": sorted({s for _, s, _ in entries}),
            "source": source,
        }
        if segments:
            manifest["segments"] = dict(segments)
            manifest["videos"] = len(videos)
        manifest.update(added)
        manifest["files"] = _file_digests(folder, tmp, gen, files)
        data = json.dumps(manifest, indent=1).encode()
        with build_step("writing the manifest", tmp / MANIFEST):
            fileio.atomic_write_bytes(tmp / MANIFEST, data)
        with build_step("writing the manifest's checksum", tmp / MANIFEST_SUM):
            fileio.atomic_write_bytes(tmp / MANIFEST_SUM, f"{hashlib.sha256(data).hexdigest()}  {MANIFEST}\n".encode())
        with build_step("flushing the new generation to disk", tmp):
            for p in tmp.iterdir():  # everything on disk before the generation becomes visible
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        with build_step("moving the new generation into place", final):
            os.replace(tmp, final)
        with build_step(f"switching {CURRENT} to the new generation", folder / CURRENT):
            fileio.atomic_write_bytes(folder / CURRENT, (gen + "\n").encode(), durable=True)
        switched = True
    finally:
        if not switched:  # the previous generation stays the live one; nothing of this one is left
            shutil.rmtree(tmp, ignore_errors=True)
            if final.is_dir() and read_current_name(folder) != gen:
                shutil.rmtree(final, ignore_errors=True)
    try:
        collect_garbage(folder)
    except OSError as e:  # the new generation is live and whole; what is left is removed by the next build
        import logging

        logging.getLogger(__name__).warning("%s: clean-up after the switch stopped (%s); the next build retries",
                                            folder, e)
    return final


def _thumb_order(rel: str) -> tuple[int, str]:
    stem = Path(rel).stem
    return (int(stem), rel) if stem.isdigit() else (-1, rel)


def _video_rows(entries: Sequence[tuple[Item, str, int]]) -> list[tuple[Item, str, int]]:
    """One entry per video of a segmented collection (entries sorted by video): its first segment's, with the
    thumbnails of all its segments (in frame order, their records alongside) and no time range."""
    out: list[tuple[Item, str, int]] = []
    for it, s, i in entries:
        if not out or out[-1][0].video_id != it.video_id:
            out.append((Item.from_dict(dict(it.to_dict(), thumbnails=[], thumb_stats=[], start=None, end=None)),
                        s, i))
        video = out[-1][0]
        stats = list(it.thumb_stats) + [[]] * (len(it.thumbnails) - len(it.thumb_stats))
        for t, st in zip(it.thumbnails, stats, strict=True):
            if t not in video.thumbnails:
                video.thumbnails.append(t)
                video.thumb_stats.append(st)
    for video, _, _ in out:
        order = sorted(range(len(video.thumbnails)), key=lambda j: _thumb_order(video.thumbnails[j]))
        video.thumbnails = [video.thumbnails[j] for j in order]
        video.thumb_stats = [video.thumb_stats[j] for j in order if video.thumb_stats[j]]
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


def _write_meta_db(path: Path, entries: Sequence[tuple[Item, str, int]],
                   segments: Sequence[tuple[Item, str, int]] | None = None) -> None:
    """``meta.sqlite``: table ``videos`` (one row per video, FAISS id = row) and table ``files`` (the file
    policy's record of each video; ``files.py``); with ``segments`` (the entries of an index of segments) also
    table ``segments``, whose rows are then the FAISS ids."""
    with build_step("writing the metadata database", path), fileio.atomic_path(path) as tmp:
        db = sqlite3.connect(tmp)
        try:
            db.execute("CREATE TABLE videos (row INTEGER PRIMARY KEY, video_id TEXT UNIQUE NOT NULL, "
                       "path TEXT NOT NULL, kind TEXT NOT NULL, size INTEGER, mtime_ns INTEGER, duration REAL, "
                       "frames INTEGER, thumbnails TEXT, shard TEXT NOT NULL, shard_row INTEGER NOT NULL)")
            db.execute("CREATE TABLE files (row INTEGER PRIMARY KEY, root TEXT NOT NULL, entries TEXT NOT NULL, "
                       "thumbs TEXT NOT NULL)")
            db.executemany("INSERT INTO videos VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                           [(r, it.video_id, it.path, it.kind, it.size, it.mtime_ns, it.duration, it.frames,
                             json.dumps(it.thumbnails), s, i) for r, (it, s, i) in enumerate(entries)])
            db.executemany("INSERT INTO files VALUES (?,?,?,?)",
                           [(r, it.root, json.dumps(it.files, ensure_ascii=False),
                             json.dumps([[t, *st] for t, st in zip(it.thumbnails, it.thumb_stats, strict=False)]))
                            for r, (it, _, _) in enumerate(entries)])
            if segments is not None:
                _write_segment_rows(db, segments, entries)
            db.commit()
        finally:
            db.close()


def _file_digests(folder: Path, tmp: Path, gen: str, names: dict[str, Any]) -> dict[str, list[Any]]:
    """[size, sha256] of every file the new generation reads, keyed by its path relative to the index folder.

    A shard's ``.npy`` digest is the one its sidecar recorded when it was written (a shard damaged since then
    then fails verification instead of being blessed anew); its sidecar and the generation's own files are
    hashed here.
    """
    out: dict[str, list[Any]] = {}
    for rel in names:
        path = tmp / rel.split("/", 1)[1] if rel.startswith(gen + "/") else folder / rel
        with build_step("recording the checksum of", path):
            if rel.endswith(".npy") and rel.startswith(SHARDS + "/"):
                side = read_shard_side(folder, Path(rel).stem)
                if side is not None and "npy_sha256" in side:
                    out[rel] = [int(side["npy_size"]), side["npy_sha256"]]
                    continue
            out[rel] = [path.stat().st_size, sha256_file(path)]
    return out


# ----------------------------------------------------------------------------------------------- readers, clean-up
def reader_lock(gen: Path) -> int | None:
    """Hold a shared ``flock`` on a generation's manifest while reading it (a file descriptor; close it to
    release). :func:`collect_garbage` leaves a generation alone while anyone holds one. None where the
    manifest cannot be opened (the caller's next read says why)."""
    try:
        fd = os.open(gen / MANIFEST, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_SH)
    except (ImportError, OSError):
        pass  # no flock (another OS, some network file systems): readers then simply hold no lock
    return fd


def _claim(gen: Path) -> tuple[bool, int | None]:
    """(free, descriptor): whether no reader holds ``gen`` (checked with a non-blocking exclusive lock on its
    manifest), and the descriptor keeping that lock, to be closed once the generation is removed: a reader
    that arrives meanwhile waits, then finds it gone and opens the live one."""
    try:
        import fcntl

        fd = os.open(gen / MANIFEST, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except (ImportError, OSError):
        return True, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True, fd
    except OSError:
        os.close(fd)
        return False, None


def _generation_uses(gen: Path) -> tuple[set[str], set[str]]:
    """(shards, thumbnail keys) a generation refers to; empty sets for an unreadable one."""
    shards: set[str] = set()
    thumbs: set[str] = set()
    try:
        shards = set(json.loads((gen / MANIFEST).read_text())["shards"])
        db = open_db_readonly(gen / META_DB)
        try:
            thumbs = {Path(t).parts[1] for (js,) in db.execute("SELECT thumbnails FROM videos")
                      for t in json.loads(js) if len(Path(t).parts) > 1}
        finally:
            db.close()
    except (OSError, ValueError, KeyError, TypeError, sqlite3.Error):
        pass
    return shards, thumbs


def remove_stale_temps(folder: Path) -> int:
    """Remove what killed runs left: ``.gen-*.tmp`` folders and ``.tmp-*`` files in the index folder, in
    ``shards/`` and in every ``thumbs/<key>/``. Only under the build lock (no other build is writing).
    Returns how many were removed."""
    folder = Path(folder)
    n = 0
    places = [folder, folder / SHARDS]
    if (folder / THUMBS).is_dir():
        places += [p for p in (folder / THUMBS).iterdir() if p.is_dir() and not p.is_symlink()]
    for d in places:
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if d == folder and p.name.startswith("." + GEN_PREFIX) and p.name.endswith(".tmp"):
                _remove_any(p)
                n += 1
            elif p.name.startswith(TMP_PREFIX) and (p.is_file() or p.is_symlink()):
                p.unlink(missing_ok=True)
                n += 1
    return n


def _remove_any(p: Path) -> None:
    """Remove a folder tree or a file; a link is removed itself, never followed."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def collect_garbage(folder: Path) -> None:
    """Remove what no generation in use needs: old generations, temp files, unused shards and thumbnails.

    Only called by a build that holds the build lock, right after it switched ``CURRENT``; shards of an
    interrupted build (never referenced) are removed here too, after the re-run has reused them. A generation
    a reader (a server, a running query) still holds is kept, with its shards and thumbnails; a later build
    removes it once it is released. Clean-up is best effort: a failure here leaves files, never a broken index.
    """
    folder = Path(folder)
    live = read_current_name(folder)
    if live is None:
        return
    keep_shards, keep_thumbs = _generation_uses(folder / live)
    for p in folder.iterdir():
        if p.name.startswith(GEN_PREFIX) and p.name != live and p.is_dir() and not p.is_symlink():
            free, fd = _claim(p)
            if not free:
                shards, thumbs = _generation_uses(p)
                keep_shards |= shards
                keep_thumbs |= thumbs
                continue
            try:
                shutil.rmtree(p, ignore_errors=True)
            finally:
                if fd is not None:
                    os.close(fd)
        elif p.name.startswith(GEN_PREFIX) and p.name != live and p.is_symlink():
            p.unlink(missing_ok=True)  # not a generation of this index
    remove_stale_temps(folder)
    for p in (folder / SHARDS).glob("*") if (folder / SHARDS).is_dir() else []:
        stem = p.name.split(".")[0] if not p.name.startswith(".") else None
        if stem is None or stem not in keep_shards:
            p.unlink(missing_ok=True)
    thumbs = folder / THUMBS
    if thumbs.is_dir():
        for p in thumbs.iterdir():
            if p.name not in keep_thumbs:
                _remove_any(p)


# ----------------------------------------------------------------------------------------------- reading
def read_current_name(folder: Path) -> str | None:
    """The generation name ``CURRENT`` holds, or None when it is missing or not a valid name (no message)."""
    try:
        return read_current(folder)
    except IndexFormatError:
        return None


def read_current(folder: str | os.PathLike) -> str:
    """The live generation's name, checked: ``CURRENT`` is a small regular file holding one ``gen-*`` name of
    a real folder directly inside the index folder (not a path, not a link to elsewhere). IndexFormatError
    (one line naming the file) for anything else."""
    folder = Path(folder)
    cur = folder / CURRENT
    try:
        st = os.lstat(cur)
    except FileNotFoundError:
        if (folder / "index.faiss").exists() or (folder / MANIFEST).exists():
            raise IndexFormatError(f"{folder}: index of an older format (no {CURRENT} file); rebuild it with "
                                   "search.py build") from None
        raise IndexFormatError(f"{folder}: not a search index (no {CURRENT} file); build one with search.py "
                               "build") from None
    except OSError as e:
        raise IndexFormatError(f"{cur}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise IndexFormatError(f"{cur}: not a regular file (a link or a folder); the index is damaged")
    if st.st_size > MAX_CURRENT_BYTES:
        raise IndexFormatError(f"{cur}: {st.st_size} bytes, not a generation name; the index is damaged")
    try:
        raw = cur.read_bytes()[:MAX_CURRENT_BYTES]
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise IndexFormatError(f"{cur}: holds binary data, not a generation name; the index is damaged") from None
    except OSError as e:
        raise IndexFormatError(f"{cur}: cannot read ({e.strerror or e})") from None
    name = text.strip()
    if not GEN_NAME.fullmatch(name):
        raise IndexFormatError(f"{cur}: names {name[:80]!r}, not a {GEN_PREFIX}* folder of this index; the index "
                               "is damaged")
    gen = folder / name
    try:
        inside = not gen.is_symlink() and gen.is_dir() and gen.resolve().parent == folder.resolve()
    except OSError:
        inside = False
    if not inside:
        raise IndexFormatError(f"{cur}: names {name!r}, which is not a folder inside {folder} (missing, or a link "
                               "elsewhere); truncated or damaged index")
    return name


def read_manifest(folder: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(live generation folder, its manifest), or IndexFormatError with one line saying what is wrong.

    The manifest's bytes must match the SHA-256 recorded beside it (``manifest.sha256``): an edited or damaged
    manifest (a changed logit scale rescales every score) is refused, not read.
    """
    folder = Path(folder)
    if not folder.exists():
        raise IndexFormatError(f"{folder}: no such index folder (build one with: search.py build --index {folder})")
    if not folder.is_dir():
        raise IndexFormatError(f"{folder}: not an index folder (a file)")
    live = read_current(folder)
    gen = folder / live
    path = gen / MANIFEST
    if not path.is_file():
        raise IndexFormatError(f"{folder}: truncated index: {CURRENT} names {live!r}, which has no {MANIFEST}")
    try:
        data = path.read_bytes()
        manifest = json.loads(data)
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"{path}: truncated or damaged ({type(e).__name__})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    recorded = read_manifest_sum(gen)
    if recorded is None and version != FORMAT_VERSION:
        raise IndexFormatError(f"{folder}: index format version {version}, this version reads {FORMAT_VERSION}; "
                               "rebuild it with search.py build")
    if recorded is None:
        raise IndexFormatError(f"{gen / MANIFEST_SUM}: missing or damaged; the manifest cannot be checked (rebuild "
                               "the index)")
    if hashlib.sha256(data).hexdigest() != recorded:
        raise IndexFormatError(f"{path}: truncated or damaged (its SHA-256 differs from the one recorded in "
                               f"{MANIFEST_SUM} at build time); rebuild the index")
    if version != FORMAT_VERSION:
        raise IndexFormatError(f"{folder}: index format version {version}, this version reads {FORMAT_VERSION}; "
                               "rebuild it with search.py build")
    missing = [k for k in ("count", "dim", "fingerprint", "model", "index_type", "shards", "files")
               if k not in manifest]
    if missing:
        raise IndexFormatError(f"{path}: truncated or damaged (missing {', '.join(missing)})")
    return gen, manifest


def open_db_readonly(path: str | os.PathLike, **kw: Any) -> sqlite3.Connection:
    """A read-only SQLite connection (a ``file:`` URI, so any character of the path is safe in it)."""
    return sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, **kw)


def read_manifest_sum(gen: Path) -> str | None:
    """The manifest's SHA-256 recorded in ``manifest.sha256`` (hex), or None when it is missing or not one."""
    try:
        text = (gen / MANIFEST_SUM).read_bytes()[:200].decode("ascii")
    except (OSError, UnicodeDecodeError):
        return None
    m = re.fullmatch(r"([0-9a-f]{64}) [ *]" + re.escape(MANIFEST) + r"\n?", text)
    return m.group(1) if m else None
