#!/usr/bin/env python
"""Load on ``search.py serve``: 32 concurrent clients on loopback for a bounded time, against a 100k-video index.

Set-up (in a temporary folder): a CLIP2Video model whose text tower has ViT-B/32's size (random weights; the
vision tower is shrunk, queries never use it), ``--n`` synthetic video vectors (a mixture of clusters on the
sphere per 512-d half, as a real embedding collection has, 1024-d like a TAB model) exported as
``--save_embeddings`` output with that model recorded, then ``search.py build --from_embeddings`` and
``search.py serve --port 0`` as a user runs them. The index type is what ``build`` picks for that size.

Phases, one after the other, each bounded in time:

1. baseline: the same queries through ``SearchIndex.query`` in this process, one at a time, in a worker thread
   as the server runs them (the work itself), with the server's text runtime (``--text_encoder``);
2. the in-process batched limit: batches of ``--max_batch`` (16) queries encoded and searched as one
   (``batcher.search_batch``) by ``--encoders`` threads at once, as fast as they go: the most the server
   could answer on this machine;
3. ``/api/search``, one client (the work + HTTP + JSON);
4. three successive phases of ``--seconds`` each with ``--clients`` clients: ``/api/search`` (the figure),
   ``/api/similar`` (no text encoding), ``/api/health`` (the HTTP floor); the server's RSS after each;
5. ``/api/search`` again on a server started with ``--max_batch 1`` (every query encoded and searched alone).

The server runs with ``--query_cache 0``: the queries are distinct, and the figure is the work, not the cache.

Every client is a thread with its own keep-alive connection; the clients run on the same 2 cores as the
server, so they take part of its CPU. Queries are distinct texts from a template grammar (the server caches
nothing). Errors (any status but 200, or a broken connection) are counted and must be 0. The server's
memory (VmRSS from /proc) is read before and after the load and its peak (VmHWM) at the end.

    python benchmarks/bench_server.py [--n 100000] [--clients 32] [--seconds 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlencode

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SUBJECTS = ["a man", "a woman", "two kids", "a dog", "a cat", "a chef", "a band", "people", "a girl", "an old man",
            "a crowd", "a racing car", "a horse", "a cartoon character", "a reporter", "a soccer team"]
ACTIONS = ["is singing", "is cooking pasta", "rides a bicycle", "plays the guitar", "is dancing", "runs",
           "explains a recipe", "swims", "is talking to the camera", "jumps over a fence", "drives fast",
           "plays football", "reads the news", "climbs a rock", "is painting", "laughs"]
PLACES = ["on a stage", "in a kitchen", "on a beach", "in the street", "in a park", "at night", "in the snow",
          "in a studio", "on a farm", "in a stadium", "in a forest", "at a wedding", "on television", "indoors"]


def queries(n: int, seed: int = 0) -> list[str]:
    rng = np.random.RandomState(seed)
    out = set()
    while len(out) < n:
        out.add(f"{SUBJECTS[rng.randint(len(SUBJECTS))]} {ACTIONS[rng.randint(len(ACTIONS))]} "
                f"{PLACES[rng.randint(len(PLACES))]}")
    return sorted(out)


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered_vectors(n: int, half: int, clusters: int, seed: int) -> np.ndarray:
    """``[v_g, v_a]``: each half a unit vector near one of ``clusters`` random centres."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, clusters, n)
    parts = []
    for _ in range(2):
        centres = normalise(rng.standard_normal((clusters, half)).astype(np.float32))
        spread = rng.uniform(0.6, 1.2, clusters).astype(np.float32)[label, None] / np.sqrt(half)
        parts.append(normalise(centres[label] + spread * rng.standard_normal((n, half)).astype(np.float32)))
    return np.concatenate(parts, axis=1).astype(np.float32)


