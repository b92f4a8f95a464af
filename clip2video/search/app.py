"""Serve a search index: a JSON API and one static page (``search.py serve``; the command is ``cli/serve.py``).

The app holds one opened index (model and vectors loaded once) and answers

- ``GET /api/search?q=TEXT&k=K[&qb=0|1]``: text → videos, the same ids, order and scores as ``search.py query
  --json``; ``q`` may be query arithmetic (``"2:a dog" - snow + like:ID``); a plain caption gets QB-Norm when
  the index stores a query bank, unless ``qb=0`` (or ``serve --no_qb``), arithmetic never; each result has the
  ``start``/``end`` of its segment; in an index of segments results are grouped by video (its next best
  segments as ``moments``) unless ``group=0``; ``video_id=`` ranks one video's segments; ``path=``,
  ``min_duration=``, ``max_duration=``, ``modified_after=`` filter before k (``moments.py``);
- ``POST /api/search``: the same with uploaded images (multipart; bounds and checks in ``rich_api.py``);
- ``GET /api/similar?video_id=ID&k=K[&start=S]``: video (or the moment of it starting at S) → videos;
- ``GET /api/clip?video_id=ID&start=S&end=E[&copy=1]``: that range of an indexed video file as an MP4 download
  (``export.py``; at most ``max_clip_seconds`` long, one cut at a time, only while the file is the one the
  build recorded);
- ``GET /api/frames?video_id=ID``: the frame URLs of a video indexed as a frame folder;
- ``GET /api/health``: ``{"status": "ok", "videos": N, "model": fingerprint, "qb_norm": bool, "generation":
  name}``;
- ``GET /video/{id}`` (HTTP Range requests, so the player can seek), ``GET /thumb/{id}/{n}``,
  ``GET /frame/{id}/{n}``: files, found only through the index's own records;
- ``GET /`` and ``/static/{name}``: the search page (no build step, nothing fetched from elsewhere);
- ``HEAD`` on any of them: the ``GET`` answer's status and headers without the body.

Safety, because people run this on a laptop full of private footage (the trust model: whoever sends requests
is untrusted; the indexed folder and the index folder may change after the build):

- No request ever becomes a path. A file is served only when the id in the URL is an indexed video id and the
  file is one the build recorded for it: a video file, a frame of its frame folder picked by number among the
  frames recorded, or a thumbnail under the index's ``thumbs/``; and only while it is still the recorded
  regular file, under the recorded root, unchanged in size and mtime, reached through no link
  (``files.open_recorded``). Anything else is a 404 and one log line. Any other spelling of an id (``..%2f``,
  double encoding, backslashes, absolute paths, NUL) is simply an unknown id.
- Loopback by default; when bound to loopback the app accepts only loopback ``Host`` headers, so that a web
  page elsewhere cannot reach it through DNS rebinding.
- Query length and ``k`` are bounded (400 beyond the bounds, ``limits.ServerLimits``), and every integer in a
  request goes through one strict parser (``limits.strict_int``); text queries go through a ``QueryBatcher``
  (``batcher.py``): encoded off the event loop, batched while the encoders are busy, and bounded in number
  (503 with a clear message beyond it, instead of an unbounded queue). The caches are bounded in bytes.
- Every answer, errors included, is JSON ``{"error": "..."}`` with the security headers (``web.Guard``); a bug
  is logged on the server and answered with a 500 that holds no traceback.
- A build that switches the index's generation is picked up between requests (``live.LiveIndex``).

The pieces: ``web.Guard`` (middleware), ``Records`` (bounded cache, one per generation), the routers
``api_routes``, ``file_routes`` and ``page_routes``, ``add_error_handlers``; ``create_app`` puts them together.
clip-retrieval's back end separates a knn service from a front end; here one process serves both, which
keeps the metadata look-up (its slow part) in memory next to the index.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import mimetypes
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from clip2video.modules.runtime.lru import BoundedLRU
from clip2video.search.batcher import BatcherClosed, BusyError, QueryBatcher, search_batch
from clip2video.search.files import MAX_ID_CHARS, NotServed, open_recorded
from clip2video.search.limits import ServerLimits, strict_int
from clip2video.search.live import LiveIndex, Served
from clip2video.search.moments import DEFAULT_MOMENTS, MAX_MOMENTS, Filters, SearchRequest, parse_date
from clip2video.search.query_parse import is_plain_text
from clip2video.search.rich_api import NO_QB, RichSearch, parse_q, rich_routes
from clip2video.search.store import THUMBS
from clip2video.search.web import SECURITY_HEADERS, Guard, RecordedFileResponse, server_config

logger = logging.getLogger("clip2video.search.app")

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"


class ApiError(Exception):
    """An answer with an HTTP status and a one-line message (sent as ``{"error": message}``)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# ----------------------------------------------------------------------------------------------- caches
