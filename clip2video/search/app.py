"""Serve a search index: a JSON API and one static page (``search.py serve``).

The app holds one opened index (model and vectors loaded once) and answers

- ``GET /api/search?q=TEXT&k=K``: text → videos, the same ids, order and scores as ``search.py query --json``;
- ``GET /api/similar?video_id=ID&k=K``: video → videos;
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
- Query length and ``k`` are bounded (400 beyond the bounds); text encodings run in a small thread pool off the
  event loop (a slow query does not stall health checks, file transfers or other searches) and the number of
  queries running or waiting is bounded (503 with a clear message beyond it, instead of an unbounded queue).
  Queries that arrive while the encoders are busy are encoded and searched together as one batch when an
  encoder frees up (dynamic batching, as inference servers do), which is where throughput under load comes from.
- Every error is JSON ``{"error": "..."}``; a bug is logged on the server and answered with a 500 that holds
  no traceback.

clip-retrieval's back end separates a knn service from a front end; here one process serves both, which
keeps the metadata look-up (its slow part) in memory next to the index.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import mimetypes
import os
import signal
import socket
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from clip2video.search.build import IMAGE_EXTS  # what makes a folder a frame folder: its frames are these files

logger = logging.getLogger("clip2video.search.app")

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
DEFAULTS = {"max_query_chars": 1000, "max_k": 100, "default_k": 10, "max_concurrent_encodes": 2, "max_waiting": 64,
            "max_batch": 16}
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


def _host_name(header: str) -> str:
    """The host part of a ``Host`` header (``[::1]:8000`` → ``::1``, ``localhost:8000`` → ``localhost``)."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _Guard:
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
                response = JSONResponse({"error": f"Host {host[:100]!r} not allowed (loopback server)"},
                                        status_code=400)
                return await response(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in SECURITY_HEADERS if k not in names]
            await send(message)

        return await self.app(scope, receive, send_with_headers)


def _url_id(video_id: str) -> str:
    """A video id as one URL path segment (``/`` and everything else that is not plain is escaped)."""
    return quote(video_id, safe="")


def _is_within(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError):
        return False