def make_model_and_embeddings(work: Path, n: int, clusters: int) -> Path:
    """A ViT-B/32-text-size TDB + TAB model saved as a checkpoint, and an export of ``n`` vectors naming it."""
    import torch

    from clip2video.modules.network.backbone import ClipConfig
    from clip2video.modules.weights.factory import create_model
    from clip2video.modules.weights.identity import describe_model
    from clip2video.modules.weights.spec import ModelSpec
    from clip2video.search.build import write_embeddings

    torch.manual_seed(0)
    model = create_model("tab_tdb", clip_config=ClipConfig(vision_width=64, vision_layers=1),
                         mask_layout="per_video").eval()
    ckpt = work / "model" / "pytorch_model.bin.0"
    ckpt.parent.mkdir(parents=True)
    torch.save(model.state_dict(), ckpt)
    meta = describe_model(model, ModelSpec.of_variant("tab_tdb", checkpoint=str(ckpt), max_words=32)).to_dict()
    half = meta["global_dim"]
    video = clustered_vectors(n, half, clusters, seed=1)
    ids = [f"video{i:06d}" for i in range(n)]
    return write_embeddings(work / "emb", np.zeros((0, video.shape[1]), np.float32), video, [], ids, meta)


def start_server(index: Path, env: dict, extra: list[str]) -> tuple[subprocess.Popen, int]:
    """``search.py serve --port 0``; returns once it logs its URL (model and index loaded)."""
    proc = subprocess.Popen([sys.executable, "search.py", "serve", "--index", str(index), "--port", "0", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        m = re.search(r"serving \d+ videos at http://127\.0\.0\.1:(\d+)/", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep draining
            return proc, int(m.group(1))
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"search.py serve did not start (exit code {proc.wait()})")


def make_model_and_embeddings_subprocess(work: Path, n: int, clusters: int, env: dict) -> Path:
    """The set-up in its own process, so that this one measures with a fresh heap and thread pool."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; import bench_server as b; "
            "print(b.make_model_and_embeddings(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))")
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(work), str(n), str(clusters)],
                       cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return Path(r.stdout.strip().splitlines()[-1])


def rss_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in kB, its parts RssAnon (heap: what the process allocated) and RssFile (file pages mapped
    in: the memory-mapped vector shards that re-scoring reads, which the kernel may drop at any time), and the
    number of threads (each thread that allocates may hold a malloc arena)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:", "Threads:", "RssAnon:", "RssFile:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def pct(ms: list[float]) -> tuple[float, float]:
    if not ms:
        return float("nan"), float("nan")
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def load(port: int, paths: list[str], clients: int, seconds: float) -> dict:
    """``clients`` threads, each with one keep-alive connection, requesting ``paths`` round-robin."""
    stop = time.monotonic() + seconds
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def client(c: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        i = c
        while time.monotonic() < stop:
            path = paths[i % len(paths)]
            i += clients
            t0 = time.perf_counter()
            try:
                conn.request("GET", path)
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
                if not ok:
                    with lock:
                        statuses[r.status] = statuses.get(r.status, 0) + 1
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            dt = (time.perf_counter() - t0) * 1000
            if ok:
                lat[c].append(dt)
            else:
                errors[c] += 1
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = [x for row in lat for x in row]
    p50, p99 = pct(ms)
    return {"clients": clients, "seconds": round(wall, 2), "requests": len(ms), "rps": len(ms) / wall,
            "p50_ms": p50, "p99_ms": p99, "errors": sum(errors), "error_statuses": statuses}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="indexed videos")
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each of the three load phases")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--encoders", type=int, default=2, help="serve --max_concurrent_encodes")
    ap.add_argument("--max_batch", type=int, default=16, help="serve --max_batch")
    ap.add_argument("--text_encoder", default="auto", help="serve --text_encoder")
    ap.add_argument("--no_unbatched", action="store_true", help="skip phase 5")
    ap.add_argument("--json", default=None, help="write the figures here too")
    ap.add_argument("--work", default=None, help="keep the model, vectors and index here (reused when present)")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    texts = queries(3000)
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        work = Path(args.work or tmp)
        index = work / "index"
        if not (index / "CURRENT").is_file():
            t0 = time.perf_counter()
            work.mkdir(parents=True, exist_ok=True)
            emb = make_model_and_embeddings_subprocess(work, args.n, args.clusters, env)
            subprocess.run([sys.executable, "search.py", "build", "--from_embeddings", str(emb), "--index",
                            str(index)], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
            print(f"set-up: {args.n} vectors, model and index in {time.perf_counter() - t0:.1f} s", flush=True)

        # 1. baseline: the work itself, in this process
        from clip2video.cli.serve import set_compute_threads
        from clip2video.search.index import SearchIndex

        threads = set_compute_threads(None, args.encoders)  # what serve sets for itself
        load0 = os.getloadavg()
        print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} (2 idle cores: < 0.5)", flush=True)
        ix = SearchIndex.open(index, text_encoder=args.text_encoder)
        kind = ix.manifest.get("index_type")
        def run_direct():
            ix.query(["warm up"], args.k)
            times, enc = [], []
            stop = time.monotonic() + min(8.0, args.seconds)
            i = 0
            while time.monotonic() < stop:
                t1 = time.perf_counter()
                ix.query([texts[i % len(texts)]], args.k)
                times.append((time.perf_counter() - t1) * 1000)
                i += 1
            for t in texts[:30]:
                t1 = time.perf_counter()
                ix.encode_text([t])
                enc.append((time.perf_counter() - t1) * 1000)
            return times, enc

        # in a worker thread with serve's thread setting, as the server runs its encodes
        with ThreadPoolExecutor(1) as pool:
            direct, enc = pool.submit(run_direct).result()
        runtime = ix.text_encoder.name

        def run_batches(start: int) -> int:  # encode + search of batches, until the deadline
            from clip2video.search.batcher import search_batch

            done, i = 0, start
            while time.monotonic() < batch_stop:
                batch = [texts[(i + j) % len(texts)] for j in range(args.max_batch)]
                search_batch(ix, batch, [args.k] * len(batch))
                done += len(batch)
                i += args.max_batch * args.encoders
            return done

        ix.query(texts[: args.max_batch], args.k)  # warm-up at batch size
        t_b = time.perf_counter()
        batch_stop = time.monotonic() + min(8.0, args.seconds)
        with ThreadPoolExecutor(args.encoders) as pool:
            batched_n = sum(pool.map(run_batches, [e * args.max_batch for e in range(args.encoders)]))
        limit_qps = batched_n / (time.perf_counter() - t_b)
        ix.close()
        print(f"in-process batched limit ({args.encoders} thread(s), batches of {args.max_batch}, {runtime}): "
              f"{limit_qps:.1f} queries/s", flush=True)
        d50, d99 = pct(direct)
        e50, _ = pct(enc)
        print(f"baseline (SearchIndex.query in-process, 1 at a time, {kind}, {threads} thread(s)): "
              f"p50 {d50:.1f} ms, p99 {d99:.1f} ms, {1000 / np.mean(direct):.1f} queries/s "
              f"(text encoding alone p50 {e50:.1f} ms)", flush=True)

        serve_args = ["--max_concurrent_encodes", str(args.encoders), "--max_batch", str(args.max_batch),
                      "--text_encoder", args.text_encoder, "--query_cache", "0"]
        proc, port = start_server(index, env, serve_args)
        try:
            search_paths = [f"/api/search?{urlencode({'q': t, 'k': args.k})}" for t in texts]
            similar_paths = [f"/api/similar?{urlencode({'video_id': f'video{(i * 7919) % args.n:06d}', 'k': args.k})}"
                             for i in range(400)]
            mem0 = rss_kb(proc.pid)
            one = load(port, search_paths[::-1], 1, min(8.0, args.seconds))
            mem_warm = rss_kb(proc.pid)
            many = load(port, search_paths, args.clients, args.seconds)
            mem1 = rss_kb(proc.pid)
            sim = load(port, similar_paths, args.clients, args.seconds)
            mem_sim = rss_kb(proc.pid)
            health = load(port, ["/api/health"], args.clients, args.seconds)
            mem2 = rss_kb(proc.pid)
        finally:
            proc.terminate()
            rc = proc.wait(30)
        unbatched = None
        if not args.no_unbatched:  # the same load on a server that encodes every query alone, same run
            proc, port = start_server(index, env, serve_args[:2] + ["--max_batch", "1"] + serve_args[4:])
            try:
                unbatched = load(port, search_paths, args.clients, args.seconds)
            finally:
                proc.terminate()
                rc = max(rc, proc.wait(30))
    rows = [("/api/search, 1 client", one), (f"/api/search, {args.clients} clients", many),
            (f"/api/similar, {args.clients} clients", sim), (f"/api/health, {args.clients} clients", health)]
    if unbatched is not None:
        rows.insert(2, (f"/api/search, {args.clients} clients, --max_batch 1 (no batching)", unbatched))
    print("\n| phase | requests | req/s | p50 ms | p99 ms | errors |\n| --- | --- | --- | --- | --- | --- |")
    print(f"| baseline: SearchIndex.query in-process, 1 at a time | {len(direct)} | {1000 / np.mean(direct):.1f} | "
          f"{d50:.1f} | {d99:.1f} | 0 |")
    for name, r in rows:
        print(f"| {name} | {r['requests']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['errors']}{' ' + str(r['error_statuses']) if r['error_statuses'] else ''} |")
    mb = 1024
    growth = (mem2["VmRSS"] - mem_warm["VmRSS"]) / mem_warm["VmRSS"]
    anon_growth = (mem2["RssAnon"] - mem_warm["RssAnon"]) / mem_warm["RssAnon"]
    print(f"\nserver RSS: {mem0['VmRSS'] / mb:.0f} MiB before the load, {mem_warm['VmRSS'] / mb:.0f} MiB after one "
          f"client, then {mem1['VmRSS'] / mb:.0f} / {mem_sim['VmRSS'] / mb:.0f} / {mem2['VmRSS'] / mb:.0f} MiB after "
          f"the {args.seconds:.0f}-s /api/search, /api/similar, /api/health phases: {100 * growth:+.1f} % over the "
          f"three (peak {mem2['VmHWM'] / mb:.0f} MiB); threads {mem_warm['Threads']} / {mem1['Threads']} / "
          f"{mem_sim['Threads']} / {mem2['Threads']}; server exit code after SIGTERM: {rc}")
    print(f"  of which heap (RssAnon): {mem_warm['RssAnon'] / mb:.0f} → {mem1['RssAnon'] / mb:.0f} / "
          f"{mem_sim['RssAnon'] / mb:.0f} / {mem2['RssAnon'] / mb:.0f} MiB ({100 * anon_growth:+.1f} %); mapped files "
          f"(RssFile, the vector shards): {mem_warm['RssFile'] / mb:.0f} → {mem1['RssFile'] / mb:.0f} / "
          f"{mem_sim['RssFile'] / mb:.0f} / {mem2['RssFile'] / mb:.0f} MiB")
    load1 = os.getloadavg()
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    errors = sum(r["errors"] for _, r in rows)
    figures = {"n": args.n, "index_type": kind, "text_encoder": runtime,
               "baseline": {"requests": len(direct), "p50_ms": d50, "p99_ms": d99, "encode_p50_ms": e50},
               "batched_limit_qps": limit_qps, "phases": {name: r for name, r in rows},
               "rss_kb": {"before": mem0, "after_one_client": mem_warm, "after_search": mem1, "after_similar": mem_sim,
                          "end": mem2}, "rss_growth": growth, "rss_anon_growth": anon_growth,
               "load_before": load0, "load_after": load1,
               "exit_code": rc}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    unb = (f", {many['rps'] / unbatched['rps']:.2f}x without batching ({unbatched['rps']:.1f})"
           if unbatched is not None else "")
    print(f"{args.clients} clients: {many['rps']:.1f} req/s on /api/search = {100 * many['rps'] / limit_qps:.0f} % of "
          f"the in-process batched limit ({limit_qps:.1f}/s), {many['rps'] / one['rps']:.2f}x one client "
          f"({one['rps']:.1f}){unb}; p50 {many['p50_ms']:.0f} ms, p99 {many['p99_ms']:.0f} ms; errors {errors}; "
          f"RSS {100 * growth:+.1f} % over the three phases (heap {100 * anon_growth:+.1f} %); "
          f"1-client p50 {one['p50_ms']:.1f} ms vs in-process "
          f"{d50:.1f} ms (HTTP + JSON +{one['p50_ms'] - d50:.1f} ms); text runtime {runtime}")
    return 1 if errors or rc != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
