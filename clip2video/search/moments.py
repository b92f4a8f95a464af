"""Queries over an index of segments: grouping by video, one video's segments, and filters applied before k.

``SearchIndex.search(vectors, SearchRequest(...))`` comes here for everything but the plain top-k of an index
of whole videos (which keeps its own short path in ``index.py``):

- **grouped** (the default for an index of segments): each video once, at its best segment, with its next
  best segments as ``moments``; ``group=False`` lists segments as they rank;
- **one video** (``video_id``): that video's segments ranked, scored exactly (a video has few of them);
- **filters** (``Filters``: path glob, duration range, modified after a date) on the metadata the index
  stores per video; they select rows *before* the top k is taken, so a filtered query still returns k hits
  when k rows pass.

How the rows are found, for any index type. When the rows that pass the filters are few
(≤ :data:`EXACT_FILTERED_ROWS`), they are scored exactly, all of them. Otherwise the FAISS index is searched
with an ``IDSelectorBitmap`` that skips the rows that do not pass (FAISS evaluates the selector inside the
flat scan and inside each probed inverted list), asking for more rows than needed (grouping needs more rows
than videos) and doubling the request until k videos are found; an approximate index's candidates are then
re-scored exactly, as in ``index.py``. Where an approximate index's probed lists hold fewer passing rows than
asked for, the passing rows are scored exactly instead, so the answer never comes up short. Milvus and
Weaviate filter the same way (a bitset of allowed ids inside the vector search, brute force when the allowed
set is small). The exact scan goes in chunks, so its memory does not grow with the index.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

SearchIndex = Any  # ``index.SearchIndex`` (not imported: the index imports this module)
Hit = Any

EXACT_FILTERED_ROWS = 20_000
"""At most this many rows passing the filters: score them all exactly instead of searching FAISS."""
DEFAULT_MOMENTS = 3
"""Further segments listed under a grouped hit."""
MAX_MOMENTS = 50
_CHUNK = 65_536  # rows scored per matrix product in exact scans (bounded memory)


@dataclass(frozen=True)
class Moment:
    """A further segment of a hit's video: its time range (seconds) and score."""

    start: float
    end: float
    score: float


