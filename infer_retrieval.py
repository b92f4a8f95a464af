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
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

logger = logging.getLogger("clip2video.eval")

MODEL_FLAGS = ("sim_type", "temporal_type", "temporal_proj", "center_type", "center_proj")


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``prog: error: ...``) raised as ``UsageError``, not usage + exit."""

    def error(self, message: str):
        raise UsageError(message)


# ----------------------------------------------------------------------------------------------- shared flags
def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model flags shared with train.py (the original's names, plus ``--variant`` and ``--mask_layout``)."""
    from modules.model import FLAG_CHOICES, VARIANTS

    g = p.add_argument_group("model")
    g.add_argument("--variant", default=None, choices=list(VARIANTS),
                   help="Table-1 row by name; overrides the raw flags below")
    g.add_argument("--sim_type", default="meanP", choices=FLAG_CHOICES["sim_type"])
    g.add_argument("--temporal_type", default="", choices=FLAG_CHOICES["temporal_type"])
    g.add_argument("--temporal_proj", default="", choices=FLAG_CHOICES["temporal_proj"])
    g.add_argument("--center_type", default="", choices=FLAG_CHOICES["center_type"])
    g.add_argument("--center_proj", default="", choices=FLAG_CHOICES["center_proj"])
    g.add_argument("--centerK", type=int, default=5)
    g.add_argument("--center_weight", type=float, default=0.5)
    g.add_argument("--cross_num_hidden_layers", type=int, default=4)
    g.add_argument("--mask_layout", default=None, choices=["original", "per_video"],
                   help="attention-mask layout of the temporal heads (default: original for released "
                        "checkpoints, what the checkpoint says for ours)")
    g.add_argument("--clip_path", default=None, help="OpenAI CLIP weights (ViT-B-32.pt or a state dict)")


