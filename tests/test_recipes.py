"""The two training recipes: the clip4clip step against a hand-derived BertAdam, its schedules and decay groups,
exact resume, and train.py --recipe clip4clip end to end (CPU, tiny models)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from test_training import ColourPairs, losses_of, make_generic_data, micro_cfg, micro_model, train_argv
from torch import nn

from clip2video.modules.runtime.distributed import DistInfo
from clip2video.modules.runtime.logging_utils import MetricLog, read_log
from clip2video.modules.training import loop
from clip2video.modules.training.loop import TrainConfig, TrainState, train
from clip2video.modules.training.optim import (
    SCHEDULES,
    BertAdam,
    OptimConfig,
    build_recipe,
    clip4clip_param_groups,
    param_groups,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- schedules
def test_schedules_at_their_boundaries():
    w = 0.1
    for name, f in SCHEDULES.items():
        assert f(0.0, w) == 0.0, name  # the first update (step 0) has learning rate 0
        assert f(w / 2, w) == pytest.approx(0.5), name
        assert f(w * (1 - 1e-9), w) == pytest.approx(1.0, abs=1e-8), name  # the warm-up reaches 1 at x = w
    cos = SCHEDULES["warmup_cosine"]
    assert cos(w, w) == pytest.approx(0.5 * (1 + math.cos(math.pi * w)))  # 0.976: the cosine is over the whole run
    assert cos(w, w) == pytest.approx(0.97553, abs=1e-5)
    assert cos(0.2, w) == pytest.approx(0.90451, abs=1e-5)
    assert cos(0.5, w) == pytest.approx(0.5)
    assert cos(1.0, w) == pytest.approx(0.0, abs=1e-15)
    lin = SCHEDULES["warmup_linear"]
    assert lin(w, w) == 1.0
    assert lin(0.55, w) == pytest.approx(0.5)
    assert lin(1.0, w) == 0.0 and lin(1.3, w) == 0.0  # clamped at 0 at and after the end
    const = SCHEDULES["warmup_constant"]
    assert const(w, w) == 1.0 and const(1.0, w) == 1.0
    # no warm-up: the schedule starts at its post-warm-up value
    assert cos(0.0, 0.0) == 1.0 and lin(0.0, 0.0) == 1.0 and const(0.0, 0.0) == 1.0


# ----------------------------------------------------------------------------------------------- decay groups
class Tiny(nn.Module):
    """Parameters named like CLIP2Video's (``clip.*`` and heads), incl. BERT-style and CLIP-style LayerNorms."""

    def __init__(self):
        super().__init__()
        self.clip = nn.Module()
        self.clip.proj = nn.Linear(3, 2)  # clip.proj.weight: decay; clip.proj.bias: no decay
        self.clip.ln_final = nn.LayerNorm(2)  # CLIP's name: its weight IS decayed under clip4clip
        self.clip.logit_scale = nn.Parameter(torch.tensor(1.0))  # decayed under clip4clip
        self.head = nn.Linear(2, 2)
        self.LayerNorm = nn.LayerNorm(2)  # BERT's name: never decayed
        torch.manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn_like(p))
            self.clip.logit_scale.fill_(1.0)


def test_clip4clip_groups_by_name():
    groups = {n: g for g in clip4clip_param_groups(Tiny(), OptimConfig(lr=0.1, coef_lr=0.5)) for n in
              g["param_names"]}
    decayed = {n for n, g in groups.items() if g["weight_decay"] == 0.2}
    assert decayed == {"clip.proj.weight", "clip.ln_final.weight", "clip.logit_scale", "head.weight"}
    assert {n for n, g in groups.items() if g["lr"] == pytest.approx(0.05)} == {
        "clip.proj.weight", "clip.proj.bias", "clip.ln_final.weight", "clip.ln_final.bias", "clip.logit_scale"}

    model = micro_model("tab_tdb")
    ours = {n: g for g in param_groups(model, OptimConfig()) for n in g["param_names"]}
    c4c = {n: g for g in clip4clip_param_groups(model, OptimConfig()) for n in g["param_names"]}
    assert set(ours) == set(c4c)  # the same trainable parameters, grouped differently
    for n in ("clip.ln_final.weight", "clip.logit_scale", "clip.positional_embedding", "clip.visual.class_embedding",
              "weight_center", "emb_center", "frame_position_embeddings.weight", "trans_layernorm.weight",
              "transformerClip.resblocks.0.ln_1.weight"):
        assert ours[n]["weight_decay"] == 0.0 and c4c[n]["weight_decay"] == 0.2, n
    for n in ("clip.transformer.resblocks.0.attn.in_proj_bias", "trans_layernorm.bias", "clip.visual.ln_post.bias"):
        assert c4c[n]["weight_decay"] == 0.0, n
    # "clip." is matched anywhere in the name, case-sensitively: transformerClip/actionClip are heads
    assert c4c["transformerClip.resblocks.0.attn.in_proj_weight"]["name"] == "heads_decay"
    assert c4c["clip.visual.proj"]["name"] == "clip_decay"
    # no parameter decayed by ours escapes decay under clip4clip
    assert not [n for n in ours if ours[n]["weight_decay"] > 0 and c4c[n]["weight_decay"] == 0]


