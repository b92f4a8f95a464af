"""Optimiser groups, schedule, freezing and the logit-scale clamp."""

from __future__ import annotations

import math

import pytest
import torch

from clip2video.modules.training.optim import (
    LOGIT_SCALE_MAX,
    OptimConfig,
    build_optimizer,
    build_scheduler,
    clamp_logit_scale,
    freeze_clip_layers,
    param_groups,
    warmup_cosine,
)


@pytest.fixture(scope="module")
def model():
    from test_training import micro_model

    return micro_model("tab_tdb")


def _groups(model, **kw):
    return {g["name"]: g for g in param_groups(model, OptimConfig(lr=1e-4, coef_lr=1e-3, **kw))}


def test_param_groups_decay_and_learning_rates(model):
    groups = _groups(model)
    assert set(groups) == {"clip_decay", "clip_no_decay", "heads_decay", "heads_no_decay"}
    lrs = {n: g["lr"] for n, g in groups.items()}
    assert lrs["clip_decay"] == lrs["clip_no_decay"] == pytest.approx(1e-7)
    assert lrs["heads_decay"] == lrs["heads_no_decay"] == 1e-4
    assert groups["clip_decay"]["weight_decay"] == groups["heads_decay"]["weight_decay"] == 0.2
    assert groups["clip_no_decay"]["weight_decay"] == groups["heads_no_decay"]["weight_decay"] == 0.0
    where = {n: g for g in groups.values() for n in g["param_names"]}
    no_decay = [
        "clip.logit_scale", "clip.token_embedding.weight", "clip.positional_embedding",
        "clip.visual.class_embedding", "clip.visual.positional_embedding", "clip.ln_final.weight",
        "clip.visual.ln_pre.bias",
        "clip.transformer.resblocks.0.attn.in_proj_bias", "weight_center", "emb_center",
        "frame_position_embeddings.weight", "type_position_embeddings.weight", "trans_layernorm.weight",
        "transformerClip.resblocks.0.ln_1.weight", "transformerClip.resblocks.0.mlp.c_fc.bias",
    ]
    for n in no_decay:
        assert where[n]["weight_decay"] == 0.0, n
    decay = [
        "clip.visual.conv1.weight", "clip.text_projection", "clip.visual.proj",
        "clip.transformer.resblocks.0.attn.in_proj_weight", "clip.visual.transformer.resblocks.0.mlp.c_fc.weight",
        "transformerClip.resblocks.0.attn.in_proj_weight", "frame2t_attention.resblocks.0.mlp.c_proj.weight",
        "actionClip.resblocks.0.attn.out_proj.weight",
    ]
    for n in decay:
        assert where[n]["weight_decay"] == 0.2, n
    for n, g in where.items():
        assert g["name"].startswith("clip") == n.startswith("clip."), n
    # every trainable parameter is in exactly one group
    assert sorted(where) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    opt = build_optimizer(model, OptimConfig())
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6


def test_warmup_then_cosine_to_zero():
    total, warm = 100, 10
    values = [warmup_cosine(s, total, warm) for s in range(total + 1)]
    assert values[0] == pytest.approx(0.1) and values[4] == pytest.approx(0.5) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.5)  # halfway through the cosine
    assert values[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))
    assert warmup_cosine(5, 10, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_scheduler_scales_each_group_from_its_own_base():
    from test_training import micro_model

    model = micro_model("tdb")
    opt = build_optimizer(model, OptimConfig(lr=1e-2, coef_lr=1e-2))
    sched = build_scheduler(opt, total_steps=20, warmup_proportion=0.1)  # 2 warm-up steps
    seen = []
    for _ in range(20):
        seen.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    assert seen[0]["heads_decay"] == pytest.approx(5e-3) and seen[0]["clip_decay"] == pytest.approx(5e-5)
    assert seen[1]["heads_decay"] == pytest.approx(1e-2) and seen[1]["clip_no_decay"] == pytest.approx(1e-4)
    assert seen[11]["heads_decay"] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 9 / 18)))


@pytest.mark.parametrize("k", [-1, 0, 1])
def test_freeze_layer_num(k):
    from test_training import micro_model

    model = micro_model("tab_tdb")
    # micro CLIP has one block per tower: add the rule's cases by name
    frozen = set(freeze_clip_layers(model, k))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if k == -1:
        assert not frozen
        return
    for n in ("clip.token_embedding.weight", "clip.positional_embedding", "clip.visual.conv1.weight",
              "clip.visual.class_embedding", "clip.visual.positional_embedding", "clip.visual.ln_pre.weight"):
        assert n in frozen, n
    for n in ("clip.ln_final.weight", "clip.text_projection", "clip.logit_scale", "clip.visual.ln_post.bias",
              "clip.visual.proj", "weight_center", "transformerClip.resblocks.0.attn.in_proj_weight"):
        assert n in trainable, n
    block0 = {n for n, _ in model.named_parameters() if ".resblocks.0." in n and n.startswith("clip.")}
    assert (block0 <= frozen) == (k >= 1) and (block0 <= trainable) == (k == 0)
    assert not any(n.startswith(("transformerClip", "actionClip", "frame2t")) for n in frozen)
    names = {g["name"]: g for g in param_groups(model, OptimConfig())}
    assert not (frozen & {n for g in names.values() for n in g["param_names"]})


def test_freeze_counts_blocks_of_both_towers():
    from clip2video.modules.network.backbone import ClipConfig
    from clip2video.modules.weights.factory import create_model

    model = create_model("meanP", clip_config=ClipConfig(embed_dim=64, image_size=16, patch_size=8, vision_width=64,
                                                          vision_layers=3, context_length=8, vocab_size=16,
                                                          text_width=64, text_layers=3))
    frozen = set(freeze_clip_layers(model, 2))
    for tower in ("clip.transformer", "clip.visual.transformer"):
        assert f"{tower}.resblocks.1.ln_1.weight" in frozen
        assert f"{tower}.resblocks.2.ln_1.weight" not in frozen


def test_logit_scale_clamped(model):
    with torch.no_grad():
        model.clip.logit_scale.fill_(10.0)
    clamp_logit_scale(model)
    assert float(model.clip.logit_scale.detach()) == pytest.approx(LOGIT_SCALE_MAX)
    with torch.no_grad():
        model.clip.logit_scale.fill_(1.0)
    clamp_logit_scale(model)
    assert float(model.clip.logit_scale.detach()) == 1.0


def test_fused_adamw_on_cpu_matches_the_default_implementation(model):
    import copy

    a, b = copy.deepcopy(model), copy.deepcopy(model)
    opt_a = build_optimizer(a, OptimConfig(lr=1e-3, coef_lr=1.0))
    assert opt_a.defaults["fused"] is True
    opt_b = build_optimizer(b, OptimConfig(lr=1e-3, coef_lr=1.0))
    for g in opt_b.param_groups:  # the foreach implementation, as torch picks it without fused=True
        g["fused"], g["foreach"] = None, True
    torch.manual_seed(0)
    grads = [[torch.randn_like(p) for p in a.parameters()] for _ in range(3)]
    for step in grads:
        for m, opt in ((a, opt_a), (b, opt_b)):
            for p, g in zip(m.parameters(), step, strict=True):
                p.grad = g.clone()
            opt.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(pa, pm) for pa, pm in zip(a.parameters(), model.parameters(), strict=True))
