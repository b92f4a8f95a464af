"""Reading a search index and answering queries: ``SearchIndex`` over the live generation of an index folder.

A CLIP2Video score is one inner product of a caption vector ``[w·t_g, (1−w)·t_a]`` and a video vector
``[v_g, v_a]`` (``CLIP2Video.text_vector`` / ``video_vector``), times the logit scale. The index stores the
video vectors and answers a caption vector with the top-k videos and those very scores, so a query returns
the numbers ``infer_retrieval.py --save_sim`` writes for the same model.

The folder format is ``store.py``'s; the model comes from the record the manifest holds
(``clip2video.modules.weights.identity``), loaded on the first text query.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clip2video.modules.weights.identity import ModelMismatchError, ModelRecord
from clip2video.search.moments import Moment, SearchRequest, search_moments
from clip2video.search.store import (
    FAISS_FILE,
    META_DB,
    SHARDS,
    IndexFormatError,
    Item,
    apply_search_params,
    read_manifest,
)

if TYPE_CHECKING:
    from clip2video.modules.weights.spec import ModelSpec


@dataclass(frozen=True)
class Hit:
    video_id: str
    score: float  # ×logit-scale units, the number infer_retrieval.py --save_sim writes
    path: str  # the indexed source path, as recorded at build time
    start: float | None = None  # the segment's time range in seconds (a whole video: 0 and its duration)
    end: float | None = None
    moments: tuple[Moment, ...] = ()  # grouped results: the video's next best segments, best first
    thumbnails: tuple[int, ...] | None = None  # which of the video's thumbnails show this segment (None: all)
    segment: bool = False  # a segment of a video (an index of segments), not a whole video


@dataclass(frozen=True)
class VideoRecord:
    video_id: str
    path: Path
    kind: str  # "file" | "frames"
    thumbnails: list[Path]
    duration: float | None
    frames: int | None


# ----------------------------------------------------------------------------------------------- queries
def encode_queries(model, tokenizer, texts: Sequence[str], precision: str = "fp32") -> np.ndarray:
    """(n, D) float32 caption vectors ``[w·t_g, (1−w)·t_a]`` for a batch of query texts.

    ``model.encode_text`` runs the text tower on the batch's real tokens only, so a short query costs a
    fraction of a ``max_words``-long one.
    """
    import torch

    from clip2video.modules.runtime.precision import autocast

    ids, mask = tokenizer.batch(list(texts))
    device = next(model.parameters()).device
    with torch.inference_mode(), autocast(device, precision):
        t = model.encode_text(ids.to(device), mask.to(device))
        v = model.text_vector(t).float().cpu().numpy()
    return np.ascontiguousarray(v, dtype=np.float32)



class SearchIndex:
    """A read-only view of the live generation of an index folder; safe for concurrent readers.

    The model is loaded lazily on the first text query, from what the manifest records (checkpoint path and
    resolved config), and checked against the recorded fingerprint.
    """

    def __init__(self, folder: Path, gen: Path, manifest: dict[str, Any], device: str | None, precision: str):
        self.folder = folder
        self.generation = gen
        self.manifest = manifest
        self.fingerprint: str = manifest["fingerprint"]
        self.model_record = ModelRecord.from_dict(manifest["model"])
        self.logit_scale = float(self.model_record.logit_scale)
        self.dim = int(manifest["dim"])
        self.device = device
        self.precision = precision
        self._lock = threading.Lock()
        self._model = None
        self._tokenizer = None
        self._load(gen, manifest)

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, folder: str | os.PathLike, *, device: str | None = None, precision: str = "fp32") -> SearchIndex:
        folder = Path(folder)
        gen, manifest = read_manifest(folder)
        return cls(folder, gen, manifest, device, precision)

    def _load(self, gen: Path, manifest: dict[str, Any]) -> None:
        import faiss

        self.segments: dict[str, Any] | None = manifest.get("segments") or None
        try:
            db = sqlite3.connect(f"file:{gen / META_DB}?mode=ro", uri=True, check_same_thread=False)
            videos = db.execute("SELECT row, video_id, path, shard, shard_row, duration, mtime_ns FROM videos "
                                "ORDER BY row").fetchall()
            if self.segments:
                rows = db.execute("SELECT row, video, shard, shard_row, start_s, end_s, thumbnails FROM segments "
                                  "ORDER BY row").fetchall()
            else:
                rows = [(r[0], r[0], r[3], r[4], 0.0, r[5], None) for r in videos]
        except sqlite3.Error as e:
            raise IndexFormatError(f"{gen / META_DB}: truncated or damaged ({e})") from None
        if len(rows) != manifest["count"] or any(r[0] != i for i, r in enumerate(rows)):
            raise IndexFormatError(f"{gen / META_DB}: truncated ({len(rows)} rows, manifest says {manifest['count']})")
        if any(r[0] != i for i, r in enumerate(videos)) or any(not 0 <= r[1] < len(videos) for r in rows):
            raise IndexFormatError(f"{gen / META_DB}: damaged (segments name videos it does not hold)")
        self._db = db
        self.video_ids: list[str] = [r[1] for r in videos]  # one per video, in id order
        self.paths: list[str] = [r[2] for r in videos]
        self._row_of = {v: i for i, v in enumerate(self.video_ids)}  # video id → its number
        self.durations = np.array([np.nan if r[5] is None else float(r[5]) for r in videos], dtype=np.float64)
        self.mtimes = np.array([r[6] or 0 for r in videos], dtype=np.int64)
        self.n_rows = len(rows)  # vectors: one per video, or one per segment
        self.row_video = np.array([r[1] for r in rows], dtype=np.int64)  # rows of a video are contiguous
        self.starts = np.array([r[4] for r in rows], dtype=np.float64)
        self.ends = np.array([np.nan if r[5] is None else r[5] for r in rows], dtype=np.float64)
        self._row_thumbs = [None if r[6] is None else tuple(json.loads(r[6])) for r in rows]
        self.video_first = np.searchsorted(self.row_video, np.arange(len(videos)), side="left")
        self.video_stop = np.searchsorted(self.row_video, np.arange(len(videos)), side="right")
        if len(rows) and np.any(np.diff(self.row_video) < 0):
            raise IndexFormatError(f"{gen / META_DB}: damaged (a video's segments are not together)")
        shard_names = list(manifest["shards"])
        pos = {s: k for k, s in enumerate(shard_names)}
        self._shards = []
        for s in shard_names:
            p = self.folder / SHARDS / f"{s}.npy"
            try:
                m = np.load(p, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise IndexFormatError(f"{p}: missing or truncated vector shard ({type(e).__name__})") from None
            if m.ndim != 2 or m.shape[1] != self.dim or m.dtype != np.float32:
                raise IndexFormatError(f"{p}: vector shard of shape {m.shape} {m.dtype}, expected (n, {self.dim})")
            self._shards.append(m)
        try:
            self._row_shard = np.array([pos[r[2]] for r in rows], dtype=np.int32)
            self._row_offset = np.array([r[3] for r in rows], dtype=np.int64)
        except KeyError as e:
            raise IndexFormatError(f"{gen / META_DB}: names shard {e} that the manifest does not list") from None
        for k, m in enumerate(self._shards):
            sel = self._row_offset[self._row_shard == k]
            if len(sel) and sel.max() >= m.shape[0]:
                raise IndexFormatError(f"{self.folder / SHARDS / shard_names[k]}.npy: truncated vector shard")
        fpath = gen / FAISS_FILE
        try:
            self._index = faiss.read_index(str(fpath))
        except (RuntimeError, OSError) as e:
            raise IndexFormatError(f"{fpath}: missing or truncated FAISS index ({str(e).splitlines()[0][:120]})") \
                from None
        if self._index.ntotal != self.n_rows or self._index.d != self.dim:
            raise IndexFormatError(f"{fpath}: holds {self._index.ntotal} vectors of dim {self._index.d}, "
                                   f"expected {len(rows)} of dim {self.dim}")
        apply_search_params(self._index, manifest.get("search_params") or "")
        self.exact = manifest["index_type"] == "Flat"

    def __len__(self) -> int:
        """Number of videos (an index of segments holds more rows: ``n_rows``)."""
        return len(self.video_ids)

    # ------------------------------------------------------------------ vectors
    def vectors(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Exact stored vectors of the given rows, (len(rows), D) float32 (one gather per shard)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        if len(rows) == 0:
            return out
        shard = self._row_shard[rows]
        offset = self._row_offset[rows]
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = self._shards[k][offset[sel]]
        return out

    def hit(self, row: int, score: float, moments: tuple[Moment, ...] = ()) -> Hit:
        """The :class:`Hit` of index row ``row`` with ``score`` (unscaled inner product)."""
        v = int(self.row_video[row])
        end = float(self.ends[row])
        return Hit(self.video_ids[v], float(score) * self.logit_scale, self.paths[v], float(self.starts[row]),
                   None if np.isnan(end) else end, moments, self._row_thumbs[row], bool(self.segments))

    # ------------------------------------------------------------------ model
    def check_model(self, spec: ModelSpec) -> None:
        """ModelMismatchError when ``spec`` describes another model than the one the index was built with.

        The spec's model is loaded and fingerprinted (the mask layout does not count: an index always runs
        ``per_video``).
        """
        from clip2video.modules.weights.identity import model_fingerprint
        from clip2video.modules.weights.spec import load_model

        theirs = model_fingerprint(load_model(spec))
        if theirs != self.fingerprint:
            raise ModelMismatchError(f"{self.folder}: another model (fingerprint {theirs[:12]}) than the one the "
                                     f"index was built with ({self.fingerprint[:12]})", expected=self.fingerprint,
                                     got=theirs)

    def _ensure_model(self):
        if self._model is not None:
            return self._model
        with self._lock:
            if self._model is None:
                from clip2video.modules.network.tokenizer import ClipTokenizer
                from clip2video.modules.weights.identity import load_recorded

                model = load_recorded(self.model_record, device=self.device)
                self._tokenizer = ClipTokenizer(int(self.model_record.max_words or 32))
                self._model = model
        return self._model

    def model_and_tokenizer(self):
        """The recorded model (loaded on the first call) and its tokenizer, for queries other than plain text
        (``query_vectors.QueryEncoder``)."""
        return self._ensure_model(), self._tokenizer

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """(n, D) float32 caption vectors (unscaled); only real tokens go through the text tower."""
        if isinstance(texts, str):
            texts = [texts]
        model = self._ensure_model()
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        v = encode_queries(model, self._tokenizer, list(texts), self.precision)
        if v.shape[1] != self.dim:
            raise IndexFormatError(f"{self.folder}: model gives {v.shape[1]}-d vectors, the index holds {self.dim}-d")
        return np.ascontiguousarray(v, dtype=np.float32)

    # ------------------------------------------------------------------ search
    def search(self, vectors: np.ndarray, k: int | SearchRequest) -> list[list[Hit]]:
        """Top-k videos per query vector, best first, scores ×logit scale.

        An approximate index proposes candidates; their scores are then recomputed from the exact stored
        vectors (and re-sorted), so every score printed is the exact CLIP2Video score. ``k`` may be a
        ``moments.SearchRequest``: grouping of segments by video, one video's segments, filters (an index of
        segments groups by default).
        """
        q = np.ascontiguousarray(np.atleast_2d(np.asarray(vectors, dtype=np.float32)))
        if q.shape[0] and q.shape[1] != self.dim:
            raise ValueError(f"query vectors have dim {q.shape[1]}, the index holds {self.dim}")
        request = k if isinstance(k, SearchRequest) else SearchRequest(int(k))
        if not request.plain(self):
            return search_moments(self, q, request)
        k = request.k
        if q.shape[0] == 0 or self.n_rows == 0 or k <= 0:
            return [[] for _ in range(q.shape[0])]
        k = min(int(k), self.n_rows)
        fetch = k if self.exact else min(self.n_rows, max(2 * k, k + 10))
        scores, labels = self._index.search(q, fetch)
        out = []
        for qi in range(q.shape[0]):
            lab = labels[qi][labels[qi] >= 0]
            if self.exact:
                sc = scores[qi][: len(lab)]
            else:
                sc = self.vectors(lab) @ q[qi]
                order = np.argsort(-sc, kind="stable")
                lab, sc = lab[order], sc[order]
            out.append([self.hit(r, s) for r, s in zip(lab[:k].tolist(), sc[:k].tolist(), strict=True)])
        return out

    def query(self, texts: list[str], k: int | SearchRequest) -> list[list[Hit]]:
        return self.search(self.encode_text(texts), k)

    def similar(self, video_id: str, k: int | SearchRequest, start: float | None = None) -> list[Hit]:
        """Videos (or moments) closest to an indexed video, or to its segment starting at ``start``; the video
        itself is excluded (with ``start``: only its segments that overlap that one). KeyError for an unknown id
        or start.

        The vector is weighted as a caption's is (``[w·v_g, (1−w)·v_a]``) so the two parts count as in a text
        query; a whole video of several segments is the mean of its segments' parts, each made unit length.
        """
        v = self._row_of[video_id]
        first, stop = int(self.video_first[v]), int(self.video_stop[v])
        g = int(self.model_record.global_dim or 0)
        if start is None:
            rows = np.arange(first, stop)
            exclude = rows
        else:
            at = np.nonzero(np.abs(self.starts[first:stop] - float(start)) < 1e-6)[0]
            if not len(at):
                raise KeyError(f"{video_id}@{start}")
            r = first + int(at[0])
            rows = np.array([r])
            exclude = np.arange(first, stop)[(self.starts[first:stop] < self.ends[r])
                                             & (self.ends[first:stop] > self.starts[r])]
        vec = self._mean_vector(rows)
        if 0 < g < self.dim:
            w = float(self.model_record.center_weight)
            vec = np.concatenate([w * vec[:g], (1 - w) * vec[g:]])
        request = k if isinstance(k, SearchRequest) else SearchRequest(int(k))
        if not self.segments and start is None and request.plain(self):  # as before: one row per video
            hits = self.search(vec[None], request.k + 1)[0]
            return [h for h in hits if h.video_id != video_id][: request.k]
        return self.search(vec[None], request.excluding(tuple(int(x) for x in exclude)))[0]

    def stored_vector(self, video_id: str) -> np.ndarray:
        """The stored ``[v_g, v_a]`` of an indexed video, (D,) float32; KeyError for an unknown id. A video of
        several segments: the mean of its segments' parts, each made unit length again."""
        v = self._row_of[video_id]
        return self._mean_vector(np.arange(int(self.video_first[v]), int(self.video_stop[v])))

    def _mean_vector(self, rows: np.ndarray) -> np.ndarray:
        vec = self.vectors(rows)
        if len(rows) == 1:
            return vec[0]
        g = int(self.model_record.global_dim or 0)
        parts = [vec[:, :g], vec[:, g:]] if 0 < g < self.dim else [vec]
        return np.concatenate([p.mean(0) / max(float(np.linalg.norm(p.mean(0))), 1e-12) for p in parts])

    def record(self, video_id: str) -> VideoRecord | None:
        if video_id not in self._row_of:
            return None
        with self._lock:
            row = self._db.execute("SELECT video_id, path, kind, duration, frames, thumbnails FROM videos "
                                   "WHERE video_id = ?", (video_id,)).fetchone()
        if row is None:
            return None
        thumbs = [self.folder / t for t in json.loads(row[5] or "[]")]
        return VideoRecord(row[0], Path(row[1]), row[2], thumbs, row[3], row[4])

    def frame_rate(self, video_id: str) -> float:
        """Frames per second that a frame folder's frames stand for (what its times are measured in): the
        index's ``--video_fps``, else its recorded frames / duration, else the default."""
        from clip2video.dataloaders.video_io import DEFAULT_VIDEO_FPS

        fps = (self.manifest.get("encoding") or {}).get("video_fps")
        if fps:
            return float(fps)
        rec = self.record(video_id)
        if rec is not None and rec.frames and rec.duration:
            return float(rec.frames) / float(rec.duration)
        return DEFAULT_VIDEO_FPS

    def rows_of(self, video_id: str) -> range:
        """Index rows of one video (its segments in time order); KeyError for an unknown id."""
        v = self._row_of[video_id]
        return range(int(self.video_first[v]), int(self.video_stop[v]))

    def items(self) -> list[Item]:
        """Every indexed video with its stored file state (for incremental builds)."""
        with self._lock:
            rows = self._db.execute("SELECT video_id, path, kind, size, mtime_ns, duration, frames, thumbnails, "
                                    "shard, shard_row FROM videos ORDER BY row").fetchall()
        return [Item(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7] or "[]")) for r in rows]

    def locations(self) -> list[tuple[str, int]]:
        with self._lock:
            return self._db.execute("SELECT shard, shard_row FROM videos ORDER BY row").fetchall()

    def close(self) -> None:
        self._db.close()
