"""Optimiser, learning-rate schedule, freezing and the logit-scale clamp of CLIP2Video training.

Choices (and why):

* AdamW with CLIP's betas (0.9, 0.98) and eps 1e-6: the pre-trained weights were fitted with them and the
  smaller β2 keeps Adam stable for large contrastive batches (CLIP paper, open_clip defaults).
* Weight decay 0.2 on matrices only. No decay on biases, normalisation weights, embedding tables / tokens
  (token, positional, frame-position, type-position, class embedding, video proxies), TAB centres and the
  logit scale: decaying those pulls them towards 0, which has no regularising meaning for a lookup table or
  a temperature (open_clip's ``exclude`` rule, extended by name to the CLIP2Video heads).
* Two learning rates: CLIP (``clip.*``) at ``lr·coef_lr`` (1e-7 in the paper) so fine-tuning does not wash out
  the pre-training; the new heads at ``lr`` (CLIP4Clip's ``coef_lr``).
* Linear warm-up over ``warmup_proportion`` of the optimiser steps, then cosine to 0, stepped once per
  optimiser step (not per micro-batch).
* ``freeze_layer_num k`` (CLIP4Clip semantics): k ≥ 0 freezes CLIP's embeddings (token/positional tables,
  patch convolution, class embedding, ``ln_pre``) and blocks 0..k−1 of both towers; the final LayerNorms,
  projections and the logit scale always train; −1 freezes nothing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

LOGIT_SCALE_MAX = math.log(100.0)

# Parameter names (last components) that hold tables, tokens, centres or the temperature: never decayed.
NO_DECAY_NAMES = (
    "token_embedding",
    "positional_embedding",
    "frame_position_embeddings",
    "type_position_embeddings",
    "class_embedding",
    "weight_center",
    "emb_center",
    "logit_scale",
    "added_cls",
    "temporal_embedding",
)
# CLIP parameters that stay trainable whatever freeze_layer_num says (CLIP4Clip).
ALWAYS_TRAINABLE = ("ln_final.", "text_projection", "logit_scale", "visual.ln_post.", "visual.proj")
_BLOCK = re.compile(r"^(?:visual\.)?transformer\.resblocks\.(\d+)\.")


@dataclass
class OptimConfig:
    """Optimiser and schedule settings (typed; built by train.py from its flags).

    Attributes:
        lr: learning rate of the new heads.
        coef_lr: CLIP's learning rate is ``lr * coef_lr``.
        weight_decay: decoupled weight decay of the decayed groups.
        betas, eps: AdamW moments.
        warmup_proportion: fraction of all optimiser steps spent in linear warm-up.
        max_grad_norm: gradient clipping threshold (≤ 0 disables).
    """

    lr: float = 1e-4
    coef_lr: float = 1e-3
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_proportion: float = 0.1
    max_grad_norm: float = 1.0


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """True for parameters that must not be weight-decayed (see module docstring)."""
    if param.ndim < 2:  # biases, LayerNorm weights, class embedding, logit scale
        return True
    parts = name.split(".")
    return any(p in NO_DECAY_NAMES for p in parts)


def is_clip_param(name: str) -> bool:
    """Pre-trained CLIP weights (lr·coef_lr), as opposed to the new heads (lr)."""
    return name.startswith("clip.")


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Four AdamW groups: {CLIP, heads} × {decay, no decay}; frozen parameters are left out.

    Each group carries a ``name`` (for logs and tests) and its own ``lr`` so the schedule scales both rates.
    """
    groups: dict[tuple[bool, bool], list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((is_clip_param(name), is_no_decay(name, p)), []).append((name, p))
    out = []
    for (clip, no_decay), items in sorted(groups.items()):
        out.append({
            "name": f"{'clip' if clip else 'heads'}_{'no_decay' if no_decay else 'decay'}",
            "params": [p for _, p in items],
            "param_names": [n for n, _ in items],
            "lr": cfg.lr * cfg.coef_lr if clip else cfg.lr,
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
        })
    return out


def _fused_supported(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW kernel: floating-point parameters all on CPU or all on one CUDA device type."""
    kinds = {p.device.type for p in params}
    return len(kinds) == 1 and kinds <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` (the ``param_names`` key is kept for inspection; AdamW ignores it).

    Uses torch's fused AdamW kernel where it exists (CPU and CUDA): one pass over each parameter instead of
    the ~10 ``_foreach`` passes of the default implementation and no parameter-sized temporaries, which
    matters at the 151 M parameters of ViT-B/32 CLIP2Video (the step time is in benchmarks/README.md); the
    update is the same AdamW formula (agreement with ``foreach`` within fp32 rounding, tests/test_optim.py).
    Build the optimiser after moving the model to its device.
    """
    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("no trainable parameters (is --freeze_layer_num freezing everything?)")
    params = [p for g in groups for p in g["params"]]
    fused = _fused_supported(params) or None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier at optimiser step ``step`` (0-based): linear 0→1 over the warm-up, cosine 1→0 after.

    The multiplier of step 0 is 1/warmup (not 0) so that the first update already moves the weights.
    """
    if total_steps <= 0:
        return 1.0
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_proportion: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimiser-step warm-up + cosine schedule applied to every group's own base lr."""
    warmup = int(round(warmup_proportion * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total_steps, warmup))


def freeze_clip_layers(model: nn.Module, freeze_layer_num: int) -> list[str]:
    """Freeze CLIP's embeddings and its first ``freeze_layer_num`` blocks in both towers (CLIP4Clip rule).

    Args:
        model: a CLIP2Video (parameters named ``clip.*``).
        freeze_layer_num: −1 freezes nothing; k ≥ 0 freezes the embeddings and blocks 0..k−1.

    Returns:
        names of the parameters that were frozen.
    """
    if freeze_layer_num < -1:
        raise ValueError(f"--freeze_layer_num must be >= -1, got {freeze_layer_num}")
    if freeze_layer_num == -1:
        return []
    frozen = []
    for name, p in model.named_parameters():
        if not name.startswith("clip."):
            continue
        sub = name[len("clip."):]
        if sub.startswith(ALWAYS_TRAINABLE):
            continue
        m = _BLOCK.match(sub)
        if m is not None and int(m.group(1)) >= freeze_layer_num:
            continue
        p.requires_grad_(False)
        frozen.append(name)
    return frozen


@torch.no_grad()
def clamp_logit_scale(model: nn.Module, max_value: float = LOGIT_SCALE_MAX) -> None:
    """Keep the learned temperature at most ×100 (CLIP's clamp), after every optimiser step."""
    model.clip.logit_scale.clamp_(max=max_value)