def create_app(index, *, max_query_chars: int = DEFAULTS["max_query_chars"], max_k: int = DEFAULTS["max_k"],
               default_k: int = DEFAULTS["default_k"],
               max_concurrent_encodes: int = DEFAULTS["max_concurrent_encodes"],
               max_waiting: int = DEFAULTS["max_waiting"], max_batch: int = DEFAULTS["max_batch"],
               allowed_hosts: list[str] | None = None,
               max_frames_listed: int = 240, record_cache: int = 65536):
    """The ASGI app over an opened index (anything with the ``SearchIndex`` interface of ``clip2video.search.index``).

    ``max_concurrent_encodes`` batches of text queries are encoded at once (in their own threads); queries that
    arrive meanwhile wait and go into the next batch (at most ``max_batch``), up to ``max_waiting`` of them;
    beyond that a search gets 503. ``allowed_hosts`` restricts the ``Host`` header
    (``None``: any).
    """
    for name, value, low in (("max_query_chars", max_query_chars, 1), ("max_k", max_k, 1),
                             ("max_concurrent_encodes", max_concurrent_encodes, 1), ("max_waiting", max_waiting, 0),
                             ("max_batch", max_batch, 1)):
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    default_k = min(default_k, max_k)
    folder = Path(index.folder)
    encoders = ThreadPoolExecutor(max_workers=max_concurrent_encodes, thread_name_prefix="encode")
    in_flight = {"n": 0, "runners": 0}  # queries encoding or waiting, batch runners; touched on the event loop only
    pending: list[tuple[str, int, asyncio.Future]] = []
    runner_tasks: set[asyncio.Task] = set()
    records: OrderedDict[str, Any] = OrderedDict()  # small LRU: the page asks for the same records repeatedly
    frame_lists: OrderedDict[str, list[Path]] = OrderedDict()
    static_files = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()} if STATIC_DIR.is_dir() else {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        encoders.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="clip2video search", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(_Guard, allowed_hosts=allowed_hosts)
    app.state.index = index
    app.state.encoders = encoders

    # ------------------------------------------------------------------------------------------- errors
    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return error(exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error(400, "bad request")

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        logger.exception("internal error on %s", request.url.path)
        return error(500, "internal error (see the server log)")

    # ------------------------------------------------------------------------------------------- helpers
    def record(video_id: str):
        """The index's record of an id, or None (any odd spelling is just an unknown id)."""
        if video_id in records:
            records.move_to_end(video_id)
            return records[video_id]
        if not video_id or len(video_id) > 4096:
            return None
        try:
            rec = index.record(video_id)
        except (KeyError, ValueError, TypeError):
            rec = None
        if rec is not None:
            records[video_id] = rec
            if len(records) > record_cache:
                records.popitem(last=False)
        return rec

    def frames_of(video_id: str, rec) -> list[Path]:
        """The image files of an indexed frame folder, in name order (listed once, then cached)."""
        if video_id not in frame_lists:
            base = Path(rec.path)
            try:
                names = sorted(e.name for e in os.scandir(base)
                               if e.name.lower().endswith(IMAGE_EXTS) and e.is_file())
            except OSError:
                names = []
            frame_lists[video_id] = [base / n for n in names]
            if len(frame_lists) > 1024:
                frame_lists.popitem(last=False)
        return frame_lists[video_id]

    def hit_json(hit) -> dict:
        rec = record(hit.video_id)
        uid = _url_id(hit.video_id)
        kind = rec.kind if rec is not None else None
        return {
            "video_id": hit.video_id,
            "score": float(hit.score),
            "thumbnails": [f"/thumb/{uid}/{i}" for i in range(len(rec.thumbnails))] if rec is not None else [],
            "video": f"/video/{uid}" if kind == "file" else None,
            "kind": kind,
            "frames": f"/api/frames?video_id={uid}" if kind == "frames" else None,
        }

    def parse_k(raw: str | None) -> int:
        if raw is None or raw == "":
            return default_k
        if len(raw) > 12 or not raw.strip().lstrip("+-").isdigit():
            raise ApiError(400, f"k must be an integer from 1 to {max_k}, got {raw[:20]!r}")
        k = int(raw)
        if not 1 <= k <= max_k:
            raise ApiError(400, f"k must be from 1 to {max_k}, got {k}")
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

    # ------------------------------------------------------------------------------------------- batching
    def run_batch(texts: list[str], ks: list[int]) -> list[list]:
        """Encode a batch of queries in one pass and search them together, per distinct k (so that each
        answer is exactly what a query with that k alone returns)."""
        vectors = index.encode_text(texts)
        out: list[list] = [[] for _ in texts]
        for k in sorted(set(ks)):
            rows = [i for i, kk in enumerate(ks) if kk == k]
            for i, hits in zip(rows, index.search(vectors[rows], k), strict=True):
                out[i] = hits
        return out

    async def batch_runner():
        """Takes whatever queries are waiting (up to ``max_batch``) and runs them as one batch, until none wait.

        At batch size 1 the text tower is bound by reading its weights, so a batch of waiting queries costs
        little more than one, and an exact index scans its vectors once for the whole batch.
        """
        loop = asyncio.get_running_loop()
        in_flight["runners"] += 1
        try:
            while pending:
                batch = pending[:max_batch]
                del pending[:max_batch]
                batch = [b for b in batch if not b[2].done()]  # a cancelled request (client gone)
                if not batch:
                    continue
                try:
                    results = await loop.run_in_executor(encoders, run_batch, [b[0] for b in batch],
                                                         [b[1] for b in batch])
                except Exception as e:  # noqa: BLE001 - handed to each waiting request
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for (_, _, fut), hits in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(hits)
        finally:
            in_flight["runners"] -= 1

    async def encode_and_search(q: str, k: int) -> list:
        fut = asyncio.get_running_loop().create_future()
        pending.append((q, k, fut))
        if in_flight["runners"] < max_concurrent_encodes:
            task = asyncio.ensure_future(batch_runner())
            runner_tasks.add(task)
            task.add_done_callback(runner_tasks.discard)
        return await fut

    # ------------------------------------------------------------------------------------------- API
    @app.get("/api/health")
    async def health():
        return {"status": "ok", "videos": len(index), "model": index.fingerprint}

    @app.get("/api/search")
    async def search(request: Request):
        t0 = time.perf_counter()
        params = request.query_params
        q = parse_text("q", params.get("q"), max_query_chars)
        k = parse_k(params.get("k"))
        if in_flight["n"] >= max_concurrent_encodes + max_waiting:
            raise ApiError(503, f"busy: {in_flight['n']} queries are being encoded or waiting; retry shortly")
        in_flight["n"] += 1
        try:
            hits = await encode_and_search(q, k)
        finally:
            in_flight["n"] -= 1
        results = [hit_json(h) for h in hits]
        return {"query": q, "k": k, "took_ms": round((time.perf_counter() - t0) * 1000, 3), "results": results}

    @app.get("/api/similar")
    async def similar(request: Request):
        t0 = time.perf_counter()
        params = request.query_params
        video_id = parse_text("video_id", params.get("video_id"), 4096)
        k = parse_k(params.get("k"))
        if record(video_id) is None:
            raise ApiError(404, f"unknown video_id {video_id[:200]!r}")

        def run():
            try:
                return index.similar(video_id, k)
            except KeyError:
                return None

        hits = await asyncio.to_thread(run)
        if hits is None:
            raise ApiError(404, f"unknown video_id {video_id[:200]!r}")
        results = [hit_json(h) for h in hits]
        return {"video_id": video_id, "k": k, "took_ms": round((time.perf_counter() - t0) * 1000, 3),
                "results": results}

    @app.get("/api/frames")
    async def frames(request: Request):
        video_id = parse_text("video_id", request.query_params.get("video_id"), 4096)
        rec = record(video_id)
        if rec is None:
            raise ApiError(404, f"unknown video_id {video_id[:200]!r}")
        if rec.kind != "frames":
            raise ApiError(404, f"video {video_id[:200]!r} is a video file, not a frame folder (see /video/)")
        paths = await asyncio.to_thread(frames_of, video_id, rec)
        n = len(paths)
        step = max(1, -(-n // max_frames_listed))
        uid = _url_id(video_id)
        return {"video_id": video_id, "count": n, "frames": [f"/frame/{uid}/{i}" for i in range(0, n, step)]}

    # ------------------------------------------------------------------------------------------- files
    def not_found(what: str = "not found") -> JSONResponse:
        return error(404, what)

    @app.get("/video/{video_id:path}")
    async def video(video_id: str):
        rec = record(video_id)
        if rec is None or rec.kind != "file":
            return not_found()
        path = Path(rec.path)
        if not path.is_file():
            return not_found(f"video {video_id[:200]!r} is indexed but its file is gone")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type)  # answers Range requests with 206 (checked in tests)

    @app.get("/thumb/{video_id:path}/{n:int}")
    async def thumb(video_id: str, n: int):
        rec = record(video_id)
        if rec is None or not 0 <= n < len(rec.thumbnails):
            return not_found()
        path = Path(rec.thumbnails[n])
        if not _is_within(path, folder) or not path.is_file():
            logger.warning("thumbnail %s of %r is not a file inside the index folder; not served", path, video_id)
            return not_found()
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "image/jpeg")

    @app.get("/frame/{video_id:path}/{n:int}")
    async def frame(video_id: str, n: int):
        rec = record(video_id)
        if rec is None or rec.kind != "frames":
            return not_found()
        paths = await asyncio.to_thread(frames_of, video_id, rec)
        if not 0 <= n < len(paths):
            return not_found()
        return FileResponse(paths[n], media_type=mimetypes.guess_type(paths[n].name)[0] or "image/jpeg")

    # ------------------------------------------------------------------------------------------- page
    @app.get("/")
    async def page():
        if "index.html" not in static_files:
            return not_found("the search page is not installed (clip2video/static/index.html)")
        return FileResponse(static_files["index.html"], media_type="text/html; charset=utf-8")

    @app.get("/static/{name}")
    async def static(name: str):
        path = static_files.get(name)  # only the files shipped with the package, by exact name
        if path is None:
            return not_found()
        return FileResponse(path, media_type=mimetypes.guess_type(name)[0] or "application/octet-stream")

    return app


# ----------------------------------------------------------------------------------------------- command line
def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def set_compute_threads(per_encode: int | None, encoders: int) -> int:
    """Threads each text encoding (and FAISS search) may use; default: the cores divided among the encoders.

    Concurrency comes from the encoder threads; intra-op threads beyond one core per encode only wait at each
    parallel region's barrier for a sibling that another request (or, on a shared machine, another program)
    holds, which costs more than it gives under load. Process-wide, hence set by the command, not the app.
    """
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = per_encode or max(1, cores // max(1, encoders))
    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass
    return n


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``serve`` on ``search.py``'s subcommands, with the same model flags as ``query``."""
    from clip2video.cli.common import add_checkpoint_args, add_precision_arg

    p = subparsers.add_parser(
        "serve", help="serve an index: JSON API and a search page",
        description="Serve an index built by `search.py build`: a JSON API (/api/search, /api/similar, "
                    "/api/health) and a search page at /. Binds to 127.0.0.1 unless --host says otherwise.")
    p.add_argument("--config", default=None, help="YAML file of flag defaults")
    p.add_argument("--index", required=True, help="index folder written by `search.py build`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port; the URL is logged)")
    g = p.add_argument_group("bounds")
    g.add_argument("--max_query_chars", type=int, default=DEFAULTS["max_query_chars"])
    g.add_argument("--max_k", type=int, default=DEFAULTS["max_k"])
    g.add_argument("--max_concurrent_encodes", type=int, default=DEFAULTS["max_concurrent_encodes"],
                   help="text queries encoded at once")
    g.add_argument("--max_waiting", type=int, default=DEFAULTS["max_waiting"],
                   help="queries waiting for an encoder before the server answers 503")
    g.add_argument("--max_batch", type=int, default=DEFAULTS["max_batch"],
                   help="waiting queries encoded together in one batch")
    g.add_argument("--threads", type=int, default=None,
                   help="compute threads per query (default: cores / --max_concurrent_encodes)")
    p.add_argument("--device", default=None)
    add_precision_arg(p)
    add_checkpoint_args(p)
    p.set_defaults(func=serve_main)
    return p


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, opened here so that ``--port 0`` can log the port it got."""
    from clip2video.cli.common import UsageError

    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: must be from 0 to 65535")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock


def serve_main(args: argparse.Namespace) -> int:
    """Open the index (model loaded once, before the URL is logged) and serve until SIGINT / SIGTERM."""
    import uvicorn

    from clip2video.cli.common import UsageError
    from clip2video.search.index import SearchIndex

    for name in ("max_query_chars", "max_k", "max_concurrent_encodes", "max_batch"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_waiting < 0:
        raise UsageError(f"--max_waiting must be at least 0, got {args.max_waiting}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: must be from 0 to 65535")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    threads = set_compute_threads(args.threads, args.max_concurrent_encodes)
    index = SearchIndex.open(args.index, device=args.device, precision=args.precision)
    if hasattr(index, "check_model_flags"):
        index.check_model_flags(args)
    t0 = time.perf_counter()
    index.encode_text(["a warm-up query"])  # loads the text tower now, not on the first user's query
    logger.info("model loaded in %.1f s; %d encoder(s) of %d thread(s)", time.perf_counter() - t0,
                args.max_concurrent_encodes, threads)
    loopback = is_loopback(args.host)
    if not loopback:
        logger.warning("listening on %s: anyone who can reach this address can search the index and fetch "
                       "its videos", args.host)
    app = create_app(index, max_query_chars=args.max_query_chars, max_k=args.max_k,
                     max_concurrent_encodes=args.max_concurrent_encodes, max_waiting=args.max_waiting,
                     max_batch=args.max_batch,
                     allowed_hosts=list(LOOPBACK_HOSTS) if loopback else None)
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    stopped_by: list[int] = []
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the handler that was
    # there before; these make that second delivery a no-op, so a stop is a clean exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stopped_by.append(s))
    print(f"serving {len(index)} videos at {url}  (Ctrl-C to stop)", file=sys.stderr, flush=True)
    logger.info("serving %d videos from %s at %s", len(index), args.index, url)
    server.run(sockets=[sock])
    sock.close()
    why = signal.Signals(stopped_by[0]).name if stopped_by else "shutdown"
    print(f"stopped ({why})", file=sys.stderr, flush=True)
    return 0
