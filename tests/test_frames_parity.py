"""Frames → image tower parity: the fixture's frame folders, sampled and preprocessed by our loader, give the
original's raw CLIP frame features (padded slots included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clip2video.dataloaders.frames import load_video
from clip2video.modules.network.model import make_config
from clip2video.modules.weights.factory import load_model

from parity_utils import CENTER_K, DATASETS, checkpoint_of, commands, expected

pytestmark = pytest.mark.usefixtures("parity_dir")


@pytest.mark.parametrize("ds", DATASETS)
def test_image_tower_from_frame_folders(ds, parity_dir, parity_weights):
    e, meta = expected(ds)
    args = commands()[ds]["args"]
    model = load_model(checkpoint_of(parity_weights, ds), make_config("tab_tdb", center_k=CENTER_K[ds])).eval()
    frames, masks = [], []
    for vid in meta["video_ids"]:
        f, m, files = load_video(parity_dir / args["features_path"] / vid, max_frames=12,
                                 framerate=int(args["feature_framerate"]), image_size=224)
        assert files == meta["frames"][vid]["sampled"]
        frames.append(f)
        masks.append(m)
    frames, masks = torch.stack(frames), torch.stack(masks)
    np.testing.assert_array_equal(masks.numpy(), e["video_mask"])
    with torch.no_grad():
        feats = model.encode_frames(frames, masks).numpy()
    assert np.abs(feats - e["frame_emb"]).max() <= 1e-4
