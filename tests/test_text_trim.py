"""Text on real tokens only: cutting a batch to its longest caption changes no vector (≤ 1e-6).

The reference is the previous computation written out here: the tower over all ``max_words`` positions, the
end-token feature at the largest id, TAB over the mask without the start token. It is compared with
``encode_text`` (which cuts every batch), with ``encode_captions`` (equal-length batches, order restored) and,
for training, with the gradients of a loss.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from clip2video.modules.evaluation.engine import encode_captions, length_batches
from clip2video.modules.network.alignment import align_tokens
from clip2video.modules.network.backbone import ClipConfig
from clip2video.modules.network.model import TextEmbedding
from clip2video.modules.network.temporal import l2n
from clip2video.modules.network.tokenizer import ClipTokenizer, real_length
from clip2video.modules.weights.factory import create_model

from conftest import REFERENCE, need

TOL = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return create_model("tab_tdb", clip_config=ClipConfig.tiny()).eval()


def all_positions(model, ids: torch.Tensor, mask: torch.Tensor) -> TextEmbedding:
    """The 32-position computation (no cut), as the original ran it."""
    tokens = model.text_tokens(ids)
    assert tokens.shape[1] == ids.shape[1]
    eot = tokens[torch.arange(ids.shape[0]), ids.argmax(dim=-1)]
    tab = mask.clone()
    tab[:, 0] = 0
    return TextEmbedding(l2n(eot), align_tokens(tokens, tab, model.weight_center, model.emb_center))


def synthetic_captions(n: int = 120, seed: int = 0) -> list[str]:
    """``n`` captions; from 46 on, every length from 1 to 45 words occurs (the longest are truncated)."""
    rng = np.random.default_rng(seed)
    vocab = "a man woman dog is playing cooking talking about the red car song on in with video of game".split()
    every = np.arange(1, 46) if n >= 45 else rng.integers(1, 45, n)
    lengths = rng.permutation(np.r_[every, rng.integers(3, 16, n - len(every))])
    return [" ".join(rng.choice(vocab, k)) for k in lengths]


def msrvtt_captions() -> list[str]:
    """Every fourth MSR-VTT 1k-A test sentence plus the ten longest (so truncation at 32 is included)."""
    path = need(REFERENCE / "msrvtt_data" / "MSRVTT_JSFUSION_test.csv")
    with open(path, newline="") as f:
        sentences = [r["sentence"] for r in csv.DictReader(f)]
    longest = sorted(range(len(sentences)), key=lambda i: -len(sentences[i].split()))[:10]
    return [sentences[i] for i in sorted(set(range(0, len(sentences), 4)) | set(longest))]


def check_captions(model, captions: list[str]) -> None:
    tok = ClipTokenizer(32)
    ids, mask = tok.batch(captions)
    lengths = mask.sum(1)
    assert int(lengths.max()) == 32 and int(lengths.min()) < 8  # both ends of the range are exercised
    with torch.no_grad():
        ref = all_positions(model, ids, mask)
        for lo in range(0, len(captions), 64):  # encode_text cuts each batch to its own longest caption
            part = model.encode_text(ids[lo : lo + 64], mask[lo : lo + 64])
            assert float((part.global_ - ref.global_[lo : lo + 64]).abs().max()) <= TOL
            assert float((part.aligned - ref.aligned[lo : lo + 64]).abs().max()) <= TOL
        got = encode_captions(model, captions, tok, batch_size=16)
    assert got.global_.shape == ref.global_.shape and got.aligned.shape == ref.aligned.shape
    assert float((got.global_ - ref.global_).abs().max()) <= TOL
    assert float((got.aligned - ref.aligned).abs().max()) <= TOL


def test_trimmed_equals_all_positions_on_synthetic_captions(model):
    check_captions(model, synthetic_captions())


def test_trimmed_equals_all_positions_on_msrvtt_captions(model):
    check_captions(model, msrvtt_captions())


def test_tab_tokens_and_end_token_survive_the_cut(model):
    """The kept positions' token features are those of the 32-position run, and the end token is among them."""
    tok = ClipTokenizer(32)
    ids, mask = tok.batch(["a dog", "a man is talking about a red car in a video game"])
    keep = real_length(ids, mask)
    assert keep == int(mask.sum(1).max()) < 32
    assert int(ids.argmax(-1).max()) < keep  # every end token is kept
    assert not mask[:, keep:].any()  # nothing the TAB mask selects is cut
    with torch.no_grad():
        full = model.text_tokens(ids)
        cut = model.text_tokens(ids[:, :keep])
    # unnormalised features (|x| up to ~3): the same relative bound as the vectors
    assert float((full[:, :keep] - cut).abs().max()) <= TOL * float(full.abs().max())
    # and the padding does change the positions after the cut (the test is not vacuous)
    assert float((full[:, keep:] - full[:, keep - 1 : keep]).abs().max()) > 1e-3


def test_real_length_counts_every_real_position():
    ids = torch.tensor([[49406, 5, 49407, 0, 0, 0], [49406, 7, 8, 9, 49407, 0]])
    mask = (ids != 0).long()
    assert real_length(ids, mask) == 5
    holes = mask.clone()
    holes[0, 5] = 1  # a mask set on a padding id still counts
    assert real_length(ids, holes) == 6
    assert real_length(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)) == 0


def test_length_batches_group_equal_lengths_and_cover_every_caption():
    lengths = [5, 3, 5, 9, 3, 5, 5, 12]
    batches = length_batches(lengths, batch_size=2, min_batch=1)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 2 and len({lengths[i] for i in b}) == 1 for b in batches)
    assert [lengths[b[0]] for b in batches] == sorted(lengths[b[0]] for b in batches)  # shortest first
    assert length_batches([], 4) == []
    # rare lengths are pooled up to min_batch; full-size groups of one length stay pure
    lengths = [7] * 6 + [20, 21, 25, 30, 31, 32]
    batches = length_batches(lengths, batch_size=6, min_batch=3)
    assert [sorted({lengths[i] for i in b}) for b in batches] == [[7], [20, 21, 25], [30, 31, 32]]


def test_training_gradients_unchanged_by_the_cut():
    """The loss and every gradient of a training step agree with the 32-position computation."""
    torch.manual_seed(5)
    model = create_model("tab_tdb", clip_config=ClipConfig.tiny()).train()
    ids, mask = ClipTokenizer(32).batch(["a dog", "a man is cooking", "a red car on a road in the rain at night",
                                         "someone talks", "two women are playing a video game", "music",
                                         "a cat sits", "the man is talking about a song"])
    assert 8 < real_length(ids, mask) < 32
    video = torch.nn.functional.normalize(torch.randn(8, model.config.clip.embed_dim), dim=-1)

    def grads(encode) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        t = encode()
        loss = -(t.global_ * video).sum() - (t.aligned * video).sum()
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_ref, g_ref = grads(lambda: all_positions(model, ids, mask))
    loss_cut, g_cut = grads(lambda: model.encode_text(ids, mask))
    assert abs(loss_ref - loss_cut) <= 1e-5
    assert set(g_ref) == set(g_cut) and "clip.transformer.resblocks.0.attn.in_proj_weight" in g_ref
    for name, g in g_ref.items():
        assert float((g - g_cut[name]).abs().max()) <= 1e-6 * max(1.0, float(g.abs().max())), name
