"""QB-Norm: query-bank normalisation of text-to-video scores by the dynamic inverted softmax.

Bogolin et al., "Cross Modal Retrieval with Querybank Normalisation" (CVPR 2022; reference code
ioanacroi/qb-norm, read for its definition, not copied). A bank B of queries (training captions, encoded by
the same model) is scored against the gallery videos: S_B = scores(B × videos), on the scale the model ranks
with (CLIP2Video: the ×100 logits). For a query q with scores s_q:

* R = the videos that are among the top-k of at least one bank query;
* if q's top-1 video is in R:  s'_q(v) = exp(β·s_q(v)) / Σ_{b∈B} exp(β·S_B(b, v)),
  otherwise s'_q = s_q unchanged.

So a video that many bank queries already rank first (a "hub") is discounted, but only for queries that
land on such hubs. Published for CLIP2Video with k = 1 and β = 1/1.99 on the ×100 scores.

Only two things about the bank are needed per video: the normalising sum (kept as its logarithm,
``log_norm[v] = logsumexp_b β·S_B(b, v)``, which never overflows: β·S_B reaches 50 on the ×100 scale and a
bank holds ~10⁵ captions) and membership of R. :class:`BankStatistics` accumulates both over bank score rows
in chunks (the bank never has to be held whole), partial statistics of several processes merge exactly
(:meth:`QBNormStats.merge`), and :meth:`QBNormStats.apply` normalises any rows afterwards, one query or many,
in O(videos) per query. This is what an index can store to normalise single queries.

Ties: a row's "top-1" and "top-k" are taken in column order among equal scores (``argmax`` / a stable sort),
which makes the definition deterministic where the reference's ``argsort`` leaves ties to the sort.
Normalised values are computed in float64 as ``exp(β·s − log_norm)``; rows left unchanged keep their scores.
Only text queries are normalised (the bank is captions): video-to-text metrics have no QB-Norm counterpart here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: β published for CLIP2Video's ×100 logits (the reference's default, 20, is for cosine scores).
CLIP2VIDEO_BETA = 1.0 / 1.99


@dataclass
class QBNormStats:
    """What single-query normalisation needs from a bank, per gallery video.

    Attributes:
        log_norm: (M,) float64, ``log Σ_b exp(β·S_B(b, v))``.
        retrieved: (M,) bool, ``v ∈ R`` (in the top-k of some bank query).
        beta: inverse temperature β the sums were taken with.
        k: top-k that defined R.
        n_bank: bank queries summed.
    """

    log_norm: np.ndarray
    retrieved: np.ndarray
    beta: float
    k: int
    n_bank: int

    def __post_init__(self) -> None:
        self.log_norm = np.asarray(self.log_norm, dtype=np.float64).reshape(-1)
        self.retrieved = np.asarray(self.retrieved, dtype=bool).reshape(-1)
        if self.log_norm.shape != self.retrieved.shape:
            raise ValueError(f"QB-Norm statistics: {self.log_norm.shape[0]} sums but {self.retrieved.shape[0]} "
                             "retrieved flags")

    @property
    def n_videos(self) -> int:
        return int(self.log_norm.shape[0])

    def normalised_queries(self, rows: np.ndarray) -> np.ndarray:
        """(N,) bool: which rows are normalised (their top-1 video, first in column order, is in R)."""
        rows = np.atleast_2d(np.asarray(rows))
        self._check(rows)
        return self.retrieved[rows.argmax(axis=1)] if rows.shape[1] else np.zeros(rows.shape[0], dtype=bool)

    def apply(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalise score rows (N, M) (or one row (M,)) → (float64 rows of the same shape, (N,) bool mask of
        the normalised ones). Unchanged rows keep their scores."""
        arr = np.asarray(rows)
        flat = arr.ndim == 1
        x = np.array(np.atleast_2d(arr), dtype=np.float64)  # a copy: the caller's rows are never modified
        norm = self.normalised_queries(x)
        if norm.any():
            x[norm] = np.exp(self.beta * x[norm] - self.log_norm)
        return (x[0] if flat else x), (norm[:1] if flat else norm)

    def merge(self, others: list[QBNormStats]) -> QBNormStats:
        """Statistics of the union of disjoint banks (e.g. the shares of several processes)."""
        parts = [self, *others]
        for p in parts[1:]:
            if p.n_videos != self.n_videos or p.beta != self.beta or p.k != self.k:
                raise ValueError("QB-Norm statistics to merge must share the videos, β and k")
        return QBNormStats(np.logaddexp.reduce(np.stack([p.log_norm for p in parts]), axis=0),
                           np.logical_or.reduce(np.stack([p.retrieved for p in parts]), axis=0),
                           self.beta, self.k, sum(p.n_bank for p in parts))

    def _check(self, rows: np.ndarray) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.n_videos:
            raise ValueError(f"QB-Norm: score rows have shape {rows.shape}, the bank statistics are for "
                             f"{self.n_videos} videos")


