"""Shared test helpers: paths to the reference data beside the checkout, tiny models and data sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CLIP2VIDEO_SHARED", ROOT.parent / "shared"))
REFERENCE = SHARED / "reference-data"
PARITY = SHARED / "fixtures" / "parity-small"


def need(path: Path) -> Path:
    """Skip the calling test cleanly when an optional data folder beside the checkout is absent."""
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of small matrices: faster than two on a busy machine, and those
    tests' results do not depend on it (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def reference_dir() -> Path:
    return need(REFERENCE)


@pytest.fixture
def parity_dir() -> Path:
    return need(PARITY)


@pytest.fixture(scope="session")
def parity_weights(tmp_path_factory) -> Path:
    """The parity fixture's random weights, generated once per test session by its own script."""
    need(PARITY)
    from parity_utils import make_weights

    return make_weights(tmp_path_factory.mktemp("parity-weights"))


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "magenta": (255, 0, 255), "cyan": (0, 255, 255), "white": (255, 255, 255), "black": (0, 0, 0)}


def make_colour_clips(root: Path, n_videos: int, frames: int, colours: int, size: tuple[int, int],
                      noise: int) -> tuple[Path, Path]:
    """Frame folders of one colour each plus ±``noise`` levels (PNG, lossless) and a generic csv naming the
    colour; the last 4 videos are ``val``, the others ``train``. Returns (csv, frame root)."""
    import numpy as np
    from PIL import Image

    names = list(COLOURS)[:colours]
    rng = np.random.default_rng(0)
    feats = root / "frames"
    rows = ["video_id,caption,split"]
    for v in range(n_videos):
        name = names[v % len(names)]
        d = feats / f"video{v}"
        d.mkdir(parents=True)
        for f in range(frames):
            pixels = np.array(COLOURS[name]) + rng.integers(-noise, noise + 1, size=(*size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(d / f"{f + 1:08d}.png")
        rows.append(f"video{v},a video that is {name},{'val' if v >= n_videos - 4 else 'train'}")
    (root / "annotations.csv").write_text("\n".join(rows) + "\n")
    return root / "annotations.csv", feats


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny TAB-TDB model (seed 0) exported in the release format."""
    import torch

    from clip2video.modules.network.backbone import ClipConfig
    from clip2video.modules.weights.factory import create_model
    from clip2video.modules.weights.release import export_original

    torch.manual_seed(0)
    model = create_model("tab_tdb", clip_config=ClipConfig.tiny(), center_k=3)
    return export_original(model, tmp_path_factory.mktemp("ckpt") / "pytorch_model.bin.1")


def generic_eval_argv(ann: Path, features: Path, ckpt: Path, sim: Path, *extra: str, max_frames: int) -> list[str]:
    """``infer_retrieval.py`` flags for a generic csv's test split with a :func:`tiny_ckpt` export."""
    return ["--datatype", "generic", "--data_path", str(ann), "--split", "test", "--features_path", str(features),
            "--checkpoint", str(ckpt.parent), "--model_num", "1", "--max_words", "16", "--max_frames", str(max_frames),
            "--batch_size_val", "4", "--num_thread_reader", "0", "--device", "cpu", "--save_sim", str(sim), *extra]
