#!/usr/bin/env python
"""Search your own videos by text: build an index of a folder of videos, then query it.

    python search.py build --features_path FRAMES --index my_index --checkpoint ckpt --model_num 2 \\
        --variant tab_tdb --max_frames 12 --feature_framerate 1
    python search.py build --from_embeddings emb_dir --index my_index     # from infer_retrieval --save_embeddings
    python search.py query --index my_index -k 10 "a dog catches a frisbee" ["more text" ...] [--json]
    python search.py query --index my_index --like VIDEO_ID
    python search.py query --index my_index --image photo.jpg            # or --clip clip.mp4
    python search.py query --index my_index "2:a dog" + photo.jpg - snow   # weighted query arithmetic
    python search.py build ... --query_bank train_captions.txt            # + QB-Norm for every caption query
    python search.py verify --index my_index                              # every file against its checksum
    torchrun --nproc_per_node 4 search.py build ...                       # encoding split over 4 processes

Scores are the numbers ``infer_retrieval.py --save_sim`` writes for the same model (×logit scale). The index
records the model, so ``query`` needs only ``--index``; model flags given to it must describe the same model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from clip2video.cli.common import (
    OneLineParser,
    UsageError,
    add_checkpoint_args,
    add_data_args,
    add_precision_arg,
    check_paths,
    exit_process,
    model_spec,
    parse_with_config,
    run_main,
)
from clip2video.cli.query_args import add_query_args, answer, plan_queries
from clip2video.cli.serve import add_serve_parser, add_text_encoder_arg, check_index_model

logger = logging.getLogger("clip2video.cli.search")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="search.py", description=__doc__.split("\n")[1],
                      formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{build,query,verify,serve}", parser_class=OneLineParser)

    b = sub.add_parser("build", help="index a folder of videos (or exported embeddings)")
    b.add_argument("--config", default=None, help="YAML file of flag defaults")
    b.add_argument("--index", required=True, help="index folder to create or update")
    src = b.add_argument_group("videos")
    add_data_args(src, ["features_path"], helps={
        "features_path": "folder of videos: video files (read directly) and/or frame folders <id>/00000001.jpg"})
    src.add_argument("--from_embeddings", default=None, help="folder with video.npy + video_ids.json (+ meta.json)")
    src.add_argument("--follow_symlinks", action="store_true",
                     help="index through symbolic links (to video files, frame folders, frames); each is resolved "
                          "now and its target recorded. Without it links are skipped, one line each")
    add_data_args(src, ["max_words", "max_frames", "feature_framerate", "video_fps", "image_mode"], helps={
        "max_words": "query length in tokens (start + words + end)",
        "video_fps": "video files are read as if extracted at this rate (sample_frame.py --fps); for frame "
                     "folders it gives their duration"})
    src.add_argument("--batch_size", type=int, default=16)
    src.add_argument("--batch_size_val", type=int, default=None, help="alias of --batch_size")
    add_data_args(src, ["num_thread_reader"], helps={"num_thread_reader": "data-loading processes"})
    add_checkpoint_args(b)
    ix = b.add_argument_group("index")
    ix.add_argument("--index_type", default="auto",
                    help="auto (by size), Flat, or a FAISS factory string such as IVF1024,SQ8")
    ix.add_argument("--search_params", default=None, help="FAISS search parameters, e.g. nprobe=32")
    ix.add_argument("--max_index_memory", default=None, metavar="SIZE",
                    help="memory budget of the index (e.g. 1GB, 500MB): with --index_type auto, the index type and "
                         "parameters with the best expected recall that fit; the choice is printed")
    qb = b.add_argument_group("QB-Norm (query-bank normalisation of text queries)")
    qb.add_argument("--query_bank", default=None, metavar="FILE",
                    help="UTF-8 text, one caption per line (training captions): stored with the index and applied "
                         "to every text query (query/serve --no_qb to switch off); a rebuild without it keeps the "
                         "stored bank")
    qb.add_argument("--qb_beta", type=float, default=None,
                    help="inverse temperature β on the index's scores (default: the stored one, else 1/1.99, "
                         "published for CLIP2Video's ×100 scores)")
    qb.add_argument("--qb_k", type=int, default=None,
                    help="a row is a hub when in some bank caption's top-k (default: the stored one, else 1)")
    qb.add_argument("--no_query_bank", action="store_true", help="drop the query bank the index stores")
    o = b.add_argument_group("run")
    o.add_argument("--device", default=None)
    add_precision_arg(o)
    o.add_argument("--no_progress", action="store_true")
    o.add_argument("--seed", type=int, default=42)

    q = sub.add_parser("query", help="search an index by text (or by an indexed video)")
    q.add_argument("--config", default=None, help="YAML file of flag defaults")
    q.add_argument("--index", required=True)
    q.add_argument("texts", nargs="*", help="query texts, each its own query; with a standing + or - they are one "
                   "weighted sum of texts, image and clip files and like:VIDEO_ID (docs/search-queries.md)")
    q.add_argument("--queries_file", default=None, help="one query per line, each taken literally as a caption")
    q.add_argument("--like", default=None, metavar="VIDEO_ID", help="videos similar to an indexed one")
    add_query_args(q)
    q.add_argument("-k", "--k", type=int, default=10)
    q.add_argument("--json", action="store_true",
                   help="print JSON: [{query, qb_norm: {enabled, applied}, results: [{video_id, score, path}]}]")
    q.add_argument("--no_qb", action="store_true",
                   help="plain scores even when the index stores a query bank (no QB-Norm)")
    q.add_argument("--device", default=None)
    add_precision_arg(q)
    add_text_encoder_arg(q, default="torch")
    add_checkpoint_args(q)
    q.add_argument("--max_words", type=int, default=None, help=argparse.SUPPRESS)

    v = sub.add_parser("verify", help="check every file of an index against the checksums its build recorded")
    v.add_argument("--index", required=True)
    v.add_argument("--json", action="store_true", help="print the report as JSON")

    add_serve_parser(sub)  # cli/serve.py owns its flags (the model flags are query's); imports no web framework
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main("search.py", lambda: run(argv))  # a bad index folder (IndexFormatError) is a ValueError: 1


def _parse(argv: list[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    if not argv or argv[0] not in p._subparsers._group_actions[0].choices:
        if argv and argv[0] in ("-h", "--help"):
            p.parse_args(argv)
        raise UsageError("give a command: build, query, verify, serve")
    sub = p._subparsers._group_actions[0].choices[argv[0]]
    args = parse_with_config(sub, argv[1:])
    args.command = argv[0]
    return args


def run(argv: list[str] | None) -> int:
    args = _parse(argv)
    if args.command == "build":
        return cmd_build(args)
    if args.command == "query":
        return cmd_query(args)
    if args.command == "verify":
        return cmd_verify(args)
    return args.func(args)  # serve (and any other registered command)


# ----------------------------------------------------------------------------------------------- build
def bank_request(args: argparse.Namespace):
    """The build's ``qb.BankRequest`` from its flags; a bad bank file or value is one line (exit 2 / 1)."""
    from clip2video.search.qb import BankRequest, read_bank_file

    if args.no_query_bank and (args.query_bank or args.qb_beta is not None or args.qb_k is not None):
        raise UsageError("--no_query_bank excludes --query_bank, --qb_beta and --qb_k")
    if args.qb_beta is not None and not (args.qb_beta > 0 and math.isfinite(args.qb_beta)):
        raise UsageError(f"--qb_beta must be a positive number, got {args.qb_beta}")
    if args.qb_k is not None and args.qb_k < 1:
        raise UsageError(f"--qb_k must be >= 1, got {args.qb_k}")
    if args.no_query_bank:
        return BankRequest(drop=True)
    if not args.query_bank:
        return BankRequest(beta=args.qb_beta, k=args.qb_k)
    if not Path(args.query_bank).is_file():
        raise UsageError(f"--query_bank {args.query_bank}: no such file")
    try:
        return read_bank_file(args.query_bank, beta=args.qb_beta, k=args.qb_k)
    except (OSError, ValueError) as e:
        raise UsageError(f"--query_bank {e}") from None


