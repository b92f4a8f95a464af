"""Serve a search index: a JSON API and one static page (``search.py serve``; the command is ``cli/serve.py``).

The app holds one opened index (model and vectors loaded once) and answers

- ``GET /api/search?q=TEXT&k=K``: text → videos, the same ids, order and scores as ``search.py query --json``;
  ``q`` may be query arithmetic (``"2:a dog" - snow + like:ID``); each result has the ``start``/``end`` of its
  segment; in an index of segments results are grouped by video (its next best segments as ``moments``)
  unless ``group=0``; ``video_id=`` ranks one video's segments; ``path=``, ``min_duration=``,
  ``max_duration=``, ``modified_after=`` filter before k (``moments.py``);
- ``POST /api/search``: the same with uploaded images (multipart; bounds and checks in ``rich_api.py``);
- ``GET /api/similar?video_id=ID&k=K[&start=S]``: video (or the moment of it starting at S) → videos;
- ``GET /api/clip?video_id=ID&start=S&end=E[&copy=1]``: that range as an MP4 download (``export.py``; at most
  ``max_clip_seconds`` long, one cut at a time);
- ``GET /api/frames?video_id=ID``: the frame URLs of a video indexed as a frame folder;
- ``GET /api/health``: ``{"status": "ok", "videos": N, "model": fingerprint}``;
- ``GET /video/{id}`` (HTTP Range requests, so the player can seek), ``GET /thumb/{id}/{n}``,
  ``GET /frame/{id}/{n}``: files, found only through the index's own metadata;
- ``GET /`` and ``/static/{name}``: the search page (no build step, nothing fetched from elsewhere).

Safety, because people run this on a laptop full of private footage:

- No request ever becomes a path. A file is served only when the id in the URL is an indexed video id; its
  location comes from the record written at build time (thumbnails must also lie inside the index folder,
  frames are the listing of the indexed folder picked by number). Any other spelling (``..%2f``, double
  encoding, backslashes, absolute paths, NUL) is simply an unknown id: 404.
- Loopback by default; when bound to loopback the app accepts only loopback ``Host`` headers, so that a web
  page elsewhere cannot reach it through DNS rebinding.
- Query length and ``k`` are bounded (400 beyond the bounds, ``limits.ServerLimits``); text queries go through
  a ``QueryBatcher`` (``batcher.py``): encoded off the event loop, batched while the encoders are busy, and
  bounded in number (503 with a clear message beyond it, instead of an unbounded queue).
- Every error is JSON ``{"error": "..."}``; a bug is logged on the server and answered with a 500 that holds
  no traceback.

The pieces: ``HostGuard`` (middleware), ``Records`` and ``FrameLists`` (bounded caches), the routers
``api_routes``, ``file_routes`` and ``page_routes``, ``add_error_handlers``; ``create_app`` puts them together.
clip-retrieval's back end separates a knn service from a front end; here one process serves both, which
keeps the metadata look-up (its slow part) in memory next to the index.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import mimetypes
import os
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from clip2video.search.batcher import BatcherClosed, BusyError, QueryBatcher, search_batch
from clip2video.search.build import IMAGE_EXTS  # what makes a folder a frame folder: its frames are these files
from clip2video.search.limits import ServerLimits
from clip2video.search.moments import DEFAULT_MOMENTS, MAX_MOMENTS, Filters, SearchRequest, parse_date
from clip2video.search.query_parse import is_plain_text
from clip2video.search.rich_api import RichSearch, parse_q, rich_routes

logger = logging.getLogger("clip2video.search.app")

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
MAX_ID_CHARS = 4096
# The page loads nothing from elsewhere; the policy makes the browser enforce it.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; media-src 'self'; "
                                 b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class ApiError(Exception):
    """An answer with an HTTP status and a one-line message (sent as ``{"error": message}``)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# ----------------------------------------------------------------------------------------------- middleware
