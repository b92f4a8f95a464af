"""Evaluation batches the temporal heads differently from the original's groups without changing a vector."""

from __future__ import annotations

import pytest
import torch

from clip2video.modules.evaluation.engine import encode_video_heads, merge_uniform_groups
from clip2video.modules.network.backbone import ClipConfig
from clip2video.modules.weights.factory import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_merge_pools_uniform_groups_and_keeps_mixed_ones():
    masks = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 0, 0], [1, 0, 0]])
    groups = [[0, 1], [2, 3], [4], [5], [6, 7]]
    merged = merge_uniform_groups(groups, masks, batch_size=2)
    assert [2, 3] in merged  # mixed masks: the group stays as it was
    assert sorted(i for g in merged for i in g) == list(range(8))
    for g in merged:
        if g != [2, 3]:
            assert len(g) <= 2 and bool((masks[g] == masks[g[0]]).all())
    assert len(merge_uniform_groups(groups, masks, batch_size=8)) == 3  # [2, 3], all-full, all-one-frame


@pytest.mark.parametrize("layout", ["original", "per_video"])
def test_heads_with_merged_groups_equal_the_original_groups(layout):
    torch.manual_seed(0)
    model = create_model("tab_tdb", clip_config=ClipConfig.tiny(), mask_layout=layout).eval()
    n, t, d = 14, 12, model.config.clip.embed_dim
    feats = torch.randn(n, t, d)
    counts = [12, 12, 12, 12, 5, 12, 12, 3, 12, 12, 12, 7, 7, 12]
    masks = (torch.arange(t) < torch.tensor(counts)[:, None]).long()
    groups = [[0, 1, 2], [3, 4], [5, 6], [7], [8, 9, 10], [11, 12], [13]]
    with torch.no_grad():
        ref_g = torch.zeros(n, d)
        ref_a = torch.zeros(n, d)
        for g in groups:  # the original's way: one call per evaluation batch
            v = model.encode_video_features(feats[g], masks[g])
            ref_g[g], ref_a[g] = v.global_, v.aligned
        got = encode_video_heads(model, feats, masks, groups)
        alone = model.encode_video_features(feats[[3]], masks[[3]]).global_[0]
    assert float((got.global_ - ref_g).abs().max()) <= 1e-6
    assert float((got.aligned - ref_a).abs().max()) <= 1e-6
    if layout == "original":  # the groups matter in this case (the test is not vacuous)
        assert float((alone - ref_g[3]).abs().max()) > 1e-4