@dataclass(frozen=True)
class Filters:
    """Which videos a query may return (all set conditions must hold). ``path`` is a shell glob matched
    against the whole recorded path (``*`` also crosses ``/``); durations are seconds; ``modified_after`` is a
    file modification time in nanoseconds since the epoch. A video of unknown duration fails a duration bound."""

    path: str | None = None
    min_duration: float | None = None
    max_duration: float | None = None
    modified_after: int | None = None

    def __post_init__(self) -> None:
        for name in ("min_duration", "max_duration"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a number of seconds >= 0, got {v}")
        if self.min_duration is not None and self.max_duration is not None and self.min_duration > self.max_duration:
            raise ValueError(f"min_duration {self.min_duration:g} is above max_duration {self.max_duration:g}")

    @property
    def empty(self) -> bool:
        return self.path is None and self.min_duration is None and self.max_duration is None \
            and self.modified_after is None

    def videos(self, index: SearchIndex) -> np.ndarray:
        """(n_videos,) bool: the videos that pass."""
        ok = np.ones(len(index.video_ids), dtype=bool)
        if self.path is not None:
            ok &= np.array([fnmatch.fnmatchcase(p, self.path) for p in index.paths], dtype=bool)
        d = index.durations
        if self.min_duration is not None:
            ok &= ~np.isnan(d) & (d >= self.min_duration)
        if self.max_duration is not None:
            ok &= ~np.isnan(d) & (d <= self.max_duration)
        if self.modified_after is not None:
            ok &= index.mtimes > self.modified_after
        return ok


def parse_date(text: str, what: str = "modified_after") -> int:
    """An ISO 8601 date or date-time (``2024-05-01``, ``2024-05-01T13:30``; local time unless it names a
    zone) → nanoseconds since the epoch. ValueError naming ``what`` otherwise."""
    try:
        t = dt.datetime.fromisoformat(text.strip())
    except (ValueError, AttributeError):
        raise ValueError(f"{what} {text!r}: not a date (YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS])") from None
    return int(round(t.timestamp() * 1e9)) if t.tzinfo else int(round(t.astimezone().timestamp() * 1e9))


@dataclass(frozen=True)
class SearchRequest:
    """One query's options (hashable, so that the server batches queries that share them).

    ``group`` None: grouped for an index of segments, as-is for one of whole videos. ``video_id``: rank the
    segments of that video only. ``moments``: further segments listed under a grouped hit. ``exclude``: index
    rows never returned ("more like this" leaves out the moment it starts from).
    """

    k: int
    group: bool | None = None
    video_id: str | None = None
    filters: Filters = field(default_factory=Filters)
    moments: int = DEFAULT_MOMENTS
    exclude: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.moments <= MAX_MOMENTS:
            raise ValueError(f"moments must be from 0 to {MAX_MOMENTS}, got {self.moments}")

    def plain(self, index: SearchIndex) -> bool:
        """Whether this is the plain top-k of an index of whole videos (``index.py``'s own path)."""
        return (not index.segments and self.video_id is None and self.filters.empty and not self.exclude)

    def grouped(self, index: SearchIndex) -> bool:
        return bool(index.segments) if self.group is None else bool(self.group)

    def excluding(self, rows: tuple[int, ...]) -> SearchRequest:
        return replace(self, exclude=tuple(sorted(set(self.exclude) | set(rows))))


# ----------------------------------------------------------------------------------------------- rows
def allowed_rows(index: SearchIndex, request: SearchRequest) -> np.ndarray | None:
    """(n_rows,) bool of the rows the request may return, or None for all. KeyError for an unknown video."""
    mask = None
    if not request.filters.empty:
        mask = request.filters.videos(index)[index.row_video]
    if request.video_id is not None:
        rows = index.rows_of(request.video_id)
        own = np.zeros(index.n_rows, dtype=bool)
        own[rows.start : rows.stop] = True
        mask = own if mask is None else mask & own
    if request.exclude:
        if mask is None:
            mask = np.ones(index.n_rows, dtype=bool)
        mask[np.asarray(request.exclude, dtype=np.int64)] = False
    return mask


def exact_top(index: SearchIndex, q: np.ndarray, rows: np.ndarray | None, need: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``need`` best of ``rows`` (all rows when None) for query ``q`` by exact inner product, best first
    (ties by row); in chunks, so memory does not grow with the index."""
    total = index.n_rows if rows is None else len(rows)
    best_r = np.zeros(0, dtype=np.int64)
    best_s = np.zeros(0, dtype=np.float32)
    for c in range(0, total, _CHUNK):
        r = np.arange(c, min(c + _CHUNK, total), dtype=np.int64) if rows is None else rows[c : c + _CHUNK]
        s = index.vectors(r) @ q
        r, s = np.concatenate([best_r, r]), np.concatenate([best_s, s])
        if len(r) > need:
            keep = np.argpartition(-s, need - 1)[:need]
            r, s = r[keep], s[keep]
        best_r, best_s = r, s
    order = np.lexsort((best_r, -best_s))
    return best_r[order], best_s[order]


def top_rows(index: SearchIndex, q: np.ndarray, need: int, allowed: np.ndarray | None,
             n_allowed: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``need`` rows among the allowed ones, best first, with exact scores (unscaled); fewer only
    when fewer rows are allowed."""
    import faiss

    need = min(need, n_allowed)
    if need <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    if allowed is not None and n_allowed <= EXACT_FILTERED_ROWS:
        return exact_top(index, q, np.nonzero(allowed)[0], need)
    fetch = need if index.exact else min(n_allowed, max(2 * need, need + 10))
    params = None
    if allowed is not None:
        bits = np.packbits(allowed, bitorder="little")
        params = _search_params(index, faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits)))
    try:
        if params is None:
            _, labels = index._index.search(q[None], fetch)
        else:
            _, labels = index._index.search(q[None], fetch, params=params)
    except (RuntimeError, TypeError):  # an index type that takes no selector
        return exact_top(index, q, None if allowed is None else np.nonzero(allowed)[0], need)
    lab = labels[0][labels[0] >= 0].astype(np.int64)
    if allowed is not None:
        lab = lab[allowed[lab]]
    if len(lab) < need:  # the probed lists hold too few: all allowed rows, exactly
        return exact_top(index, q, None if allowed is None else np.nonzero(allowed)[0], need)
    sc = index.vectors(lab) @ q
    order = np.lexsort((lab, -sc))
    return lab[order][:need], sc[order][:need]


def _search_params(index: SearchIndex, selector):
    """FAISS search parameters carrying ``selector`` and the index's own probe settings."""
    import faiss

    ix = faiss.downcast_index(index._index)
    if isinstance(ix, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=selector, nprobe=ix.nprobe)
    if isinstance(ix, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=ix.hnsw.efSearch)
    if isinstance(ix, (faiss.IndexFlat, faiss.IndexScalarQuantizer, faiss.IndexPQ)):
        return faiss.SearchParameters(sel=selector)
    return None  # a wrapper (refine stage, transform): rows are filtered after the search instead


