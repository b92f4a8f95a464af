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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clip2video.modules.weights.identity import ModelMismatchError, ModelRecord
from clip2video.search.integrity import verify_generation
from clip2video.search.moments import Moment, SearchRequest, search_moments
from clip2video.search.qb import load_statistics, normalise_candidates, top_k
from clip2video.search.store import (
    FAISS_FILE,
    MANIFEST,
    META_DB,
    SHARDS,
    IndexFormatError,
    Item,
    apply_search_params,
    open_db_readonly,
    read_current_name,
    read_manifest,
    reader_lock,
)

if TYPE_CHECKING:
    from clip2video.modules.weights.spec import ModelSpec


@dataclass(frozen=True)
class Hit:
    video_id: str
    score: float  # ×logit-scale units, the number infer_retrieval.py --save_sim writes (--save_sim_qb's with qb)
    path: str  # the indexed source path, as recorded at build time
    qb: bool = False  # the score is QB-Norm's exp(β·s)/Σ_bank (the query landed on a row of R)
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
    # the file policy's record (``files.py``): the root every served file lies under, the files recorded at
    # build time ([name relative to ``path`` ("" for a video file), size, mtime_ns]) and each thumbnail's
    # [size, mtime_ns, sha256]
    root: Path | None = None
    files: list[list[Any]] = field(default_factory=list)
    thumb_stats: list[list[Any]] = field(default_factory=list)


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



