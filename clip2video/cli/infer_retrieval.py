#!/usr/bin/env python
"""Evaluate a CLIP2Video checkpoint on a text–video retrieval protocol.

Takes every flag of the original's ``test/*.sh`` scripts, so those command lines run unchanged apart from
paths, e.g. (MSR-VTT 1k-A)::

    python infer_retrieval.py --num_thread_reader 2 --val_csv data/msrvtt_data/MSRVTT_JSFUSION_test.csv \\
        --data_path data/msrvtt_data/MSRVTT_data.json --features_path data/msrvtt_data/frames \\
        --output_dir logs/msrvtt.log --max_words 32 --max_frames 12 --batch_size_val 64 --datatype msrvtt \\
        --feature_framerate 2 --sim_type seqTransf --checkpoint ckpt/msrvtt --do_eval --model_num 2 \\
        --temporal_type TDB --temporal_proj sigmoid_selfA --center_type TAB --centerK 5 --center_weight 0.5 \\
        --center_proj TAB_TDB --clip_path ViT-B-32.pt --save_sim sim.npy --metrics_json metrics.json

``--output_dir`` may be a folder or, as the original's scripts pass it, a log-file path.

Post-processing, always reported next to the plain metrics and labelled: ``--qb_norm BANK`` (QB-Norm, Bogolin
et al. 2022: dynamic inverted softmax with a bank of training captions; a fixed bank, so it also works for one
query at a time) and ``--dsl`` (dual softmax over all test queries; not a single-query method). Every result
file and the log record what was measured: protocol, annotation files and weights by SHA-256, counts, mask
layout, precision, all flags, post-processing and the code version.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

from clip2video.cli.common import (
    OneLineParser,
    UsageError,
    add_checkpoint_args,
    add_data_args,
    add_precision_arg,
    check_paths,
    exit_process,
    model_spec,
    output_paths,
    parse_with_config,
    run_main,
)

logger = logging.getLogger("clip2video.eval")
EVAL_DATA_FLAGS = ("datatype", "data_root", "val_csv", "data_path", "features_path", "video_fps", "split",
                   "max_words", "max_frames", "feature_framerate", "batch_size_val", "num_thread_reader",
                   "image_mode", "skip_missing")


# ----------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file of flag defaults")
    add_data_args(p.add_argument_group("data (the original's flags)"), EVAL_DATA_FLAGS)
    add_checkpoint_args(p)
    o = p.add_argument_group("run and outputs")
    o.add_argument("--output_dir", default=None, help="output folder, or a log-file path (as the original)")
    o.add_argument("--do_eval", action="store_true", help="accepted for compatibility (evaluation always runs)")
    o.add_argument("--save_sim", default=None, help="write the caption × video matrix here (.npy)")
    o.add_argument("--metrics_json", default=None,
                   help="write {t2v: {...}, v2t: {...}, [dsl, qb_norm,] run: {what was measured}} here")
    o.add_argument("--save_embeddings", default=None, metavar="DIR",
                   help="write text.npy, video.npy, text_ids.json, video_ids.json, meta.json here")
    o.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    add_precision_arg(o)
    o.add_argument("--dsl", action="store_true",
                   help="also report dual-softmax re-ranked metrics (labelled; uses all test queries, so not a "
                        "single-query method)")
    q = p.add_argument_group("QB-Norm (query-bank normalisation; reported next to the plain metrics)")
    q.add_argument("--qb_norm", default=None, metavar="BANK",
                   help="query bank: UTF-8 text file, one caption per line (training captions), encoded with the "
                        "same model and text flags")
    q.add_argument("--qb_norm_split", default=None, metavar="SPLIT",
                   help="instead of a file, every caption of a training split of --datatype/--data_path: a split "
                        "name for msvd/vatex/generic (train), the video-list csv for MSR-VTT (MSRVTT_train.9k.csv)")
    q.add_argument("--qb_beta", type=float, default=None,
                   help="inverse temperature on the model's scores (default 1/1.99, published for CLIP2Video's "
                        "x100 scores)")
    q.add_argument("--qb_k", type=int, default=1, help="a video is a hub when in some bank query's top-k (1)")
    q.add_argument("--save_sim_qb", default=None, metavar="FILE.npy",
                   help="write the QB-Norm matrix (normalised rows exp(beta*s)/sum, other rows unchanged)")
    o.add_argument("--visualize", nargs=2, metavar=("N", "OUT.png"), default=None,
                   help="PNG grid of the top-5 videos for N queries, ground truth marked")
    o.add_argument("--seed", type=int, default=42)
    for legacy in ("--local_rank", "--n_gpu", "--vocab_size"):
        o.add_argument(legacy, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main("infer_retrieval.py", lambda: run(parse_with_config(build_parser(), argv)))


def run(args: argparse.Namespace) -> int:
    from clip2video.modules.runtime.distributed import cleanup_distributed, init_distributed

    out_dir, log_file = output_paths(args.output_dir)
    info = init_distributed(args.device)  # under torchrun: one rank per process, each encodes a share
    try:
        return _run(args, info, out_dir, log_file)
    finally:
        cleanup_distributed()


def check_qb_args(args: argparse.Namespace) -> None:
    """QB-Norm's flags, each failing with one line naming the flag."""
    if args.qb_norm and args.qb_norm_split:
        raise UsageError("--qb_norm and --qb_norm_split exclude each other (a bank file or a training split)")
    has_bank = bool(args.qb_norm or args.qb_norm_split)
    if not has_bank:
        for flag in ("save_sim_qb", "qb_beta"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag} needs a query bank (--qb_norm BANK or --qb_norm_split SPLIT)")
        return
    if args.qb_beta is not None and not (args.qb_beta > 0 and math.isfinite(args.qb_beta)):
        raise UsageError(f"--qb_beta must be a positive number, got {args.qb_beta}")
    if args.qb_k < 1:
        raise UsageError(f"--qb_k must be >= 1, got {args.qb_k}")
    if args.qb_norm and not Path(args.qb_norm).is_file():
        raise UsageError(f"--qb_norm {args.qb_norm}: no such file")
    if args.qb_norm_split and args.datatype in ("msrvtt", "msrvttfull") and not Path(args.qb_norm_split).is_file():
        raise UsageError(f"--qb_norm_split {args.qb_norm_split}: no such file (for MSR-VTT, the training video "
                         "list csv, e.g. MSRVTT_train.9k.csv)")


