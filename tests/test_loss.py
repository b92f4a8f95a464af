"""Global-batch loss: the gather is the identity on one process and the loss is CLIP2Video's symmetric CE.

The two-process gradient equality (the real test of the gather's backward) is in test_distributed.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clip2video.modules.network.model import TextEmbedding, VideoEmbedding
from clip2video.modules.training.loss import gather_with_grad, global_batch_loss


def _emb(b: int, d: int, seed: int, aligned: bool = True):
    g = torch.Generator().manual_seed(seed)

    def unit():
        return F.normalize(torch.randn(b, d, generator=g), dim=-1).requires_grad_(True)

    return unit(), (unit() if aligned else None)


def test_gather_is_identity_with_gradient_on_one_process():
    x = torch.randn(4, 3, requires_grad=True)
    y = gather_with_grad(x)
    assert y is x
    (y * 2).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_loss_is_weighted_symmetric_ce_of_both_terms():
    from test_training import micro_model

    model = micro_model("tab_tdb")
    tg, ta = _emb(6, 8, 0)
    vg, va = _emb(6, 8, 1)
    scale = torch.tensor(20.0)
    loss, terms = global_batch_loss(model, TextEmbedding(tg, ta), VideoEmbedding(vg, va), scale)

    def sym(t, v):
        s = scale * t @ v.t()
        y = torch.arange(6)
        return (F.cross_entropy(s, y) + F.cross_entropy(s.t(), y)) / 2

    w = model.config.center_weight
    want = w * sym(tg, vg) + (1 - w) * sym(ta, va)
    assert torch.allclose(loss, want, atol=1e-6)
    assert set(terms) == {"loss_global", "loss_tab"}
    loss.backward()
    assert tg.grad is not None and va.grad is not None


def test_loss_without_tab_and_under_autocast_runs_in_float32():
    from test_training import micro_model

    model = micro_model("meanP")
    tg, _ = _emb(5, 8, 2, aligned=False)
    vg, _ = _emb(5, 8, 3, aligned=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = global_batch_loss(model, TextEmbedding(tg.bfloat16()), VideoEmbedding(vg.bfloat16()),
                                        torch.tensor(10.0))
    assert loss.dtype == torch.float32 and set(terms) == {"loss_global"}
    # perfectly aligned pairs with a large scale give a near-zero loss; random ones about log(batch)
    same, _ = _emb(5, 8, 4, aligned=False)
    low, _ = global_batch_loss(model, TextEmbedding(same), VideoEmbedding(same), torch.tensor(100.0))
    assert float(low) < 0.05 < math.log(5) / 2
