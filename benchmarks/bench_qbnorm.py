#!/usr/bin/env python
"""QB-Norm's cost: building the bank statistics, and normalising queries, against plain scoring in the same run.

Inputs are random unit vectors of CLIP2Video's size (1024-d: the TAB-TDB caption / video vectors), scores on
the ×100 scale, β = 1/1.99, k = 1 (the published CLIP2Video setting). Defaults: a bank of 180,000 captions
(MSR-VTT 9k training split: 9,000 videos × 20 captions) against 1,000 videos (1k-A).

* bank statistics: scoring the bank against the videos in chunks (the baseline: what any use of the bank
  costs) + the streaming log-sum-exp and top-k (``BankStatistics.add``);
* per query: one query row scored (baseline: plain search scoring, ``q @ Vᵀ``) + ``QBNormStats.apply``
  (argmax, lookup, and for normalised queries M exps); also for a batch of 1,000 queries.

Encoding the bank's captions is not included: it costs what encoding as many test captions costs (one pass of
the text tower per caption, ``benchmarks/bench_text.py``).

    python benchmarks/bench_qbnorm.py [--bank 180000] [--videos 1000] [--dim 1024] [--threads N]

The last line printed is the cost per query relative to plain scoring.

``--search``: the same in a search index (``clip2video.search``): an index generation of ``--videos`` rows is
written with a bank's statistics (``store.write_generation`` + ``qb.generation_writer``: the build step, timed),
opened as ``SearchIndex``, and single queries are answered by ``SearchIndex.search(q, k)`` with QB-Norm and
without (``qb=False``: the exact FAISS flat top-k, the baseline), interleaved; p50 / p99 per query. Text
encoding is not included (the same with and without). ``--index_type IVF…`` measures an approximate index
(QB-Norm on the re-scored candidates).

    python benchmarks/bench_qbnorm.py --search --videos 50000 --bank 20000 [--index_type Flat] [--queries 300]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from clip2video.modules.evaluation.qbnorm import CLIP2VIDEO_BETA, BankStatistics


def unit(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=1, keepdim=True)


def best_of(baseline, ours, repeats: int) -> tuple[float, float]:
    """Best time of each over ``repeats`` rounds, the two alternating (and swapping order) so that load from
    other jobs on the machine falls on both alike."""
    times: dict[str, list[float]] = {"baseline": [], "ours": []}
    for r in range(repeats):
        for name, fn in ((("baseline", baseline), ("ours", ours)) if r % 2 == 0 else (("ours", ours),
                                                                                       ("baseline", baseline))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return min(times["baseline"]), min(times["ours"])


def search_mode(a, videos: torch.Tensor, bank: torch.Tensor, queries: torch.Tensor, load: float) -> None:
    """Per-query cost of QB-Norm inside ``SearchIndex.search`` (see the module doc)."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from clip2video.search.index import SearchIndex
    from clip2video.search.qb import QueryBank, generation_writer
    from clip2video.search.store import Item, write_generation, write_shard

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "index"
        items = [Item(f"v{i:07d}", f"/videos/v{i:07d}.mp4", "file", 1, 1) for i in range(a.videos)]
        write_shard(folder, "bench", videos.numpy(), items, "bench")
        qbank = QueryBank(bank.numpy(), {"path": "bench", "sha256": "", "captions": a.bank}, "bench",
                          {"max_words": 32, "precision": "fp32"}, CLIP2VIDEO_BETA, 1)
        t0 = time.perf_counter()
        write_generation(folder, [(it, "bench", r) for r, it in enumerate(items)], index_type=a.index_type,
                         model_meta={"dim": a.dim, "fingerprint": "bench", "logit_scale": 100.0}, encoding={},
                         extra=generation_writer(qbank, 100.0))
        t_build = time.perf_counter() - t0
        index = SearchIndex.open(folder)
        print(f"index: {a.videos} rows ({index.manifest['index_type']}), generation with bank statistics written in "
              f"{t_build:.1f} s ({a.bank} bank captions × {a.videos} rows; {int(index.qb.retrieved.sum())} rows in R)")
        q = queries.numpy()
        index.search(q[:2], a.k)
        index.search(q[:2], a.k, qb=False)  # warm-up: the flat view, FAISS threads
        times: dict[bool, list[float]] = {False: [], True: []}
        applied = 0
        for i in range(len(q)):
            for use in ((False, True) if i % 2 == 0 else (True, False)):
                t0 = time.perf_counter()
                hits = index.search(q[i : i + 1], a.k, qb=use)[0]
                times[use].append(time.perf_counter() - t0)
                applied += int(use and hits[0].qb)
        p = {u: (1e3 * np.percentile(times[u], 50), 1e3 * np.percentile(times[u], 99)) for u in times}
        print(f"single query, k {a.k}: plain p50 {p[False][0]:.2f} ms (p99 {p[False][1]:.2f}), with QB-Norm p50 "
              f"{p[True][0]:.2f} ms (p99 {p[True][1]:.2f}); {applied} of {len(q)} queries normalised; load average "
              f"{load:.2f} ({'idle' if load < 0.5 else 'NOT idle'})")
        print(f"QB-Norm per query in search: {p[True][0] / p[False][0]:.2f}x plain (p50 {p[True][0]:.2f} ms vs "
              f"{p[False][0]:.2f} ms, {a.videos} rows, {index.manifest['index_type']})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", type=int, default=180_000)
    ap.add_argument("--videos", type=int, default=1_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--queries", type=int, default=1_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--search", action="store_true", help="per-query cost inside SearchIndex.search (module doc)")
    ap.add_argument("--index_type", default="Flat", help="with --search: Flat (exact) or a FAISS factory string")
    ap.add_argument("-k", "--k", type=int, default=10, help="with --search: results per query")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
        if a.search:  # as search.py serve does: FAISS on the same number of threads
            import faiss

            faiss.omp_set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    load = os.getloadavg()[0]
    print(f"bank {a.bank} captions, {a.videos} videos, dim {a.dim}, threads {torch.get_num_threads()}, "
          f"load average {load:.2f} on {os.cpu_count()} cores ({'idle' if load < 0.5 else 'NOT idle'})")
    g = torch.Generator().manual_seed(0)
    videos = unit(a.videos, a.dim, g)
    # a bank drawn towards a third of the videos, so that some videos are hubs (in R) and others are not
    hubs = torch.randint(0, max(1, a.videos // 3), (a.bank,), generator=g)
    bank = unit(a.bank, a.dim, g) + 0.3 * videos[hubs]
    bank = bank / bank.norm(dim=1, keepdim=True)
    queries = videos[torch.randint(0, a.videos, (a.queries,), generator=g)] + unit(a.queries, a.dim, g)
    queries = queries / queries.norm(dim=1, keepdim=True)
    if a.search:
        search_mode(a, videos, bank, queries, load)
        return
    vt = videos.t().contiguous()
    scale = 100.0

    def score_bank(stats: BankStatistics | None) -> None:
        for s in range(0, a.bank, a.chunk):
            rows = (scale * (bank[s : s + a.chunk] @ vt)).numpy()
            if stats is not None:
                stats.add(rows)

    holder: list[BankStatistics] = []

    def build() -> None:
        holder.clear()
        holder.append(BankStatistics(a.videos, CLIP2VIDEO_BETA, 1))
        score_bank(holder[0])

    t_plain, t_build = best_of(lambda: score_bank(None), build, a.repeats)
    stats = holder[0].result()
    stored = stats.log_norm.nbytes + stats.retrieved.nbytes
    print(f"bank statistics: {t_build:.2f} s (scoring alone {t_plain:.2f} s; statistics add {t_build - t_plain:.2f} s"
          f" = {1e9 * (t_build - t_plain) / (a.bank * a.videos):.2f} ns per bank score); "
          f"{int(stats.retrieved.sum())} of {a.videos} videos in R; stored: {stored} bytes")

    q1 = [queries[i : i + 1] for i in range(a.queries)]

    def plain_single() -> None:
        for q in q1:
            (scale * (q @ vt)).numpy()

    def qb_single() -> None:
        for q in q1:
            stats.apply((scale * (q @ vt)).numpy())

    t_p1, t_q1 = (t / a.queries for t in best_of(plain_single, qb_single, a.repeats))
    norm = stats.normalised_queries((scale * (queries @ vt)).numpy())
    t_pb, t_qb = best_of(lambda: (scale * (queries @ vt)).numpy(),
                         lambda: stats.apply((scale * (queries @ vt)).numpy()), a.repeats)
    print(f"single query: plain scoring {1e6 * t_p1:.1f} µs, with QB-Norm {1e6 * t_q1:.1f} µs "
          f"(+{1e6 * (t_q1 - t_p1):.1f} µs; {int(norm.sum())} of {a.queries} queries normalised)")
    print(f"batch of {a.queries}: plain {1e3 * t_pb:.2f} ms, with QB-Norm {1e3 * t_qb:.2f} ms "
          f"(+{1e6 * (t_qb - t_pb) / a.queries:.2f} µs per query)")
    print(f"QB-Norm per single query: {t_q1 / t_p1:.2f}x plain scoring ({1e6 * t_q1:.1f} µs vs {1e6 * t_p1:.1f} µs)")


if __name__ == "__main__":
    main()
