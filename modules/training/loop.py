"""The training loop of CLIP2Video as plain functions: data order, steps, checkpoints, resume, export.

Structure after open_clip's ``train_one_epoch`` and nanoGPT's loop (ideas only, no code copied): no Trainer
class, one ``train`` function that owns the loop and a few helpers that tests call directly.

What a step does (one optimiser step = ``gradient_accumulation_steps`` micro-batches):

1. each rank encodes its micro-batch (autocast bf16/fp16 when asked);
2. ``modules.loss.global_batch_loss`` gathers the embeddings of all ranks and computes CLIP2Video's loss on
   the global micro-batch, with a gather whose backward makes N processes × b samples give exactly the
   gradient of one process × N·b samples;
3. backward (DDP all-reduces gradients on the last micro-batch only: ``no_sync`` before);
4. clip the gradient norm (1.0), optimiser step (AdamW + scheduler under the ``clip2video`` recipe, BertAdam
   with its own schedule under ``clip4clip``: modules/training/optim.py), clamp the logit scale to ≤ ln 100.

Gradient accumulation and a contrastive loss. Accumulating k micro-batches of size m is NOT the same as one
batch of k·m: each micro-batch's similarity matrix only holds its own m captions and videos, so every sample
sees m−1 negatives instead of k·m−1, and the softmax normaliser differs. Accumulation reproduces the
*number of samples per update* (and so the schedule), not the contrastive task. Prefer more processes (the
gather makes them exact) or gradient checkpointing to fit a large batch; use accumulation only when
neither is possible and report it.

Data order is a function of (seed, epoch) only (``GlobalBatchSampler``), and checkpoints store how many
micro-batches of the current epoch were consumed; ``--resume`` re-creates the epoch's order and skips them,
so a run killed at any step and resumed ends with the same weights and the same log as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from clip2video.modules.runtime.distributed import DistInfo, barrier, broadcast_object
from clip2video.modules.runtime.logging_utils import MetricLog
from clip2video.modules.runtime.precision import autocast, check_precision
from clip2video.modules.weights.checkpoint import atomic_save

from .loss import GATHER_GRADS, global_batch_loss
from .optim import OptimConfig, build_recipe, clamp_logit_scale, freeze_clip_layers, next_lr_factor

logger = logging.getLogger(__name__)



class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN/inf; the message names the step."""


@dataclass
class TrainConfig:
    """Everything the loop needs, typed (train.py builds it from the flags; modules never see argparse).

    Attributes:
        output_dir: checkpoints, exports and logs go here (rank 0 only).
        batch_size: GLOBAL batch per optimiser step, over all processes and accumulation steps.
        epochs: passes over the training pairs.
        gradient_accumulation_steps: micro-batches per optimiser step (see the module docstring).
        max_steps: stop after this many optimiser steps (0 = no cap); the schedule spans the capped length.
        precision: fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler).
        grad_checkpointing: recompute the CLIP towers in backward.
        freeze_layer_num: CLIP4Clip's freezing (−1 none, k ≥ 0 embeddings + first k blocks).
        seed: seeds parameters' random init (by the caller), data order and the RNGs.
        num_workers: DataLoader workers per process.
        eval_every: validate every this many epochs (0 = never); also at the end of training.
        save_every_steps: also write ``latest.pt`` every this many optimiser steps (0 = epoch ends only).
        log_every: write a JSONL record every this many optimiser steps.
        select_metric: validation metric that picks ``best.pt`` (``t2v_R1``, ``v2t_R1``, ``rsum``).
        export: write ``pytorch_model.bin.{epoch}`` (the release format) after every epoch.
        progress: tqdm bar on rank 0.
        gather_grad: ``exact`` (the loss's gather gives the single-process gradient of the global batch) or
            ``local`` (CLIP4Clip's gather: each rank keeps its own slice; modules/training/loss.py).
        optim: optimiser / schedule settings, the recipe included.
    """

    output_dir: Path
    batch_size: int = 128
    epochs: int = 5
    gradient_accumulation_steps: int = 1
    max_steps: int = 0
    precision: str = "fp32"
    grad_checkpointing: bool = False
    freeze_layer_num: int = 0
    seed: int = 42
    num_workers: int = 2
    eval_every: int = 1
    save_every_steps: int = 0
    log_every: int = 1
    select_metric: str = "t2v_R1"
    export: bool = True
    progress: bool = True
    gather_grad: str = "exact"
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        check_precision(self.precision)
        if self.batch_size < 1 or self.epochs < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("--batch_size, --epochs and --gradient_accumulation_steps must be >= 1")
        if self.select_metric not in ("t2v_R1", "v2t_R1", "rsum"):
            raise ValueError(f"select_metric must be t2v_R1, v2t_R1 or rsum, got {self.select_metric!r}")
        if self.gather_grad not in GATHER_GRADS:
            raise ValueError(f"gather_grad must be one of {', '.join(GATHER_GRADS)}, got {self.gather_grad!r}")