class BankStatistics:
    """Accumulates :class:`QBNormStats` over bank score rows given in chunks (a streaming log-sum-exp).

    Args:
        n_videos: gallery size M.
        beta: inverse temperature (on the scale of the scores given to :meth:`add`).
        k: a video is in R when it is among the top-k of some bank query.
    """

    def __init__(self, n_videos: int, beta: float = CLIP2VIDEO_BETA, k: int = 1):
        if not (beta > 0 and np.isfinite(beta)):
            raise ValueError(f"QB-Norm: β must be a positive number, got {beta}")
        if k < 1:
            raise ValueError(f"QB-Norm: k must be >= 1, got {k}")
        self.n_videos, self.beta, self.k = n_videos, float(beta), int(k)
        self._max = np.full(n_videos, -np.inf)
        self._sum = np.zeros(n_videos)  # Σ exp(β·s − _max)
        self._hits = np.zeros(n_videos, dtype=bool)
        self.n_bank = 0

    def add(self, rows: np.ndarray) -> None:
        """Bank score rows (n, M), any float dtype."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.n_videos:
            raise ValueError(f"QB-Norm: bank rows have shape {rows.shape}, expected (n, {self.n_videos})")
        if not rows.shape[0]:
            return
        if not np.isfinite(rows).all():
            raise ValueError("QB-Norm: a bank score is NaN or infinite")
        b = self.beta * rows.astype(np.float64)
        new_max = np.maximum(self._max, b.max(axis=0))
        rescale = np.exp(self._max - new_max)  # exp(-inf) = 0 before the first rows
        self._sum = self._sum * rescale + np.exp(b - new_max).sum(axis=0)
        self._max = new_max
        if self.k == 1:
            top = rows.argmax(axis=1)
        else:
            top = np.argsort(-rows, axis=1, kind="stable")[:, : self.k].reshape(-1)
        self._hits[top] = True
        self.n_bank += rows.shape[0]

    def result(self) -> QBNormStats:
        if self.n_bank == 0:
            raise ValueError("QB-Norm: the query bank is empty")
        return QBNormStats(self._max + np.log(self._sum), self._hits.copy(), self.beta, self.k, self.n_bank)


def bank_statistics(bank_scores: np.ndarray, beta: float = CLIP2VIDEO_BETA, k: int = 1,
                    chunk: int = 8192) -> QBNormStats:
    """:class:`QBNormStats` of a whole bank score matrix (n_bank, M)."""
    bank_scores = np.asarray(bank_scores)
    acc = BankStatistics(bank_scores.shape[1] if bank_scores.ndim == 2 else 0, beta, k)
    for s in range(0, bank_scores.shape[0], chunk):
        acc.add(bank_scores[s : s + chunk])
    return acc.result()


def dynamic_inverted_softmax(scores: np.ndarray, bank_scores: np.ndarray, beta: float = CLIP2VIDEO_BETA,
                             k: int = 1) -> np.ndarray:
    """QB-Norm of a query × video matrix with a bank × video matrix (float64; see the module docstring)."""
    return bank_statistics(bank_scores, beta, k).apply(scores)[0]
