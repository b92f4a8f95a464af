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
"""

from __future__ import annotations

import argparse
import json
import logging
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
    model_fields,
    model_flags_given,
    output_paths,
    parse_with_config,
    resolve_clip_flags,
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
    o.add_argument("--metrics_json", default=None, help="write {t2v: {...}, v2t: {...}} here")
    o.add_argument("--save_embeddings", default=None, metavar="DIR",
                   help="write text.npy, video.npy, text_ids.json, video_ids.json, meta.json here")
    o.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    add_precision_arg(o)
    o.add_argument("--dsl", action="store_true", help="also report dual-softmax re-ranked metrics (labelled)")
    o.add_argument("--visualize", nargs=2, metavar=("N", "OUT.png"), default=None,
                   help="PNG grid of the top-5 videos for N queries, ground truth marked")
    o.add_argument("--seed", type=int, default=42)
    for legacy in ("--local_rank", "--n_gpu", "--vocab_size"):
        o.add_argument(legacy, default=None, help=argparse.SUPPRESS)
    return p


def load_for_eval(args: argparse.Namespace):
    """The model the flags describe, loaded strictly (never a silent fallback to untrained heads).

    Our checkpoints and exports carry their config (used unless model flags are given explicitly); a
    released ``pytorch_model.bin.N`` is described by the flags and evaluated with the original mask layout.
    """
    from clip2video.modules.network.model import make_config
    from clip2video.modules.weights.clip_weights import load_clip
    from clip2video.modules.weights.factory import create_model, load_model

    variant, fields = model_fields(args)
    ckpt = args.checkpoint or args.init_model
    if ckpt is None:
        if not args.zero_shot:
            raise UsageError("--checkpoint is required (or --zero_shot to evaluate CLIP-initialised heads)")
        if not args.clip_path and ":" not in (args.clip_model or ""):
            raise UsageError("--zero_shot needs --clip_path (a file, or a name such as ViT-B/32) or --clip_model "
                             "NAME:TAG")
        extra = {"mask_layout": args.mask_layout} if args.mask_layout else {}
        sd, clip_cfg = load_clip(resolve_clip_flags(args), args.clip_model)
        return create_model(make_config(variant, clip_cfg, **fields, **extra), clip_state_dict=sd)
    if args.clip_model:
        logger.info("--clip_model ignored: a checkpoint's backbone is read from the checkpoint")
    return load_model(ckpt, make_config(variant, **fields), model_num=args.model_num, mask_layout=args.mask_layout,
                      prefer_stored=not model_flags_given(args))


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


def _run(args: argparse.Namespace, info, out_dir, log_file) -> int:
    from clip2video.dataloaders.annotations import load_eval_set
    from clip2video.dataloaders.dataset import VideoDataset
    from clip2video.modules.evaluation.engine import eval_loader, evaluate, video_share
    from clip2video.modules.evaluation.metrics import format_table, markdown_row
    from clip2video.modules.network.tokenizer import ClipTokenizer
    from clip2video.modules.runtime.logging_utils import setup_logging

    setup_logging(log_file, is_main=info.is_main)  # only rank 0 writes the log and the outputs
    if args.visualize:
        try:
            args.visualize[0] = int(args.visualize[0])
        except ValueError:
            raise UsageError(f"--visualize N OUT.png: N must be an integer, got {args.visualize[0]!r}") from None
    if not args.features_path:
        raise UsageError("--features_path is required (folder of frame folders)")
    check_paths(args)
    device = info.device
    torch.manual_seed(args.seed)

    rset = load_eval_set(args.datatype, data_path=args.data_path, features_path=args.features_path,
                         val_csv=args.val_csv, split=args.split, skip_missing=args.skip_missing)
    logger.info("%s: %d captions, %d videos (%s)", args.datatype, len(rset.captions), len(rset.video_ids),
                "multi-caption" if rset.multi_caption else "one caption per video")
    model = load_for_eval(args).to(device).eval()
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
                   keep_sim=bool(args.visualize), dsl=args.dsl, progress=info.is_main, info=info)
    if not info.is_main:
        return 0
    logger.info("timings: %s (total %.1f s)", {k: round(v, 2) for k, v in res.timings.items()},
                time.perf_counter() - t0)
    table = format_table(res.metrics, f"{args.datatype} ({len(rset.captions)} captions × {len(rset.video_ids)} videos)")
    logger.info("\n%s", table)
    name = f"{model.config.variant} {args.datatype}"
    logger.info("markdown: %s", markdown_row(name, res.metrics))
    if res.dsl_metrics is not None:
        logger.info("\n%s", format_table(res.dsl_metrics, "with dual-softmax re-ranking (DSL, not CLIP2Video)"))
        logger.info("markdown: %s", markdown_row(name + " +DSL", res.dsl_metrics))
    payload = dict(res.metrics)
    if res.dsl_metrics is not None:
        payload["dsl"] = res.dsl_metrics
    if args.metrics_json:
        from clip2video.fileio import atomic_write_text

        atomic_write_text(args.metrics_json, json.dumps(payload, indent=1))
    if args.save_embeddings:  # one vector per caption / video: logit_scale · text @ video.T == --save_sim
        from clip2video.search.build import describe_model, write_embeddings

        meta = dict(describe_model(model, args), features_path=str(Path(args.features_path).resolve()),
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