def cmd_build(args: argparse.Namespace) -> int:
    import torch

    from clip2video.modules.runtime.distributed import cleanup_distributed, init_distributed
    from clip2video.modules.runtime.logging_utils import setup_logging
    from clip2video.modules.weights.identity import describe_model
    from clip2video.modules.weights.spec import load_model
    from clip2video.search.build import build_from_embeddings, build_from_folder

    if bool(args.features_path) == bool(args.from_embeddings):
        raise UsageError("give one of --features_path (videos) or --from_embeddings (exported vectors)")
    check_paths(args, dirs=("features_path", "from_embeddings"))
    if args.batch_size_val:
        args.batch_size = args.batch_size_val
    max_bytes = None
    if args.max_index_memory is not None:
        from clip2video.search.index_choice import parse_size

        try:
            max_bytes = parse_size(args.max_index_memory)
        except ValueError as e:
            raise UsageError(f"--max_index_memory {args.max_index_memory}: {e}") from None
    bank = bank_request(args)
    t0 = time.perf_counter()
    if args.from_embeddings:
        setup_logging(None)
        res = build_from_embeddings(args.from_embeddings, args.index, index_type=args.index_type,
                                    search_params=args.search_params, query_bank=bank, device=args.device,
                                    follow_symlinks=args.follow_symlinks,
                                    max_index_bytes=max_bytes)
        logger.info("index %s: %d videos from %s (%.1f s)", args.index, res.count, args.from_embeddings,
                    time.perf_counter() - t0)
        print_index_choice(args.index, max_bytes)
        return 0
    info = init_distributed(args.device)
    try:
        setup_logging(None, is_main=info.is_main)
        torch.manual_seed(args.seed)
        spec = model_spec(args)
        model = load_model(spec)
        if model.config.mask_layout != "per_video":
            logger.info("mask layout: the checkpoint's heads ran with the %s layout (released checkpoints); the "
                        "index encodes every video with per_video so that its vector depends on that video alone",
                        model.config.mask_layout)
            model.config.mask_layout = "per_video"
        model = model.to(info.device).eval()
        record = describe_model(model, spec)
        res = build_from_folder(args.features_path, args.index, model, record, max_frames=args.max_frames,
                                framerate=args.feature_framerate, image_mode=args.image_mode,
                                precision=args.precision, video_fps=args.video_fps, batch_size=args.batch_size,
                                num_workers=args.num_thread_reader, index_type=args.index_type,
                                search_params=args.search_params, device=info.device, info=info,
                                progress=not args.no_progress, query_bank=bank, follow_symlinks=args.follow_symlinks,
                                max_index_bytes=max_bytes)
    finally:
        cleanup_distributed()
    if res is None:
        return 0
    print_index_choice(args.index, max_bytes)
    logger.info("index %s: %d videos (%d encoded, %d unchanged, %d removed) in %.1f s", args.index, res.count,
                res.encoded, res.reused, res.removed, time.perf_counter() - t0)
    if res.failed:
        for vid, why in res.failed:
            print(f"search.py: skipped {vid}: {why}", file=sys.stderr)
        print(f"search.py: {len(res.failed)} video(s) could not be read or were refused and were skipped",
              file=sys.stderr)
        return 1
    return 0


