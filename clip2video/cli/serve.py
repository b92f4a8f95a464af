"""``search.py serve``: its flags and the command that opens an index and serves it (the app: ``search/app.py``).

Building the parser imports no web framework, so ``search.py build`` and ``query`` (and ``serve --help``)
work where the serve extra is not installed; ``serve`` itself then says in one line what to install.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
import time

from clip2video.cli.common import UsageError, add_checkpoint_args, add_precision_arg, model_spec
from clip2video.search.limits import ServerLimits
from clip2video.search.text_encoder import FAST_EXTRA

logger = logging.getLogger("clip2video.search.app")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
SERVE_EXTRA = "serve needs fastapi and uvicorn: pip install 'clip2video[serve]'"


class MissingExtra(RuntimeError):
    """An optional dependency group is not installed (exit 1, one line saying what to install)."""


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


def add_text_encoder_arg(p, default: str) -> None:
    """``--text_encoder``: the runtime of the text tower (``search/text_encoder.py``)."""
    from clip2video.search.text_encoder import TEXT_ENCODERS

    p.add_argument("--text_encoder", default=default, choices=list(TEXT_ENCODERS),
                   help="runtime of the text tower: torch (scores equal infer_retrieval.py --save_sim), onnx (ONNX "
                        "Runtime, same vectors to ~1e-7, faster), openvino-bf16 (fastest; vectors within cosine "
                        "0.9995 of fp32, scores not equal to --save_sim), torch-int8 / onnx-int8 (measured, not "
                        "within that bound), auto (onnx when onnxruntime is installed, else torch). onnx and openvino "
                        f"need the fast extra: {FAST_EXTRA} (default: {default})")


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``serve`` on ``search.py``'s subcommands, with the same model flags as ``query``."""
    d = ServerLimits()
    p = subparsers.add_parser(
        "serve", help="serve an index: JSON API and a search page",
        description="Serve an index built by `search.py build`: a JSON API (/api/search, /api/similar, "
                    "/api/clip, /api/health) and a search page at /. Binds to 127.0.0.1 unless --host says otherwise. "
                    "Needs the serve extra: pip install 'clip2video[serve]'.")
    p.add_argument("--config", default=None, help="YAML file of flag defaults")
    p.add_argument("--index", required=True, help="index folder written by `search.py build`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port; the URL is logged)")
    g = p.add_argument_group("bounds")
    g.add_argument("--max_query_chars", type=int, default=d.max_query_chars)
    g.add_argument("--max_k", type=int, default=d.max_k)
    g.add_argument("--max_concurrent_encodes", type=int, default=d.max_concurrent_encodes,
                   help="text queries encoded at once")
    g.add_argument("--max_waiting", type=int, default=d.max_waiting,
                   help="queries waiting for an encoder before the server answers 503")
    g.add_argument("--max_batch", type=int, default=d.max_batch,
                   help="waiting queries encoded together in one batch")
    g.add_argument("--max_clip_seconds", type=int, default=d.max_clip_seconds,
                   help="longest clip /api/clip cuts, in seconds")
    g.add_argument("--threads", type=int, default=None,
                   help="compute threads per query (default: cores / --max_concurrent_encodes)")
    g.add_argument("--query_cache", default="16MB", metavar="SIZE",
                   help="memory for the vectors of recent queries (LRU; e.g. 16MB, 0 for none)")
    p.add_argument("--no_qb", action="store_true",
                   help="answer with plain scores even when the index stores a query bank (a request's qb=1 "
                        "still asks for QB-Norm)")
    p.add_argument("--device", default=None)
    add_precision_arg(p)
    add_text_encoder_arg(p, default="auto")
    add_checkpoint_args(p)
    p.set_defaults(func=serve_main)
    return p


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, opened here so that ``--port 0`` can log the port it got."""
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


def _server_modules():
    """(uvicorn, the app module), or MissingExtra when the serve extra is not installed."""
    try:
        import uvicorn

        from clip2video.search import app
    except ImportError as e:
        if (e.name or "").split(".")[0] == "clip2video":
            raise  # our own code failed to import: a bug, with its traceback
        missing = f" ({e.name} is missing)" if e.name else ""
        raise MissingExtra(SERVE_EXTRA.replace(":", f"{missing}:", 1)) from None
    return uvicorn, app


def limits_of(args: argparse.Namespace) -> ServerLimits:
    """The bounds the flags set; a bad one is a usage error naming its flag."""
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    try:
        return ServerLimits(max_query_chars=args.max_query_chars, max_k=args.max_k,
                            max_concurrent_encodes=args.max_concurrent_encodes, max_waiting=args.max_waiting,
                            max_batch=args.max_batch, max_clip_seconds=args.max_clip_seconds)
    except ValueError as e:
        raise UsageError(f"--{e}") from None


def check_index_model(index, args: argparse.Namespace) -> None:
    """UsageError when model flags given with an index describe another model than the one it was built with."""
    from clip2video.modules.weights.identity import ModelMismatchError

    spec = model_spec(args, if_given=True)
    if spec is None:
        return
    try:
        index.check_model(spec)
    except ModelMismatchError as e:
        raise UsageError(f"--index {index.folder}: the model flags describe another model (fingerprint "
                         f"{e.got[:12]}) than the one the index was built with ({e.expected[:12]}); drop the "
                         "model flags or rebuild the index") from None


def serve_main(args: argparse.Namespace) -> int:
    """Open the index (model loaded once, before the URL is logged) and serve until SIGINT / SIGTERM."""
    uvicorn, app_module = _server_modules()
    from clip2video.search.index import SearchIndex

    limits = limits_of(args)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: must be from 0 to 65535")
    from clip2video.search.index_choice import parse_size

    try:
        cache_bytes = parse_size(args.query_cache, allow_zero=True)
    except ValueError as e:
        raise UsageError(f"--query_cache {args.query_cache}: {e}") from None
    threads = set_compute_threads(args.threads, limits.max_concurrent_encodes)
    # every file checked against its build's checksums before the first request (integrity.py): a server runs
    # long, so the seconds of hashing are paid once, and a damaged index refuses to start
    index = SearchIndex.open(args.index, device=args.device, precision=args.precision, verify=True,
                             text_encoder=args.text_encoder, query_cache_bytes=cache_bytes)
    check_index_model(index, args)
    t0 = time.perf_counter()
    index.encode_text(["a warm-up query"])  # loads the text tower now, not on the first user's query
    index.query_cache.clear()
    logger.info("model loaded in %.1f s; text encoder %s; %d encoder(s) of %d thread(s)", time.perf_counter() - t0,
                index.text_encoder.name, limits.max_concurrent_encodes, threads)
    loopback = is_loopback(args.host)
    if not loopback:
        logger.warning("listening on %s: anyone who can reach this address can search the index and fetch "
                       "its videos", args.host)
    app = app_module.create_app(index, limits=limits, allowed_hosts=list(LOOPBACK_HOSTS) if loopback else None,
                                qb_default=not args.no_qb)
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    server = uvicorn.Server(app_module.server_config(app, log_level="warning", access_log=False, lifespan="on"))
    stopped_by: list[int] = []
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the handler that was
    # there before; these make that second delivery a no-op, so a stop is a clean exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stopped_by.append(s))
    print(f"serving {len(index)} videos at {url}  (Ctrl-C to stop)", file=sys.stderr, flush=True)
    logger.info("serving %d videos from %s at %s", len(index), args.index, url)
    server.run(sockets=[sock])
    sock.close()
    index.close()
    why = signal.Signals(stopped_by[0]).name if stopped_by else "shutdown"
    print(f"stopped ({why})", file=sys.stderr, flush=True)
    return 0
