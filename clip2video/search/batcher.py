"""Dynamic batching of text queries for the server: ``QueryBatcher``.

Queries that arrive while every encoder is busy wait; when an encoder frees up, the waiting queries (up to
``max_batch``) are encoded in one pass and searched together, and each caller gets its own answer. At batch
size 1 the text tower is bound by reading its weights, so a batch costs little more than one query, and an
exact index scans its vectors once for the whole batch: that is where throughput under load comes from (the
dynamic batching of inference servers such as Triton or TorchServe, in a few lines of asyncio).

The number of queries encoding or waiting is bounded: beyond it ``submit`` raises ``BusyError`` at once
instead of queueing without limit. The encoding runs in a small thread pool, off the event loop, so a slow
query stalls neither file transfers nor health checks. Everything except the pool's work happens on the
event loop that calls ``submit``; no lock is needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class BusyError(RuntimeError):
    """Too many queries are encoding or waiting; the caller should retry shortly (HTTP 503)."""


class BatcherClosed(RuntimeError):
    """The batcher was shut down before the query could run."""


def search_batch(index, texts: list[str], ks: list[Any]) -> list[list[Any]]:
    """Encode ``texts`` in one pass and search them per distinct k, so each answer is exactly what a query
    with that k alone returns (``index``: the ``SearchIndex`` interface). A query's k may come as ``(k, qb)``,
    ``qb`` saying whether QB-Norm applies to it (``SearchIndex.search(..., qb=)``); k is a number or a hashable
    request (``moments.SearchRequest``: grouping, filters)."""
    vectors = index.encode_text(texts)
    out: list[list[Any]] = [[] for _ in texts]
    keys = [kk if isinstance(kk, tuple) else (kk, None) for kk in ks]
    for key in sorted(set(keys), key=lambda kq: (getattr(kq[0], "k", kq[0]), repr(kq[0]), str(kq[1]))):
        rows = [i for i, kk in enumerate(keys) if kk == key]
        k, qb = key
        found = index.search(vectors[rows], k) if qb is None else index.search(vectors[rows], k, qb=qb)
        for i, hits in zip(rows, found, strict=True):
            out[i] = hits
    return out


class QueryBatcher:
    """Runs ``run(texts, ks) -> answers`` over batches of waiting queries, at most ``max_concurrent`` at once.

    Args:
        run: answers a batch: one result per text, in order (``search_batch`` bound to an index). Queries
            submitted with a ``target`` (the index generation a server request leased) are batched only with
            queries of the same target, and ``run(texts, ks, target)`` is called for them.
        max_concurrent: batches running at once, each in its own thread.
        max_waiting: queries that may wait beyond those running; more get ``BusyError``.
        max_batch: queries taken into one batch.
    """

    def __init__(self, run: Callable[[list[str], list[int]], Sequence[Any]], *, max_concurrent: int = 2,
                 max_waiting: int = 64, max_batch: int = 16):
        for name, value, low in (("max_concurrent_encodes", max_concurrent, 1), ("max_waiting", max_waiting, 0),
                                 ("max_batch", max_batch, 1)):
            if value < low:
                raise ValueError(f"{name} must be at least {low}, got {value}")
        self.run = run
        self.max_concurrent = max_concurrent
        self.max_waiting = max_waiting
        self.max_batch = max_batch
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="encode")
        self._pending: list[tuple[str, int, asyncio.Future, Any]] = []
        self._in_flight = 0  # queries encoding or waiting
        self._runners: set[asyncio.Task] = set()
        self._closed = False
        self.batches = 0  # batches run so far (for logs and tests)

    @property
    def in_flight(self) -> int:
        """Queries submitted and not yet answered."""
        return self._in_flight

    async def submit(self, text: str, k: int | tuple[int, bool], target: Any = None) -> Any:
        """The answer to one query; BusyError when the bound is reached, BatcherClosed after ``shutdown``.

        An exception raised by ``run`` for the batch this query ran in is raised here (to every caller of
        that batch); the batcher goes on with the next batch.
        """
        if self._closed:
            raise BatcherClosed("the server is shutting down")
        if self._in_flight >= self.max_concurrent + self.max_waiting:
            raise BusyError(f"busy: {self._in_flight} queries are being encoded or waiting; retry shortly")
        self._in_flight += 1
        try:
            fut = asyncio.get_running_loop().create_future()
            self._pending.append((text, k, fut, target))
            if len(self._runners) < self.max_concurrent:
                task = asyncio.ensure_future(self._drain())
                self._runners.add(task)
                task.add_done_callback(self._runners.discard)
            return await fut
        finally:
            self._in_flight -= 1

    async def _drain(self) -> None:
        """Take whatever queries wait (up to ``max_batch``) and run them as one batch, until none wait."""
        loop = asyncio.get_running_loop()
        while self._pending and not self._closed:
            target = self._pending[0][3]
            batch, rest = [], []
            for b in self._pending:
                (batch if b[3] is target and len(batch) < self.max_batch else rest).append(b)
            self._pending[:] = rest
            batch = [b for b in batch if not b[2].done()]  # a cancelled request (client gone)
            if not batch:
                continue
            self.batches += 1
            args = [[b[0] for b in batch], [b[1] for b in batch]] + ([] if target is None else [target])
            try:
                results = await loop.run_in_executor(self._pool, self.run, *args)
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} queries answered with {len(results)} results")
            except Exception as e:  # noqa: BLE001 - handed to each caller of this batch
                for _, _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, _, fut, _), answer in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(answer)

    def shutdown(self) -> None:
        """Refuse new queries, fail the waiting ones with BatcherClosed, drop batches not yet started."""
        self._closed = True
        pending, self._pending = self._pending, []
        for _, _, fut, _ in pending:
            if not fut.done():
                fut.set_exception(BatcherClosed("the server is shutting down"))
        self._pool.shutdown(wait=False, cancel_futures=True)