def _give_back_freed_memory() -> None:
    """glibc keeps freed heap for reuse; after the model export (hundreds of MB of temporaries) give it back
    to the system so the server's RSS is what it holds. A no-op where glibc is not the C library."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class SearchIndex:
    """A read-only view of the live generation of an index folder; safe for concurrent readers.

    The model is loaded lazily on the first text query, from what the manifest records (checkpoint path and
    resolved config), and checked against the recorded fingerprint.
    """

    def __init__(self, folder: Path, gen: Path, manifest: dict[str, Any], device: str | None, precision: str,
                 text_encoder: str = "torch", query_cache_bytes: int = 0, lock_fd: int | None = None):
        from clip2video.search.text_encoder import TEXT_ENCODERS, QueryCache

        if text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"--text_encoder must be one of {', '.join(TEXT_ENCODERS)}, got {text_encoder!r}")
        self.folder = folder
        self.generation = gen
        self._lock_fd = None  # set once loaded: until then the opener owns (and on failure closes) the descriptor
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
        self.text_encoder_name = text_encoder
        self._encoder = None
        self.query_cache = QueryCache(query_cache_bytes)
        self._load(gen, manifest)
        self._lock_fd = lock_fd  # shared flock on the manifest: the build's clean-up leaves this generation alone

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, folder: str | os.PathLike, *, device: str | None = None, precision: str = "fp32",
             verify: bool | None = None, text_encoder: str = "torch", query_cache_bytes: int = 0) -> SearchIndex:
        """Open the live generation of ``folder``, checked against its build's record (``integrity.py``).

        ``text_encoder`` picks the runtime of the text tower (``text_encoder.TEXT_ENCODERS``; ``torch`` gives
        ``--save_sim``'s numbers); ``query_cache_bytes`` bounds the cache of recent query vectors (0: none).

        ``verify``: True hashes every file, False only the small ones, None (default) hashes every file on the
        first open of a generation and only the small ones after that. A generation replaced by a build while
        it was being opened is retried with the new one.
        """
        folder = Path(folder)
        for attempt in range(3):
            gen, manifest = read_manifest(folder)
            fd = reader_lock(gen)
            try:
                if fd is None or not (gen / MANIFEST).is_file():
                    raise IndexFormatError(f"{folder}: truncated index: generation {gen.name} has no {MANIFEST}")
                verify_generation(folder, gen, manifest, full=verify)
                return cls(folder, gen, manifest, device, precision, text_encoder, query_cache_bytes, lock_fd=fd)
            except BaseException as e:
                if fd is not None:
                    os.close(fd)
                if isinstance(e, IndexFormatError) and attempt < 2 and read_current_name(folder) != gen.name:
                    continue  # a build switched generations meanwhile: open the new one
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    @property
    def generation_name(self) -> str:
        return self.generation.name

    def reopen(self, *, verify: bool | None = None) -> SearchIndex:
        """The folder's live generation opened anew (after a build); the loaded model is shared when the new
        generation records the same one."""
        new = SearchIndex.open(self.folder, device=self.device, precision=self.precision, verify=verify,
                               text_encoder=self.text_encoder_name)
        new.query_cache = self.query_cache  # keyed by fingerprint: another model's vectors are never returned
        if self._model is not None and new.model_record.to_dict() == self.model_record.to_dict():
            new._model, new._tokenizer, new._encoder = self._model, self._tokenizer, self._encoder
        return new

    def changed(self) -> bool:
        """Whether ``CURRENT`` names another generation than the one open (a build switched)."""
        name = read_current_name(self.folder)
        return name is not None and name != self.generation.name

    def _load(self, gen: Path, manifest: dict[str, Any]) -> None:
        import faiss

        self.segments: dict[str, Any] | None = manifest.get("segments") or None
        try:
            db = open_db_readonly(gen / META_DB, check_same_thread=False)
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
        self._row_of = {v: i for i, v in enumerate(self.video_ids)}  # video id → its number (= row of videos)
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
        if self._index.ntotal != len(rows) or self._index.d != self.dim:
            raise IndexFormatError(f"{fpath}: holds {self._index.ntotal} vectors of dim {self._index.d}, "
                                   f"expected {len(rows)} of dim {self.dim}")
        params = manifest.get("search_params") or ""
        apply_search_params(self._index, params)
        self.exact = manifest["index_type"] == "Flat"
        # candidates re-scored per result asked for (``rerank=R`` in the search parameters; 2 by default):
        # codes that rank coarsely (PQ) need more of them than 8-bit ones
        self.rerank = 2.0
        for part in params.split(","):
            name, _, value = part.partition("=")
            if name.strip() == "rerank":
                try:
                    self.rerank = float(value)
                except ValueError:
                    raise IndexFormatError(f"{gen}: search parameter {part!r} is not a number") from None
        self.qb = load_statistics(gen, manifest)  # QB-Norm statistics per row (qb.py), None without a bank
        self._all: np.ndarray | None = None

    def __len__(self) -> int:
        """Number of videos (an index of segments holds more rows: ``n_rows``)."""
        return len(self.video_ids)

    # ------------------------------------------------------------------ vectors
    def vectors(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Exact stored vectors of the given rows, (len(rows), D) float32."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        if len(rows) == 0:
            return out
        shard, offset = self._row_shard[rows], self._row_offset[rows]
        for s in np.unique(shard):  # one gather per shard (re-scoring reads up to a few hundred rows)
            sel = shard == s
            out[sel] = self._shards[s][offset[sel]]
        return out

    def all_vectors(self) -> np.ndarray:
        """Every row's vector, (n, D) float32: the exact index's own storage (no copy) when it has one."""
        if self._all is None:
            import faiss

            flat = faiss.downcast_index(self._index) if self.exact else None
            if isinstance(flat, faiss.IndexFlat) and flat.ntotal:
                view = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
                self._all = view  # valid while self._index lives, which it does as long as self
            else:
                self._all = self.vectors(np.arange(self.n_rows))
        return self._all

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

    def _ensure_encoder(self):
        """The text encoder over the recorded model, built on first use."""
        if self._encoder is not None:
            return self._encoder
        model = self._ensure_model()
        with self._lock:
            if self._encoder is None:
                from clip2video.search.text_encoder import make_text_encoder

                self._encoder = make_text_encoder(self.text_encoder_name, model, self._tokenizer, self.dim,
                                                  precision=self.precision)
                if self._encoder.name != "torch":
                    _give_back_freed_memory()  # the export's temporaries (hundreds of MB)
        return self._encoder

    @property
    def text_encoder(self):
        """The text encoder in use (``text_encoder.TextEncoder``; its ``name`` says which runtime)."""
        return self._ensure_encoder()

    def model_and_tokenizer(self):
        """The recorded model (loaded on the first call) and its tokenizer, for queries other than plain text
        (``query_vectors.QueryEncoder``)."""
        return self._ensure_model(), self._tokenizer

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """(n, D) float32 caption vectors (unscaled); only real tokens go through the text tower; recent
        queries come from the cache (keyed by this index's model fingerprint and the encoder)."""
        from clip2video.search.text_encoder import encode_cached

        if isinstance(texts, str):
            texts = [texts]
        encoder = self._ensure_encoder()
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        v = encode_cached(encoder, self.query_cache, self.fingerprint, list(texts))
        if v.shape[1] != self.dim:
            raise IndexFormatError(f"{self.folder}: model gives {v.shape[1]}-d vectors, the index holds {self.dim}-d")
        return np.ascontiguousarray(v, dtype=np.float32)

    # ------------------------------------------------------------------ search
    def hit(self, row: int, score: float, moments: tuple[Moment, ...] = (), qb: bool = False) -> Hit:
        """The :class:`Hit` of index row ``row`` with ``score`` (already ×logit scale, or QB-Norm's)."""
        v = int(self.row_video[row])
        end = float(self.ends[row])
        return Hit(self.video_ids[v], float(score), self.paths[v], bool(qb), float(self.starts[row]),
                   None if np.isnan(end) else end, moments, self._row_thumbs[row], bool(self.segments))

    def qb_rows(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every row's score for each query with QB-Norm applied as a whole row: ((n, rows) float64, (n,) bool
        normalised or not). Scored with torch's matrix product (see :meth:`_search_all_qb`)."""
        import torch

        with torch.inference_mode():
            plain = (torch.tensor(q) @ torch.from_numpy(self.all_vectors()).T).numpy()
        return self.qb.apply(self.logit_scale * plain.astype(np.float64))

    def search(self, vectors: np.ndarray, k: int | SearchRequest, *, qb: bool | None = None) -> list[list[Hit]]:
        """Top-k videos per query vector, best first, scores ×logit scale.

        An approximate index proposes candidates; their scores are then recomputed from the exact stored
        vectors (and re-sorted), so every score printed is the exact CLIP2Video score.

        The vectors are text queries: when the index stores QB-Norm statistics they are applied (``qb``
        None or True; False switches them off), over every row for an exact index, over the re-scored
        candidates for an approximate one (``qb.py``). ``Hit.qb`` says whether a query's scores are normalised.

        ``k`` may be a ``moments.SearchRequest``: grouping of segments by video, one video's segments, filters
        (an index of segments groups by default); ``moments.search_moments`` answers those.
        """
        q = np.ascontiguousarray(np.atleast_2d(np.asarray(vectors, dtype=np.float32)))
        if q.shape[0] and q.shape[1] != self.dim:
            raise ValueError(f"query vectors have dim {q.shape[1]}, the index holds {self.dim}")
        request = k if isinstance(k, SearchRequest) else SearchRequest(int(k))
        if not request.plain(self):
            return search_moments(self, q, request, qb=qb)
        k = request.k
        if q.shape[0] == 0 or self.n_rows == 0 or k <= 0:
            return [[] for _ in range(q.shape[0])]
        k = min(int(k), self.n_rows)
        use_qb = self.qb is not None and qb is not False
        if use_qb and self.exact:
            return self._search_all_qb(q, k)
        fetch = k if self.exact else min(self.n_rows, max(int(np.ceil(self.rerank * k)), k + 10))
        scores, labels = self._index.search(q, fetch)
        out = []
        for qi in range(q.shape[0]):
            lab = labels[qi][labels[qi] >= 0]
            applied = False
            if self.exact:
                sc = scores[qi][: len(lab)]
            else:
                sc = self.logit_scale * (self.vectors(lab) @ q[qi]).astype(np.float64)
                if use_qb:
                    sc, applied = normalise_candidates(self.qb, lab, sc)
                order = np.argsort(-sc, kind="stable")
                lab, sc = lab[order], sc[order]
            scale = self.logit_scale if self.exact else 1.0
            out.append([self.hit(r, float(s) * scale, qb=applied)
                        for r, s in zip(lab[:k].tolist(), sc[:k].tolist(), strict=True)])
        return out

    def _search_all_qb(self, q: np.ndarray, k: int) -> list[list[Hit]]:
        """Exact search with QB-Norm: each query scored against every row and normalised as a whole row.

        The scores come from torch's matrix product, which keeps to the threads the process set
        (``torch.set_num_threads``, as ``serve`` does); NumPy's BLAS starts its own and, on a loaded machine,
        waits on them (``benchmarks/README.md``, QB-Norm in search).
        """
        rows, applied = self.qb_rows(q)
        out = []
        for qi in range(q.shape[0]):
            top = top_k(rows[qi], k)
            out.append([self.hit(r, float(rows[qi, r]), qb=bool(applied[qi])) for r in top.tolist()])
        return out

    def query(self, texts: list[str], k: int | SearchRequest, *, qb: bool | None = None) -> list[list[Hit]]:
        return self.search(self.encode_text(texts), k, qb=qb)

    def similar(self, video_id: str, k: int | SearchRequest, start: float | None = None) -> list[Hit]:
        """Videos (or moments) closest to an indexed video, or to its segment starting at ``start``; the video
        itself is excluded (with ``start``: only its segments that overlap that one). KeyError for an unknown id
        or start. Never QB-normalised: the bank holds captions.

        The vector is weighted as a caption's is (``[w·v_g, (1−w)·v_a]``) so the two parts count as in a text
        query; a whole video of several segments is the mean of its segments' parts, each made unit length.
        """
        v = self._row_of[video_id]
        first, stop = int(self.video_first[v]), int(self.video_stop[v])
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
        g = int(self.model_record.global_dim or 0)
        if 0 < g < self.dim:
            w = float(self.model_record.center_weight)
            vec = np.concatenate([w * vec[:g], (1 - w) * vec[g:]])
        request = k if isinstance(k, SearchRequest) else SearchRequest(int(k))
        if not self.segments and start is None and request.plain(self):  # as before: one row per video
            hits = self.search(vec[None], request.k + 1, qb=False)[0]
            return [h for h in hits if h.video_id != video_id][: request.k]
        return self.search(vec[None], request.excluding(tuple(int(x) for x in exclude)), qb=False)[0]

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

    def record(self, video_id: str) -> VideoRecord | None:
        """The video's record with its file policy record (None for an id the index does not hold)."""
        r = self._row_of.get(video_id)
        if r is None:
            return None
        try:
            with self._lock:
                row = self._db.execute("SELECT v.video_id, v.path, v.kind, v.duration, v.frames, f.root, f.entries, "
                                       "f.thumbs FROM videos v JOIN files f ON v.row = f.row WHERE v.row = ?",
                                       (r,)).fetchone()
            if row is None:
                return None
            thumbs = json.loads(row[7] or "[]")
            return VideoRecord(row[0], Path(row[1]), row[2], [self.folder / t[0] for t in thumbs], row[3], row[4],
                               Path(row[5]) if row[5] else None, json.loads(row[6] or "[]"),
                               [list(t[1:]) for t in thumbs])
        except (sqlite3.Error, ValueError, TypeError, IndexError) as e:
            raise IndexFormatError(f"{self.generation / META_DB}: damaged record of {video_id[:200]!r} "
                                   f"({type(e).__name__})") from None

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
        """Close the database and release the generation (a build may then remove it)."""
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
        # the shards' memory maps and the FAISS index go with it (and the view into the index's storage first)
        self._all, self._shards, self._index = None, [], None
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:  # an index dropped without close() releases its generation all the same
        try:
            fd, self._lock_fd = getattr(self, "_lock_fd", None), None
            if fd is not None:
                os.close(fd)
        except Exception:  # noqa: BLE001, S110 - nothing to report during interpreter shutdown
            pass