def load_bank(args: argparse.Namespace) -> tuple[list[str] | None, dict | None]:
    """The query bank's captions and what the result files record about it (or None, None)."""
    from clip2video.dataloaders.annotations import load_caption_bank, read_caption_file
    from clip2video.provenance import file_record

    if args.qb_norm:
        captions = read_caption_file(args.qb_norm)
        return captions, {"source": "file", "file": file_record(args.qb_norm), "captions": len(captions)}
    if args.qb_norm_split:
        captions, files = load_caption_bank(args.datatype, data_path=args.data_path, split=args.qb_norm_split)
        return captions, {"source": "training split", "datatype": args.datatype, "split": args.qb_norm_split,
                          "files": [file_record(f) for f in files], "captions": len(captions)}
    return None, None


def run_record(args: argparse.Namespace, rset, model, info, bank: dict | None, spec) -> dict:
    """What a metrics file says it measured (README "Result files"): protocol, data, weights, settings, code."""
    import numpy as np

    from clip2video.dataloaders.annotations import PROTOCOLS, annotation_files, normalize_datatype
    from clip2video.modules.evaluation.qbnorm import CLIP2VIDEO_BETA
    from clip2video.modules.weights.checkpoint import released_path
    from clip2video.provenance import code_version, file_record

    datatype = normalize_datatype(args.datatype)
    per_video = np.bincount(rset.caption_video, minlength=len(rset.video_ids)) if len(rset.video_ids) else np.zeros(0)
    ckpt_file = released_path(spec.checkpoint, spec.model_num) if spec.checkpoint else None
    sidecar = ckpt_file.with_name(ckpt_file.name + ".config.json") if ckpt_file else None
    clip = None  # the CLIP weights (zero-shot) or the file / name describing a released checkpoint's backbone
    if spec.clip_path:
        clip = file_record(spec.clip_path) if Path(spec.clip_path).is_file() else {"name": spec.clip_path}
    post: dict = {"plain": "none: the model's scores (keys t2v, v2t)"}
    if args.dsl:
        post["dsl"] = {"method": "dual softmax over the test queries of each video column (CAMoE)",
                       "note": "uses all test queries; not a single-query method", "temperature": 1.0,
                       "directions": ["t2v", "v2t"]}
    if bank is not None:
        post["qb_norm"] = {"method": "QB-Norm, dynamic inverted softmax (Bogolin et al. 2022)",
                           "bank": bank, "beta": args.qb_beta or CLIP2VIDEO_BETA, "k": args.qb_k,
                           "scale": "the model's scores (logit scale x cosine)",
                           "note": "a fixed bank of training captions: usable for single queries",
                           "directions": ["t2v"]}
    return {
        "protocol": {"name": rset.name, "description": PROTOCOLS[datatype], "multi_caption": bool(rset.multi_caption)},
        "datatype": datatype,
        "split": args.split if datatype in ("msvd", "vatexEnglish", "generic") else None,
        "annotations": [file_record(f) for f in annotation_files(datatype, data_path=args.data_path,
                                                                  csv_path=args.val_csv, split=args.split)],
        "features_path": str(Path(args.features_path).resolve()),
        "counts": {"captions": len(rset.captions), "videos": len(rset.video_ids),
                   "captions_per_video": {"min": int(per_video.min()) if per_video.size else 0,
                                          "max": int(per_video.max()) if per_video.size else 0,
                                          "mean": float(per_video.mean()) if per_video.size else 0.0}},
        "checkpoint": file_record(ckpt_file),
        "checkpoint_config": file_record(sidecar) if sidecar is not None and sidecar.is_file() else None,
        "clip": clip,
        "model": {"variant": model.config.variant, "mask_layout": model.config.mask_layout,
                  "logit_scale": float(model.logit_scale.detach().exp()), "backbone": model.config.clip.describe()},
        "mask_layout": model.config.mask_layout,
        "precision": args.precision,
        "device": str(info.device),
        "processes": info.world_size,
        "post_processing": post,
        "flags": json.loads(json.dumps({k: v for k, v in sorted(vars(args).items())}, default=str)),
        "code": code_version(),
    }


