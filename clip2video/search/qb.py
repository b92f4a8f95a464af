"""QB-Norm in a search index: what single-query normalisation needs, stored in each generation, and applied.

QB-Norm (Bogolin et al., CVPR 2022; ``modules/evaluation/qbnorm.py`` has the definition) normalises a text
query's scores with a fixed bank of training captions. Unlike dual softmax it needs nothing about the other
test queries, so it works one query at a time: per index row it needs the log normalising sum
``log Σ_b exp(β·S_B(b, row))`` and whether the row is in R (the rows some bank caption ranks in its top k).

``search.py build --query_bank FILE`` encodes the bank's captions with the index's model and text settings
(exactly as ``infer_retrieval.py --qb_norm`` encodes them) and writes, inside the new generation folder (so
they switch in atomically with the rest of it):

* ``qb_bank.npy``: the bank's caption vectors (float32, one row per caption), so that a later build need not
  encode the bank again;
* ``qb_log_norm.npy`` (float64) and ``qb_retrieved.npy`` (bool): one entry per index row, in row order;
* the manifest's ``qb_norm`` object: β, k, the bank file (path, SHA-256, caption count), what the bank vectors
  were encoded with, the file names.

R depends on every row (a bank caption's top-1 can move to a new video), so every build recomputes both
statistics from the stored bank vectors against all the index's vectors: an incremental build gives the
statistics a clean build gives. A build without ``--query_bank`` keeps the stored bank (β and k too, unless
given); ``--no_query_bank`` drops it.

Applying (``SearchIndex.search``): for an exact index the query is scored against every row and normalised as
a whole row, which is exactly ``infer_retrieval.py --save_sim_qb``'s row for the same caption. For an
approximate index the normalisation is applied to the re-scored candidates only: whether the query is
normalised is decided by its best candidate, and a row outside the candidate list is never promoted.
Rows are whatever the index holds (videos or segments); video-to-video queries (``similar``) are never
normalised, since the bank holds captions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clip2video.modules.evaluation.qbnorm import CLIP2VIDEO_BETA, BankStatistics, QBNormStats
from clip2video.search.store import IndexFormatError

logger = logging.getLogger("clip2video.cli.search")

MANIFEST_KEY = "qb_norm"
BANK_FILE = "qb_bank.npy"
LOG_NORM_FILE = "qb_log_norm.npy"
RETRIEVED_FILE = "qb_retrieved.npy"
#: bank × rows scores computed at once while building the statistics (float32; bounds the build's memory)
SCORE_BLOCK = 1 << 23


@dataclass(frozen=True)
class BankRequest:
    """What a build was asked to do with the query bank.

    ``captions`` None keeps the bank the live generation stores (if any); ``drop`` removes it. ``beta`` /
    ``k`` None keep the stored values (or take the published defaults for a new bank: 1/1.99 and 1).
    """

    captions: tuple[str, ...] | None = None
    source: dict[str, Any] | None = None  # {"path", "sha256", "bytes", "captions"} of the bank file
    beta: float | None = None
    k: int | None = None
    drop: bool = False

    def __post_init__(self) -> None:
        if self.beta is not None and not (self.beta > 0 and np.isfinite(self.beta)):
            raise ValueError(f"--qb_beta must be a positive number, got {self.beta}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"--qb_k must be >= 1, got {self.k}")
        if self.drop and (self.captions is not None or self.beta is not None or self.k is not None):
            raise ValueError("--no_query_bank excludes --query_bank, --qb_beta and --qb_k")


def read_bank_file(path: str | os.PathLike, *, beta: float | None = None, k: int | None = None) -> BankRequest:
    """A :class:`BankRequest` for a caption file (UTF-8, one caption per line, blank lines skipped).

    Raises FileNotFoundError (no such file) or ValueError (not UTF-8, naming the line; no caption), one line each.
    """
    from clip2video.dataloaders.annotations import read_caption_file
    from clip2video.provenance import file_record

    captions = read_caption_file(path)
    source = dict(file_record(path), captions=len(captions))
    return BankRequest(tuple(captions), source, beta, k)


@dataclass
class QueryBank:
    """A bank ready to be written into a generation: its caption vectors and settings."""

    vectors: np.ndarray  # (n_bank, D) float32, possibly a memory map of the previous generation's file
    source: dict[str, Any]
    key: str  # model fingerprint, text settings and bank file: what the vectors depend on
    text: dict[str, Any]  # {"max_words", "precision"} the captions were encoded with
    beta: float
    k: int
    origin: Path | None = None  # the stored file the vectors were read from (linked, not rewritten)


def bank_key(fingerprint: str, text: dict[str, Any], sha256: str) -> str:
    return hashlib.sha256(json.dumps([fingerprint, text, sha256], sort_keys=True).encode()).hexdigest()[:20]


def encode_bank(model, captions: Sequence[str], *, max_words: int, precision: str = "fp32",
                device=None, batch_size: int = 256) -> np.ndarray:
    """(n, D) float32 caption vectors ``[w·t_g, (1−w)·t_a]``, encoded as evaluation encodes captions
    (``encode_captions``: same tokenizer rule and precision), so the statistics equal ``--qb_norm``'s."""
    import torch

    from clip2video.modules.evaluation.engine import encode_captions
    from clip2video.modules.network.tokenizer import ClipTokenizer

    device = device or next(model.parameters()).device
    with torch.inference_mode():
        t = encode_captions(model, list(captions), ClipTokenizer(int(max_words)), batch_size=batch_size,
                            device=device, precision=precision)
        v = model.text_vector(t).float().cpu().numpy()
    return np.ascontiguousarray(v, dtype=np.float32)