def _host_name(header: str) -> str:
    """The host part of a ``Host`` header (``[::1]:8000`` → ``::1``, ``localhost:8000`` → ``localhost``)."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostGuard:
    """Pure ASGI middleware: rejects foreign ``Host`` headers (when asked to) and adds :data:`SECURITY_HEADERS`.

    Pure ASGI rather than an ``@app.middleware`` function so that file bodies stream through untouched.
    """

    def __init__(self, app, allowed_hosts: list[str] | None = None):
        self.app = app
        self.allowed = {h.strip("[]").lower() for h in allowed_hosts} if allowed_hosts else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.allowed is not None:
            host = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1")
            if _host_name(host).lower() not in self.allowed:
                response = error_response(400, f"Host {host[:100]!r} not allowed (loopback server)")
                return await response(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in SECURITY_HEADERS if k not in names]
            await send(message)

        return await self.app(scope, receive, send_with_headers)


# ----------------------------------------------------------------------------------------------- caches
class Records:
    """The index's record of a video id, or None; the last ``size`` looked up are kept (the page asks for the
    same records repeatedly). Any odd spelling of an id is just an unknown id."""

    def __init__(self, index, size: int):
        self.index = index
        self.size = size
        self._cache: OrderedDict[str, Any] = OrderedDict()

    def get(self, video_id: str):
        if video_id in self._cache:
            self._cache.move_to_end(video_id)
            return self._cache[video_id]
        if not video_id or len(video_id) > MAX_ID_CHARS:
            return None
        try:
            rec = self.index.record(video_id)
        except (KeyError, ValueError, TypeError):
            rec = None
        if rec is not None:
            self._cache[video_id] = rec
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return rec


class FrameLists:
    """The image files of an indexed frame folder, in name order: listed once, then kept (``size`` folders)."""

    def __init__(self, size: int):
        self.size = size
        self._cache: OrderedDict[str, list[Path]] = OrderedDict()

    def get(self, video_id: str, rec) -> list[Path]:
        if video_id not in self._cache:
            base = Path(rec.path)
            try:
                names = sorted(e.name for e in os.scandir(base) if e.name.lower().endswith(IMAGE_EXTS) and e.is_file())
            except OSError:
                names = []
            self._cache[video_id] = [base / n for n in names]
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return self._cache[video_id]


# ----------------------------------------------------------------------------------------------- request parts
def _url_id(video_id: str) -> str:
    """A video id as one URL path segment (``/`` and everything else that is not plain is escaped)."""
    return quote(video_id, safe="")


def _is_within(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError):
        return False


def parse_k(raw: str | None, limits: ServerLimits) -> int:
    if raw is None or raw == "":
        return limits.default_k
    if len(raw) > 12 or not raw.strip().lstrip("+-").isdigit():
        raise ApiError(400, f"k must be an integer from 1 to {limits.max_k}, got {raw[:20]!r}")
    k = int(raw)
    if not 1 <= k <= limits.max_k:
        raise ApiError(400, f"k must be from 1 to {limits.max_k}, got {k}")
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


def parse_float(name: str, raw: str | None, *, low: float = 0.0) -> float | None:
    if raw is None or raw == "":
        return None
    try:
        value = float(raw) if len(raw) <= 32 else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < low:
        raise ApiError(400, f"{name} must be a number >= {low:g}, got {raw[:40]!r}")
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
    if not (raw_moments.isdigit() and int(raw_moments) <= MAX_MOMENTS):
        raise ApiError(400, f"moments must be an integer from 0 to {MAX_MOMENTS}, got {raw_moments[:20]!r}")
    after = p.get("modified_after") or None
    try:
        after = parse_date(after, "modified_after") if after is not None else None
        filters = Filters(path=path, min_duration=parse_float("min_duration", p.get("min_duration")),
                          max_duration=parse_float("max_duration", p.get("max_duration")), modified_after=after)
    except ValueError as e:
        raise ApiError(400, str(e).splitlines()[0]) from None
    return SearchRequest(k, group=group, video_id=video_id, filters=filters, moments=int(raw_moments))


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
                 if kind is not None and start is not None and end is not None and end - start <= max_clip
                 else None),
    }


def _ms_since(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


# ----------------------------------------------------------------------------------------------- routes
def api_routes(index, batcher: QueryBatcher, records: Records, frame_lists: FrameLists,
               limits: ServerLimits, rich: RichSearch) -> APIRouter:
    """``/api/health``, ``/api/search``, ``/api/similar``, ``/api/frames``."""
    r = APIRouter()

    @r.get("/api/health")
    async def health():
        return {"status": "ok", "videos": len(index), "model": index.fingerprint}

    @r.get("/api/search")
    async def search(request: Request):
        t0 = time.perf_counter()
        q = parse_text("q", request.query_params.get("q"), limits.max_query_chars)
        k = parse_k(request.query_params.get("k"), limits)
        req = parse_request(request, k, records)
        key = k if req == SearchRequest(k) else req  # a plain k keeps the text path as it was
        parts = parse_q(q)  # query arithmetic (rich_api.py); a plain caption takes the batched text path
        if not is_plain_text(parts):
            hits = await rich.answer(parts, key, None)  # no uploads: image and clip parts are refused
            return {"query": q, "parts": [p.to_dict() for p in parts], "k": k, "took_ms": _ms_since(t0),
                    "results": [hit_json(h, records, limits.max_clip_seconds) for h in hits]}
        try:
            hits = await batcher.submit(parts[0].value, key)
        except (BusyError, BatcherClosed) as e:
            raise ApiError(503, str(e)) from None
        return {"query": q, "k": k, "took_ms": _ms_since(t0),
                "results": [hit_json(h, records, limits.max_clip_seconds) for h in hits]}

    @r.get("/api/similar")
    async def similar(request: Request):
        t0 = time.perf_counter()
        p = request.query_params
        video_id = parse_text("video_id", p.get("video_id"), MAX_ID_CHARS)
        k = parse_k(p.get("k"), limits)
        start = parse_float("start", p.get("start"))
        if records.get(video_id) is None:
            raise ApiError(404, f"unknown video_id {video_id[:200]!r}")
        req = SearchRequest(k, group=parse_group(p.get("group")))

        def run():
            try:
                if start is None and req == SearchRequest(k):
                    return index.similar(video_id, k)
                return index.similar(video_id, req, start=start)
            except KeyError:
                return None

        hits = await asyncio.to_thread(run)
        if hits is None:
            what = f"video_id {video_id[:200]!r}" + (f" start {start:g}" if start is not None else "")
            raise ApiError(404, f"unknown {what}")
        return {"video_id": video_id, "start": start, "k": k, "took_ms": _ms_since(t0),
                "results": [hit_json(h, records, limits.max_clip_seconds) for h in hits]}

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
        rec = records.get(video_id)
        if rec is None:
            raise ApiError(404, f"unknown video_id {video_id[:200]!r}")
        if end - start > limits.max_clip_seconds:
            raise ApiError(400, f"clip of {end - start:g} s asked for; the limit is {limits.max_clip_seconds} s")
        if clip_slots.locked():
            raise ApiError(503, "busy: another clip is being cut; retry shortly")
        async with clip_slots:
            return await _cut_clip(index, rec, video_id, start, end, p.get("copy") == "1")

    @r.get("/api/frames")
    async def frames(request: Request):
        video_id = parse_text("video_id", request.query_params.get("video_id"), MAX_ID_CHARS)
        rec = records.get(video_id)
        if rec is None:
            raise ApiError(404, f"unknown video_id {video_id[:200]!r}")
        if rec.kind != "frames":
            raise ApiError(404, f"video {video_id[:200]!r} is a video file, not a frame folder (see /video/)")
        paths = await asyncio.to_thread(frame_lists.get, video_id, rec)
        n = len(paths)
        step = max(1, -(-n // limits.max_frames_listed))
        uid = _url_id(video_id)
        fps = index.frame_rate(video_id) if hasattr(index, "frame_rate") else None  # what its times count in
        return {"video_id": video_id, "count": n, "fps": fps,
                "frames": [f"/frame/{uid}/{i}" for i in range(0, n, step)]}

    return r


async def _cut_clip(index, rec, video_id: str, start: float, end: float, copy: bool):
    """Cut the clip into a private temporary folder, send it, then remove it."""
    import shutil
    import tempfile

    from starlette.background import BackgroundTask

    from clip2video.search.export import ExportError, export_clip

    tmp = Path(tempfile.mkdtemp(prefix="clip2video-clip-"))
    out = tmp / "clip.mp4"
    fps = index.frame_rate(video_id) if hasattr(index, "frame_rate") else None
    try:
        clip = await asyncio.to_thread(export_clip, rec.path, out, start, end, kind=rec.kind, fps=fps, copy=copy,
                                       what=f"video {video_id[:200]!r}")
    except ExportError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ApiError(400, str(e)) from None
    except (OSError, ValueError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("clip of %r %g–%g s failed: %s", video_id, start, end, e)
        raise ApiError(422, f"video {video_id[:200]!r} cannot be cut ({str(e).splitlines()[0][:200]})") from None
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in video_id)[-80:] or "clip"
    filename = f"{name}_{_seconds(clip.start)}-{_seconds(clip.end)}.mp4"
    return FileResponse(out, media_type="video/mp4", filename=filename,
                        headers={"X-Clip-Range": f"{clip.start:.3f}-{clip.end:.3f}",
                                 "X-Clip-Exact": "1" if clip.exact else "0"},
                        background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True))


def file_routes(folder: Path, records: Records, frame_lists: FrameLists) -> APIRouter:
    """``/video/{id}``, ``/thumb/{id}/{n}``, ``/frame/{id}/{n}``: only files the index's records name."""
    r = APIRouter()

    @r.get("/video/{video_id:path}")
    async def video(video_id: str):
        rec = records.get(video_id)
        if rec is None or rec.kind != "file":
            return error_response(404, "not found")
        path = Path(rec.path)
        if not path.is_file():
            return error_response(404, f"video {video_id[:200]!r} is indexed but its file is gone")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type)  # answers Range requests with 206 (checked in tests)

    @r.get("/thumb/{video_id:path}/{n:int}")
    async def thumb(video_id: str, n: int):
        rec = records.get(video_id)
        if rec is None or not 0 <= n < len(rec.thumbnails):
            return error_response(404, "not found")
        path = Path(rec.thumbnails[n])
        if not _is_within(path, folder) or not path.is_file():
            logger.warning("thumbnail %s of %r is not a file inside the index folder; not served", path, video_id)
            return error_response(404, "not found")
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "image/jpeg")

    @r.get("/frame/{video_id:path}/{n:int}")
    async def frame(video_id: str, n: int):
        rec = records.get(video_id)
        if rec is None or rec.kind != "frames":
            return error_response(404, "not found")
        paths = await asyncio.to_thread(frame_lists.get, video_id, rec)
        if not 0 <= n < len(paths):
            return error_response(404, "not found")
        return FileResponse(paths[n], media_type=mimetypes.guess_type(paths[n].name)[0] or "image/jpeg")

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
    """Every error as ``{"error": one line}``; a bug is logged here and answered without a traceback."""

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

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        logger.exception("internal error on %s", request.url.path)
        return error_response(500, "internal error (see the server log)")


