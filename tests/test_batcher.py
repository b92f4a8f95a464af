"""QueryBatcher without HTTP: batching of waiting queries, the bound on them, routing of answers, a failing
batch, shutdown; and search_batch's per-k split."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from clip2video.search.batcher import BatcherClosed, BusyError, QueryBatcher, search_batch


class Recorder:
    """A batch function that answers each (text, k) with (text, k, batch number), optionally held at a gate
    and failing on texts that contain "boom"."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.gate: threading.Event | None = None
        self.lock = threading.Lock()

    def __call__(self, texts, ks):
        with self.lock:
            self.calls.append(list(texts))
            n = len(self.calls)
        if self.gate is not None:
            self.gate.wait(30)
        if any("boom" in t for t in texts):
            raise RuntimeError("encoder failed")
        return [(t, k, n) for t, k in zip(texts, ks, strict=True)]


async def _until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_waiting_queries_run_as_one_batch_and_each_caller_gets_its_own_answer():
    async def main():
        run = Recorder()
        run.gate = threading.Event()
        b = QueryBatcher(run, max_concurrent=1, max_waiting=8, max_batch=16)
        first = asyncio.ensure_future(b.submit("first", 1))
        await _until(lambda: len(run.calls) == 1)
        waiting = [asyncio.ensure_future(b.submit(t, k)) for t, k in (("a", 2), ("b", 3), ("c", 4))]
        await _until(lambda: b.in_flight == 4)
        run.gate.set()
        got = await asyncio.gather(first, *waiting)
        b.shutdown()
        return run, got

    run, got = asyncio.run(main())
    assert run.calls == [["first"], ["a", "b", "c"]]  # one batch for the three that waited
    assert got == [("first", 1, 1), ("a", 2, 2), ("b", 3, 2), ("c", 4, 2)]


def test_max_batch_splits_the_waiting_queries():
    async def main():
        run = Recorder()
        run.gate = threading.Event()
        b = QueryBatcher(run, max_concurrent=1, max_waiting=8, max_batch=2)
        first = asyncio.ensure_future(b.submit("first", 1))
        await _until(lambda: len(run.calls) == 1)
        waiting = [asyncio.ensure_future(b.submit(t, 1)) for t in "abcde"]
        await _until(lambda: b.in_flight == 6)
        run.gate.set()
        got = await asyncio.gather(first, *waiting)
        b.shutdown()
        return run, got

    run, got = asyncio.run(main())
    assert run.calls == [["first"], ["a", "b"], ["c", "d"], ["e"]]
    assert [g[0] for g in got] == ["first", *"abcde"]


def test_beyond_the_bound_a_query_is_refused_at_once():
    async def main():
        run = Recorder()
        run.gate = threading.Event()
        b = QueryBatcher(run, max_concurrent=1, max_waiting=1, max_batch=4)
        first = asyncio.ensure_future(b.submit("first", 1))
        await _until(lambda: len(run.calls) == 1)
        second = asyncio.ensure_future(b.submit("second", 1))
        await _until(lambda: b.in_flight == 2)
        t0 = time.perf_counter()
        with pytest.raises(BusyError, match="busy: 2 queries"):
            await b.submit("third", 1)
        refused_in = time.perf_counter() - t0
        run.gate.set()
        got = await asyncio.gather(first, second)
        after = await b.submit("fourth", 1)  # room again once the others are answered
        b.shutdown()
        return got, after, refused_in, b.in_flight

    got, after, refused_in, left = asyncio.run(main())
    assert refused_in < 1.0
    assert [g[0] for g in got] == ["first", "second"] and after[0] == "fourth" and left == 0