# ----------------------------------------------------------------------------------------------- the step
def hand_bertadam(params: dict[str, list[float]], grads: list[dict[str, list[float]]], lr: dict[str, float],
                  wd: dict[str, float], t_total: int, warmup: float, global_clip: bool,
                  max_norm: float = 1.0, b1: float = 0.9, b2: float = 0.98, e: float = 1e-6) -> dict[str, list[float]]:
    """BertAdam written out element by element from its formulas (python floats, no torch)."""
    p = {n: list(v) for n, v in params.items()}
    m = {n: [0.0] * len(v) for n, v in params.items()}
    v2 = {n: [0.0] * len(v) for n, v in params.items()}
    for step, g_step in enumerate(grads):
        g = {n: list(x) for n, x in g_step.items()}
        if global_clip:  # the training loop's clip_grad_norm_ over all parameters
            total = math.sqrt(sum(x * x for xs in g.values() for x in xs))
            c = min(1.0, max_norm / (total + 1e-6))
            g = {n: [x * c for x in xs] for n, xs in g.items()}
        x = step / t_total
        factor = x / warmup if x < warmup else 0.5 * (1.0 + math.cos(math.pi * x))
        for n in p:
            norm = math.sqrt(sum(x * x for x in g[n]))
            c = min(1.0, max_norm / (norm + 1e-6))  # BertAdam's own per-parameter clip
            for i in range(len(p[n])):
                gi = g[n][i] * c
                m[n][i] = b1 * m[n][i] + (1 - b1) * gi
                v2[n][i] = b2 * v2[n][i] + (1 - b2) * gi * gi
                u = m[n][i] / (math.sqrt(v2[n][i]) + e) + wd[n] * p[n][i]
                p[n][i] -= lr[n] * factor * u
    return p


def _grads(model: nn.Module, steps: int, scale: float) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{n: scale * (1 + s) * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
            for s in range(steps)]


@pytest.mark.parametrize("through_loop", [False, True])
def test_bertadam_equals_the_hand_derived_step(tmp_path, through_loop):
    """Six updates of t_total = 8 with warm-up 0.25: lr 0 at the first, the warm-up boundary at the third
    (x = w exactly), then the cosine. Gradients large enough that the per-parameter clip acts (standalone) or
    the global clip does (through the loop's optimizer_step, after which no single norm can exceed 1)."""
    model = Tiny().double()
    cfg = OptimConfig(lr=0.1, coef_lr=0.5, warmup_proportion=0.25, recipe="clip4clip")
    optimizer, scheduler = build_recipe(model, cfg, total_steps=8)
    assert isinstance(optimizer, BertAdam) and scheduler is None
    grads = _grads(model, 6, scale=0.7)
    per_param_norms = [float(g.norm()) for step in grads for g in step.values()]
    assert max(per_param_norms) > 1.0 and min(per_param_norms) < 1.0  # both sides of the clip
    names = dict(model.named_parameters())
    groups = {n: g for g in optimizer.param_groups for n in g["param_names"]}
    want = hand_bertadam({n: p.detach().flatten().tolist() for n, p in names.items()},
                         [{n: g.flatten().tolist() for n, g in step.items()} for step in grads],
                         {n: groups[n]["lr"] for n in names}, {n: groups[n]["weight_decay"] for n in names},
                         t_total=8, warmup=0.25, global_clip=through_loop)
    start = {n: p.detach().clone() for n, p in names.items()}
    run = loop._Run(model, optimizer, None, None, TrainState(), TrainConfig(output_dir=tmp_path, optim=cfg),
                    DistInfo(), MetricLog(None), {})
    factors = []
    for s, step in enumerate(grads):
        for n, p in names.items():
            p.grad = step[n].clone()
        if through_loop:
            factors.append(loop.optimizer_step(run, 0)["lr"] / cfg.lr)
        else:
            factors.append(optimizer.next_factor())
            optimizer.step()
        if s == 0:  # lr 0: nothing moves at the first update, decay included
            assert all(torch.equal(p, start[n]) for n, p in names.items())
    assert factors == pytest.approx([0.0, 0.5, 0.5 * (1 + math.cos(math.pi / 4)), 0.5 * (1 + math.cos(3 * math.pi / 8)),
                                     0.5, 0.5 * (1 + math.cos(5 * math.pi / 8))])
    for n, p in names.items():
        got = p.detach().flatten().tolist()
        assert got == pytest.approx(want[n], rel=1e-12, abs=1e-14), n
        assert not torch.equal(p, start[n]), n  # every parameter moved
    assert optimizer.steps_done() == 6


