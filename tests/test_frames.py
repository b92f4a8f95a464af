"""Frame listing, sampling, jitter and preprocessing (dataloaders/frames.py)."""

from __future__ import annotations

import io
import json

import numpy as np
import PIL
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw

from clip2video.dataloaders.frames import (
    CLIP_MEAN,
    CLIP_STD,
    FAST_MODE_MEAN_LEVELS,
    FrameError,
    jitter_positions,
    list_frame_files,
    load_video,
    preprocess_image,
    resize_crop,
    resize_crop_array,
    resize_geometry,
    sample_positions,
)

DATASETS = ("msrvtt", "msrvttfull", "msvd", "vatex")
LEVEL = 1.0 / 255 / min(CLIP_STD)  # one uint8 level after normalisation (upper bound over channels)


def reference_transform(size: int = 224) -> T.Compose:
    """The straightforward pipeline the original used (torchvision transforms on a PIL image)."""
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def original_transform(size: int = 224) -> T.Compose:
    """The original's pipeline as Pillow <= 12 ran it: the resize is explicitly horizontal pass, then vertical.

    Pillow >= 13 may run the vertical pass first for tall images (one call); two single-axis calls fix the
    order on any Pillow version. For landscape and square frames this is ``reference_transform`` exactly.
    """
    def resize(img: Image.Image) -> Image.Image:
        w, h = img.size
        (fw, fh), _ = resize_geometry(w, h, size)
        img = img.resize((fw, h), Image.Resampling.BICUBIC) if fw != w else img
        return img.resize((fw, fh), Image.Resampling.BICUBIC) if fh != h else img

    return T.Compose([resize, T.CenterCrop(size), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def natural_image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Smooth gradients + hard-edged shapes + mild noise: exercises both flat and sharp resampling."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h, 1)
    a = np.stack([120 + 100 * np.sin(3 * x + seed), 90 + 80 * np.cos(4 * y), 128 + 60 * np.sin(5 * (x + y))], -1)
    a = np.clip(a + rng.normal(0, 6, a.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(a)
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(1, max(w, h) // 3 + 2))
        d.ellipse((x0, y0, x0 + r, y0 + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return im.convert(mode) if mode != "RGB" else im


def save(im: Image.Image, path, fmt: str = "JPEG") -> None:
    im.save(path, fmt, quality=90) if fmt == "JPEG" else im.save(path, fmt)


def make_folder(path, n: int, size=(64, 48)) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        save(natural_image(*size, seed=i), path / f"{i + 1:08d}.jpg")


# ------------------------------------------------------------------------------------------------- sampling


def test_normalisation_constants_are_the_backbones_objects():
    """One definition: the data side reads CLIP's mean/std from the backbone, not from a copy of its own."""
    from clip2video.dataloaders import frames
    from clip2video.modules.network import backbone

    assert frames.CLIP_MEAN is backbone.OPENAI_MEAN and frames.CLIP_STD is backbone.OPENAI_STD
    assert backbone.ClipConfig().image_mean == backbone.OPENAI_MEAN


def test_sample_positions_design_example():
    # the original's rule on 58 files, framerate 2 -> 1-based files 1,5,11,15,21,25,31,35,41,45,51,58
    pos = sample_positions(58, 2, 12)
    assert (pos + 1).tolist() == [1, 5, 11, 15, 21, 25, 31, 35, 41, 45, 51, 58]
    assert pos.dtype == np.int64


@pytest.mark.parametrize("n,r,m", [(13, 2, 12), (5, 1, 12), (1, 1, 12), (100, 1, 12), (64, 1, 12), (3, 3, 12),
                                   (1000, 5, 12), (7, 1, 4)])
def test_sample_positions_matches_original_formula(n, r, m):
    idx = np.linspace(0, n - 1, num=n // r, dtype=int)
    if len(idx) > m:
        idx = idx[np.linspace(0, len(idx) - 1, num=m, dtype=int)]
    pos = sample_positions(n, r, m)
    assert pos.tolist() == idx.tolist()
    assert len(pos) == min(n // r, m) and np.all(np.diff(pos) > 0) and pos[-1] <= n - 1


def test_sample_positions_errors():
    with pytest.raises(FrameError, match="3 frame file"):
        sample_positions(3, 4, 12)
    with pytest.raises(FrameError):
        sample_positions(0, 1, 12)
    with pytest.raises(ValueError, match="feature_framerate"):
        sample_positions(10, 0, 12)
    with pytest.raises(ValueError, match="max_frames"):
        sample_positions(10, 1, 0)


def test_jitter_positions_properties():
    base = sample_positions(300, 1, 12)  # gaps 27/28 -> s = 13
    s = int(np.diff(base).min()) // 2
    moved = 0
    for seed in range(200):
        j = jitter_positions(base, 300, np.random.default_rng(seed))
        assert j[0] == base[0] and j[-1] == base[-1]
        assert np.all(np.diff(j) > 0) and j.min() >= 0 and j.max() < 300
        off = j[1:-1] - base[1:-1]
        assert off.min() >= -s and off.max() < s
        moved += int((off != 0).sum())
    assert moved > 1500  # offsets really drawn
    a = jitter_positions(base, 300, np.random.default_rng([1, 2, 3]))
    b = jitter_positions(base, 300, np.random.default_rng([1, 2, 3]))
    assert a.tolist() == b.tolist()


def test_jitter_only_when_half_gap_exceeds_two():
    base = sample_positions(60, 1, 12)  # gaps 5/6 -> s = 2: no jitter
    assert jitter_positions(base, 60, np.random.default_rng(0)).tolist() == base.tolist()
    short = np.array([0, 50])
    assert jitter_positions(short, 51, np.random.default_rng(0)).tolist() == [0, 50]


# -------------------------------------------------------------------------------------------------- listing


def test_list_frame_files_sorted_without_extension_filter(tmp_path):
    for name in ["b.jpg", "a.png", "10.jpg", "2.jpg", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    assert list_frame_files(tmp_path) == ["10.jpg", "2.jpg", "a.png", "b.jpg", "notes.txt"]


def test_list_frame_files_missing_folder(tmp_path):
    with pytest.raises(FrameError, match="video_missing.*does not exist"):
        list_frame_files(tmp_path / "video_missing")
    f = tmp_path / "file.jpg"
    f.write_bytes(b"x")
    with pytest.raises(FrameError, match="file.jpg.*not a folder"):
        list_frame_files(f)


# ---------------------------------------------------------------------------------------------- preprocessing

SIZES = [(320, 240), (640, 480), (160, 120), (120, 160), (160, 90), (157, 118), (400, 300), (224, 224), (225, 224),
         (224, 225), (223, 300), (1280, 720), (480, 853), (853, 480), (50, 50), (2, 150), (150, 2), (3, 2), (7, 640),
         (226, 1000), (999, 225), (341, 256), (256, 341)]


PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


@pytest.mark.parametrize("w,h", SIZES)
def test_exact_mode_bit_identical_to_original_pipeline(tmp_path, w, h):
    im = natural_image(w, h, seed=w * 7 + h)
    path = tmp_path / "f.png"  # lossless, so the reference sees the same decoded pixels
    save(im, path, "PNG")
    out = preprocess_image(path, 224, "exact")
    assert out.dtype == torch.float32 and out.shape == (3, 224, 224)
    ref = original_transform()(Image.open(path).convert("RGB"))
    assert torch.equal(out, ref), f"{w}x{h}: max diff {(out - ref).abs().max():.3g}"
    if w >= h or PILLOW_MAJOR < 13:  # the installed torchvision + Pillow gives the same pixels here
        assert torch.equal(out, reference_transform()(Image.open(path).convert("RGB"))), f"{w}x{h}"


def test_exact_mode_random_sizes_and_jpeg(tmp_path):
    rng = np.random.default_rng(123)
    ref_t = original_transform(224)
    for k in range(16):
        w, h = (int(v) for v in rng.integers(8, 900, 2))
        path = tmp_path / f"{k}.jpg"
        save(natural_image(w, h, seed=k), path, "JPEG")
        ref = ref_t(Image.open(path).convert("RGB"))
        assert torch.equal(preprocess_image(path, 224, "exact"), ref), f"{w}x{h}"


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_exact_mode_non_rgb_images_convert_first(tmp_path, mode):
    im = natural_image(200, 130, seed=5, mode="RGB")
    im = im.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 3)
    path = tmp_path / ("f.tif" if mode in ("CMYK", "I;16") else "f.png")
    im.save(path)
    ref = reference_transform()(Image.open(path).convert("RGB"))
    assert torch.equal(preprocess_image(path), ref)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_decoders_agree_with_pillow(tmp_path, monkeypatch, mode):
    # colour JPEGs may be decoded by torchvision (when it matches Pillow here), others by Pillow: same tensors
    from clip2video.dataloaders import frames

    path = tmp_path / "f.jpg"
    natural_image(331, 247, seed=3).convert(mode).save(path, "JPEG", quality=85)
    ref = original_transform()(Image.open(path).convert("RGB"))
    assert torch.equal(preprocess_image(path), ref)
    monkeypatch.setattr(frames, "_torch_jpeg_matches_pillow", lambda: False)  # Pillow only
    assert torch.equal(preprocess_image(path), ref)


def test_torchvision_decoder_is_loaded_without_torchvision_and_falls_back_to_its_package(tmp_path, monkeypatch):
    # the operator library is loaded from torchvision's folder directly; without it, torchvision.io is used
    import importlib.util

    from clip2video.dataloaders import frames

    path = tmp_path / "f.jpg"
    natural_image(200, 150, seed=5).save(path, "JPEG", quality=90)
    data = path.read_bytes()
    ref = np.asarray(Image.open(path).convert("RGB"))
    frames._torch_jpeg_op.cache_clear()
    try:
        assert np.array_equal(frames._decode_with_torch(data), ref)
        real_find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "torchvision" else real_find_spec(name, *a))
        frames._torch_jpeg_op.cache_clear()
        assert np.array_equal(frames._decode_with_torch(data), ref)  # through torchvision.io's wrapper
        assert frames._decode_with_torch(b"\xff\xd8\xff not a jpeg") is None
    finally:
        frames._torch_jpeg_op.cache_clear()


def test_normalisation_table_covers_every_level(tmp_path):
    # every uint8 level in every channel, no resize: the look-up table alone against ToTensor + Normalize
    levels = np.arange(224 * 224 * 3) % 256
    rgb = np.stack([np.roll(levels, 7 * c)[: 224 * 224] for c in range(3)], -1).reshape(224, 224, 3)
    path = tmp_path / "levels.png"
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    assert torch.equal(preprocess_image(path), reference_transform()(Image.open(path).convert("RGB")))


def test_other_image_size(tmp_path):
    path = tmp_path / "f.png"
    save(natural_image(300, 200, seed=1), path, "PNG")
    assert torch.equal(preprocess_image(path, 96), reference_transform(96)(Image.open(path).convert("RGB")))


def test_resize_geometry_rounding():
    # torchvision: long side int(224*long/short); crop offset int(round(d / 2.0)) with ties to even
    assert resize_geometry(320, 240, 224) == ((298, 224), (37, 0))
    assert resize_geometry(120, 160, 224) == ((224, 298), (0, 37))
    assert resize_geometry(225, 224, 224) == ((225, 224), (0, 0))  # round(0.5) == 0
    assert resize_geometry(227, 224, 224) == ((227, 224), (2, 0))  # round(1.5) == 2


def jpeg_file(tmp_path, w, h, seed):
    b = io.BytesIO()
    natural_image(w, h, seed=seed).save(b, "JPEG", quality=90)
    p = tmp_path / f"{w}x{h}_{seed}.jpg"
    p.write_bytes(b.getvalue())
    return p


def test_fast_mode_bounds(tmp_path):
    # short side < 2*224: no DCT scaling, and the resize is exact's: identical tensors
    for w, h in [(320, 240), (400, 300), (160, 120)]:
        for seed in range(3):
            p = jpeg_file(tmp_path, w, h, seed)
            assert torch.equal(preprocess_image(p, mode="fast"), preprocess_image(p, mode="exact")), f"{w}x{h}"
    # large frames are decoded at reduced DCT scale: small mean difference
    for w, h in [(640, 480), (1280, 720)]:
        p = jpeg_file(tmp_path, w, h, 0)
        d = (preprocess_image(p, mode="fast") - preprocess_image(p, mode="exact")).abs()
        assert 0 < d.mean() <= FAST_MODE_MEAN_LEVELS * LEVEL


RESIZE_SIZES = [(320, 240), (240, 320), (1280, 720), (720, 1280), (640, 360), (150, 100), (8, 300), (224, 300),
                (300, 224), (224, 224), (225, 224), (227, 225), (1000, 999), (97, 61)]


@pytest.mark.parametrize("size", RESIZE_SIZES)
def test_resize_kernel_bit_identical_to_pillow(size):
    w, h = size
    rng = np.random.default_rng(w * h)
    for rgb in (rng.integers(0, 256, (h, w, 3), dtype=np.uint8),  # noise: every rounding case, clamping
                np.asarray(natural_image(w, h, seed=w + h))):
        ref = np.asarray(resize_crop(Image.fromarray(rgb), 224))
        ours = resize_crop_array(rgb, 224)
        assert ours.shape == ref.shape == (224, 224, 3) and ours.dtype == np.uint8
        assert np.array_equal(ours, ref), f"{w}x{h}: {(ours != ref).sum()} values differ"
    assert np.array_equal(resize_crop_array(rgb, 96), np.asarray(resize_crop(Image.fromarray(rgb), 96)))


def test_resize_without_numba_falls_back_to_pillow(monkeypatch):
    from clip2video.dataloaders import resample

    rgb = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    kernel = resample.resize_crop_array(rgb, 224)
    monkeypatch.setattr(resample, "numba", None)
    assert not resample.accelerated()
    assert np.array_equal(resample.resize_crop_array(rgb, 224), kernel)
    with pytest.raises(ValueError, match="uint8"):
        resample.resize_crop_array(rgb.astype(np.float32), 224)


def test_preprocess_errors_name_the_file(tmp_path):
    with pytest.raises(FrameError, match="nothere.jpg.*does not exist"):
        preprocess_image(tmp_path / "nothere.jpg")
    bad = tmp_path / "00000001.jpg"
    bad.write_text("not an image")
    with pytest.raises(FrameError, match="00000001.jpg.*not a readable image"):
        preprocess_image(bad)
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(jpeg_file(tmp_path, 320, 240, 9).read_bytes()[:600])
    with pytest.raises(FrameError, match="trunc.jpg"):
        preprocess_image(trunc)
    with pytest.raises(ValueError, match="mode"):
        preprocess_image(bad, mode="turbo")


# ----------------------------------------------------------------------------------------------- load_video


def test_load_video_padding_and_mask(tmp_path):
    make_folder(tmp_path / "v", 5)
    frames, mask, files = load_video(tmp_path / "v", max_frames=12, framerate=1, image_size=32)
    assert frames.shape == (12, 3, 32, 32) and frames.dtype == torch.float32
    assert mask.dtype == torch.int64 and mask.tolist() == [1] * 5 + [0] * 7
    assert files == [f"{i:08d}.jpg" for i in range(1, 6)]
    assert torch.count_nonzero(frames[5:]) == 0 and torch.count_nonzero(frames[:5].flatten(1), dim=1).min() > 0
    assert torch.equal(frames[2], preprocess_image(tmp_path / "v" / files[2], 32))


def test_load_video_jitter_uses_rng(tmp_path):
    make_folder(tmp_path / "v", 80, size=(16, 12))
    _, _, plain = load_video(tmp_path / "v", max_frames=4, image_size=16)
    _, _, a = load_video(tmp_path / "v", max_frames=4, image_size=16, rng=np.random.default_rng(7))
    _, _, b = load_video(tmp_path / "v", max_frames=4, image_size=16, rng=np.random.default_rng(7))
    assert a == b and a[0] == plain[0] and a[-1] == plain[-1] and a != plain


def test_load_video_errors(tmp_path):
    with pytest.raises(FrameError, match="video404.*does not exist"):
        load_video(tmp_path / "video404")
    (tmp_path / "empty_video").mkdir()
    with pytest.raises(FrameError, match="empty_video.*empty"):
        load_video(tmp_path / "empty_video")
    make_folder(tmp_path / "short", 1)
    with pytest.raises(FrameError, match="short.*feature_framerate 2"):
        load_video(tmp_path / "short", framerate=2)
    make_folder(tmp_path / "corrupt", 3)
    (tmp_path / "corrupt" / "00000002.jpg").write_bytes(b"\x00garbage")
    with pytest.raises(FrameError, match="corrupt/00000002.jpg"):
        load_video(tmp_path / "corrupt", image_size=32)


# ----------------------------------------------------------------------------------------- fixture parity


@pytest.mark.parametrize("ds", DATASETS)
def test_fixture_sampling_and_preprocessing(parity_dir, ds):
    """Sampled files == the original's, and per-frame input statistics == the original's (all slots)."""
    args = json.loads((parity_dir / "commands.json").read_text())[ds]["args"]
    meta = json.loads((parity_dir / "expected" / f"{ds}.meta.json").read_text())
    emb = np.load(parity_dir / "expected" / f"{ds}.emb.npz")
    root = parity_dir / args["features_path"]
    assert sorted(meta["frames"]) == sorted(meta["video_ids"])
    for j, vid in enumerate(meta["video_ids"]):
        frames, mask, files = load_video(root / vid, max_frames=int(args["max_frames"]),
                                         framerate=int(args["feature_framerate"]), image_size=224)
        assert len(list_frame_files(root / vid)) == meta["frames"][vid]["n_files"]
        assert files == meta["frames"][vid]["sampled"], vid
        np.testing.assert_array_equal(mask.numpy(), emb["video_mask"][j])
        mean = frames.mean(dim=(2, 3)).numpy()
        std = frames.std(dim=(2, 3)).numpy()  # unbiased, as torch's default
        assert np.abs(mean - emb["frame_input_mean"][j]).max() <= 1e-6, vid
        assert np.abs(std - emb["frame_input_std"][j]).max() <= 1e-6, vid