@dataclass
class TrainState:
    """Position of the run; stored in every checkpoint.

    Attributes:
        step: optimiser steps done.
        epoch: current epoch (0-based).
        batch_in_epoch: micro-batches of ``epoch`` already consumed (per process).
        best_metric: best validation value so far (−inf before the first validation).
        log_records: JSONL records written so far (the log is cut back to this on resume).
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float = -math.inf
    log_records: int = 0


@dataclass
class TrainResult:
    """What ``train`` returns: final state, per-step losses (rank-identical) and the last validation."""

    state: TrainState
    losses: list[float]
    metrics: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------- data order
class GlobalBatchSampler(Sampler[list[int]]):
    """Micro-batches of this rank, a function of (seed, epoch) only, sharded CONTIGUOUSLY.

    Each epoch draws one permutation; it is cut into global batches of ``global_batch`` samples (the last
    incomplete one is dropped so every rank takes the same number of steps), each global batch into
    ``accum`` micro-batches of ``world·micro`` samples, and rank r takes positions [r·micro, (r+1)·micro) of
    every micro-batch. Gathered in rank order (modules/training/loss.py), the N ranks therefore see exactly the batch a
    single process would, in the same order (a strided ``DistributedSampler`` would permute it).

    Args:
        n: dataset length.
        global_batch: samples per optimiser step over all ranks and micro-batches.
        rank, world_size: this process and the number of processes.
        accum: micro-batches per optimiser step.
        seed: data-order seed.
        shuffle: permute each epoch (False: dataset order, for tests and debugging).
    """

    def __init__(self, n: int, global_batch: int, *, rank: int = 0, world_size: int = 1, accum: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if global_batch % (world_size * accum):
            raise ValueError(
                f"--batch_size {global_batch} must be divisible by processes × --gradient_accumulation_steps "
                f"({world_size} × {accum})"
            )
        if n < global_batch:
            raise ValueError(
                f"the training set has {n} pairs, fewer than one global batch (--batch_size {global_batch})"
            )
        self.n, self.global_batch, self.rank, self.world, self.accum = n, global_batch, rank, world_size, accum
        self.micro = global_batch // (world_size * accum)
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first ``start`` micro-batches (resume)."""
        self.epoch, self.start = epoch, start

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch * self.accum - self.start)

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        perm = self.order()
        span = self.world * self.micro  # samples of one micro-batch over all ranks
        for m in range(self.start, self.steps_per_epoch * self.accum):
            base = m * span + self.rank * self.micro
            yield perm[base : base + self.micro]


# ---------------------------------------------------------------------------------------------- RNG + checkpoints
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dict(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                    state: TrainState, run_config: dict[str, Any], metric: dict[str, Any] | None,
                    recipe: str = "clip2video") -> dict[str, Any]:
    """One dict holding everything a resume needs (model in the release key layout). Under the ``clip4clip``
    recipe the schedule is part of the optimiser state (``scheduler`` is None)."""
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "recipe": recipe,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "state": asdict(state),
        "step": state.step,
        "epoch": state.epoch,
        "config": {"model": model.config.to_dict(), "args": run_config},
        "metric": metric,
    }


def save_checkpoint(path: Path, ckpt: dict[str, Any]) -> None:
    atomic_save(ckpt, path)
    logger.info("saved %s (step %d, epoch %d)", path, ckpt["step"], ckpt["epoch"])


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """``--resume latest`` → ``output_dir/latest.pt`` if it exists (else a fresh start); a path must exist."""
    if not resume:
        return None
    if resume == "latest":
        path = output_dir / "latest.pt"
        if not path.is_file():
            logger.warning("--resume latest: no %s yet, starting from scratch", path)
            return None
        return path
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file")
    return path