def test_bertadam_state_dict_resumes_the_schedule():
    model_a, model_b = Tiny().double(), Tiny().double()
    cfg = OptimConfig(lr=0.1, coef_lr=0.5, warmup_proportion=0.25, recipe="clip4clip")
    opt_a, _ = build_recipe(model_a, cfg, total_steps=8)
    grads = _grads(model_a, 6, scale=0.3)
    for step in grads[:3]:
        for n, p in model_a.named_parameters():
            p.grad = step[n].clone()
        opt_a.step()
    # a fresh optimiser on a copy of the weights, loaded from the state dict, continues exactly
    model_b.load_state_dict(model_a.state_dict())
    opt_b, _ = build_recipe(model_b, cfg, total_steps=8)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.steps_done() == 3 and opt_b.next_factor() == opt_a.next_factor()
    for step in grads[3:]:
        for m, opt in ((model_a, opt_a), (model_b, opt_b)):
            for n, p in m.named_parameters():
                p.grad = step[n].clone()
            opt.step()
    for (n, pa), pb in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb), n


# ----------------------------------------------------------------------------------------------- the loop
def c4c_cfg(out: Path, **kw) -> TrainConfig:
    return micro_cfg(out, optim=OptimConfig(lr=2e-3, coef_lr=0.5, warmup_proportion=0.2, recipe="clip4clip"), **kw)