def model_fields(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(variant, config fields) from parsed flags."""
    from modules.model import VARIANTS, variant_of_flags

    if args.variant:
        name, fields = args.variant, dict(VARIANTS[args.variant])
    else:
        fields = {k: getattr(args, k) for k in MODEL_FLAGS}
        name = variant_of_flags(**fields)
    fields.update(center_k=args.centerK, center_weight=args.center_weight, cross_layers=args.cross_num_hidden_layers)
    return name, fields


def parse_with_config(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``--config file.yaml`` supplies defaults; flags on the command line override them (timm style)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            raise UsageError(f"--config {path}: no such file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UsageError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UsageError(f"--config {path}: expected a mapping of flag: value")
        valid = {a.dest for a in p._actions}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise UsageError(f"--config {path}: unknown keys {', '.join(unknown)}")
        p.set_defaults(**data)
    return p.parse_args(argv)


def output_paths(output_dir: str | None) -> tuple[Path | None, Path | None]:
    """(folder for outputs, log file). The original's scripts pass a log-file path as --output_dir."""
    if not output_dir:
        return None, None
    p = Path(output_dir)
    if p.suffix in (".log", ".txt") or p.is_file():
        return p.parent, p
    return p, p / "log.txt"


# ----------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file of flag defaults")
    d = p.add_argument_group("data (the original's flags)")
    d.add_argument("--datatype", default="msrvtt", help="msrvtt | msrvttfull | msvd | vatexEnglish | generic")
    d.add_argument("--val_csv", default=None, help="MSR-VTT test csv (JSFUSION 1k-A or *.full.csv)")
    d.add_argument("--data_path", default=None, help="MSRVTT_data.json, or the MSVD/VATEX annotation folder")
    d.add_argument("--features_path", default=None, help="folder of frame folders <video_id>/00000001.jpg")
    d.add_argument("--split", default="test", help="split list for MSVD/VATEX/generic (test, val, test1k5_sec)")
    d.add_argument("--max_words", type=int, default=32)
    d.add_argument("--max_frames", type=int, default=12)
    d.add_argument("--feature_framerate", type=int, default=1)
    d.add_argument("--batch_size_val", type=int, default=16)
    d.add_argument("--num_thread_reader", type=int, default=2)
    d.add_argument("--image_mode", default="exact", choices=["exact", "fast"],
                   help="frame preprocessing: exact = the original's PIL path; fast = quicker, not bit-exact")
    d.add_argument("--skip_missing", action="store_true", help="drop listed videos without frames (logged)")
    c = p.add_argument_group("checkpoint")
    c.add_argument("--checkpoint", default=None, help="folder of pytorch_model.bin.N, or a weight file")
    c.add_argument("--model_num", default=None, help="N of pytorch_model.bin.N")
    c.add_argument("--init_model", default=None, help="alias of --checkpoint with a file path")
    c.add_argument("--zero_shot", action="store_true",
                   help="no checkpoint: CLIP weights from --clip_path, heads initialised from CLIP")
    add_model_args(p)
    o = p.add_argument_group("run and outputs")
    o.add_argument("--output_dir", default=None, help="output folder, or a log-file path (as the original)")
    o.add_argument("--do_eval", action="store_true", help="accepted for compatibility (evaluation always runs)")
    o.add_argument("--save_sim", default=None, help="write the caption × video matrix here (.npy)")
    o.add_argument("--metrics_json", default=None, help="write {t2v: {...}, v2t: {...}} here")
    o.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    o.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
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
    from modules.checkpoint import load_clip_weights, load_model
    from modules.model import create_model, make_config

    variant, fields = model_fields(args)
    ckpt = args.checkpoint or args.init_model
    if ckpt is None:
        if not args.zero_shot:
            raise UsageError("--checkpoint is required (or --zero_shot to evaluate CLIP-initialised heads)")
        if not args.clip_path:
            raise UsageError("--zero_shot needs --clip_path")
        extra = {"mask_layout": args.mask_layout} if args.mask_layout else {}
        return create_model(variant, clip_state_dict=load_clip_weights(args.clip_path), **fields, **extra)
    explicit = args.variant is not None or any(getattr(args, k) for k in MODEL_FLAGS[1:]) or args.sim_type != "meanP"
    return load_model(ckpt, make_config(variant, **fields), model_num=args.model_num, mask_layout=args.mask_layout,
                      prefer_stored=not explicit)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    try:
        args = parse_with_config(p, argv)
        return run(args)
    except UsageError as e:
        print(f"infer_retrieval.py: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"infer_retrieval.py: error: {msg}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    from dataloaders.annotations import load_eval_set
    from dataloaders.dataset import VideoDataset
    from modules.evaluation import evaluate
    from modules.logging_utils import setup_logging
    from modules.metrics import format_table, markdown_row
    from modules.tokenizer import ClipTokenizer

    out_dir, log_file = output_paths(args.output_dir)
    setup_logging(log_file)
    if args.visualize:
        try:
            args.visualize[0] = int(args.visualize[0])
        except ValueError:
            raise UsageError(f"--visualize N OUT.png: N must be an integer, got {args.visualize[0]!r}") from None
    if not args.features_path:
        raise UsageError("--features_path is required (folder of frame folders)")
    if not Path(args.features_path).is_dir():
        raise UsageError(f"--features_path {args.features_path}: no such folder")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)

    rset = load_eval_set(args.datatype, data_path=args.data_path, features_path=args.features_path,
                         val_csv=args.val_csv, split=args.split, skip_missing=args.skip_missing)
    logger.info("%s: %d captions, %d videos (%s)", args.datatype, len(rset.captions), len(rset.video_ids),
                "multi-caption" if rset.multi_caption else "one caption per video")
    model = load_for_eval(args).to(device).eval()
    logger.info("model: variant %s, mask layout %s, %s", model.config.variant, model.config.mask_layout,
                "TAB on" if model.config.use_tab else "no TAB")
    dataset = VideoDataset(rset.video_ids, args.features_path, max_frames=args.max_frames,
                           framerate=args.feature_framerate, image_size=model.config.clip.image_size,
                           mode=args.image_mode)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size_val, shuffle=False,
                                         num_workers=args.num_thread_reader, pin_memory=device.type == "cuda")
    t0 = time.perf_counter()
    res = evaluate(model, rset, loader, tokenizer=ClipTokenizer(args.max_words), batch_size_val=args.batch_size_val,
                   device=device, precision=args.precision, save_sim=args.save_sim,
                   keep_sim=bool(args.visualize), dsl=args.dsl, progress=True)
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
        from modules.checkpoint import atomic_write_text

        atomic_write_text(args.metrics_json, json.dumps(payload, indent=1))
    if out_dir is not None:
        from modules.checkpoint import atomic_write_text

        # next to the log: run/log.txt → run/metrics.json, run/msrvtt.log → run/msrvtt.metrics.json
        name = "metrics.json" if log_file.name == "log.txt" else f"{log_file.stem}.metrics.json"
        atomic_write_text(out_dir / name, json.dumps(payload, indent=1))
    if args.visualize:
        import numpy as np

        from modules.visualize import retrieval_grid

        n, png = args.visualize
        rng = np.random.default_rng(args.seed)
        queries = sorted(rng.choice(len(rset.captions), size=min(n, len(rset.captions)), replace=False).tolist())
        retrieval_grid(res.sim, queries, rset.captions, rset.caption_video, rset.video_ids, args.features_path, png)
        logger.info("wrote %s", png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
