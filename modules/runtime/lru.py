"""A least-recently-used map bounded by an estimate of its size in bytes.

Every cache on the query path (the tokenizer's memos, the server's query vectors and video records) must stay
bounded however many distinct requests arrive, so they share this one mechanism; each says only how much one
entry costs (``cost``), which is where they differ.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


class BoundedLRU:
    """``get``/``put`` with at most ``max_bytes`` (estimated by ``cost(key, value)``), least recently used out
    first; an entry larger than the whole bound is not kept, ``max_bytes`` 0 keeps nothing. Thread-safe (the
    server encodes in several threads) and picklable (the lock is made anew, for DataLoader workers)."""

    what = "max_bytes"  # how a bad bound is named in the error

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"{self.what} must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def cost(self, key: Any, value: Any) -> int:  # pragma: no cover - every cache says what an entry costs
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            state = {k: v for k, v in self.__dict__.items() if k != "_lock"}
            state["_data"] = OrderedDict(self._data)
            return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    @property
    def nbytes(self) -> int:
        return self.bytes

    def get(self, key: Hashable) -> Any:
        with self._lock:
            got = self._data.get(key)
            if got is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return got[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = self.cost(key, value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._data[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._data.popitem(last=False)
                self.bytes -= dropped

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.bytes = 0

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self._data), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                "misses": self.misses}