# ----------------------------------------------------------------------------------------------- the app
def create_app(index, *, limits: ServerLimits | None = None, allowed_hosts: list[str] | None = None,
               static_dir: Path = STATIC_DIR, **bounds: int) -> FastAPI:
    """The ASGI app over an opened index (anything with the ``SearchIndex`` interface of ``search.index``).

    ``limits`` (or any of its fields as keyword arguments: ``max_k=50``) bound every input and cache; see
    ``ServerLimits``. ``allowed_hosts`` restricts the ``Host`` header (``None``: any).
    """
    unknown = sorted(set(bounds) - set(ServerLimits.__dataclass_fields__))
    if unknown:
        raise TypeError(f"create_app got unexpected keyword arguments {', '.join(unknown)}")
    limits = replace(limits or ServerLimits(), **bounds)
    batcher = QueryBatcher(functools.partial(search_batch, index), max_concurrent=limits.max_concurrent_encodes,
                           max_waiting=limits.max_waiting, max_batch=limits.max_batch)
    records = Records(index, limits.record_cache)
    frame_lists = FrameLists(limits.frame_list_cache)
    rich = RichSearch(index, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.shutdown()
        rich.shutdown()

    app = FastAPI(title="clip2video search", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(HostGuard, allowed_hosts=allowed_hosts)
    app.state.index = index
    app.state.batcher = batcher
    add_error_handlers(app)
    app.include_router(api_routes(index, batcher, records, frame_lists, limits, rich))
    app.include_router(rich_routes(rich, records, limits, parse_k=parse_k, hit_json=hit_json, ms_since=_ms_since))
    app.include_router(file_routes(Path(index.folder), records, frame_lists))
    app.include_router(page_routes(static_dir))
    return app