def print_index_choice(index: str, max_bytes: int | None) -> None:
    """One line on stdout: the index type the build chose, its memory and its expected recall."""
    from clip2video.search.index_choice import estimate_bytes, format_size
    from clip2video.search.store import read_manifest

    _, m = read_manifest(index)
    choice = m.get("index_choice")
    params = f" ({m['search_params']})" if m.get("search_params") else ""
    if choice:
        budget = f" within --max_index_memory {format_size(max_bytes)}" if max_bytes else " (by size)"
        print(f"index: {m['index_type']}{params} for {m['count']} vectors{budget}: ~{format_size(choice['bytes'])}, "
              f"expected recall@10 ~{choice['recall']:.3f} (measured on benchmarks/bench_search.py's vectors)")
        return
    try:
        size = estimate_bytes(m["index_type"], m["count"], m["dim"])
    except ValueError:
        size = None
    line = f"index: {m['index_type']}{params} (--index_type) for {m['count']} vectors"
    if size is not None:
        line += f": ~{format_size(size)}"
        if max_bytes and size > max_bytes:
            line += f", above --max_index_memory {format_size(max_bytes)} (--index_type overrides the budget)"
    print(line)


# ----------------------------------------------------------------------------------------------- verify
def cmd_verify(args: argparse.Namespace) -> int:
    """Every file of the live generation against its recorded size and SHA-256, every thumbnail, SQLite's
    quick_check; exit 1 with one line naming the first file that differs."""
    from clip2video.search.integrity import verify_index

    t0 = time.perf_counter()
    report = verify_index(args.index)
    took = time.perf_counter() - t0
    if args.json:
        print(json.dumps(dict(report.__dict__, seconds=round(took, 3))))
        return 0
    changed = report.sources_changed
    print(f"{args.index}: generation {report.generation} intact: {report.files} files ({report.bytes / 2**20:.1f} "
          f"MiB) and {report.thumbnails} thumbnails match their checksums, SQLite quick_check ok ({took:.1f} s)")
    if changed:
        print(f"{args.index}: {changed} indexed video(s) changed or gone since the build; they are not served "
              "until the next build")
    return 0


