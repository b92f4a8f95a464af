"""Torch datasets (dataloaders/dataset.py): items, bad data, picklability, worker-independent jitter."""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from clip2video.dataloaders.annotations import load_eval_set
from clip2video.dataloaders.dataset import PairDataset, VideoDataset
from clip2video.dataloaders.frames import FrameError, load_video
from clip2video.modules.network.tokenizer import ClipTokenizer

S = 16  # tiny image size keeps these tests fast; preprocessing itself is tested in test_frames.py


def make_frames(root, name: str, n: int, seed: int = 0) -> None:
    from PIL import Image

    d = root / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(d / f"{i + 1:08d}.png")


@pytest.fixture
def frames_root(tmp_path):
    make_frames(tmp_path, "long", 90, seed=1)  # 12 positions, gaps 8 -> jitter s = 4
    make_frames(tmp_path, "short", 3, seed=2)
    make_frames(tmp_path, "mid", 40, seed=3)
    return tmp_path


def test_video_dataset_items(frames_root):
    ds = VideoDataset(["long", "short"], frames_root, max_frames=12, framerate=1, image_size=S)
    assert len(ds) == 2
    item = ds[1]
    assert set(item) == {"frames", "mask", "index"} and item["index"] == 1
    assert item["frames"].shape == (12, 3, S, S) and item["frames"].dtype == torch.float32
    assert item["mask"].dtype == torch.long and item["mask"].tolist() == [1, 1, 1] + [0] * 9
    ref, _, _ = load_video(frames_root / "short", max_frames=12, image_size=S)
    assert torch.equal(item["frames"], ref)
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["frames"].shape == (2, 12, 3, S, S) and batch["index"].tolist() == [0, 1]


def test_video_dataset_bad_video_raises_naming_it(frames_root):
    ds = VideoDataset(["long", "video_gone"], frames_root, image_size=S)
    with pytest.raises(FrameError, match="video_gone.*does not exist"):
        ds[1]


def test_video_dataset_skip_bad_filters_at_construction(frames_root, caplog):
    (frames_root / "empty").mkdir()
    ids = ["long", "empty", "short", "gone", "mid"]
    plain = VideoDataset(ids, frames_root, framerate=4, image_size=S)
    bad = dict(plain.validate())
    assert set(bad) == {"empty", "gone", "short"}  # short: 3 files < framerate 4
    assert "empty" in bad["empty"] and "does not exist" in bad["gone"] and "feature_framerate 4" in bad["short"]
    with caplog.at_level(logging.WARNING):
        ds = VideoDataset(ids, frames_root, framerate=4, image_size=S, skip_bad=True)
    assert "skipping 3 of 5 videos" in caplog.text
    assert len(ds) == 2 and [ds[i]["index"] for i in range(2)] == [0, 4]  # index = column in ``ids``


def test_constructor_argument_errors(frames_root):
    with pytest.raises(FileNotFoundError, match="--features_path .*nowhere"):
        VideoDataset(["a"], frames_root / "nowhere")
    with pytest.raises(ValueError, match="--image_mode"):
        VideoDataset(["a"], frames_root, mode="quick")
    with pytest.raises(ValueError, match="--feature_framerate"):
        PairDataset([("a", "b")], frames_root, ClipTokenizer(), framerate=0)


def test_pair_dataset_items(frames_root):
    tok = ClipTokenizer(max_words=32)
    ds = PairDataset([("long", "a dog runs"), ("short", "a cat")], frames_root, tok, image_size=S, jitter=False)
    item = ds[0]
    assert set(item) == {"input_ids", "attention_mask", "frames", "frame_mask", "index"}
    ids, mask = tok("a dog runs")
    assert item["input_ids"].dtype == torch.long and item["input_ids"].tolist() == ids.tolist()
    assert item["attention_mask"].tolist() == mask.tolist()
    assert item["frames"].shape == (12, 3, S, S) and item["frame_mask"].sum() == 12
    assert ds[1]["frame_mask"].tolist() == [1, 1, 1] + [0] * 9
    ref, _, _ = load_video(frames_root / "long", image_size=S)
    assert torch.equal(item["frames"], ref)  # no jitter: the evaluation frames


def test_pair_dataset_bad_video_names_it(frames_root):
    ds = PairDataset([("missing_vid", "x")], frames_root, ClipTokenizer(), image_size=S)
    with pytest.raises(FrameError, match="video 'missing_vid'.*does not exist"):
        ds[0]


def test_jitter_is_a_function_of_seed_epoch_index(frames_root):
    pairs = [("long", "x")] * 4
    ds = PairDataset(pairs, frames_root, ClipTokenizer(), image_size=S, seed=3)
    a0 = [ds[i]["frames"] for i in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(a0, [ds[i]["frames"] for i in range(4)], strict=True))
    assert not all(torch.equal(a0[0], x) for x in a0[1:])  # index enters the seed
    ds.set_epoch(1)
    assert not all(torch.equal(x, ds[i]["frames"]) for i, x in enumerate(a0))  # epoch enters the seed
    other = PairDataset(pairs, frames_root, ClipTokenizer(), image_size=S, seed=4)
    assert not all(torch.equal(x, other[i]["frames"]) for i, x in enumerate(a0))
    np.random.seed(0)
    torch.manual_seed(0)  # global state must not matter
    assert torch.equal(PairDataset(pairs, frames_root, ClipTokenizer(), image_size=S, seed=3)[2]["frames"], a0[2])


def test_same_batches_for_0_and_2_workers(frames_root):
    pairs = [("long", f"caption {i}") for i in range(6)] + [("mid", "m"), ("short", "s")]
    out = {}
    for workers in (0, 2):
        ds = PairDataset(pairs, frames_root, ClipTokenizer(), image_size=S, seed=11)
        ds.set_epoch(2)
        loader = DataLoader(ds, batch_size=3, shuffle=False, num_workers=workers)
        out[workers] = [b for b in loader]
    for b0, b2 in zip(out[0], out[2], strict=True):
        for k in ("frames", "frame_mask", "input_ids", "attention_mask", "index"):
            assert torch.equal(b0[k], b2[k]), k
    first = torch.cat([b["frames"] for b in out[0]])
    assert not torch.equal(first[0], first[1])  # jitter really varied the frames


def test_datasets_pickle(frames_root):
    v = VideoDataset(["long"], frames_root, image_size=S)
    p = PairDataset([("long", "x")], frames_root, ClipTokenizer(), image_size=S)
    v2, p2 = pickle.loads(pickle.dumps(v)), pickle.loads(pickle.dumps(p))
    assert torch.equal(v2[0]["frames"], v[0]["frames"]) and torch.equal(p2[0]["frames"], p[0]["frames"])


def test_fixture_eval_set_through_video_dataset(parity_dir):
    """End of the data path on the fixture: annotation columns → VideoDataset → the original's frame masks."""
    args = json.loads((parity_dir / "commands.json").read_text())["vatex"]["args"]
    emb = np.load(parity_dir / "expected" / "vatex.emb.npz")
    r = load_eval_set(args["datatype"], data_path=parity_dir / args["data_path"],
                      features_path=parity_dir / args["features_path"])
    ds = VideoDataset(r.video_ids, parity_dir / args["features_path"], framerate=int(args["feature_framerate"]),
                      skip_bad=True)
    assert len(ds) == len(r.video_ids) == emb["video_mask"].shape[0]
    masks = torch.stack([ds[i]["mask"] for i in range(len(ds))])
    np.testing.assert_array_equal(masks.numpy(), emb["video_mask"])
