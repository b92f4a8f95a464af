"""CLIP-ViP video proxies: reduction to CLIP, attention pattern, masking, gradients, checkpoints."""

from __future__ import annotations

import pytest
import torch

from clip2video.modules.network.backbone import ClipConfig
from clip2video.modules.weights.factory import create_model, load_model
from clip2video.modules.weights.release import export_original


def vip_model(**kw):
    torch.manual_seed(0)
    return create_model("vip", clip_config=ClipConfig.tiny(), **kw)


def test_reduces_to_clip_with_one_frame_and_one_proxy():
    model = vip_model(vip_proxies=1).eval()
    assert model.vip.added_cls.shape[0] == 0
    frames = torch.randn(3, 1, 3, 32, 32)
    with torch.no_grad():
        got = model.vip(model.clip.visual, frames, torch.ones(3, 1))
        want = model.clip.visual(frames[:, 0])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attention_pattern_patches_see_only_proxies_and_their_frame():
    model = vip_model().eval()
    vip = model.vip
    frames = torch.randn(1, 4, 3, 32, 32)
    mask = torch.ones(1, 4)
    outputs = {}

    def run(x):
        tokens, n = vip.embed(model.clip.visual, x)
        h = model.clip.visual.ln_pre(tokens)
        key_mask = torch.ones(1, tokens.shape[1], dtype=torch.bool)
        block = model.clip.visual.transformer.resblocks[0]
        return vip._block(block, h, 4, n, key_mask), n

    with torch.no_grad():
        base, n = run(frames)
        changed = frames.clone()
        changed[0, 2] += torch.randn_like(changed[0, 2])
        outputs, _ = run(changed)
        # also the full encoder output changes
        vis = model.clip.visual
        assert (model.vip(vis, frames, mask) - model.vip(vis, changed, mask)).abs().max() > 1e-4
    diff = (outputs - base).abs().amax(dim=-1)[0]  # per token, after one block
    p = vip.num_proxies
    frame_of = [-1] * p + [i // n for i in range(4 * n)]
    for tok, f in enumerate(frame_of):
        if f == -1 or f == 2:
            assert diff[tok] > 1e-6, f"token {tok} (frame {f}) should see frame 2"
        else:
            assert diff[tok] == 0, f"token {tok} of frame {f} must not see frame 2"


def test_masked_frames_do_not_change_the_vector():
    model = vip_model().eval()
    frames = torch.randn(2, 6, 3, 32, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    other = frames.clone()
    other[0, 3:] = torch.randn_like(other[0, 3:]) * 3
    with torch.no_grad():
        a = model.encode_video(frames, mask).global_
        b = model.encode_video(other, mask).global_
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_forward_backward_finite_and_temporal_interpolation():
    model = vip_model(vip_frames=8).train()
    frames = torch.randn(2, 12, 3, 32, 32)  # 12 frames vs an 8-row temporal table: interpolated
    mask = torch.ones(2, 12)
    ids = torch.tensor([[49406, 320, 1929, 49407, 0], [49406, 320, 1611, 49407, 0]])
    tmask = (ids > 0).long()
    out = model(ids, tmask, frames, mask)
    loss, terms = model.loss(out.text, out.video, out.logit_scale)
    loss.backward()
    assert torch.isfinite(loss) and set(terms) == {"loss_global"}
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.vip.temporal_embedding.grad.abs().sum() > 0


def test_checkpoint_round_trip(tmp_path):
    model = vip_model()
    with torch.no_grad():
        model.vip.temporal_embedding.normal_()
    path = export_original(model, tmp_path / "pytorch_model.bin.1")
    back = load_model(path)
    assert back.config.video_encoder == "vip"
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    assert "vip.added_cls" in model.state_dict() and "vip.temporal_embedding" in model.state_dict()


def test_vip_configs_parse(tmp_path):
    from pathlib import Path

    from clip2video.cli.train import parse_args

    root = Path(__file__).resolve().parents[1]
    feats = tmp_path / "frames"
    feats.mkdir()
    files = sorted((root / "configs" / "train").glob("*_vip*.yaml"))
    assert len(files) == 6
    for f in files:
        a = parse_args(["--config", str(f), "--tiny_clip", "--features_path", str(feats), "--output_dir", "x"])
        assert a.variant == "vip" and a.max_frames == 12, f.name
        if f.stem.endswith("_vip"):  # the CLIP-ViP recipe
            assert (a.lr, a.coef_lr, a.warmup_proportion) == (1e-6, 1.0, 0.01), f.name
        else:  # this codebase's schedule
            assert (a.lr, a.coef_lr, a.warmup_proportion) == (1e-4, 1e-3, 0.1), f.name


def to_hf_clipvip(model) -> dict:
    """Inverse of release.clipvip_to_ours, written independently: our vip model in the CLIP-ViP release
    layout (Hugging Face CLIP names under ``clipmodel.``)."""
    sd = model.state_dict()
    out = {"clipmodel.logit_scale": sd["clip.logit_scale"],
           "clipmodel.text_projection.weight": sd["clip.text_projection"].t(),
           "clipmodel.visual_projection.weight": sd["clip.visual.proj"].t(),
           "clipmodel.text_model.embeddings.token_embedding.weight": sd["clip.token_embedding.weight"],
           "clipmodel.text_model.embeddings.position_embedding.weight": sd["clip.positional_embedding"],
           "clipmodel.text_model.embeddings.position_ids": torch.arange(77)[None],
           "clipmodel.text_model.final_layer_norm.weight": sd["clip.ln_final.weight"],
           "clipmodel.text_model.final_layer_norm.bias": sd["clip.ln_final.bias"],
           "clipmodel.vision_model.embeddings.class_embedding": sd["clip.visual.class_embedding"],
           "clipmodel.vision_model.embeddings.patch_embedding.weight": sd["clip.visual.conv1.weight"],
           "clipmodel.vision_model.embeddings.position_embedding.weight": sd["clip.visual.positional_embedding"],
           "clipmodel.vision_model.embeddings.added_cls": sd["vip.added_cls"],
           "clipmodel.vision_model.embeddings.temporal_embedding": sd["vip.temporal_embedding"][None],
           "clipmodel.vision_model.pre_layrnorm.weight": sd["clip.visual.ln_pre.weight"],
           "clipmodel.vision_model.pre_layrnorm.bias": sd["clip.visual.ln_pre.bias"],
           "clipmodel.vision_model.post_layernorm.weight": sd["clip.visual.ln_post.weight"],
           "clipmodel.vision_model.post_layernorm.bias": sd["clip.visual.ln_post.bias"]}
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for ours, hf in (("clip.transformer.resblocks", "text_model"), ("clip.visual.transformer.resblocks",
                                                                     "vision_model")):
        i = 0
        while f"{ours}.{i}.ln_1.weight" in sd:
            pre = f"clipmodel.{hf}.encoder.layers.{i}."
            for kind in ("weight", "bias"):
                q, k, v = sd[f"{ours}.{i}.attn.in_proj_{kind}"].chunk(3)
                out[pre + f"self_attn.q_proj.{kind}"], out[pre + f"self_attn.k_proj.{kind}"] = q, k
                out[pre + f"self_attn.v_proj.{kind}"] = v
                for a, b in names.items():
                    out[pre + f"{b}.{kind}"] = sd[f"{ours}.{i}.{a}.{kind}"]
            i += 1
    return {k: v.clone() for k, v in out.items()}


def test_released_clipvip_layout_maps_to_ours(tmp_path):
    from clip2video.modules.weights.checkpoint import CheckpointError, atomic_save
    from clip2video.modules.weights.release import clipvip_to_ours

    model = vip_model(vip_frames=6)
    with torch.no_grad():
        model.vip.temporal_embedding.normal_()
    hf = to_hf_clipvip(model)
    mapped = clipvip_to_ours(hf)
    assert set(mapped) == set(model.state_dict())
    assert all(torch.equal(mapped[k], v) for k, v in model.state_dict().items())
    atomic_save({"model": hf}, tmp_path / "clipvip.pt")
    back = load_model(tmp_path / "clipvip.pt")
    assert back.config.video_encoder == "vip" and back.config.vip_frames == 6 and back.config.vip_proxies == 4
    frames, mask = torch.randn(2, 6, 3, 32, 32), torch.ones(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(back.eval().encode_video(frames, mask).global_,
                                   model.eval().encode_video(frames, mask).global_, atol=0, rtol=0)
    hf["clipmodel.vision_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unmapped keys: vision_model.extra.weight"):
        clipvip_to_ours(hf)
