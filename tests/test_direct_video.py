"""Reading video files directly equals extracting lossless frames first and reading those.

For clips at 25, 29.97 and 60 fps (OpenCV mp4v, and H.264 with B-frames and short GOPs, so that seeks and
frame reordering are exercised) and for the real H.264 files in ``../shared/reference-data/videos``:
``sample_frame.py --format png`` frames == the direct decoder's frames at every output position, the loader's
tensors are equal, and ``infer_retrieval.py`` gives the same similarity matrix on the video files as on the
PNG folders. Training runs from a folder of MP4 files and follows the same losses as from the PNG folders.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip2video.cli import infer_retrieval, sample_frame
from clip2video.dataloaders.dataset import PairDataset, VideoDataset
from clip2video.dataloaders.frames import load_video, load_video_file
from clip2video.dataloaders.synthetic import make_synthetic_dataset
from clip2video.dataloaders.video_io import decode_outputs, encode_video, probe
from clip2video.modules.network.backbone import ClipConfig
from clip2video.modules.weights.factory import create_model

from conftest import REFERENCE, generic_eval_argv, need

RATES = [25, 30000 / 1001, 60]
VIDEO_FPS = 5


def extract_png(videos: Path, out: Path, fps: float = VIDEO_FPS) -> None:
    argv = ["--input_path", str(videos), "--output_path", str(out), "--fps", str(fps), "--workers", "1",
            "--format", "png"]
    assert sample_frame.main(argv) == 0


def png_pixels(folder: Path) -> list[np.ndarray]:
    out = []
    for f in sorted(folder.iterdir()):
        assert f.suffix == ".png"
        with Image.open(f) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def assert_same_pixels(video: Path, frames: Path, fps: float = VIDEO_FPS) -> int:
    """Every output position: the PNG's pixels == the direct decoder's, byte for byte. Returns the count."""
    stored = png_pixels(frames)
    assert len(stored) == probe(video).n_output(fps)
    direct = decode_outputs(video, list(range(len(stored))), fps)
    for k, (a, b) in enumerate(zip(stored, direct, strict=True)):
        assert a.shape == b.shape and a.tobytes() == b.tobytes(), f"{video.name}: output frame {k} differs"
    return len(stored)


def assert_same_tensors(video: Path, frames: Path, image_size: int = 32) -> None:
    """The loader's sampled tensors from the file == from the PNG folder (sampling rules and jitter included)."""
    for framerate, max_frames in [(1, 12), (2, 4), (1, 3)]:
        for rng_seed in (None, 7):
            kw = dict(max_frames=max_frames, framerate=framerate, image_size=image_size)
            a = load_video(frames, **kw, rng=None if rng_seed is None else np.random.default_rng(rng_seed))
            b = load_video_file(video, fps=VIDEO_FPS, **kw,
                                rng=None if rng_seed is None else np.random.default_rng(rng_seed))
            assert [Path(n).stem for n in a[2]] == b[2]
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def h264_clips(folder: Path, fps: float, n: int = 4, seconds: float = 1.6, size: int = 48) -> None:
    """Clips with B-frames and a keyframe every 8 frames: seeks land mid-clip and frames arrive reordered."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(round(fps * 100))
    n_frames = round(seconds * fps)
    y, x = np.mgrid[0:size, 0:size]
    for v in range(n):
        frames = []
        for k in range(n_frames):
            img = np.stack([(x * 4 + k * 7) % 256, (y * 5 + v * 40) % 256, ((x + y + k) * 3) % 256], -1)
            img = img + rng.integers(0, 20, img.shape)
            frames.append(np.clip(img, 0, 255).astype(np.uint8))
        encode_video(folder / f"h264_{v}.mp4", frames, fps=fps, gop=8)


@pytest.fixture(scope="module", params=RATES, ids=["25fps", "29.97fps", "60fps"])
def synthetic(request, tmp_path_factory):
    fps = request.param
    root = tmp_path_factory.mktemp(f"direct{round(fps)}")
    summary = make_synthetic_dataset(root / "d", n_videos=8, seed=3, size=64, n_frames=round(1.4 * fps), fps=fps)
    videos = Path(summary["media"])
    h264_clips(root / "h264", fps)
    extract_png(videos, root / "png")
    extract_png(root / "h264", root / "h264_png")
    return root, videos, Path(summary["annotations"])


def test_png_extraction_equals_direct_decoding(synthetic):
    root, videos, _ = synthetic
    for folder, png in ((videos, root / "png"), (root / "h264", root / "h264_png")):
        for video in sorted(folder.iterdir()):
            n = assert_same_pixels(video, png / video.stem)
            assert n >= 7
            assert_same_tensors(video, png / video.stem)


def eval_argv(csv_path: Path, features: Path, ckpt: Path, sim: Path, *extra: str) -> list[str]:
    return generic_eval_argv(csv_path, features, ckpt, sim, "--video_fps", str(VIDEO_FPS), *extra, max_frames=6)


def test_eval_on_video_files_equals_eval_on_png_folders(synthetic, tiny_ckpt, tmp_path, capsys):
    root, videos, ann = synthetic
    assert infer_retrieval.main(eval_argv(ann, videos, tiny_ckpt, tmp_path / "v.npy")) == 0
    out = capsys.readouterr().out
    assert "0 frame folders, " in out and "video files (read directly at 5 fps)" in out
    assert infer_retrieval.main(eval_argv(ann, root / "png", tiny_ckpt, tmp_path / "f.npy")) == 0
    a, b = np.load(tmp_path / "v.npy"), np.load(tmp_path / "f.npy")
    assert a.shape == b.shape and a.shape[1] >= 2
    assert np.abs(a - b).max() <= 1e-4


def test_eval_with_loader_workers(synthetic, tiny_ckpt, tmp_path):
    _, videos, ann = synthetic
    argv = eval_argv(ann, videos, tiny_ckpt, tmp_path / "w.npy")
    argv[argv.index("--num_thread_reader") + 1] = "2"
    assert infer_retrieval.main(argv) == 0
    assert infer_retrieval.main(eval_argv(ann, videos, tiny_ckpt, tmp_path / "m.npy")) == 0
    assert np.array_equal(np.load(tmp_path / "w.npy"), np.load(tmp_path / "m.npy"))


def test_visualize_thumbnails_from_video_files(synthetic):
    from clip2video.visualize import _thumbs

    root, videos, _ = synthetic
    vid = sorted(p.stem for p in videos.iterdir())[0]
    from_file, from_png = _thumbs(videos / vid, 3), _thumbs(root / "png" / vid, 3)
    assert [np.asarray(a).tobytes() for a in from_file] == [np.asarray(b).tobytes() for b in from_png]
    assert np.asarray(from_file[0]).std() > 0  # a real frame, not the grey placeholder


def test_mixed_folder_prefers_frame_folders_and_counts(synthetic, tmp_path, caplog):
    root, videos, _ = synthetic
    mixed = tmp_path / "mixed"
    shutil.copytree(videos, mixed)
    ids = sorted(p.stem for p in videos.iterdir())
    shutil.copytree(root / "png" / ids[0], mixed / ids[0])  # both a folder and a file: the folder wins
    shutil.copytree(root / "png" / ids[1], mixed / ids[1])
    (mixed / f"{ids[1]}.mp4").unlink()
    with caplog.at_level(logging.INFO):
        ds = VideoDataset(ids, mixed, max_frames=4, image_size=32, video_fps=VIDEO_FPS)
    assert "2 frame folders, 6 video files" in caplog.text
    assert [is_file for _, is_file in ds.sources] == [False, False] + [True] * 6
    ref = VideoDataset(ids, root / "png", max_frames=4, image_size=32)
    for i in range(len(ids)):
        assert torch.equal(ds[i]["frames"], ref[i]["frames"])


def test_training_from_mp4_folder_follows_png_folder(synthetic, tmp_path):
    """A few training steps from video files: the same losses as from the PNG folders (jitter included)."""
    from clip2video.cli import train

    root, videos, ann = synthetic
    losses = {}
    for name, feats in (("mp4", videos), ("png", root / "png")):
        out = tmp_path / name
        argv = ["--tiny_clip", "--datatype", "generic", "--data_path", str(ann), "--features_path", str(feats),
                "--video_fps", str(VIDEO_FPS), "--output_dir", str(out), "--batch_size", "4", "--epochs", "1",
                "--max_steps", "2", "--max_frames", "4", "--max_words", "12", "--num_thread_reader", "0",
                "--variant", "tab_tdb", "--seed", "3", "--no_progress", "--device", "cpu"]
        assert train.main(argv) == 0
        rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        losses[name] = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert len(losses["mp4"]) == 2 and all(np.isfinite(v) for _, v in losses["mp4"])
    assert losses["mp4"] == losses["png"]


def test_pair_dataset_reads_video_files(synthetic):
    root, videos, _ = synthetic
    ids = sorted(p.stem for p in videos.iterdir())[:3]
    tok = lambda caption: (np.zeros(4, np.int64), np.ones(4, np.int64))  # noqa: E731
    a = PairDataset([(v, "x") for v in ids], videos, tok, max_frames=4, image_size=32, video_fps=VIDEO_FPS)
    b = PairDataset([(v, "x") for v in ids], root / "png", tok, max_frames=4, image_size=32)
    for i in range(len(ids)):
        assert torch.equal(a[i]["frames"], b[i]["frames"]) and torch.equal(a[i]["frame_mask"], b[i]["frame_mask"])


def test_zero_shot_from_mp4_folder(synthetic, tmp_path):
    """``--zero_shot`` (CLIP weights, CLIP-initialised heads) straight from a folder of MP4 files."""
    _, videos, ann = synthetic
    clip = create_model("tab_tdb", clip_config=ClipConfig.tiny(), center_k=3).clip
    # an OpenAI-layout state dict keeps OpenAI's integer buffers: that is what marks it as QuickGELU weights
    sd = dict(clip.state_dict(), input_resolution=torch.tensor(ClipConfig.tiny().image_size),
              context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(sd, tmp_path / "tiny_clip.pt")
    argv = ["--datatype", "generic", "--data_path", str(ann), "--split", "test", "--features_path", str(videos),
            "--zero_shot", "--clip_path", str(tmp_path / "tiny_clip.pt"), "--max_words", "16", "--max_frames", "6",
            "--batch_size_val", "4", "--num_thread_reader", "0", "--device", "cpu", "--metrics_json",
            str(tmp_path / "m.json")]
    assert infer_retrieval.main(argv) == 0
    assert set(json.loads((tmp_path / "m.json").read_text())) == {"t2v", "v2t", "run"}


# ------------------------------------------------------------------------------------- real H.264 files


@pytest.fixture(scope="module")
def reference_videos(tmp_path_factory):
    src = need(REFERENCE / "videos")
    root = tmp_path_factory.mktemp("refvideos")
    videos = root / "videos"
    videos.mkdir()
    for name in ("bigbuckbunny.mp4", "bikes.mp4"):
        shutil.copy(need(src / name), videos / name)
    extract_png(videos, root / "png")
    ann = root / "annotations.csv"
    with open(ann, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("video_id", "caption", "split"))
        w.writerows([("bigbuckbunny", "a big rabbit in a forest", "test"), ("bigbuckbunny", "a cartoon", "test"),
                     ("bikes", "people riding bicycles", "test"), ("bikes", "a street scene", "test")])
    return root, videos, ann


def test_reference_videos_png_equals_direct(reference_videos):
    root, videos, _ = reference_videos
    counts = {v.stem: assert_same_pixels(v, root / "png" / v.stem) for v in sorted(videos.iterdir())}
    assert counts == {"bigbuckbunny": 27, "bikes": 50}  # 132 frames at 25 fps, 250 at 25 fps, read at 5 fps
    for v in sorted(videos.iterdir()):
        assert_same_tensors(v, root / "png" / v.stem, image_size=224)


def test_reference_videos_eval_equals_png(reference_videos, tiny_ckpt, tmp_path):
    root, videos, ann = reference_videos
    assert infer_retrieval.main(eval_argv(ann, videos, tiny_ckpt, tmp_path / "v.npy")) == 0
    assert infer_retrieval.main(eval_argv(ann, root / "png", tiny_ckpt, tmp_path / "f.npy")) == 0
    a, b = np.load(tmp_path / "v.npy"), np.load(tmp_path / "f.npy")
    assert a.shape == (4, 2) and np.abs(a - b).max() <= 1e-4
