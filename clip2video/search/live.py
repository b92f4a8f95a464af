"""The generation a running server answers from, switched when a build replaces it: ``LiveIndex``.

A build writes a new generation and then replaces ``CURRENT`` (``store.py``). A server that opened the index
before keeps answering from the generation it opened, so :class:`LiveIndex`:

- checks, at most every ``interval`` seconds and only when a request arrives, whether ``CURRENT`` changed
  (one ``stat``); if so it opens the new generation in a background thread (checked like any first open:
  ``integrity.py``; the loaded model is shared when the record is the same), and switches to it between
  requests. Requests never wait for that work.
- gives each request a *lease* on the generation current when it started (:meth:`use`); a request keeps
  its generation to the end, so a search and the record look-ups of its results agree.
- closes a replaced generation when its last lease ends. Until then the generation keeps its shared lock on
  its manifest, which tells the build's clean-up to leave its files (thumbnails included) on disk; the next
  build removes them.
- if the new generation cannot be opened (damaged, a build half-copied by hand) it logs one line and keeps
  serving the one it has, and tries again only when ``CURRENT`` changes again.

It knows nothing of HTTP; ``app.py`` leases from it. The pattern is read-copy-update with reference counts,
as a reader of an LMDB snapshot holds it until its transaction ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from clip2video.search.store import CURRENT

logger = logging.getLogger("clip2video.search.app")


class Served:
    """One opened generation and what the server keeps with it (``extra``, e.g. its record cache)."""

    def __init__(self, index: Any, extra: Any = None):
        self.index = index
        self.extra = extra
        self.leases = 0
        self.retired = False
        self.owned = False  # opened by LiveIndex; the first one is closed at shutdown by whoever opened it
        # (every replaced generation is closed when its last lease ends, the first one too)

    @property
    def name(self) -> str | None:
        gen = getattr(self.index, "generation", None)
        return getattr(gen, "name", None)


class LiveIndex:
    """The index a server answers from; reopened when a build switches generations.

    Args:
        index: an opened index. When it has ``reopen()`` and a ``folder`` with a ``CURRENT`` file it is watched;
            anything else (a test's stub) is served as it is.
        make_extra: per-generation state built for every opened generation (``extra`` of :class:`Served`).
        interval: seconds between two checks of ``CURRENT`` (0: at every request).
    """

    def __init__(self, index: Any, *, make_extra: Callable[[Any], Any] | None = None, interval: float = 1.0):
        self._make_extra = make_extra or (lambda ix: None)
        self._current = Served(index, self._make_extra(index))
        self._lock = threading.Lock()
        self.interval = interval
        self._watch = hasattr(index, "reopen") and hasattr(index, "folder")
        self._cur_path = os.path.join(os.fspath(index.folder), CURRENT) if self._watch else None
        self._seen = self._stat()
        self._next_check = time.monotonic() + interval
        self._loading: threading.Thread | None = None
        self._failed: str | None = None  # a generation that could not be opened (not retried)
        self.switches = 0

    # ------------------------------------------------------------------ leases
    @property
    def current(self) -> Served:
        return self._current

    @contextlib.contextmanager
    def use(self) -> Iterator[Served]:
        """Lease the current generation for one request (checks for a new one first, without waiting)."""
        self.poll()
        with self._lock:
            served = self._current
            served.leases += 1
        try:
            yield served
        finally:
            with self._lock:
                served.leases -= 1
                done = served.retired and served.leases == 0
            if done:
                _close(served)

    # ------------------------------------------------------------------ watching
    def _stat(self) -> tuple[int, int, int] | None:
        if self._cur_path is None:
            return None
        try:
            st = os.stat(self._cur_path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def poll(self) -> None:
        """Start opening a new generation if ``CURRENT`` changed since the last look (rate-limited)."""
        if not self._watch:
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.interval
        seen = self._stat()
        if seen == self._seen:
            return
        with self._lock:
            if self._loading is not None and self._loading.is_alive():
                return  # the running load will look again when it ends
            self._seen = seen
            self._loading = threading.Thread(target=self._load, name="index-reload", daemon=True)
            self._loading.start()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a reload in progress (tests; a shutdown)."""
        t = self._loading
        if t is not None:
            t.join(timeout)

    def _load(self) -> None:
        old = self._current
        try:
            if not old.index.changed():
                return
            new_name = _current_name(old.index)
            if new_name is not None and new_name == self._failed:
                return
            t0 = time.perf_counter()
            new_index = old.index.reopen()
        except (OSError, ValueError, RuntimeError) as e:
            name = _current_name(old.index)
            self._failed = name
            logger.error("index %s: new generation %s not served (%s); still serving %s", old.index.folder, name,
                         str(e).splitlines()[0] if str(e) else type(e).__name__, old.name)
            return
        new = Served(new_index, self._make_extra(new_index))
        new.owned = True
        with self._lock:
            self._current = new
            old.retired = True
            idle = old.leases == 0
        self.switches += 1
        logger.info("index %s: now serving generation %s (%d videos; opened in %.1f s), was %s",
                    new_index.folder, new.name, len(new_index), time.perf_counter() - t0, old.name)
        if idle:
            _close(old)
        if self._stat() != self._seen:  # CURRENT moved again meanwhile: look again at the next request
            self._seen = None
            self._next_check = 0.0

    def close(self) -> None:
        """Server shutdown: close the current generation if this LiveIndex opened it (the first one is closed
        by whoever opened it)."""
        self.wait(5)
        with self._lock:
            served = self._current
            served.retired = served.owned
            idle = served.owned and served.leases == 0
        if idle:
            _close(served)


def _current_name(index: Any) -> str | None:
    from clip2video.search.store import read_current_name

    return read_current_name(index.folder)


def _close(served: Served) -> None:
    close = getattr(served.index, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # noqa: BLE001 - closing a retired generation must not fail a request
            logger.warning("closing generation %s failed", served.name, exc_info=True)


__all__ = ["LiveIndex", "Served"]