def _record_bytes(rec) -> int:
    """Estimated memory of a video record (paths, file and thumbnail records)."""
    files = getattr(rec, "files", None) or []
    return (400 + 2 * len(str(rec.path)) + 2 * len(rec.video_id) + sum(120 + len(str(f[0])) for f in files)
            + sum(250 + len(str(t)) for t in rec.thumbnails))


class _RecordLRU(BoundedLRU):
    @staticmethod
    def cost(video_id: str, rec) -> int:
        return _record_bytes(rec)


class Records:
    """The index's record of a video id, or None; the records looked up last are kept, up to ``max_bytes``
    (estimated) in all, least recently used dropped first. Any odd spelling of an id is just an unknown id."""

    def __init__(self, index, max_bytes: int):
        self.index = index
        self._cache = _RecordLRU(max_bytes)

    def get(self, video_id: str):
        got = self._cache.get(video_id)
        if got is not None:
            return got
        if not video_id or len(video_id) > MAX_ID_CHARS:
            return None
        try:
            rec = self.index.record(video_id)
        except (KeyError, TypeError):
            rec = None
        except ValueError as e:  # a damaged record (IndexFormatError): not served, said once per look-up
            logger.error("%s", e)
            rec = None
        if rec is not None:
            self._cache.put(video_id, rec)
        return rec


# ----------------------------------------------------------------------------------------------- request parts
def _url_id(video_id: str) -> str:
    """A video id as one URL path segment (``/`` and everything else that is not plain is escaped)."""
    return quote(video_id, safe="")


def parse_k(raw: str | None, limits: ServerLimits) -> int:
    if raw is None or raw == "":
        return limits.default_k
    k = strict_int(raw)
    if k is None or not 1 <= k <= limits.max_k:
        raise ApiError(400, f"k must be an integer from 1 to {limits.max_k}, got {raw[:20]!r}")
    return k


def parse_text(name: str, raw: str | None, limit: int) -> str:
    if raw is None:
        raise ApiError(400, f"missing query parameter {name}")
    if len(raw) > limit:
        raise ApiError(400, f"{name} is {len(raw)} characters long; the limit is {limit}")
    if not raw.strip():
        raise ApiError(400, f"{name} is empty")
    if "\x00" in raw:
        raise ApiError(400, f"{name} contains a NUL character")
    return raw


def parse_qb(raw: str | None, default: bool) -> bool:
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ApiError(400, f"qb must be 0 or 1, got {raw[:20]!r}")


def parse_float(name: str, raw: str | None) -> float | None:
    """A number of seconds >= 0 from a query parameter (None when absent); 400 otherwise."""
    if raw is None or raw == "":
        return None
    try:
        value = float(raw) if len(raw) <= 32 else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ApiError(400, f"{name} must be a number >= 0, got {raw[:40]!r}")
    return value


def parse_group(raw: str | None) -> bool | None:
    if raw in (None, ""):
        return None
    if raw not in ("0", "1"):
        raise ApiError(400, f"group must be 0 or 1, got {raw[:20]!r}")
    return raw == "1"


