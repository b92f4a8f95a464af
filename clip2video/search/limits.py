"""The server's bounds, in one value: ``ServerLimits`` (no web framework needed to read or check them).

The command line takes its flag defaults from here and the app enforces them, so ``search.py serve --help``
works, and says the same numbers, where the serve extra (fastapi, uvicorn) is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

#: Most pixels an image query may have (the command line and the server): a decoded image costs 3 bytes per
#: pixel, so a small file that claims a huge size (a decompression bomb) is refused before it is decoded.
MAX_IMAGE_PIXELS = 40_000_000


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on every input and cache of the server.

    Attributes:
        max_query_chars: longest query text accepted (400 beyond).
        max_k / default_k: most results one query may ask for, and what it gets without ``k``.
        max_concurrent_encodes: batches of text queries encoded at once (each in its own thread).
        max_waiting: queries that may wait for an encoder; beyond them a search gets 503.
        max_batch: waiting queries encoded together in one batch.
        max_frames_listed: frame URLs one ``/api/frames`` answer lists (evenly spaced beyond).
        record_cache_bytes: video records (with their file records) kept in memory, per generation, in bytes
            (estimated; least recently used dropped first).
        reload_interval_ms: how often, at most, a request checks whether a build switched ``CURRENT``.
        max_clip_seconds: longest clip ``/api/clip`` cuts (400 beyond).
        max_concurrent_clips: clips cut at once (503 beyond; cutting re-encodes video).
        max_upload_bytes: largest image one ``POST /api/search`` may upload (400 beyond).
        max_upload_files: images one ``POST /api/search`` may upload (400 beyond).
        max_image_pixels: width × height an uploaded image may have (400 beyond, checked before decoding).
        max_rich_waiting: image and arithmetic queries that may wait for an encoder (each may hold its uploads
            in memory, so fewer than text queries); beyond them 503.
    """

    max_query_chars: int = 1000
    max_k: int = 100
    default_k: int = 10
    max_concurrent_encodes: int = 2
    max_waiting: int = 64
    max_batch: int = 16
    max_frames_listed: int = 240
    record_cache_bytes: int = 4 << 20
    reload_interval_ms: int = 1000
    max_clip_seconds: int = 300
    max_concurrent_clips: int = 1
    max_upload_bytes: int = 10_000_000
    max_upload_files: int = 4
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_rich_waiting: int = 8

    def __post_init__(self) -> None:
        for f in fields(self):
            low = 0 if f.name in ("max_waiting", "max_rich_waiting", "reload_interval_ms") else 1
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{f.name} must be at least {low}, got {value}")
        if self.default_k > self.max_k:  # a default beyond the bound is the bound
            object.__setattr__(self, "default_k", self.max_k)


MAX_INT_DIGITS = 9  # every integer a request carries (k, a thumbnail or frame number) fits in 9 digits


def strict_int(raw: str | None, max_digits: int = MAX_INT_DIGITS) -> int | None:
    """The value of ``raw`` if it is 1 to ``max_digits`` ASCII digits, else None.

    The one integer parser of every route: Python's ``int()`` also takes signs, spaces, underscores and any
    Unicode digit (``"²"`` passes ``isdigit()`` and then fails ``int()``), and refuses over 4,300 digits with
    an error of its own; none of that may reach a request handler.
    """
    if raw is None or not 0 < len(raw) <= max_digits or not all("0" <= c <= "9" for c in raw):
        return None
    return int(raw)