# ---------------------------------------------------------------------------------------------- validation
@dataclass
class ValData:
    """A validation split: a RetrievalSet-like object, a dataset of its videos and a tokenizer.

    Attributes:
        rset: has ``captions``, ``video_ids``, ``caption_video``, ``multi_caption``, ``video_batches(bs)``.
        videos: dataset whose items are ``{"frames", "mask", "index"}`` in ``rset.video_ids`` order.
        tokenizer: ``.batch(captions) -> (ids, mask)``.
        batch_size_val: evaluation batch (decides the head groups of the ``original`` mask layout).
        num_workers: DataLoader workers.
    """

    rset: Any
    videos: Dataset
    tokenizer: Any
    batch_size_val: int = 16
    num_workers: int = 0


def validate(model: nn.Module, val: ValData, *, device: torch.device, precision: str = "fp32") -> dict[str, Any]:
    """Retrieval metrics of ``model`` on ``val`` through the project's evaluation pipeline
    (``modules.evaluation.evaluate``: encode each caption and video once, score by matrix products).

    Returns:
        ``{"t2v": {R1, R5, R10, MdR, MnR}, "v2t": {...}}``.
    """
    from clip2video.modules.evaluation.engine import eval_loader, evaluate

    was_training = model.training
    loader = eval_loader(val.videos, val.num_workers)
    res = evaluate(model, val.rset, loader, tokenizer=val.tokenizer, batch_size_val=val.batch_size_val,
                   device=device, precision=precision)
    model.train(was_training)
    return res.metrics


def selection_value(metrics: dict[str, Any], name: str) -> float:
    if name == "rsum":
        return sum(float(metrics[d][k]) for d in ("t2v", "v2t") for k in ("R1", "R5", "R10"))
    direction, key = name.split("_")
    return float(metrics[direction][key])


# ---------------------------------------------------------------------------------------------- the loop
def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass
class _Run:
    """What the parts of the loop share: the model being trained, its optimiser state, the log."""

    raw: nn.Module  # the model itself (never the DDP wrapper): what is saved, exported and validated
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    state: TrainState
    cfg: TrainConfig
    info: DistInfo
    log: MetricLog
    run_config: dict[str, Any]

    def save(self, name: str, metric: dict[str, Any] | None = None) -> None:
        if self.info.is_main:
            save_checkpoint(self.cfg.output_dir / name, checkpoint_dict(self.raw, self.optimizer, self.scheduler,
                                                                        self.scaler, self.state, self.run_config,
                                                                        metric, self.cfg.optim.recipe))

    def write(self, rec: dict[str, Any], prefix: str = "train") -> None:
        if self.info.is_main:
            self.log.write(rec, prefix)
            self.state.log_records += 1


def optimizer_step(run: _Run, epoch: int) -> dict[str, float]:
    """One optimiser step on the accumulated gradients: unscale (fp16), clip the global norm, refuse a
    non-finite norm, step (BertAdam then also clips each parameter's own norm), advance the schedule, clamp the
    logit scale (both recipes: CLIP4Clip clamps too), count the step.

    Returns ``grad_norm`` and the learning rates this step used (``lr`` heads, ``lr_clip``) for the log.

    Raises:
        NonFiniteLossError: gradient norm NaN/inf (without a GradScaler, which skips such steps itself).
    """
    cfg, optimizer, scheduler, scaler, raw = run.cfg, run.optimizer, run.scheduler, run.scaler, run.raw
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in raw.parameters() if p.grad is not None]
    if cfg.optim.max_grad_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    if scaler is None and not math.isfinite(grad_norm):
        raise NonFiniteLossError(
            f"gradient norm is {grad_norm} at step {run.state.step + 1} (epoch {epoch}); stopping. The last "
            f"good checkpoint is {cfg.output_dir / 'latest.pt'} (not overwritten)"
        )
    factor = next_lr_factor(optimizer, scheduler)  # schedule value used by this step
    lr_heads, lr_clip = cfg.optim.lr * factor, cfg.optim.lr * cfg.optim.coef_lr * factor
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    clamp_logit_scale(raw)
    run.state.step += 1
    return {"grad_norm": grad_norm, "lr": lr_heads, "lr_clip": lr_clip}