def test_a_failing_batch_reaches_its_callers_and_the_batcher_goes_on():
    async def main():
        run = Recorder()
        run.gate = threading.Event()
        b = QueryBatcher(run, max_concurrent=1, max_waiting=8)
        first = asyncio.ensure_future(b.submit("first", 1))
        await _until(lambda: len(run.calls) == 1)
        bad = [asyncio.ensure_future(b.submit(t, 1)) for t in ("boom", "innocent bystander")]
        await _until(lambda: b.in_flight == 3)
        run.gate.set()
        ok = await first
        results = await asyncio.gather(*bad, return_exceptions=True)
        later = await b.submit("later", 5)
        b.shutdown()
        return ok, results, later, run.calls

    ok, results, later, calls = asyncio.run(main())
    assert ok[0] == "first"
    assert all(isinstance(r, RuntimeError) and "encoder failed" in str(r) for r in results)  # both of that batch
    assert later == ("later", 5, 3) and calls[-1] == ["later"]


def test_concurrent_batches_use_separate_threads():
    async def main():
        run = Recorder()
        run.gate = threading.Event()
        b = QueryBatcher(run, max_concurrent=2, max_waiting=0)
        tasks = [asyncio.ensure_future(b.submit("x", 1))]
        await _until(lambda: len(run.calls) == 1)
        tasks.append(asyncio.ensure_future(b.submit("y", 1)))
        await _until(lambda: len(run.calls) == 2)  # runs beside the held batch instead of waiting for it
        with pytest.raises(BusyError):
            await b.submit("z", 1)
        run.gate.set()
        got = await asyncio.gather(*tasks)
        b.shutdown()
        return got

    assert sorted(g[0] for g in asyncio.run(main())) == ["x", "y"]


def test_shutdown_fails_waiting_queries_and_refuses_new_ones():
    async def main():
        run = Recorder()
        run.gate = threading.Event()
        b = QueryBatcher(run, max_concurrent=1, max_waiting=8)
        first = asyncio.ensure_future(b.submit("first", 1))
        await _until(lambda: len(run.calls) == 1)
        waiting = asyncio.ensure_future(b.submit("waiting", 1))
        await _until(lambda: b.in_flight == 2)
        b.shutdown()
        with pytest.raises(BatcherClosed):
            await waiting
        with pytest.raises(BatcherClosed):
            await b.submit("new", 1)
        run.gate.set()
        return await first  # the batch already running still answers its caller

    assert asyncio.run(main())[0] == "first"


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        QueryBatcher(Recorder(), max_batch=0)
    with pytest.raises(ValueError, match="max_waiting must be at least 0"):
        QueryBatcher(Recorder(), max_waiting=-1)


def test_search_batch_searches_each_k_apart():
    class Index:
        def __init__(self):
            self.searches = []

        def encode_text(self, texts):
            return np.array([[float(len(t))] for t in texts], dtype=np.float32)

        def search(self, vectors, k):
            self.searches.append((vectors[:, 0].tolist(), k))
            return [[f"len{int(v)}-k{k}"] for v in vectors[:, 0]]

    ix = Index()
    out = search_batch(ix, ["a", "bb", "ccc", "dddd"], [2, 1, 2, 1])
    assert out == [["len1-k2"], ["len2-k1"], ["len3-k2"], ["len4-k1"]]
    assert ix.searches == [([2.0, 4.0], 1), ([1.0, 3.0], 2)]  # one search per distinct k, rows in order


def test_search_batch_passes_qb_per_query():
    class Index:
        def __init__(self):
            self.searches = []

        def encode_text(self, texts):
            return np.array([[float(len(t))] for t in texts], dtype=np.float32)

        def search(self, vectors, k, qb=None):
            self.searches.append((vectors[:, 0].tolist(), k, qb))
            return [[f"len{int(v)}-k{k}-qb{qb}"] for v in vectors[:, 0]]

    ix = Index()
    out = search_batch(ix, ["a", "bb", "ccc", "dddd"], [(2, True), (2, False), (2, True), 1])
    assert out == [["len1-k2-qbTrue"], ["len2-k2-qbFalse"], ["len3-k2-qbTrue"], ["len4-k1-qbNone"]]
    assert ix.searches == [([4.0], 1, None), ([2.0], 2, False), ([1.0, 3.0], 2, True)]
