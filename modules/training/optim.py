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

Two recipes (``OptimConfig.recipe``, ``train.py --recipe``):

* ``clip2video`` (the default): the choices above — AdamW with bias correction, decay on matrices only, the
  cosine over the steps after the warm-up, warm-up starting at 1/W so the first update moves the weights.
* ``clip4clip``: the training step CLIP2Video's own training descends from (CLIP4Clip's ``BertAdam`` and its
  ``prep_optimizer`` grouping), written here from the published formulas (:class:`BertAdam`,
  :func:`clip4clip_param_groups`, :data:`SCHEDULES`), to reproduce the paper's recipe step for step. What
  differs is listed in ``docs/reproducing.md``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

LOGIT_SCALE_MAX = math.log(100.0)

#: Training recipes: ``clip2video`` (this project's AdamW step) and ``clip4clip`` (BertAdam, as CLIP4Clip).
RECIPES = ("clip2video", "clip4clip")

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
        recipe: ``clip2video`` (AdamW, :func:`param_groups`, :func:`warmup_cosine`) or ``clip4clip``
            (:class:`BertAdam`, :func:`clip4clip_param_groups`, one of :data:`SCHEDULES`).
        schedule: the clip4clip recipe's schedule (a key of :data:`SCHEDULES`).
    """

    lr: float = 1e-4
    coef_lr: float = 1e-3
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_proportion: float = 0.1
    max_grad_norm: float = 1.0
    recipe: str = "clip2video"
    schedule: str = "warmup_cosine"

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.recipe == "clip2video" and self.schedule != "warmup_cosine":
            raise ValueError(f"schedule {self.schedule!r} exists only in the clip4clip recipe (its schedules are "
                             "functions of the whole run's progress)")


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
    order = ((False, False), (False, True), (True, False), (True, True))  # (clip, no decay)
    return _grouped(model, cfg, lambda name, p: (is_clip_param(name), is_no_decay(name, p)), order)


def _grouped(model: nn.Module, cfg: OptimConfig, kind: Callable[[str, nn.Parameter], tuple[bool, bool]],
             order: Sequence[tuple[bool, bool]]) -> list[dict]:
    """The trainable parameters split by ``kind(name, p) → (clip, no decay)`` into groups in ``order`` (empty
    ones left out): the recipes differ only in that rule and in the order of their groups."""
    buckets: dict[tuple[bool, bool], list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets.setdefault(kind(name, p), []).append((name, p))
    return [{
        "name": f"{'clip' if clip else 'heads'}_{'no_decay' if no_decay else 'decay'}",
        "params": [p for _, p in items],
        "param_names": [n for n, _ in items],
        "lr": cfg.lr * cfg.coef_lr if clip else cfg.lr,
        "weight_decay": 0.0 if no_decay else cfg.weight_decay,
    } for clip, no_decay in order if (items := buckets.get((clip, no_decay)))]


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


# ---------------------------------------------------------------------------------------------- clip4clip recipe
def schedule_warmup_cosine(x: float, warmup: float) -> float:
    """CLIP4Clip's ``warmup_cosine``: ``x/w`` while ``x < w``, then ``0.5·(1 + cos(π·x))``.

    ``x`` is the progress ``step / t_total`` with the step counted from 0 (the first update has factor 0), and
    the cosine runs over the whole progress, not over the part after the warm-up: right after a 10 % warm-up
    it is already 0.976, not 1.
    """
    return x / warmup if x < warmup else 0.5 * (1.0 + math.cos(math.pi * x))


def schedule_warmup_linear(x: float, warmup: float) -> float:
    """CLIP4Clip's ``warmup_linear``: ``x/w`` while ``x < w``, then ``max((x − 1)/(w − 1), 0)`` (1 at ``x = w``,
    0 at the end of the run and after it)."""
    return x / warmup if x < warmup else max((x - 1.0) / (warmup - 1.0), 0.0)


def schedule_warmup_constant(x: float, warmup: float) -> float:
    """CLIP4Clip's ``warmup_constant``: ``x/w`` while ``x < w``, then 1."""
    return x / warmup if x < warmup else 1.0


#: The clip4clip recipe's schedules by CLIP4Clip's names: (progress x ∈ [0, 1], warm-up fraction w) → factor.
SCHEDULES = {
    "warmup_cosine": schedule_warmup_cosine,
    "warmup_linear": schedule_warmup_linear,
    "warmup_constant": schedule_warmup_constant,
}

#: CLIP4Clip's no-decay list, matched as substrings of parameter names. These are BERT's names: CLIP's
#: LayerNorms are called ``ln_*``, so they, the logit scale, the position tables and the TAB centres are
#: decayed under this recipe (reproduced on purpose).
CLIP4CLIP_NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")


def clip4clip_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """CLIP4Clip's ``prep_optimizer`` grouping, by names: ``clip.`` anywhere in the name → ``lr·coef_lr``; any
    of :data:`CLIP4CLIP_NO_DECAY` in the name → no weight decay. Groups in CLIP4Clip's order (decay CLIP,
    decay heads, no-decay CLIP, no-decay heads); frozen parameters are left out (BertAdam skips parameters
    without a gradient, which is the same). Each group carries ``name`` and ``param_names`` as
    :func:`param_groups` does.
    """
    order = ((True, False), (False, False), (True, True), (False, True))  # (clip, no decay)
    return _grouped(model, cfg, lambda name, p: ("clip." in name, any(nd in name for nd in CLIP4CLIP_NO_DECAY)),
                    order)