class StopAt(ColourPairs):
    """Raises when sample ``stop`` is read: with shuffle off, the run stops at the start of a known step."""

    def __init__(self, n: int, stop: int):
        super().__init__(n)
        self.stop = stop

    def __getitem__(self, i: int) -> dict:
        if i == self.stop:
            raise KeyboardInterrupt
        return super().__getitem__(i)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_resume_after_k_steps_equals_an_uninterrupted_run(tmp_path, precision):
    """48 pairs, batch 8: 6 steps per epoch, 2 epochs; cut after step 4 and resumed from latest.pt."""
    kw = dict(epochs=2, save_every_steps=1, precision=precision)
    ref_model = micro_model("tab_tdb", mask_layout="original")
    ref = train(ref_model, ColourPairs(48), c4c_cfg(tmp_path / "ref", **kw), shuffle=False)
    with pytest.raises(KeyboardInterrupt):
        train(micro_model("tab_tdb", mask_layout="original"), StopAt(48, stop=32), c4c_cfg(tmp_path / "cut", **kw),
              shuffle=False)
    ck = torch.load(tmp_path / "cut" / "latest.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == 4 and ck["recipe"] == "clip4clip" and ck["scheduler"] is None
    assert all(s["step"] == 4 for s in ck["optimizer"]["state"].values())
    model = micro_model("tab_tdb", mask_layout="original", seed=7)  # weights come from the checkpoint
    res = train(model, ColourPairs(48), c4c_cfg(tmp_path / "cut", **kw), shuffle=False, resume="latest")
    assert res.state.step == ref.state.step == 12
    assert res.losses == ref.losses[4:]
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    a = torch.load(tmp_path / "ref" / "latest.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "cut" / "latest.pt", map_location="cpu", weights_only=False)
    for i, s in a["optimizer"]["state"].items():
        for key in ("next_m", "next_v"):
            assert torch.equal(s[key], b["optimizer"]["state"][i][key]), (i, key)
    assert (a["scaler"] is None) == (precision != "fp16")
    assert losses_of(tmp_path / "ref") == losses_of(tmp_path / "cut")


def test_first_clip4clip_step_has_lr_zero_and_resume_refuses_another_recipe(tmp_path):
    model = micro_model("tab_tdb")
    init = copy.deepcopy(model.state_dict())
    train(model, ColourPairs(16), c4c_cfg(tmp_path, max_steps=1, save_every_steps=1), shuffle=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, init[k]), k  # lr_t = lr · schedule(0) = 0
    rec = [r for r in read_log(tmp_path / "log.jsonl") if "loss" in r]
    assert rec[0]["lr"] == 0.0 and rec[0]["lr_clip"] == 0.0
    with pytest.raises(ValueError, match="trained with --recipe clip4clip, this one asks for --recipe clip2video"):
        train(micro_model("tab_tdb"), ColourPairs(16), micro_cfg(tmp_path, max_steps=2), resume="latest")


# ----------------------------------------------------------------------------------------------- train.py
@pytest.mark.slow
def test_train_py_clip4clip_end_to_end_with_resume(tmp_path, monkeypatch):
    """train.py --recipe clip4clip: a run cut after step 2 and continued with --resume latest ends with the
    weights, optimiser state and log of an uninterrupted run; the export records the original mask layout."""
    from clip2video.cli.train import main

    csv, feats = make_generic_data(tmp_path)
    extra = ("--recipe", "clip4clip", "--schedule", "warmup_linear", "--save_every_steps", "1", "--eval_every", "0")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert main(train_argv(csv, feats, ref, *extra)) == 0

    real_step = loop.optimizer_step

    def interrupted(run, epoch):
        if run.state.step == 2:
            raise KeyboardInterrupt
        return real_step(run, epoch)

    monkeypatch.setattr(loop, "optimizer_step", interrupted)
    assert main(train_argv(csv, feats, cut, *extra)) == 130
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    assert torch.load(cut / "latest.pt", map_location="cpu", weights_only=False)["step"] == 2
    assert main(train_argv(csv, feats, cut, *extra, "--resume", "latest")) == 0

    a = torch.load(ref / "latest.pt", map_location="cpu", weights_only=False)
    b = torch.load(cut / "latest.pt", map_location="cpu", weights_only=False)
    assert a["step"] == b["step"] == 6 and a["recipe"] == b["recipe"] == "clip4clip"
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["param_groups"][0]["schedule"] == "warmup_linear"
    assert losses_of(ref) == losses_of(cut)
    lrs = [r["lr"] for r in read_log(ref / "log.jsonl") if "loss" in r]
    # 6 steps, warm-up 0.1: x = s/6 ≥ w from step 1, linear decay to 0 at x = 1
    assert lrs == pytest.approx([0.0] + [1e-3 * (s / 6 - 1) / (0.1 - 1) for s in range(1, 6)])
    assert a["config"]["model"]["mask_layout"] == "original"
    sidecar = json.loads((ref / "pytorch_model.bin.1.config.json").read_text())
    assert sidecar["mask_layout"] == "original"
    args = json.loads((ref / "args.json").read_text())
    assert (args["recipe"], args["schedule"], args["gather_grad"]) == ("clip4clip", "warmup_linear", "exact")


def test_recipe_flags(tmp_path, capsys):
    from clip2video.cli.train import main, parse_args

    feats = tmp_path / "frames"
    feats.mkdir()
    base = ["--tiny_clip", "--features_path", str(feats), "--output_dir", str(tmp_path / "o")]
    a = parse_args(base)
    assert (a.recipe, a.schedule, a.gather_grad) == ("clip2video", None, "exact")
    assert main([*base, "--schedule", "warmup_linear"]) == 2
    assert "--schedule warmup_linear exists only with --recipe clip4clip" in capsys.readouterr().err
    assert main([*base, "--gather_grad", "all"]) == 2
    assert "--gather_grad" in capsys.readouterr().err
