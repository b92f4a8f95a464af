#!/usr/bin/env python
"""What checking an index costs when it is opened: cheap and full checks against reading its files once.

An index of ``--n`` random ``--dim``-d vectors is built from exported embeddings (exact ``Flat`` index, so the
FAISS file holds every vector, like the shard). Then, in the same run, with the files in the page cache:

1. baseline: every file the manifest records read once, nothing else (what any reader of the index pays);
2. ``SearchIndex.open(verify=False)``: the check at every open of ``query`` (sizes, small files, SQLite
   ``quick_check``) plus loading;
3. ``SearchIndex.open(verify=True)``: the full check (every file hashed) plus loading, as ``serve`` starts and
   as the first ``query`` after a build opens;
4. ``search.py verify``'s ``verify_index`` alone.

The last line is the full open's time as a multiple of the cheap open's, and the hashing rate.

    python benchmarks/bench_integrity.py --n 200000 --dim 512
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from clip2video.cli import search
    from clip2video.search.index import SearchIndex
    from clip2video.search.integrity import verify_index
    from clip2video.search.store import MANIFEST, read_manifest

    load = os.getloadavg()[0]
    print(f"load average {load:.2f} on {os.cpu_count()} cores ({'idle' if load < 0.5 else 'NOT idle'})")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        emb = tmp / "emb"
        emb.mkdir()
        x = np.random.default_rng(0).standard_normal((args.n, args.dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(emb / "video.npy", x)
        (emb / "video_ids.json").write_text(json.dumps([f"v{i}" for i in range(args.n)]))
        del x
        ix = tmp / "ix"
        t0 = time.perf_counter()
        assert search.main(["build", "--from_embeddings", str(emb), "--index", str(ix), "--index_type", "Flat"]) == 0
        build = time.perf_counter() - t0
        gen, manifest = read_manifest(ix)
        files = [ix / rel for rel in manifest["files"]]
        total = sum(f.stat().st_size for f in files)
        print(f"index: {args.n} x {args.dim}, {len(files)} files, {total / 2**20:.1f} MiB; built in {build:.1f} s "
              f"(checksums included); {MANIFEST} records {len(manifest['files'])} files")

        def read_all():
            for f in files:
                with open(f, "rb") as fh:
                    while fh.read(1 << 20):
                        pass

        def opened(verify):
            def run():
                SearchIndex.open(ix, verify=verify).close()
            return run

        read_all()  # into the page cache
        base = best_of(read_all, args.repeats)
        cheap = best_of(opened(False), args.repeats)
        full = best_of(opened(True), args.repeats)
        verify = best_of(lambda: verify_index(ix), args.repeats)
        print(f"baseline, read every file once: {base * 1000:.0f} ms ({total / 2**20 / base:.0f} MiB/s)")
        print(f"open, cheap check (every query): {cheap * 1000:.0f} ms")
        print(f"open, full check (serve, first open after a build): {full * 1000:.0f} ms")
        print(f"search.py verify: {verify * 1000:.0f} ms ({total / 2**20 / verify:.0f} MiB/s hashed)")
        print(f"full open = {full / cheap:.2f}x cheap open = {full / base:.2f}x reading the files; "
              f"hashing {total / 2**20 / max(verify - base, 1e-9):.0f} MiB/s beyond the read")


if __name__ == "__main__":
    main()