def stored_bank(gen: Path, manifest: dict[str, Any]) -> QueryBank | None:
    """The bank a generation stores (vectors memory-mapped), None when it has none or it cannot be read."""
    meta = manifest.get(MANIFEST_KEY)
    if not isinstance(meta, dict):
        return None
    path = gen / meta.get("files", {}).get("bank", BANK_FILE)
    try:
        vectors = np.load(path, mmap_mode="r")
        if vectors.ndim != 2 or vectors.dtype != np.float32 or vectors.shape[0] != int(meta["bank"]["captions"]):
            raise ValueError(f"shape {vectors.shape} {vectors.dtype}")
        return QueryBank(vectors, dict(meta["bank"]), str(meta["key"]), dict(meta["text"]), float(meta["beta"]),
                         int(meta["k"]), origin=path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("%s: stored query bank unreadable (%s); it is not kept", path, e)
        return None


def prepare_bank(request: BankRequest, old: QueryBank | None, *, fingerprint: str, text: dict[str, Any],
                 encode: Callable[[Sequence[str]], np.ndarray]) -> QueryBank | None:
    """The bank the new generation gets: the requested file's (its stored vectors reused when the file and the
    model are the same, else ``encode`` runs), the stored one, or None.

    ValueError when β or k are given without any bank, or when the stored bank's vectors were made with
    another model or text settings and its file is not given again.
    """
    if request.drop:
        return None
    if request.captions is None:
        if old is None:
            if request.beta is not None or request.k is not None:
                raise ValueError("--qb_beta / --qb_k need a query bank: --query_bank FILE (the index stores none)")
            return None
        if bank_key(fingerprint, text, old.source.get("sha256", "")) != old.key:
            raise ValueError("the index's query bank was encoded with another model or text settings; give "
                             "--query_bank FILE again (or --no_query_bank to drop it)")
        return QueryBank(old.vectors, old.source, old.key, old.text, request.beta or old.beta,
                         request.k or old.k, old.origin)
    source = dict(request.source or {})
    key = bank_key(fingerprint, text, source.get("sha256", ""))
    beta = request.beta or (old.beta if old is not None else CLIP2VIDEO_BETA)
    k = request.k or (old.k if old is not None else 1)
    if old is not None and old.key == key and old.vectors.shape[0] == len(request.captions):
        logger.info("query bank %s unchanged: its stored vectors are reused", source.get("path"))
        return QueryBank(old.vectors, source, key, dict(text), beta, k, old.origin)
    logger.info("query bank %s: encoding %d captions", source.get("path"), len(request.captions))
    vectors = np.ascontiguousarray(encode(list(request.captions)), dtype=np.float32)
    if vectors.shape[0] != len(request.captions):
        raise ValueError(f"query bank: {vectors.shape[0]} vectors for {len(request.captions)} captions")
    return QueryBank(vectors, source, key, dict(text), beta, k)


def row_statistics(bank: np.ndarray, rows: np.ndarray, scale: float, beta: float, k: int,
                   block: int = SCORE_BLOCK) -> QBNormStats:
    """QB-Norm statistics of bank vectors (n_bank, D) against index row vectors (n, D), on the scores the index
    reports (``scale`` × inner product), bank captions a block at a time."""
    import torch

    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n = rows.shape[0]
    if n == 0:
        return QBNormStats(np.zeros(0), np.zeros(0, dtype=bool), beta, k, int(bank.shape[0]))
    acc = BankStatistics(n, beta, k)
    rows_t = torch.from_numpy(rows).T
    step = max(1, block // n)
    with torch.inference_mode():  # torch's product, as evaluation scores the bank (and within torch's threads)
        for s in range(0, bank.shape[0], step):
            part = torch.from_numpy(np.array(bank[s : s + step], dtype=np.float32))  # a copy: maps are read-only
            acc.add((scale * (part @ rows_t)).numpy())
    return acc.result()


def generation_writer(bank: QueryBank, scale: float) -> Callable[[Path, np.ndarray], dict[str, Any]]:
    """The ``extra`` step of ``store.write_generation``: statistics of the generation's rows, written with the
    bank vectors into the (temporary) generation folder; returns the manifest entry."""

    def write(folder: Path, rows: np.ndarray) -> dict[str, Any]:
        stats = row_statistics(bank.vectors, rows, scale, bank.beta, bank.k)
        np.save(folder / LOG_NORM_FILE, stats.log_norm)
        np.save(folder / RETRIEVED_FILE, stats.retrieved)
        target = folder / BANK_FILE
        linked = False
        if bank.origin is not None:
            try:  # the previous generation's file, unchanged: a second name for it, not a copy
                os.link(bank.origin, target)
                linked = True
            except OSError:
                shutil.copyfile(bank.origin, target)
                linked = True
        if not linked:
            np.save(target, np.ascontiguousarray(bank.vectors, dtype=np.float32))
        logger.info("QB-Norm: %d bank captions, %d of %d rows in R (β %.4f, k %d)", stats.n_bank,
                    int(stats.retrieved.sum()), stats.n_videos, bank.beta, bank.k)
        return {MANIFEST_KEY: {
            "method": "QB-Norm, dynamic inverted softmax (Bogolin et al. 2022)",
            "beta": bank.beta, "k": bank.k, "scale": float(scale), "bank": bank.source, "key": bank.key,
            "text": bank.text, "retrieved_rows": int(stats.retrieved.sum()),
            "files": {"bank": BANK_FILE, "log_norm": LOG_NORM_FILE, "retrieved": RETRIEVED_FILE}}}

    return write


def load_statistics(gen: Path, manifest: dict[str, Any]) -> QBNormStats | None:
    """The statistics a generation stores for its rows, None without a bank; IndexFormatError (one line) when
    its files are missing, truncated or of the wrong size."""
    meta = manifest.get(MANIFEST_KEY)
    if meta is None:
        return None
    count = int(manifest["count"])
    try:
        files = meta.get("files", {})
        log_norm = np.load(gen / files.get("log_norm", LOG_NORM_FILE))
        retrieved = np.load(gen / files.get("retrieved", RETRIEVED_FILE))
        beta, k, n_bank = float(meta["beta"]), int(meta["k"]), int(meta["bank"]["captions"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise IndexFormatError(f"{gen}: missing or damaged QB-Norm statistics ({type(e).__name__}); rebuild "
                               "with search.py build") from None
    if (log_norm.shape != (count,) or retrieved.shape != (count,) or log_norm.dtype != np.float64
            or retrieved.dtype != np.bool_ or not np.isfinite(log_norm).all()):
        raise IndexFormatError(f"{gen}: QB-Norm statistics for {log_norm.shape} / {retrieved.shape} rows, the index "
                               f"holds {count}; rebuild with search.py build")
    return QBNormStats(log_norm, retrieved, beta, k, n_bank)


def normalise_candidates(stats: QBNormStats, rows: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, bool]:
    """QB-Norm of a query's candidate rows (index rows, float scores on the model's scale): (scores, applied).

    The query counts as landing on a hub when its best candidate is in R (first in the given order among
    equal scores); then each candidate's score becomes ``exp(β·s − log_norm[row])``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not len(rows) or not stats.retrieved[rows[int(np.argmax(scores))]]:
        return scores, False
    return np.exp(stats.beta * scores - stats.log_norm[rows]), True


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first, equal scores in index order (as a stable sort)."""
    n = scores.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
    return part[np.lexsort((part, -scores[part]))]


def bank_writer(index_dir: Path, request: BankRequest | None, *, fingerprint: str, text: dict[str, Any],
                scale: float, encode: Callable[[Sequence[str]], np.ndarray]):
    """For a build of ``index_dir``: the ``write_generation`` extra that stores the bank (None: no bank).

    Run before any video is encoded, so that a bank that cannot be used stops the build at once.
    """
    from clip2video.search.store import read_manifest

    old = None
    try:
        gen, manifest = read_manifest(index_dir)
        old = stored_bank(gen, manifest)
    except IndexFormatError:
        pass
    bank = prepare_bank(request or BankRequest(), old, fingerprint=fingerprint, text=text, encode=encode)
    return generation_writer(bank, scale) if bank is not None else None