class BertAdam(torch.optim.Optimizer):
    """The optimiser of CLIP4Clip's training step (BERT's Adam variant), written from its published formulas.

    For each parameter p with gradient g (after the training loop's global-norm clip), at its update number
    s = 0, 1, 2, ...::

        g  ← g · min(1, max_grad_norm / (‖g‖ + 1e-6))        per-parameter clip (torch's clip_grad_norm_ rule)
        m  ← b1·m + (1 − b1)·g
        v  ← b2·v + (1 − b2)·g²
        u  ← m / (√v + e)                                    no bias correction
        u  ← u + weight_decay·p                              decay added after the normalisation (decoupled)
        p  ← p − lr_t·u,   lr_t = lr_group · schedule(s / t_total, warmup)

    The schedule lives in the optimiser (``t_total``, ``warmup``, ``schedule`` per group), as in CLIP4Clip, so
    there is no separate LR scheduler; ``t_total <= 0`` means a constant lr. The state (``step``, ``next_m``,
    ``next_v`` per parameter) is in :meth:`state_dict`, so a resumed run continues the schedule exactly.
    """

    def __init__(self, params, lr: float, *, warmup: float = -1.0, t_total: int = -1,
                 schedule: str = "warmup_cosine", b1: float = 0.9, b2: float = 0.98, e: float = 1e-6,
                 weight_decay: float = 0.0, max_grad_norm: float = 1.0):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if not (0.0 <= warmup < 1.0 or warmup == -1):
            raise ValueError(f"warmup must be in [0, 1) (or -1: none), got {warmup}")
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0) or e < 0:
            raise ValueError(f"need 0 <= b1, b2 < 1 and e >= 0, got {b1}, {b2}, {e}")
        defaults = dict(lr=lr, schedule=schedule, warmup=warmup, t_total=t_total, b1=b1, b2=b2, e=e,
                        weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)

    @staticmethod
    def factor(group: dict, step: int) -> float:
        """Schedule value of update number ``step`` (0-based) in ``group``."""
        if group["t_total"] <= 0:
            return 1.0
        return SCHEDULES[group["schedule"]](step / group["t_total"], group["warmup"])

    def steps_done(self) -> int:
        """Updates applied so far (every trainable parameter steps together; 0 before the first)."""
        return max((int(s["step"]) for s in self.state.values() if "step" in s), default=0)

    def next_factor(self) -> float:
        """Schedule value the next :meth:`step` uses (for logs)."""
        return self.factor(self.param_groups[0], self.steps_done())

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient (formulas in the class docstring). The per-parameter
        clip runs tensor by tensor; the moment and parameter updates run as ``torch._foreach_*`` passes over a
        group's tensors (the same element-wise arithmetic, a few passes instead of one small kernel per tensor
        and operation)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2, e, wd, clip = group["b1"], group["b2"], group["e"], group["weight_decay"], group["max_grad_norm"]
            params, grads, ms, vs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("BertAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["next_m"] = torch.zeros_like(p)
                    state["next_v"] = torch.zeros_like(p)
                if clip > 0:
                    norm = torch.linalg.vector_norm(grad)
                    grad = grad * torch.clamp(clip / (norm + 1e-6), max=1.0)
                params.append(p)
                grads.append(grad)
                ms.append(state["next_m"])
                vs.append(state["next_v"])
                steps.append(state["step"])
            if not params:
                continue
            torch._foreach_mul_(ms, b1)
            torch._foreach_add_(ms, grads, alpha=1.0 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, grads, grads, value=1.0 - b2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_add_(denom, e)
            updates = torch._foreach_div(ms, denom)  # m / (√v + e)
            del denom
            if wd > 0.0:
                torch._foreach_add_(updates, params, alpha=wd)
            lrs = [-group["lr"] * self.factor(group, s) for s in steps]
            if len(set(lrs)) == 1:  # every tensor of the group at the same update number (the normal case)
                torch._foreach_add_(params, updates, alpha=lrs[0])
            else:
                for p, u, lr in zip(params, updates, lrs, strict=True):
                    p.add_(u, alpha=lr)
            for p in params:
                self.state[p]["step"] += 1
        return loss


def build_recipe(model: nn.Module, cfg: OptimConfig, total_steps: int
                 ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR | None]:
    """(optimiser, LR scheduler or None) of ``cfg.recipe`` over a run of ``total_steps`` optimiser steps.

    ``clip2video``: fused AdamW + a per-step ``LambdaLR``. ``clip4clip``: :class:`BertAdam`, whose schedule is
    inside the optimiser (no scheduler). Build after moving the model to its device.
    """
    if cfg.recipe == "clip2video":
        optimizer = build_optimizer(model, cfg)
        return optimizer, build_scheduler(optimizer, total_steps, cfg.warmup_proportion)
    groups = clip4clip_param_groups(model, cfg)
    if not groups:
        raise ValueError("no trainable parameters (is --freeze_layer_num freezing everything?)")
    optimizer = BertAdam(groups, lr=cfg.lr, warmup=cfg.warmup_proportion, t_total=total_steps,
                         schedule=cfg.schedule, b1=cfg.betas[0], b2=cfg.betas[1], e=cfg.eps,
                         weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm)
    return optimizer, None


def next_lr_factor(optimizer: torch.optim.Optimizer, scheduler) -> float:
    """The schedule value (lr multiplier) the next optimiser step uses, under either recipe."""
    if scheduler is None:
        return optimizer.next_factor() if isinstance(optimizer, BertAdam) else 1.0
    return scheduler.get_last_lr()[0] / scheduler.base_lrs[0]


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
