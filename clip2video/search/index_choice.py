"""Which FAISS index a collection gets: by size (``auto``) or by a memory budget (``--max_index_memory``).

The idea is autofaiss's: estimate each candidate index's memory from its codes, keep those that fit the
budget, and take the one with the best recall measured on a benchmark, the fastest among equals. The
candidates and the recall figures are ``benchmarks/bench_search.py``'s, measured at 1,000,000 × 1024-d
vectors (``benchmarks/README.md``); recall depends on the data (the benchmark's generators say how much), so
the figure printed is an expectation, not a promise.

What the measurements said (the reasons behind the rules below; figures in ``benchmarks/README.md``):

- An inverted file's recall is bounded by its coarse partition: a list count at or above the number of the
  collection's natural clusters keeps each cluster in one list (200k clustered vectors, 4,096 lists: all of
  the true top-10 in the 8 nearest lists), while fewer, larger lists split clusters, and more training
  vectors per list help less than more lists. At 1M: 4,096 lists (64 training vectors each) reached recall@10
  0.94 at nprobe 256, 8,192 lists (32 each) 0.959 at the same nprobe. Flat k-means costs sample × lists × d
  per iteration, so the list count (~n / 128) and the training sample (``TRAIN_PER_LIST`` a list) are what a
  2-core build affords (15 minutes at 1M on a loaded machine).
- A graph over 8-bit codes (``HNSW32_SQ8``) has no partition to miss: recall@10 0.99 at 100k vectors, but
  0.65 at a million (FAISS's default construction effort), so it is not chosen automatically.
- Product-quantised codes of d/8 bytes with their candidates re-scored from the exact stored vectors
  (``rerank=10``: 100 candidates for k = 10, by ``SearchIndex.search``) gave the recall of 8-bit codes at a
  seventh of the memory; they are what a budget below the 8-bit index gets. Without a budget the 8-bit
  index is preferred among equals: it does not read 100 stored vectors a query.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

EXACT_MAX = 50_000
LIST_SIZE = 128  # vectors per inverted list the list count aims at
TRAIN_PER_LIST = 32  # k-means training vectors per list (its cost: sample × lists × d per iteration)
HNSW_M = 32  # links per node of the centroid graph

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int, *, allow_zero: bool = False) -> int:
    """Bytes of a size such as ``1.5GB`` (10⁹), ``512MiB`` (2²⁰), ``200M`` or ``1000000``; ValueError (one line)."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"not a size: {text!r} (e.g. 1.5GB, 512MiB, 200MB)")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"size must be {'>= 0' if allow_zero else 'positive'}, got {text!r}")
    return value