# ----------------------------------------------------------------------------------------------- search
class _Ranking:
    """How one query's rows are scored: exact inner products ×logit scale, or, when the index stores a query
    bank and the query is a caption, QB-Norm's scores of the whole row (``qb.py``; exact indexes)."""

    def __init__(self, index: SearchIndex, q: np.ndarray, dense: np.ndarray | None = None, qb: bool = False):
        self.index, self.q, self.dense, self.qb = index, q, dense, qb

    def top(self, need: int, allowed: np.ndarray | None, n_allowed: int) -> tuple[np.ndarray, np.ndarray]:
        """The best ``need`` allowed rows, best first (ties by row), with their scores."""
        if self.dense is None:
            rows, sc = top_rows(self.index, self.q, need, allowed, n_allowed)
            return rows, sc.astype(np.float64) * self.index.logit_scale
        return self.best_of(None if allowed is None else np.nonzero(allowed)[0], need)

    def best_of(self, rows: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The best ``n`` of ``rows`` (all when None), best first, with their scores."""
        if self.dense is None:
            r, sc = exact_top(self.index, self.q, rows, n)
            return r, sc.astype(np.float64) * self.index.logit_scale
        rows = np.arange(len(self.dense), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        sc = self.dense[rows]
        if len(rows) > n:
            keep = np.argpartition(-sc, n - 1)[:n]
            rows, sc = rows[keep], sc[keep]
        order = np.lexsort((rows, -sc))
        return rows[order], sc[order]


def search_moments(index: SearchIndex, queries: np.ndarray, request: SearchRequest,
                   qb: bool | None = None) -> list[list[Hit]]:
    """Per query vector: grouped hits (each video once, with ``moments``) or segments as they rank.

    ``qb`` as in ``SearchIndex.search``: with a query bank on an exact index the rows are ranked by QB-Norm's
    scores (the whole row normalised, then filtered and grouped); an approximate index's filtered, grouped or
    segment queries are not normalised (``Hit.qb`` False).
    """
    allowed = allowed_rows(index, request)
    n_allowed = index.n_rows if allowed is None else int(allowed.sum())
    if allowed is not None and n_allowed and allowed.all():
        allowed = None
    dense = applied = None
    if qb is not False and getattr(index, "qb", None) is not None and index.exact and n_allowed and len(queries):
        dense, applied = index.qb_rows(queries)
    out = []
    for i, q in enumerate(queries):
        rank = _Ranking(index, q, None if dense is None else dense[i], bool(applied[i]) if dense is not None
                        else False)
        if request.k <= 0 or n_allowed == 0:
            out.append([])
        elif request.video_id is not None:
            rows, sc = rank.best_of(None if allowed is None else np.nonzero(allowed)[0], request.k)
            out.append([index.hit(int(r), float(s), qb=rank.qb) for r, s in zip(rows, sc, strict=True)])
        elif not request.grouped(index):
            rows, sc = rank.top(request.k, allowed, n_allowed)
            out.append([index.hit(int(r), float(s), qb=rank.qb) for r, s in zip(rows, sc, strict=True)])
        else:
            out.append(_grouped(index, rank, request, allowed, n_allowed))
    return out


def _grouped(index: SearchIndex, rank: _Ranking, request: SearchRequest, allowed: np.ndarray | None,
             n_allowed: int) -> list[Hit]:
    """Top-k videos by their best allowed segment; rows are fetched in growing numbers until k videos show up."""
    k = min(request.k, len(index.video_ids))
    need = min(n_allowed, 4 * k)
    while True:
        rows, sc = rank.top(need, allowed, n_allowed)
        best: dict[int, tuple[int, float]] = {}
        for r, s in zip(rows.tolist(), sc.tolist(), strict=True):
            v = int(index.row_video[r])
            if v not in best:
                best[v] = (r, s)
        if len(best) >= k or need >= n_allowed:
            break
        need = min(n_allowed, need * 4)
    hits = []
    for v, (r, s) in list(best.items())[:k]:
        hits.append(index.hit(r, s, _moments(index, rank, v, r, allowed, request.moments), qb=rank.qb))
    return hits


def _moments(index: SearchIndex, rank: _Ranking, v: int, best: int, allowed: np.ndarray | None, n: int):
    """The next ``n`` best allowed segments of video ``v`` (its best one, row ``best``, left out), exactly."""
    if n <= 0:
        return ()
    rows = np.arange(int(index.video_first[v]), int(index.video_stop[v]), dtype=np.int64)
    rows = rows[rows != best]
    if allowed is not None:
        rows = rows[allowed[rows]]
    if not len(rows):
        return ()
    r, s = rank.best_of(rows, n)
    return tuple(Moment(float(index.starts[i]), float(index.ends[i]), float(x))
                 for i, x in zip(r.tolist(), s.tolist(), strict=True))


__all__ = ["DEFAULT_MOMENTS", "EXACT_FILTERED_ROWS", "Filters", "Moment", "SearchRequest", "allowed_rows", "exact_top",
           "parse_date", "search_moments", "top_rows"]
