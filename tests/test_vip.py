"""CLIP-ViP video proxies: reduction to CLIP, attention pattern, masking, gradients, checkpoints."""

from __future__ import annotations

import torch

from modules.backbone import ClipConfig
from modules.checkpoint import export_original, load_model
from modules.model import create_model


def vip_model(**kw):
    torch.manual_seed(0)
    return create_model("vip", clip_config=ClipConfig.tiny(), **kw)


def test_reduces_to_clip_with_one_frame_and_one_proxy():
    model = vip_model(vip_proxies=1).eval()
    assert model.vip.added_cls.shape[0] == 0
    frames = torch.randn(3, 1, 3, 32, 32)
    with torch.no_grad():
        got = model.vip(frames, torch.ones(3, 1))
        want = model.clip.visual(frames[:, 0])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attention_pattern_patches_see_only_proxies_and_their_frame():
    model = vip_model().eval()
    vip = model.vip
    frames = torch.randn(1, 4, 3, 32, 32)
    mask = torch.ones(1, 4)
    outputs = {}

    def run(x):
        tokens, n = vip.embed(x)
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
        assert (model.vip(frames, mask) - model.vip(changed, mask)).abs().max() > 1e-4
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

    from train import parse_args

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
