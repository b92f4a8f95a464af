#!/usr/bin/env python
"""Text search over a million video vectors: exact vs approximate FAISS indexes, and the whole query.

Data: ``--n`` video vectors of CLIP2Video's dimension (ViT-B/32 with TAB: ``[v_g, v_a]``, 2 × 512 = 1024),
drawn from a mixture of ``--clusters`` clusters on the sphere, separately for each 512-d half: a cluster has a
random unit centre per half and its own spread; a vector is ``normalise(centre + s·noise)`` per half. Queries
are held-out draws from the same clusters with a wider spread (a caption is not a copy of a video), weighted
like a caption vector ``[w·t_g, (1−w)·t_a]``, w = 0.5. Uniform noise would make every approximate index look
bad; clusters are what real embedding collections have.

For exact search (faiss flat inner product), a brute-force baseline (numpy matrix product + partial sort
over all vectors, the same run) and each approximate setting: recall@10 against exact, p50/p99 latency of the
search alone (one query at a time) including the exact re-scoring that ``SearchIndex.search`` does, index
memory (serialised size) and build time. Then the whole query: ViT-B/32-size text tower (random weights)
on real tokens only (``clip2video.search.index.encode_queries``), fp32 / bf16 / int8-dynamic, + the search.
Also the flat-search latency at growing sizes (where exact search stops being cheap).

    python benchmarks/bench_search.py [--n 1000000] [--queries 200] [--threads 2] [--json out.json]
    python benchmarks/bench_search.py --n 50000 --quick          # a small run

The last line printed is the whole-query p50 of the setting the index would choose, against the
brute-force search alone.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_data(n: int, n_queries: int, clusters: int, dim: int, seed: int):
    """(database (n, dim), queries (q, dim)) from the cluster mixture described in the module doc."""
    rng = np.random.default_rng(seed)
    half = dim // 2
    centres = [normalise(rng.standard_normal((clusters, half), dtype=np.float32)) for _ in range(2)]
    spread = rng.uniform(0.6, 1.4, size=clusters).astype(np.float32)  # per-cluster noise scale
    xb = np.empty((n, dim), dtype=np.float32)
    assign = rng.integers(0, clusters, size=n)
    step = 65536
    for s in range(0, n, step):
        a = assign[s : s + step]
        for h in range(2):
            noise = rng.standard_normal((len(a), half), dtype=np.float32) / np.sqrt(half)
            xb[s : s + step, h * half : (h + 1) * half] = normalise(centres[h][a] + spread[a, None] * noise)
    qa = rng.integers(0, clusters, size=n_queries)
    parts = []
    for h in range(2):
        noise = rng.standard_normal((n_queries, half), dtype=np.float32) / np.sqrt(half)
        parts.append(0.5 * normalise(centres[h][qa] + 1.3 * spread[qa, None] * noise))
    return xb, np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def pct(times: list[float]) -> tuple[float, float]:
    a = np.asarray(times) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth, strict=True)]))


def rescored(xb: np.ndarray, q: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """SearchIndex.search's last step: exact scores of the candidates, re-sorted."""
    lab = labels[labels >= 0]
    sc = xb[lab] @ q
    return lab[np.argsort(-sc, kind="stable")][:k]