def end_of_epoch(run: _Run, epoch: int, *, stop: bool, steps_per_epoch: int, val: ValData | None
                 ) -> dict[str, Any] | None:
    """Close epoch ``epoch`` (or the step budget within it): advance the epoch counter if the epoch is
    complete, export ``pytorch_model.bin.<epoch>``, validate when due (a better metric saves ``best.pt``),
    save ``latest.pt``. Returns the validation metrics (main process, when validated), else None.
    """
    cfg, info, state, raw = run.cfg, run.info, run.state, run.raw
    out = cfg.output_dir
    finished_epoch = not stop or state.batch_in_epoch >= steps_per_epoch * cfg.gradient_accumulation_steps
    if finished_epoch:
        state.epoch += 1
        state.batch_in_epoch = 0
    if info.is_main and cfg.export:
        from clip2video.modules.weights.release import export_original

        path = export_original(raw, out / f"pytorch_model.bin.{epoch}")
        logger.info("exported %s", path)
    metric = None
    do_eval = val is not None and ((cfg.eval_every and (epoch + 1) % cfg.eval_every == 0) or stop
                                   or state.epoch >= cfg.epochs)
    if do_eval:
        if info.is_main:
            metric = validate(raw, val, device=info.device, precision=cfg.precision)
            value = selection_value(metric, cfg.select_metric)
            logger.info("epoch %d validation: t2v %s | v2t %s", epoch, _fmt(metric["t2v"]), _fmt(metric["v2t"]))
            run.write({"step": state.step, "epoch": epoch, "val": metric, cfg.select_metric: value}, prefix="val")
            if value > state.best_metric:
                state.best_metric = value
                run.save("best.pt", metric)
        barrier(info)
        raw.train()
    run.save("latest.pt", metric)
    return metric