# ----------------------------------------------------------------------------------------------- query
def cmd_query(args: argparse.Namespace) -> int:
    from clip2video.search.index import SearchIndex

    if args.k < 1:
        raise UsageError(f"-k must be >= 1, got {args.k}")
    plan = plan_queries(args)  # texts, arithmetic, --image, --clip, --like, --queries_file: usage errors first
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, force=True)  # stdout carries the results
    index = SearchIndex.open(args.index, device=args.device, precision=args.precision,
                             text_encoder=args.text_encoder)
    try:
        return _answer(index, args, plan)
    finally:
        index.close()


def _answer(index, args: argparse.Namespace, plan) -> int:
    check_index_model(index, args)
    qb_on = index.qb is not None and not args.no_qb
    results = answer(index, plan, args.k, qb=qb_on)
    # QB-Norm is for captions only: --like, images, clips and arithmetic are never normalised
    qbs = [qb_json(qb_on and q.text is not None, hits) for q, hits in zip(plan, results, strict=True)]
    if args.json:
        payload = [{"query": q.label, "qb_norm": qb, "results": [{"video_id": h.video_id, "score": h.score,
                                                                  "path": h.path} for h in hits]}
                   for q, qb, hits in zip(plan, qbs, results, strict=True)]
        print(json.dumps(payload, ensure_ascii=False))
    else:
        for q, qb, hits in zip(plan, qbs, results, strict=True):
            print(q.heading() + ("  [QB-Norm]" if qb["applied"] else ""))
            for r, h in enumerate(hits, 1):
                print(f"  {r:3d}  {h.score:9.4f}  {h.video_id}  {h.path}")
    return 0


def qb_json(enabled: bool, hits) -> dict:
    """``{"enabled", "applied"}``: QB-Norm was on for the query, and its scores are normalised ones (its top
    video is one that some bank caption ranks first; otherwise QB-Norm leaves the scores as they are)."""
    return {"enabled": bool(enabled), "applied": bool(enabled and hits and hits[0].qb)}


def console() -> None:
    """``python search.py`` and the installed ``clip2video-search``: :func:`main`, then a quick exit."""
    exit_process(main())


if __name__ == "__main__":
    console()