def set_params(index, params: str) -> None:
    """``nprobe=…,k_factor=…`` on an IVF index or an IndexRefine around one (as clip2video.search.store does)."""
    from clip2video.search.store import apply_search_params

    apply_search_params(index, params)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--clusters", type=int, default=20_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nlist", type=int, default=None, help="IVF lists (default: the index's auto rule)")
    ap.add_argument("--nprobes", default="8,16,32,64,128")
    ap.add_argument("--flat_timed", type=int, default=20, help="queries timed one by one for exact search")
    ap.add_argument("--train_per_list", type=int, default=256,
                    help="k-means training vectors per IVF list (few per underlying cluster split clusters over lists)")
    ap.add_argument("--no_sizes", action="store_true", help="skip the exact-search-by-size sweep")
    ap.add_argument("--no_text", action="store_true", help="skip the text tower")
    ap.add_argument("--no_pq", action="store_true", help="skip the IVF-PQ + SQ8 refine setting")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.quick:
        a.queries, a.flat_timed = 50, 5

    import faiss
    import torch

    from clip2video.search.store import EXACT_MAX, auto_index_type

    faiss.omp_set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    k = a.k
    report: dict = {"n": a.n, "dim": a.dim, "clusters": a.clusters, "queries": a.queries, "threads": a.threads,
                    "settings": []}
    t0 = time.perf_counter()
    xb, xq = make_data(a.n, a.queries, a.clusters, a.dim, a.seed)
    print(f"data: {a.n} × {a.dim} vectors ({xb.nbytes / 2**30:.2f} GiB), {a.queries} queries, "
          f"{a.clusters} clusters, generated in {time.perf_counter() - t0:.1f} s", flush=True)

    # ---- ground truth + exact search (flat inner product) --------------------------------------------------
    t0 = time.perf_counter()
    _, truth = faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    print(f"ground truth (batched exact) in {time.perf_counter() - t0:.1f} s", flush=True)
    times = []
    for i in range(a.flat_timed):
        t = time.perf_counter()
        faiss.knn(xq[i : i + 1], xb, k, metric=faiss.METRIC_INNER_PRODUCT)
        times.append(time.perf_counter() - t)
    flat = pct(times)
    report["settings"].append({"name": "Flat (exact)", "recall": 1.0, "p50_ms": flat[0], "p99_ms": flat[1],
                               "memory_gib": xb.nbytes / 2**30, "build_s": 0.0})
    # ---- baseline: brute-force matrix product -----------------------------------------------------------------
    times = []
    found = []
    for i in range(a.flat_timed):
        t = time.perf_counter()
        s = xb @ xq[i]
        top = np.argpartition(-s, k)[:k]
        top = top[np.argsort(-s[top])]
        times.append(time.perf_counter() - t)
        found.append(top)
    base = pct(times)
    report["baseline"] = {"name": "brute-force numpy matmul", "p50_ms": base[0], "p99_ms": base[1],
                          "recall": recall(np.array(found), truth[: a.flat_timed], k)}
    print(f"baseline brute-force matmul: p50 {base[0]:.1f} ms p99 {base[1]:.1f} ms; exact flat p50 "
          f"{flat[0]:.1f} ms p99 {flat[1]:.1f} ms", flush=True)

    # ---- exact search at growing sizes -------------------------------------------------------------------------
    sizes = [s for s in (25_000, 50_000, 100_000, 200_000, 400_000) if s < a.n and not a.no_sizes]
    report["flat_by_size"] = []
    for s in sizes:
        times = []
        for i in range(max(a.flat_timed, 10)):
            t = time.perf_counter()
            faiss.knn(xq[i : i + 1], xb[:s], k, metric=faiss.METRIC_INNER_PRODUCT)
            times.append(time.perf_counter() - t)
        p = pct(times)
        report["flat_by_size"].append({"n": s, "p50_ms": p[0], "p99_ms": p[1]})
        print(f"flat at n={s}: p50 {p[0]:.2f} ms p99 {p[1]:.2f} ms", flush=True)

    # ---- approximate: IVF + SQ8 (one coarse quantizer shared with IVF-PQ) ----------------------------------------
    factory, params = auto_index_type(a.n)
    nlist = a.nlist or (int(factory.split(",")[0][3:]) if factory.startswith("IVF") else 1024)
    report["auto"] = {"factory": factory, "params": params, "exact_max": EXACT_MAX}
    rng = np.random.default_rng(a.seed)
    train_n = min(a.n, a.train_per_list * nlist)
    sample = xb[np.sort(rng.choice(a.n, size=train_n, replace=False))]
    t0 = time.perf_counter()
    km = faiss.Kmeans(a.dim, nlist, niter=8, seed=a.seed, spherical=True, verbose=False,
                      max_points_per_centroid=a.train_per_list)
    km.train(sample)
    quantizer = faiss.IndexFlatIP(a.dim)
    quantizer.add(km.centroids)
    t_coarse = time.perf_counter() - t0
    print(f"coarse quantizer: {nlist} lists trained on {train_n} vectors in {t_coarse:.1f} s", flush=True)

    def measure(name: str, index, build_s: float, param_list: list[tuple[str, str]], fetch: int) -> None:
        mem = faiss.serialize_index(index).nbytes / 2**30
        for label, p in param_list:
            set_params(index, p)
            _, lab = index.search(xq, fetch)
            found = np.array([rescored(xb, xq[i], lab[i], k) for i in range(len(xq))])
            r = recall(found, truth, k)
            times = []
            for i in range(len(xq)):
                t = time.perf_counter()
                _, li = index.search(xq[i : i + 1], fetch)
                rescored(xb, xq[i], li[0], k)
                times.append(time.perf_counter() - t)
            p50, p99 = pct(times)
            report["settings"].append({"name": f"{name} {label}", "factory": name, "params": p, "recall": r,
                                       "p50_ms": p50, "p99_ms": p99, "memory_gib": mem, "build_s": build_s})
            print(f"{name} {label}: recall@{k} {r:.3f}, p50 {p50:.2f} ms p99 {p99:.2f} ms, {mem:.3f} GiB, "
                  f"build {build_s:.0f} s", flush=True)

    probes = [int(x) for x in a.nprobes.split(",") if x]
    t0 = time.perf_counter()
    ivf = faiss.IndexIVFScalarQuantizer(quantizer, a.dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                        faiss.METRIC_INNER_PRODUCT)
    ivf.train(sample)
    ivf.add(xb)
    build = t_coarse + time.perf_counter() - t0
    measure(f"IVF{nlist},SQ8", ivf, build, [(f"nprobe={p}", f"nprobe={p}") for p in probes], max(2 * k, k + 10))

    if not a.no_pq:
        t0 = time.perf_counter()
        m = a.dim // 16
        pq = faiss.IndexIVFPQ(quantizer, a.dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        pq.train(sample)
        refine = faiss.IndexRefine(pq, faiss.IndexScalarQuantizer(a.dim, faiss.ScalarQuantizer.QT_8bit,
                                                                  faiss.METRIC_INNER_PRODUCT))
        refine.train(sample)
        refine.add(xb)
        build = t_coarse + time.perf_counter() - t0
        plist = [(f"nprobe={p},k_factor={kf}", f"nprobe={p},k_factor={kf}") for p in (16, 32) for kf in (4, 16)]
        measure(f"IVF{nlist},PQ{m}+Refine(SQ8)", refine, build, plist, max(2 * k, k + 10))
        del refine, pq

    # ---- whole query: text tower + search ---------------------------------------------------------------------
    if not a.no_text:
        from clip2video.modules.network.backbone import ClipConfig
        from clip2video.modules.network.tokenizer import ClipTokenizer
        from clip2video.modules.weights.factory import create_model
        from clip2video.search.index import encode_queries

        torch.manual_seed(0)
        model = create_model("tab_tdb", clip_config=ClipConfig(), mask_layout="per_video").eval()
        tok = ClipTokenizer(32)
        words = ("a man woman dog cat car person is playing running cooking talking about the in on with red blue "
                 "ball kitchen street video game music guitar singing dancing people two three children water "
                 "field football soccer news show cartoon").split()
        wrng = np.random.default_rng(1)
        texts = [" ".join(wrng.choice(words, size=int(wrng.integers(4, 15)))) for _ in range(a.queries)]
        lens = [len(tok.bpe_ids(t)) + 2 for t in texts]
        report["query_tokens_mean"] = float(np.mean(lens))
        variants = {"fp32": (model, "fp32"), "bf16": (model, "bf16")}
        try:
            qmodel = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
            variants["int8"] = (qmodel, "fp32")
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            print(f"int8 dynamic quantisation unavailable: {type(e).__name__}: {e}")
        ref = encode_queries(model, tok, texts[:50], "fp32")
        # the index the collection gets: IVF + SQ8 at the smallest nprobe reaching recall 0.95 (else the best)
        sq8 = [r for r in report["settings"] if r["name"].startswith(f"IVF{nlist},SQ8")]
        ok = [r for r in sq8 if r["recall"] >= 0.95]
        chosen = min(ok, key=lambda r: r["p50_ms"]) if ok else max(sq8, key=lambda r: r["recall"])
        params = chosen["params"]
        report["whole_query_index"] = chosen["name"]
        set_params(ivf, params)
        ids = [f"video{i:07d}" for i in range(a.n)]
        report["text"] = []
        for name, (mdl, prec) in variants.items():
            for t in texts[:5]:  # warm-up
                encode_queries(mdl, tok, [t], prec)
            vec = encode_queries(mdl, tok, texts[:50], prec)
            cos = float(np.mean(np.sum(normalise(vec) * normalise(ref), axis=1)))
            enc_t, whole_t = [], []
            for t in texts:
                t_a = time.perf_counter()
                v = encode_queries(mdl, tok, [t], prec)
                t_b = time.perf_counter()
                _, li = ivf.search(v, max(2 * k, k + 10))
                top = rescored(xb, v[0], li[0], k)
                _ = [(ids[j], float(xb[j] @ v[0])) for j in top]
                t_c = time.perf_counter()
                enc_t.append(t_b - t_a)
                whole_t.append(t_c - t_a)
            e50, e99 = pct(enc_t)
            w50, w99 = pct(whole_t)
            report["text"].append({"precision": name, "encode_p50_ms": e50, "encode_p99_ms": e99,
                                   "whole_p50_ms": w50, "whole_p99_ms": w99, "cos_to_fp32": cos})
            print(f"text tower {name}: encode p50 {e50:.1f} ms p99 {e99:.1f} ms; whole query (+ {params}) p50 "
                  f"{w50:.1f} ms p99 {w99:.1f} ms; cosine to fp32 vectors {cos:.5f}", flush=True)
        report["query_tokens_mean"] = float(np.mean(lens))
        best = min(report["text"], key=lambda r: r["whole_p50_ms"])
        if a.json:
            with open(a.json, "w") as f:
                json.dump(report, f, indent=1)
        print(f"whole query p50 {best['whole_p50_ms']:.1f} ms ({best['precision']}) vs brute-force search alone "
              f"{base[0]:.1f} ms: {base[0] / best['whole_p50_ms']:.1f}× faster")
    elif a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