def format_size(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def nlist_for(n: int) -> int:
    """Inverted lists for ``n`` vectors: a power of two near n / ``LIST_SIZE`` (at least 64 vectors a list)."""
    lists = 2 ** round(math.log2(max(n / LIST_SIZE, 1)))
    return int(max(1, min(lists, n // 64 if n >= 64 else 1)))


@dataclass(frozen=True)
class IndexChoice:
    """A FAISS ``index_factory`` string, its search parameters, its estimated memory and expected recall@10."""

    factory: str
    params: str
    bytes: int
    recall: float
    note: str = ""

    def describe(self) -> str:
        params = f" ({self.params})" if self.params else ""
        return (f"{self.factory}{params}: ~{format_size(self.bytes)}, expected recall@10 ~{self.recall:.3f}"
                f"{' — ' + self.note if self.note else ''}")


def estimate_bytes(factory: str, n: int, d: int) -> int:
    """Memory of a built index of ``n`` d-dimensional vectors (codes, ids, centroids, graph), as FAISS holds it.

    Understood factories: ``Flat``, ``SQ8``, ``HNSW{M}[_SQ8|,SQ8]``, ``IVF{L}[_HNSW{M}],{Flat|SQ8|PQ{m}[x{b}][fs]}``.
    ValueError for others (give ``--index_type`` without a budget then).
    """
    f = factory.replace(" ", "")
    if f == "Flat":
        return n * d * 4
    if f == "SQ8":
        return n * d + 2 * d * 4
    m = re.fullmatch(r"HNSW(\d+)(?:[_,](SQ8|Flat))?", f)
    if m:
        links = int(m.group(1))
        code = d if m.group(2) == "SQ8" else d * 4
        return n * (code + 2 * links * 4 + 16) + 2 * d * 4  # level-0 links ×2, upper levels ~1/M more
    m = re.fullmatch(r"IVF(\d+)(?:_HNSW(\d+))?,(Flat|SQ8|PQ(\d+)(?:x(\d+))?(fs)?)", f)
    if not m:
        raise ValueError(f"cannot estimate the memory of a {factory!r} index")
    lists = int(m.group(1))
    quantizer = lists * d * 4 + (lists * (2 * int(m.group(2)) * 4 + 16) if m.group(2) else 0)
    if m.group(3) == "Flat":
        code, extra = d * 4, 0
    elif m.group(3) == "SQ8":
        code, extra = d, 2 * d * 4
    else:
        sub, bits = int(m.group(4)), int(m.group(5) or 8)
        code, extra = math.ceil(sub * bits / 8), (2**bits) * d * 4
    return n * (code + 8) + quantizer + extra + lists * 64


# recall@10 measured by benchmarks/bench_search.py at 1,000,000 × 1024-d (clustered sphere generator, 200
# queries) with the candidates re-scored exactly: (factory with {L} = nlist_for(n) and {d8} = d/8 bytes,
# search parameters, recall). Best recall first; see benchmarks/README.md.
MEASURED = [
    ("IVF{L},SQ8", "nprobe={p32}", 0.959),
    # PQ + re-ranking matched the 8-bit codes' recall at every nprobe at 4,096 lists; at 8,192 lists it was not
    # measured, hence the lower expectation
    ("IVF{L},PQ{d8}", "nprobe={p32},rerank=10", 0.95),
]
# not in the list: HNSW32_SQ8 (recall@10 0.65 at efSearch 128 at 1M, 0.99 at 100k: its graph, built with
# FAISS's default efConstruction, does not hold up on a million diffuse clusters); it stays an --index_type.


def candidates(n: int, d: int) -> list[IndexChoice]:
    """Every index this module would pick for ``n`` vectors, best recall first (exact first of all)."""
    out = [IndexChoice("Flat", "", estimate_bytes("Flat", n, d), 1.0, "exact")]
    if n <= EXACT_MAX:
        return out
    lists = nlist_for(n)
    for factory, params, recall in MEASURED:
        if ("{d8}" in factory and d % 8) or ("{d16}" in factory and d % 16):
            continue
        factory = factory.format(L=lists, d8=d // 8, d16=d // 16)
        params = params.format(p32=max(8, lists // 32))
        out.append(IndexChoice(factory, params, estimate_bytes(factory, n, d), recall))
    return out


def choose_index(n: int, d: int, max_bytes: int | None = None) -> IndexChoice:
    """The index for ``n`` d-dimensional vectors: without a budget exact up to :data:`EXACT_MAX` and the best
    measured approximate one above it; with one, the best recall that fits in ``max_bytes`` (exact when it
    fits and the collection is small enough for a flat scan to be quick). ValueError when nothing fits."""
    options = candidates(n, d)
    if max_bytes is None:
        return options[0] if n <= EXACT_MAX else options[1]
    if n > EXACT_MAX:  # a flat scan of a large collection is slow whatever memory it is given
        options = options[1:]
    fit = [c for c in options if c.bytes <= max_bytes]
    if not fit:
        smallest = min(options, key=lambda c: c.bytes)
        raise ValueError(f"--max_index_memory {format_size(max_bytes)}: the smallest index for {n} vectors of "
                         f"dimension {d} needs ~{format_size(smallest.bytes)} ({smallest.factory})")
    return max(fit, key=lambda c: c.recall)  # the first of equals: 8-bit codes before PQ (no re-ranking reads)


__all__ = ["EXACT_MAX", "IndexChoice", "candidates", "choose_index", "estimate_bytes", "format_size", "nlist_for",
           "parse_size"]
