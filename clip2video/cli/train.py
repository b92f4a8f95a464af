#!/usr/bin/env python
"""Train CLIP2Video (text–video retrieval) from CLIP weights, on one process or many.

Flags follow CLIP4Clip's training script where they exist; ``--config file.yaml`` supplies defaults that
command-line flags override; the resolved arguments are written to ``OUTPUT_DIR/args.yaml``.

One process (CPU or one GPU)::

    python train.py --config configs/train/msrvtt_9k.yaml --train_csv DATA/MSRVTT_train.9k.csv \\
        --val_csv DATA/MY_HELD_OUT_val.csv --data_path DATA/MSRVTT_data.json --features_path FRAMES \\
        --clip_path ViT-B-32.pt --output_dir runs/msrvtt_9k

N processes on one node (DDP; NCCL on GPUs, gloo on CPU)::

    torchrun --nproc_per_node N train.py --config ... (same flags)

Several nodes: run the same command on every node, with the same rendezvous::

    torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d --rdzv_endpoint HOST:PORT --rdzv_id RUN \\
        train.py --config ... (same flags; OUTPUT_DIR on a shared file system if you want to resume elsewhere)

``--batch_size`` is the GLOBAL batch of one optimiser step (128 in the paper), split evenly over processes
and ``--gradient_accumulation_steps``. The contrastive loss is computed on the embeddings gathered from all
processes, so N processes with B/N samples each train exactly like one process with B samples.
``--gradient_accumulation_steps k`` is different: each of the k micro-batches only contrasts its own B/k
samples (fewer negatives), so it is NOT equivalent to a bigger batch; see modules/training/loop.py.

``--recipe clip4clip`` trains with the step CLIP2Video's training descends from (CLIP4Clip's BertAdam, its
name-based decay groups and whole-run schedules, the original mask layout; ``--gather_grad local`` adds its
all-gather gradient); the paper configs select it. ``--recipe clip2video`` (the default) is this project's
AdamW step. docs/reproducing.md lists the differences.

Outputs (rank 0): ``latest.pt`` (everything needed to resume; ``--resume latest`` continues mid-epoch),
``best.pt`` (best validation metric; the validation split, never the test split), ``pytorch_model.bin.N``
after every epoch N (0-based; the release format ``infer_retrieval.py --checkpoint OUT --model_num N``
reads), ``log.jsonl`` (step metrics and validation), ``log.txt``, ``args.yaml``, ``tensorboard/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import yaml

from clip2video.cli.common import (
    OneLineParser,
    UsageError,
    add_data_args,
    add_model_args,
    add_precision_arg,
    check_paths,
    model_fields,
    model_flags_given,
    parse_with_config,
    resolve_clip_flags,
    run_main,
)

logger = logging.getLogger("clip2video.cli.train")
TRAIN_DATA_FLAGS = ("datatype", "val_datatype", "data_root", "train_csv", "val_csv", "data_path", "features_path",
                    "video_fps", "train_split", "val_split", "max_words", "max_frames", "feature_framerate",
                    "image_mode", "num_thread_reader", "skip_missing")


# ----------------------------------------------------------------------------------------------- flags
def build_parser() -> argparse.ArgumentParser:
    from clip2video.modules.training.loss import GATHER_GRADS
    from clip2video.modules.training.optim import RECIPES, SCHEDULES

    p = OneLineParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file of flag defaults (flags on the command line win)")
    p.add_argument("--do_train", action="store_true", help="accepted for CLIP4Clip compatibility (always trains)")

    add_data_args(p.add_argument_group("data"), TRAIN_DATA_FLAGS, helps={
        "val_csv": "validation csv (MSR-VTT); selects best.pt. Never pass the test csv here",
        "data_path": "MSRVTT_data.json, the MSVD/VATEX folder or a generic csv",
        "feature_framerate": "decimation factor of the frame list",
        "num_thread_reader": "DataLoader workers per process",
        "skip_missing": "drop listed videos without a frame folder",
    })

    o = p.add_argument_group("optimisation")
    o.add_argument("--recipe", default="clip2video", choices=list(RECIPES),
                   help="clip2video: AdamW, decay on matrices, cosine after the warm-up (default); clip4clip: "
                        "CLIP4Clip's BertAdam step, decay groups and schedules, --mask_layout original")
    o.add_argument("--schedule", default=None, choices=list(SCHEDULES),
                   help="schedule of the clip4clip recipe over the whole run (default warmup_cosine)")
    o.add_argument("--gather_grad", default="exact", choices=list(GATHER_GRADS),
                   help="exact: N processes give the gradient of one process with the global batch (default); "
                        "local: CLIP4Clip's all-gather, whose backward keeps each process's own slice")
    o.add_argument("--lr", type=float, default=1e-4, help="learning rate of the new heads")
    o.add_argument("--coef_lr", type=float, default=1e-3, help="CLIP's learning rate is lr × coef_lr")
    o.add_argument("--weight_decay", type=float, default=0.2)
    o.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (<= 0: off)")
    o.add_argument("--batch_size", type=int, default=128, help="GLOBAL batch per optimiser step")
    add_data_args(o, ["batch_size_val"])
    o.add_argument("--epochs", type=int, default=5)
    o.add_argument("--max_steps", type=int, default=0, help="stop after this many optimiser steps (0: no cap)")
    o.add_argument("--warmup_proportion", type=float, default=0.1)
    o.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches per step; NOT equivalent to a bigger contrastive batch")
    o.add_argument("--freeze_layer_num", type=int, default=0,
                   help="-1: train all of CLIP; k >= 0: freeze CLIP's embeddings and first k blocks (CLIP4Clip)")
    add_precision_arg(o)
    o.add_argument("--grad_checkpointing", action="store_true", help="recompute CLIP activations in backward")
    o.add_argument("--seed", type=int, default=42)

    add_model_args(p)
    # without model flags, train the paper's full model (TAB-TDB), not the evaluation script's meanP default
    p.set_defaults(sim_type="seqTransf", temporal_type="TDB", temporal_proj="sigmoid_selfA", center_type="TAB",
                   center_proj="TAB_TDB")
    m = p.add_argument_group("initialisation")
    m.add_argument("--init_model", default=None, help="start from these weights (ours or a pytorch_model.bin.N)")
    m.add_argument("--tiny_clip", action="store_true", help="random tiny CLIP, no weights (tests and demos)")

    r = p.add_argument_group("run")
    r.add_argument("--output_dir", default=None, help="checkpoints, exports and logs")
    r.add_argument("--resume", default=None, help="latest (OUTPUT_DIR/latest.pt) or a checkpoint path")
    r.add_argument("--device", default=None, help="cpu | cuda | cuda:1 (default: the local GPU if any)")
    r.add_argument("--eval_every", type=int, default=1, help="validate every N epochs (0: only at the end)")
    r.add_argument("--save_every_steps", type=int, default=0, help="also save latest.pt every N steps")
    r.add_argument("--log_every", type=int, default=1, help="JSONL record every N steps")
    r.add_argument("--select_metric", default="t2v_R1", choices=["t2v_R1", "v2t_R1", "rsum"])
    r.add_argument("--no_export", action="store_true", help="do not write pytorch_model.bin.N")
    r.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    for legacy in ("--local_rank", "--n_gpu", "--cache_dir", "--n_display"):
        r.add_argument(legacy, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags over YAML defaults over built-in defaults (timm style); unknown YAML keys are an error."""
    p = build_parser()
    args = parse_with_config(p, argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Cross-flag checks, each failing with one line naming the flag."""
    if not args.output_dir:
        raise UsageError("--output_dir is required")
    for name in ("batch_size", "epochs", "gradient_accumulation_steps", "max_words", "max_frames",
                 "feature_framerate", "batch_size_val"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0 or args.coef_lr < 0:
        raise UsageError(f"--lr must be > 0 and --coef_lr >= 0 (got {args.lr}, {args.coef_lr})")
    if not 0.0 <= args.warmup_proportion < 1.0:
        raise UsageError(f"--warmup_proportion must be in [0, 1), got {args.warmup_proportion}")
    if args.max_steps < 0:
        raise UsageError(f"--max_steps must be >= 0, got {args.max_steps}")
    if args.freeze_layer_num < -1:
        raise UsageError(f"--freeze_layer_num must be >= -1, got {args.freeze_layer_num}")
    if args.recipe == "clip2video" and args.schedule not in (None, "warmup_cosine"):
        raise UsageError(f"--schedule {args.schedule} exists only with --recipe clip4clip (the clip2video recipe "
                         "warms up then runs a cosine over the remaining steps)")
    if args.recipe == "clip4clip" and args.schedule is None:
        args.schedule = "warmup_cosine"  # recorded in args.yaml as what the run used
    tagged = ":" in (args.clip_model or "")  # NAME:TAG alone fetches open_clip's weights of that tag
    if sum(bool(x) for x in (args.clip_path or tagged, args.init_model, args.tiny_clip)) == 0:
        raise UsageError("give --clip_path (a file such as ViT-B-32.pt, or a name such as ViT-B/32), --clip_model "
                         "NAME:TAG, --init_model or --tiny_clip")
    if args.tiny_clip and (args.clip_path or tagged):
        raise UsageError("--tiny_clip and --clip_path exclude each other")
    if args.clip_model and not args.clip_path and not tagged:
        raise UsageError("--clip_model names the architecture of --clip_path: give both, or NAME:TAG for open_clip's "
                         "weights of that tag (a checkpoint records its backbone)")
    if not args.features_path:
        raise UsageError("--features_path is required (folder of frame folders)")
    check_paths(args)


# ----------------------------------------------------------------------------------------------- building
def default_mask_layout(recipe: str) -> str:
    """The mask layout a recipe trains with when ``--mask_layout`` is not given: the clip4clip recipe
    reproduces the original's training computation (masks tiled across the batch), ours gives each video its
    own mask (vectors that depend on the video alone, as an index needs)."""
    return "original" if recipe == "clip4clip" else "per_video"


def build_model(args: argparse.Namespace):
    """The model the flags describe: from --init_model, from CLIP weights, or a random tiny CLIP."""
    from clip2video.modules.network.backbone import ClipConfig
    from clip2video.modules.network.model import make_config
    from clip2video.modules.weights.clip_weights import load_clip
    from clip2video.modules.weights.factory import create_model, load_model

    variant, fields = model_fields(args)
    layout = args.mask_layout or default_mask_layout(args.recipe)
    if args.recipe == "clip4clip" and layout != "original":
        logger.warning("--recipe clip4clip with --mask_layout %s: not the original's training computation", layout)
    if args.init_model:
        model = load_model(args.init_model, make_config(variant, **fields), mask_layout=layout,
                           prefer_stored=not model_flags_given(args))
        logger.info("initialised from %s", args.init_model)
        return model
    if args.tiny_clip:
        return create_model(variant, clip_config=ClipConfig.tiny(), mask_layout=layout, **fields)
    sd, clip_cfg = load_clip(resolve_clip_flags(args), args.clip_model)  # the backbone, recorded in checkpoints
    return create_model(make_config(variant, clip_cfg, mask_layout=layout, **fields), clip_state_dict=sd)


def build_data(args: argparse.Namespace, image_size: int):
    """(training PairDataset, validation ValData or None) from the data flags."""
    from clip2video.dataloaders.annotations import load_eval_set, load_train_set
    from clip2video.dataloaders.dataset import PairDataset, VideoDataset
    from clip2video.modules.network.tokenizer import ClipTokenizer
    from clip2video.modules.training.loop import ValData

    tokenizer = ClipTokenizer(args.max_words)
    pairs = load_train_set(args.datatype, data_path=args.data_path, features_path=args.features_path,
                           train_csv=args.train_csv, split=args.train_split, skip_missing=args.skip_missing)
    train_set = PairDataset(pairs.pairs, args.features_path, tokenizer, max_frames=args.max_frames,
                            framerate=args.feature_framerate, image_size=image_size, mode=args.image_mode,
                            seed=args.seed, jitter=True, video_fps=args.video_fps)
    val = None
    if args.val_csv or args.val_split:
        rset = load_eval_set(args.val_datatype or args.datatype, data_path=args.data_path,
                             features_path=args.features_path, val_csv=args.val_csv,
                             split=args.val_split or "val", skip_missing=args.skip_missing)
        videos = VideoDataset(rset.video_ids, args.features_path, max_frames=args.max_frames,
                              framerate=args.feature_framerate, image_size=image_size, mode=args.image_mode,
                              video_fps=args.video_fps)
        val = ValData(rset, videos, tokenizer, batch_size_val=args.batch_size_val,
                      num_workers=args.num_thread_reader)
    return train_set, val


def train_config(args: argparse.Namespace):
    from clip2video.modules.training.loop import TrainConfig
    from clip2video.modules.training.optim import OptimConfig

    return TrainConfig(
        output_dir=Path(args.output_dir), batch_size=args.batch_size, epochs=args.epochs,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_steps=args.max_steps,
        precision=args.precision, grad_checkpointing=args.grad_checkpointing,
        freeze_layer_num=args.freeze_layer_num, seed=args.seed, num_workers=args.num_thread_reader,
        eval_every=args.eval_every, save_every_steps=args.save_every_steps, log_every=args.log_every,
        select_metric=args.select_metric, export=not args.no_export, progress=not args.no_progress,
        gather_grad=args.gather_grad,
        optim=OptimConfig(lr=args.lr, coef_lr=args.coef_lr, weight_decay=args.weight_decay,
                          warmup_proportion=args.warmup_proportion, max_grad_norm=args.max_grad_norm,
                          recipe=args.recipe, schedule=args.schedule or "warmup_cosine"),
    )


def write_args(args: argparse.Namespace, out: Path) -> None:
    """``args.yaml`` + ``args.json`` next to the outputs (atomically)."""
    from clip2video.fileio import atomic_write_text

    data = {k: v for k, v in sorted(vars(args).items())}
    atomic_write_text(out / "args.yaml", yaml.safe_dump(data, sort_keys=True))
    atomic_write_text(out / "args.json", json.dumps(data, indent=1))


# ----------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> int:
    from clip2video.modules.runtime.distributed import cleanup_distributed, init_distributed
    from clip2video.modules.runtime.logging_utils import setup_logging
    from clip2video.modules.training.loop import seed_everything, train

    info = init_distributed(args.device)
    out = Path(args.output_dir)
    try:
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
        setup_logging(out / "log.txt", info.is_main)
        if info.is_main:
            write_args(args, out)
        seed_everything(args.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
        model = build_model(args)
        train_set, val = build_data(args, model.config.clip.image_size)
        logger.info("backbone: %s", model.config.clip.describe())
        logger.info("model %s (mask layout %s), %d training pairs, validation: %s", model.config.variant,
                    model.config.mask_layout, len(train_set),
                    f"{len(val.rset.captions)} captions" if val else "none (no best.pt)")
        result = train(model, train_set, train_config(args), info=info, val=val, resume=args.resume,
                       run_config=json.loads(json.dumps(vars(args))))
        if info.is_main:
            logger.info("done: step %d, best %s %.2f", result.state.step, args.select_metric,
                        result.state.best_metric if math.isfinite(result.state.best_metric) else float("nan"))
        return 0
    finally:
        cleanup_distributed()


def main(argv: list[str] | None = None) -> int:
    from clip2video.modules.training.loop import NonFiniteLossError

    return run_main("train.py", lambda: run(parse_args(argv)), codes=[(NonFiniteLossError, 3)])


if __name__ == "__main__":
    sys.exit(main())