def _run(args: argparse.Namespace, info, out_dir, log_file) -> int:
    from clip2video.dataloaders.annotations import load_eval_set
    from clip2video.dataloaders.dataset import VideoDataset
    from clip2video.modules.evaluation.engine import eval_loader, evaluate, video_share
    from clip2video.modules.evaluation.metrics import format_comparison, format_table, markdown_row
    from clip2video.modules.network.tokenizer import ClipTokenizer
    from clip2video.modules.runtime.logging_utils import setup_logging
    from clip2video.modules.weights.spec import load_model

    setup_logging(log_file, is_main=info.is_main)  # only rank 0 writes the log and the outputs
    if args.visualize:
        try:
            args.visualize[0] = int(args.visualize[0])
        except ValueError:
            raise UsageError(f"--visualize N OUT.png: N must be an integer, got {args.visualize[0]!r}") from None
    if not args.features_path:
        raise UsageError("--features_path is required (folder of frame folders)")
    check_paths(args)
    check_qb_args(args)
    device = info.device
    torch.manual_seed(args.seed)

    rset = load_eval_set(args.datatype, data_path=args.data_path, features_path=args.features_path,
                         val_csv=args.val_csv, split=args.split, skip_missing=args.skip_missing)
    logger.info("%s: %d captions, %d videos (%s)", args.datatype, len(rset.captions), len(rset.video_ids),
                "multi-caption" if rset.multi_caption else "one caption per video")
    bank_captions, bank = load_bank(args)
    if bank is not None:
        logger.info("QB-Norm query bank: %d captions (%s)", len(bank_captions),
                    args.qb_norm or f"split {args.qb_norm_split} of {args.data_path}")
    spec = model_spec(args)  # the model the flags describe, loaded strictly (modules.weights.spec.load_model)
    model = load_model(spec).to(device).eval()
    logger.info("model: variant %s, mask layout %s, %s", model.config.variant, model.config.mask_layout,
                "TAB on" if model.config.use_tab else "no TAB")
    logger.info("backbone: %s", model.config.clip.describe())
    dataset = VideoDataset(rset.video_ids, args.features_path, video_fps=args.video_fps, max_frames=args.max_frames,
                           framerate=args.feature_framerate, image_size=model.config.clip.image_size,
                           mode=args.image_mode)
    if info.is_distributed:  # this rank reads only its share of the videos (whole head groups, see video_share)
        share, _ = video_share(rset, model, args.batch_size_val, info)
        dataset = torch.utils.data.Subset(dataset, share)
        logger.info("%d processes: rank 0 encodes %d of %d videos", info.world_size, len(share), len(rset.video_ids))
    loader = eval_loader(dataset, args.num_thread_reader, pin_memory=device.type == "cuda")
    t0 = time.perf_counter()
    res = evaluate(model, rset, loader, tokenizer=ClipTokenizer(args.max_words), batch_size_val=args.batch_size_val,
                   device=device, precision=args.precision, save_sim=args.save_sim,
                   keep_sim=bool(args.visualize), dsl=args.dsl, progress=info.is_main, info=info,
                   qb_bank=bank_captions, qb_beta=args.qb_beta, qb_k=args.qb_k, save_sim_qb=args.save_sim_qb)
    if not info.is_main:
        return 0
    logger.info("timings: %s (total %.1f s)", {k: round(v, 2) for k, v in res.timings.items()},
                time.perf_counter() - t0)
    record = run_record(args, rset, model, info, bank, spec)
    counts = record["counts"]
    logger.info("measured: %s (%s); %d captions × %d videos, %.2f captions per video (min %d, max %d); mask layout "
                "%s, precision %s; code %s %s", record["protocol"]["name"], record["protocol"]["description"],
                counts["captions"], counts["videos"], counts["captions_per_video"]["mean"],
                counts["captions_per_video"]["min"], counts["captions_per_video"]["max"], record["mask_layout"],
                record["precision"], record["code"]["version"], record["code"]["git_commit"] or "(no git commit)")
    for f in record["annotations"]:
        logger.info("annotation file %s sha256 %s", f["path"], f["sha256"])
    if record["checkpoint"]:
        logger.info("checkpoint %s sha256 %s", record["checkpoint"]["path"], record["checkpoint"]["sha256"])
    table = format_table(res.metrics, f"{args.datatype} ({len(rset.captions)} captions × {len(rset.video_ids)} videos)")
    logger.info("\n%s", table)
    name = f"{model.config.variant} {args.datatype}"
    logger.info("markdown: %s", markdown_row(name, res.metrics))
    if res.dsl_metrics is not None:
        logger.info("\n%s", format_table(res.dsl_metrics, "with dual-softmax re-ranking (DSL: uses all test queries; "
                                                           "not a single-query method; not CLIP2Video)"))
        logger.info("markdown: %s", markdown_row(name + " +DSL", res.dsl_metrics))
    payload = dict(res.metrics)
    if res.dsl_metrics is not None:
        payload["dsl"] = res.dsl_metrics
    if res.qb is not None:
        qb = record["post_processing"]["qb_norm"]
        qb["normalised_queries"] = res.qb.normalised
        qb["retrieved_videos"] = int(res.qb.stats.retrieved.sum())
        logger.info("\n%s", format_comparison(
            [("T2V", res.metrics["t2v"]), ("T2V +QB-Norm", res.qb.metrics["t2v"])],
            f"QB-Norm (dynamic inverted softmax; bank {bank['captions']} captions, β {qb['beta']:.4f}, k {qb['k']}; "
            f"{res.qb.normalised} of {len(rset.captions)} queries normalised; T2V only: the bank holds captions)"))
        payload["qb_norm"] = res.qb.metrics
    payload["run"] = record
    logger.info("run record: %s", json.dumps(record, sort_keys=True))
    if args.metrics_json:
        from clip2video.fileio import atomic_write_text

        atomic_write_text(args.metrics_json, json.dumps(payload, indent=1))
    if args.save_embeddings:  # one vector per caption / video: logit_scale · text @ video.T == --save_sim
        from clip2video.modules.weights.identity import describe_model
        from clip2video.search.build import write_embeddings

        meta = dict(describe_model(model, spec).to_dict(), features_path=str(Path(args.features_path).resolve()),
                    max_frames=args.max_frames, feature_framerate=args.feature_framerate, image_mode=args.image_mode,
                    precision=args.precision, datatype=args.datatype, batch_size_val=args.batch_size_val)
        write_embeddings(args.save_embeddings, model.text_vector(res.text).float().numpy(),
                         model.video_vector(res.video).float().numpy(), rset.captions, rset.video_ids, meta)
        logger.info("wrote embeddings to %s", args.save_embeddings)
    if out_dir is not None:
        from clip2video.fileio import atomic_write_text

        # next to the log: run/log.txt → run/metrics.json, run/msrvtt.log → run/msrvtt.metrics.json
        name = "metrics.json" if log_file.name == "log.txt" else f"{log_file.stem}.metrics.json"
        atomic_write_text(out_dir / name, json.dumps(payload, indent=1))
    if args.visualize:
        import numpy as np

        from clip2video.visualize import retrieval_grid

        n, png = args.visualize
        rng = np.random.default_rng(args.seed)
        queries = sorted(rng.choice(len(rset.captions), size=min(n, len(rset.captions)), replace=False).tolist())
        retrieval_grid(res.sim, queries, rset.captions, rset.caption_video, rset.video_ids, args.features_path, png)
        logger.info("wrote %s", png)
    return 0


def console() -> None:
    """``python infer_retrieval.py`` and the installed ``clip2video-eval``: :func:`main`, then a quick exit."""
    exit_process(main())


if __name__ == "__main__":
    console()