def parse_request(request: Request, k: int, records: Records) -> SearchRequest:
    """The search options of a request's query string (grouping, one video, filters); 400 on a bad value,
    404 for an unknown ``video_id``."""
    p = request.query_params
    group = parse_group(p.get("group"))
    video_id = p.get("video_id") or None
    if video_id is not None:
        video_id = parse_text("video_id", video_id, MAX_ID_CHARS)
        if records.get(video_id) is None:
            raise ApiError(404, f"unknown video_id {video_id[:200]!r}")
    path = p.get("path") or None
    if path is not None:
        path = parse_text("path", path, 1000)
    raw_moments = p.get("moments") or str(DEFAULT_MOMENTS)
    moments = strict_int(raw_moments)
    if moments is None or not 0 <= moments <= MAX_MOMENTS:
        raise ApiError(400, f"moments must be an integer from 0 to {MAX_MOMENTS}, got {raw_moments[:20]!r}")
    after = p.get("modified_after") or None
    try:
        after = parse_date(after, "modified_after") if after is not None else None
        filters = Filters(path=path, min_duration=parse_float("min_duration", p.get("min_duration")),
                          max_duration=parse_float("max_duration", p.get("max_duration")), modified_after=after)
    except ValueError as e:
        raise ApiError(400, str(e).splitlines()[0]) from None
    return SearchRequest(k, group=group, video_id=video_id, filters=filters, moments=moments)


def _seconds(x: float) -> str:
    return f"{x:.3f}".rstrip("0").rstrip(".")


def hit_json(hit, records: Records, max_clip: float = math.inf) -> dict:
    rec = records.get(hit.video_id)
    uid = _url_id(hit.video_id)
    kind = rec.kind if rec is not None else None
    n = len(rec.thumbnails) if rec is not None else 0
    own = getattr(hit, "thumbnails", None)
    shown = range(n) if own is None else [i for i in own if 0 <= i < n]
    start, end = getattr(hit, "start", None), getattr(hit, "end", None)
    return {
        "video_id": hit.video_id,
        "score": float(hit.score),
        "start": start,
        "end": end,
        "segment": bool(getattr(hit, "segment", False)),  # a moment of a longer video (else the whole video)
        "moments": [{"start": m.start, "end": m.end, "score": float(m.score)} for m in getattr(hit, "moments", ())],
        "thumbnails": [f"/thumb/{uid}/{i}" for i in shown],
        "video": f"/video/{uid}" if kind == "file" else None,
        "kind": kind,
        "frames": f"/api/frames?video_id={uid}" if kind == "frames" else None,
        "clip": (f"/api/clip?video_id={uid}&start={_seconds(start)}&end={_seconds(end)}"
                 if kind == "file" and start is not None and end is not None and end - start <= max_clip
                 else None),
    }