def train(
    model: nn.Module,
    train_dataset: Dataset,
    cfg: TrainConfig,
    *,
    info: DistInfo | None = None,
    val: ValData | None = None,
    resume: str | None = None,
    run_config: dict[str, Any] | None = None,
    shuffle: bool = True,
    collate_fn: Callable | None = None,
) -> TrainResult:
    """Train ``model`` (a CLIP2Video, not yet wrapped) on ``train_dataset`` and return the final state.

    Args:
        model: the model, on CPU or already on ``info.device``; seeded initialisation is the caller's job.
        train_dataset: items ``{"input_ids", "attention_mask", "frames", "frame_mask", ...}``; an optional
            ``set_epoch(epoch)`` makes its augmentation a function of the epoch.
        cfg: loop settings.
        info: this process's place in the job (``modules.distributed.init_distributed``).
        val: validation split (never the test split): picks ``best.pt``.
        resume: ``latest`` or a checkpoint path.
        run_config: resolved run arguments, stored in every checkpoint.
        shuffle: permute the data each epoch.
        collate_fn: DataLoader collate function (default: stack tensors).

    Raises:
        NonFiniteLossError: loss or gradient norm NaN/inf; ``latest.pt`` keeps the last good state.
    """
    info = info or DistInfo()
    device = info.device
    out = cfg.output_dir
    run_config = run_config or {}
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)

    raw = model.to(device)
    frozen = freeze_clip_layers(raw, cfg.freeze_layer_num)
    if frozen:
        logger.info("froze %d CLIP tensors (--freeze_layer_num %d)", len(frozen), cfg.freeze_layer_num)
    if cfg.grad_checkpointing:
        raw.set_grad_checkpointing(True)
    sampler = GlobalBatchSampler(len(train_dataset), cfg.batch_size, rank=info.rank, world_size=info.world_size,
                                 accum=cfg.gradient_accumulation_steps, seed=cfg.seed, shuffle=shuffle)
    total = sampler.steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    optimizer, scheduler = build_recipe(raw, cfg.optim, total)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    state = TrainState()

    log = MetricLog(out / "log.jsonl" if info.is_main else None, out / "tensorboard" if info.is_main else None)
    ckpt_path = resolve_resume(resume, out) if info.is_main else None
    ckpt_path = broadcast_object(None if ckpt_path is None else str(ckpt_path), info)
    if ckpt_path is not None:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        stored = ck.get("recipe", "clip2video")
        if stored != cfg.optim.recipe:
            raise ValueError(f"--resume {ckpt_path}: the run was trained with --recipe {stored}, this one asks for "
                             f"--recipe {cfg.optim.recipe} (their optimiser states do not convert)")
        raw.load_state_dict(ck["model"], strict=True)
        optimizer.load_state_dict(ck["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        state = TrainState(**ck["state"])
        set_rng_state(ck["rng"])
        if info.is_main:
            log.keep_first(state.log_records)
        logger.info("resumed from %s: step %d, epoch %d, micro-batch %d", ckpt_path, state.step, state.epoch,
                    state.batch_in_epoch)
    elif info.is_main and log.path is not None and log.path.exists():
        log.path.unlink()  # a fresh run starts a fresh log

    ddp = raw
    if info.is_distributed:
        ddp = nn.parallel.DistributedDataParallel(raw, device_ids=[device] if device.type == "cuda" else None)
    logger.info("training: %d pairs, global batch %d (%d per process × %d processes × %d accumulation), "
                "%d steps/epoch, %d steps total, precision %s", len(train_dataset), cfg.batch_size, sampler.micro,
                info.world_size, cfg.gradient_accumulation_steps, sampler.steps_per_epoch, total, cfg.precision)
    logger.info("recipe %s: %s, %d parameter groups, schedule %s, gather gradient %s, mask layout %s",
                cfg.optim.recipe, type(optimizer).__name__, len(optimizer.param_groups),
                cfg.optim.schedule if cfg.optim.recipe == "clip4clip" else "warm-up + cosine after it",
                cfg.gather_grad, getattr(getattr(raw, "config", None), "mask_layout", "?"))

    run = _Run(raw, optimizer, scheduler, scaler, state, cfg, info, log, run_config)

    losses: list[float] = []
    last_metrics: dict[str, Any] | None = None
    accum = cfg.gradient_accumulation_steps
    stop = bool(cfg.max_steps) and state.step >= cfg.max_steps
    raw.train()
    while state.epoch < cfg.epochs and not stop:
        epoch = state.epoch
        if hasattr(train_dataset, "set_epoch"):
            train_dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, state.batch_in_epoch)
        loader = DataLoader(train_dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                            pin_memory=device.type == "cuda", collate_fn=collate_fn,
                            generator=torch.Generator().manual_seed(cfg.seed + epoch),
                            persistent_workers=False)
        bar = None
        if cfg.progress and info.is_main:
            from tqdm import tqdm

            bar = tqdm(total=sampler.steps_per_epoch, initial=state.batch_in_epoch // accum, desc=f"epoch {epoch}",
                       dynamic_ncols=True)
        step_loss, step_terms, t0 = 0.0, {}, time.perf_counter()
        for batch in loader:
            micro_index = state.batch_in_epoch % accum
            last_micro = micro_index == accum - 1
            batch = _to(batch, device)
            sync = ddp.no_sync() if (info.is_distributed and not last_micro) else contextlib.nullcontext()
            with sync:
                with autocast(device, cfg.precision, training=True):
                    o = ddp(batch["input_ids"], batch["attention_mask"], batch["frames"], batch["frame_mask"])
                loss, terms = global_batch_loss(raw, o.text, o.video, o.logit_scale, cfg.gather_grad)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"loss is {value} at step {state.step + 1} (epoch {epoch}, micro-batch "
                        f"{state.batch_in_epoch}); stopping. The last good checkpoint is {out / 'latest.pt'} "
                        "(not overwritten)"
                    )
                scaled = loss / accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            step_loss += value / accum
            for k, v in terms.items():
                step_terms[k] = step_terms.get(k, 0.0) + float(v) / accum
            state.batch_in_epoch += 1
            if not last_micro:
                continue

            step = optimizer_step(run, epoch)
            losses.append(step_loss)
            if state.step % cfg.log_every == 0:
                dt = time.perf_counter() - t0
                rec = {"step": state.step, "epoch": epoch, "loss": step_loss, **step_terms,
                       "lr": step["lr"], "lr_clip": step["lr_clip"],
                       "logit_scale": float(raw.clip.logit_scale.detach().exp()), "grad_norm": step["grad_norm"],
                       "samples_per_s": cfg.batch_size / max(dt, 1e-9)}
                run.write(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}")
            step_loss, step_terms, t0 = 0.0, {}, time.perf_counter()
            if cfg.save_every_steps and state.step % cfg.save_every_steps == 0:
                run.save("latest.pt")
            if cfg.max_steps and state.step >= cfg.max_steps:
                stop = True
                break
        if bar is not None:
            bar.close()

        metric = end_of_epoch(run, epoch, stop=stop, steps_per_epoch=sampler.steps_per_epoch, val=val)
        if metric is not None:
            last_metrics = metric
    log.close()
    barrier(info)
    return TrainResult(state, losses, last_metrics)


def _fmt(m: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.1f}" for k, v in m.items())