def _ms_since(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


def _media_type(name: str, default: str) -> str:
    return mimetypes.guess_type(name)[0] or default


# ----------------------------------------------------------------------------------------------- routes
def api_routes(live: LiveIndex, batcher: QueryBatcher, limits: ServerLimits, rich: RichSearch,
               qb_default: bool = True, pool: ThreadPoolExecutor | None = None) -> APIRouter:
    """``/api/health``, ``/api/search``, ``/api/similar``, ``/api/frames``.

    ``/api/similar`` runs on ``pool``, a few long-lived threads. asyncio's default pool would start up to
    cores + 4 threads, and every new thread that runs FAISS or a BLAS call gets its own malloc arena and
    OpenMP team, memory that is not given back (the server's RSS grew by ~250 MiB over a ``/api/similar``
    load that way).
    """
    r = APIRouter()

    async def in_pool(fn, *args):
        if pool is None:
            return await asyncio.to_thread(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def has_qb(g: Served) -> bool:
        return getattr(g.index, "qb", None) is not None  # the generation stores QB-Norm statistics (search/qb.py)

    @r.get("/api/health")
    async def health():
        with live.use() as g:
            return {"status": "ok", "videos": len(g.index), "model": g.index.fingerprint, "qb_norm": has_qb(g),
                    "generation": g.name}

    @r.get("/api/search")
    async def search(request: Request):
        t0 = time.perf_counter()
        q = parse_text("q", request.query_params.get("q"), limits.max_query_chars)
        k = parse_k(request.query_params.get("k"), limits)
        wanted = parse_qb(request.query_params.get("qb"), qb_default)
        parts = parse_q(q)  # query arithmetic (rich_api.py); a plain caption takes the batched text path
        with live.use() as g:
            req = parse_request(request, k, g.extra)
            key = k if req == SearchRequest(k) else req  # a plain k keeps the text path as it was
            if not is_plain_text(parts):
                hits = await rich.answer(parts, key, None, g)  # no uploads: image and clip parts are refused
                return {"query": q, "parts": [p.to_dict() for p in parts], "k": k, "took_ms": _ms_since(t0),
                        "qb_norm": NO_QB, "results": [hit_json(h, g.extra, limits.max_clip_seconds) for h in hits]}
            qb = wanted and has_qb(g)
            try:
                hits = await batcher.submit(parts[0].value, (key, qb) if has_qb(g) else key, g)
            except (BusyError, BatcherClosed) as e:
                raise ApiError(503, str(e)) from None
            return {"query": q, "k": k, "took_ms": _ms_since(t0),
                    "qb_norm": {"enabled": qb, "applied": bool(qb and hits and getattr(hits[0], "qb", False))},
                    "results": [hit_json(h, g.extra, limits.max_clip_seconds) for h in hits]}

    @r.get("/api/similar")
    async def similar(request: Request):
        t0 = time.perf_counter()
        p = request.query_params
        video_id = parse_text("video_id", p.get("video_id"), MAX_ID_CHARS)
        k = parse_k(p.get("k"), limits)
        start = parse_float("start", p.get("start"))
        req = SearchRequest(k, group=parse_group(p.get("group")))
        with live.use() as g:
            if g.extra.get(video_id) is None:
                raise ApiError(404, f"unknown video_id {video_id[:200]!r}")

            def run():
                try:
                    if start is None and req == SearchRequest(k):
                        return g.index.similar(video_id, k)
                    return g.index.similar(video_id, req, start=start)
                except KeyError:
                    return None

            hits = await in_pool(run)
            if hits is None:
                what = f"video_id {video_id[:200]!r}" + (f" start {start:g}" if start is not None else "")
                raise ApiError(404, f"unknown {what}")
            return {"video_id": video_id, "start": start, "k": k, "took_ms": _ms_since(t0),
                    "results": [hit_json(h, g.extra, limits.max_clip_seconds) for h in hits]}

    clip_slots = asyncio.Semaphore(limits.max_concurrent_clips)

    @r.get("/api/clip")
    async def clip(request: Request):
        p = request.query_params
        video_id = parse_text("video_id", p.get("video_id"), MAX_ID_CHARS)
        start, end = parse_float("start", p.get("start")), parse_float("end", p.get("end"))
        if start is None or end is None:
            raise ApiError(400, "give start and end (seconds)")
        if p.get("copy") not in (None, "", "0", "1"):
            raise ApiError(400, "copy must be 0 or 1")
        with live.use() as g:
            rec = g.extra.get(video_id)
        if rec is None:
            raise ApiError(404, f"unknown video_id {video_id[:200]!r}")
        if rec.kind != "file":
            raise ApiError(404, f"video {video_id[:200]!r} is a frame folder; clips are cut from video files "
                                "(search.py export cuts frame folders)")
        if end - start > limits.max_clip_seconds:
            raise ApiError(400, f"clip of {end - start:g} s asked for; the limit is {limits.max_clip_seconds} s")
        if clip_slots.locked():
            raise ApiError(503, "busy: another clip is being cut; retry shortly")
        async with clip_slots:
            return await _cut_clip(rec, video_id, start, end, p.get("copy") == "1")

    @r.get("/api/frames")
    async def frames(request: Request):
        video_id = parse_text("video_id", request.query_params.get("video_id"), MAX_ID_CHARS)
        with live.use() as g:
            rec = g.extra.get(video_id)
        if rec is None:
            raise ApiError(404, f"unknown video_id {video_id[:200]!r}")
        if rec.kind != "frames":
            raise ApiError(404, f"video {video_id[:200]!r} is a video file, not a frame folder (see /video/)")
        n = len(rec.files or [])  # the frames recorded at build time, in name order
        step = max(1, -(-n // limits.max_frames_listed))
        uid = _url_id(video_id)
        with live.use() as g:  # the rate the frames' times count in (a moment's start → a frame)
            fps = g.index.frame_rate(video_id) if hasattr(g.index, "frame_rate") else None
        return {"video_id": video_id, "count": n, "fps": fps,
                "frames": [f"/frame/{uid}/{i}" for i in range(0, n, step)]}

    return r


async def _cut_clip(rec, video_id: str, start: float, end: float, copy: bool):
    """Cut the clip into a private temporary folder, send it, then remove it. The source is read through a
    descriptor opened by the file policy (``files.open_recorded``): only the recorded, unchanged regular file,
    whatever its path points to now."""
    import shutil
    import tempfile

    from starlette.background import BackgroundTask

    from clip2video.search.export import ExportError, export_clip

    first = (rec.files or [None])[0]
    try:
        fd, _ = open_recorded(str(rec.path), rec.root, *(first[1:3] if first else (None, None)))
    except (NotServed, TypeError, ValueError, IndexError) as e:
        _not_served("clip source", video_id, e)
        raise ApiError(404, "not found") from None
    tmp = Path(tempfile.mkdtemp(prefix="clip2video-clip-"))
    out = tmp / "clip.mp4"
    try:
        clip = await asyncio.to_thread(export_clip, f"/proc/self/fd/{fd}", out, start, end, copy=copy,
                                       what=f"video {video_id[:200]!r}")
    except ExportError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ApiError(400, str(e)) from None
    except (OSError, ValueError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("clip of %r %g–%g s failed: %s", video_id, start, end, e)
        raise ApiError(422, f"video {video_id[:200]!r} cannot be cut ({str(e).splitlines()[0][:200]})") from None
    finally:
        os.close(fd)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in video_id)[-80:] or "clip"
    filename = f"{name}_{_seconds(clip.start)}-{_seconds(clip.end)}.mp4"
    return FileResponse(out, media_type="video/mp4", filename=filename,
                        headers={"X-Clip-Range": f"{clip.start:.3f}-{clip.end:.3f}",
                                 "X-Clip-Exact": "1" if clip.exact else "0"},
                        background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True))


def _not_served(what: str, video_id: str, why: Exception | str) -> JSONResponse:
    logger.warning("not served: %s of %s: %s", what, repr(video_id[:200]), str(why)[:500])
    return error_response(404, "not found")


def _serve(path: str, root, record, media_type: str, request: Request, what: str, video_id: str):
    """The policy's answer for one recorded file: a streaming response, or 404 with one log line."""
    try:
        size, mtime = (int(record[0]), int(record[1])) if record is not None else (None, None)
        fd, st = open_recorded(path, root, size, mtime)
    except (NotServed, TypeError, ValueError, IndexError) as e:
        return _not_served(what, video_id, e)
    return RecordedFileResponse(fd, st, media_type, request.headers.get("range"))


def file_routes(live: LiveIndex) -> APIRouter:
    """``/video/{id}``, ``/thumb/{id}/{n}``, ``/frame/{id}/{n}``: only files the index's records name, only while
    they are what the build recorded (``files.open_recorded``)."""
    r = APIRouter()

    # each file is opened while the request holds its generation (whose clean-up waits for it); once open, the
    # descriptor is what is sent, whatever happens to the path
    @r.get("/video/{video_id:path}")
    async def video(video_id: str, request: Request):
        with live.use() as g:
            rec = g.extra.get(video_id)
            if rec is None or rec.kind != "file":
                return error_response(404, "not found")
            first = (rec.files or [None])[0]
            return _serve(str(rec.path), rec.root, first[1:] if first else None,
                          _media_type(Path(rec.path).name, "application/octet-stream"), request, "video", video_id)

    @r.get("/thumb/{video_id:path}/{n}")
    async def thumb(video_id: str, n: str, request: Request):
        with live.use() as g:
            rec = g.extra.get(video_id)
            i = strict_int(n)
            if rec is None or i is None or not i < len(rec.thumbnails):
                return error_response(404, "not found")
            folder = str(g.index.folder)
            real = os.path.realpath(folder)
            rel = os.path.relpath(str(rec.thumbnails[i]), folder)
            stats = getattr(rec, "thumb_stats", None) or []
            if rel.startswith(".."):
                return _not_served(f"thumbnail {i}", video_id, f"{rec.thumbnails[i]} is outside the index folder")
            return _serve(os.path.join(real, rel), os.path.join(real, THUMBS), stats[i] if i < len(stats) else None,
                          _media_type(rel, "image/jpeg"), request, f"thumbnail {i}", video_id)

    @r.get("/frame/{video_id:path}/{n}")
    async def frame(video_id: str, n: str, request: Request):
        with live.use() as g:
            rec = g.extra.get(video_id)
            i = strict_int(n)
            if rec is None or rec.kind != "frames" or i is None or not i < len(rec.files or []):
                return error_response(404, "not found")
            name, size, mtime = rec.files[i]
            return _serve(os.path.join(str(rec.path), name), rec.root, (size, mtime),
                          _media_type(name, "image/jpeg"), request, f"frame {i}", video_id)

    return r


def page_routes(static_dir: Path = STATIC_DIR) -> APIRouter:
    """``/`` and ``/static/{name}``: only the files shipped with the package, by exact name."""
    r = APIRouter()
    static_files = {p.name: p for p in static_dir.iterdir() if p.is_file()} if static_dir.is_dir() else {}

    @r.get("/")
    async def page():
        if "index.html" not in static_files:
            return error_response(404, "the search page is not installed (clip2video/static/index.html)")
        return FileResponse(static_files["index.html"], media_type="text/html; charset=utf-8")

    @r.get("/static/{name}")
    async def static(name: str):
        path = static_files.get(name)
        if path is None:
            return error_response(404, "not found")
        return FileResponse(path, media_type=mimetypes.guess_type(name)[0] or "application/octet-stream")

    return r


def add_error_handlers(app: FastAPI) -> None:
    """Every error the framework raises as ``{"error": one line}``; a bug is answered by ``web.Guard``."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(400, "bad request")


# ----------------------------------------------------------------------------------------------- the app
def create_app(index, *, limits: ServerLimits | None = None, allowed_hosts: list[str] | None = None,
               static_dir: Path = STATIC_DIR, qb_default: bool = True, **bounds: int) -> FastAPI:
    """The ASGI app over an opened index (anything with the ``SearchIndex`` interface of ``search.index``).

    ``limits`` (or any of its fields as keyword arguments: ``max_k=50``) bound every input and cache; see
    ``ServerLimits``. ``allowed_hosts`` restricts the ``Host`` header (``None``: any). ``qb_default``: whether
    text queries get QB-Norm when the index stores a query bank and the request does not say (``qb=0|1``).
    An index that can be reopened (``SearchIndex``) is followed to the generations later builds write
    (``live.LiveIndex``); the app's ``state.live`` holds it.
    """
    unknown = sorted(set(bounds) - set(ServerLimits.__dataclass_fields__))
    if unknown:
        raise TypeError(f"create_app got unexpected keyword arguments {', '.join(unknown)}")
    limits = replace(limits or ServerLimits(), **bounds)
    live = LiveIndex(index, make_extra=lambda ix: Records(ix, limits.record_cache_bytes),
                     interval=limits.reload_interval_ms / 1000)

    def run(texts: list[str], ks: list[int], served: Served):
        return search_batch(served.index, texts, ks)

    batcher = QueryBatcher(run, max_concurrent=limits.max_concurrent_encodes, max_waiting=limits.max_waiting,
                           max_batch=limits.max_batch)
    rich = RichSearch(index, limits)
    pool = ThreadPoolExecutor(max_workers=limits.max_concurrent_encodes, thread_name_prefix="similar")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.shutdown()
        pool.shutdown(wait=False, cancel_futures=True)
        rich.shutdown()
        live.close()

    app = FastAPI(title="clip2video search", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Guard, allowed_hosts=allowed_hosts)
    app.state.index = index
    app.state.live = live
    app.state.batcher = batcher
    add_error_handlers(app)
    app.include_router(api_routes(live, batcher, limits, rich, qb_default, pool))
    app.include_router(rich_routes(rich, live, limits, parse_k=parse_k, hit_json=hit_json, ms_since=_ms_since))
    app.include_router(file_routes(live))
    app.include_router(page_routes(static_dir))
    return app


__all__ = ["SECURITY_HEADERS", "ApiError", "Records", "create_app", "parse_k", "parse_text", "server_config"]
