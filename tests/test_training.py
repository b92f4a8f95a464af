"""Training loop: learning, NaN stop, export, resume after SIGKILL, train.py flags (CPU, tiny models).

The in-memory data is learnable on purpose: every video is noise around one of 8 colours and its caption
names that colour, so a working loop must reach validation R@1 far above chance (1/8).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from clip2video.modules.network.backbone import ClipConfig
from clip2video.modules.runtime.logging_utils import read_log
from clip2video.modules.training.loop import NonFiniteLossError, TrainConfig, ValData, train, validate
from clip2video.modules.training.optim import OptimConfig
from clip2video.modules.weights.factory import create_model

from conftest import make_colour_clips

ROOT = Path(__file__).resolve().parents[1]
N_COLOURS = 8
PALETTE = 1.5 * torch.tensor(
    [[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1], [1, 1, 1], [-1, -1, -1]],
    dtype=torch.float,
)
VOCAB, LENGTH, FRAMES, SIZE = 32, 6, 4, 16
START, END = 1, VOCAB - 1


@pytest.fixture(autouse=True)
def one_thread():
    """Micro models gain nothing from intra-op threads, and on a busy machine spinning OpenMP threads slow them
    down by an order of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def micro_clip() -> ClipConfig:
    """Smallest CLIP the heads accept: one block per tower, width 64, 16×16 images of 2×2 patches."""
    return ClipConfig(embed_dim=64, image_size=SIZE, patch_size=8, vision_width=64, vision_layers=1,
                      context_length=16, vocab_size=VOCAB, text_width=64, text_layers=1)


def micro_model(variant: str = "tab_tdb", seed: int = 0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("mask_layout", "per_video")
    return create_model(variant, clip_config=micro_clip(), cross_layers=1, **kw)


def colour_ids(colour: int, filler: int | None = None) -> torch.Tensor:
    ids = torch.zeros(LENGTH, dtype=torch.long)
    words = [START, 2 + colour] + ([2 + N_COLOURS + filler] if filler is not None else []) + [END]
    ids[: len(words)] = torch.tensor(words)
    return ids


class ColourPairs(Dataset):
    """(caption, video) pairs; sample i has colour (5i + seed) mod 8 and 1..4 real frames."""

    def __init__(self, n: int, seed: int = 0, nan_from: int | None = None):
        self.n, self.seed, self.nan_from = n, seed, nan_from

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 7919 + i)
        colour = (5 * i + self.seed) % N_COLOURS
        frames = PALETTE[colour][None, :, None, None] + 0.8 * torch.randn(FRAMES, 3, SIZE, SIZE, generator=g)
        if self.nan_from is not None and i >= self.nan_from:
            frames = torch.full_like(frames, float("nan"))
        length = int(torch.randint(1, FRAMES + 1, (1,), generator=g))
        ids = colour_ids(colour, i % 3)
        return {"input_ids": ids, "attention_mask": (ids > 0).long(), "frames": frames,
                "frame_mask": (torch.arange(FRAMES) < length).long(), "index": i}


class ColourVideos(Dataset):
    """Validation videos: video i has colour i mod 8 (fresh noise)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(100_000 + i)
        frames = PALETTE[i % N_COLOURS][None, :, None, None] + 0.8 * torch.randn(FRAMES, 3, SIZE, SIZE, generator=g)
        return {"frames": frames, "mask": torch.ones(FRAMES, dtype=torch.long), "index": i}


class ColourTokenizer:
    def batch(self, captions):
        ids = torch.stack([colour_ids(int(c)) for c in captions])
        return ids, (ids > 0).long()


class ColourSet:
    """RetrievalSet-like: caption i names the colour of video i."""

    def __init__(self, n: int):
        self.video_ids = [f"v{i}" for i in range(n)]
        self.captions = [str(i % N_COLOURS) for i in range(n)]
        self.caption_video = np.arange(n, dtype=np.int64)
        self.multi_caption = False

    def video_batches(self, bs: int):
        n = len(self.video_ids)
        return [list(range(s, min(s + bs, n))) for s in range(0, n, bs)]


def colour_val(n: int = 8) -> ValData:
    return ValData(ColourSet(n), ColourVideos(n), ColourTokenizer(), batch_size_val=8)


def micro_cfg(out: Path, **kw) -> TrainConfig:
    opt = kw.pop("optim", OptimConfig(lr=2e-3, coef_lr=0.5, warmup_proportion=0.1))
    base = dict(output_dir=out, batch_size=8, epochs=1, num_workers=0, progress=False, freeze_layer_num=-1,
                optim=opt)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------------------------- in-memory loop
def test_tiny_model_learns_far_above_chance(tmp_path):
    model = micro_model()
    val = colour_val(8)
    before = validate(model, val, device=torch.device("cpu"))["t2v"]["R1"]
    res = train(model, ColourPairs(160), micro_cfg(tmp_path, epochs=10, max_steps=200, eval_every=0), val=val)
    r1 = res.metrics["t2v"]["R1"]
    assert res.state.step == 200
    assert r1 >= 75.0, f"R@1 {r1} after training (chance 12.5, before {before})"
    assert res.losses[-1] < 0.5 * res.losses[0]
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "latest.pt").is_file()
    log = read_log(tmp_path / "log.jsonl")
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 201))
    assert {"loss_global", "loss_tab", "lr", "lr_clip", "logit_scale", "samples_per_s"} <= set(steps[0])
    assert any("val" in r for r in log)
    assert all(r["logit_scale"] <= 100.0 + 1e-3 for r in steps)


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
    # shuffle off: step s reads samples [8(s-1), 8s); samples >= 24 are NaN → step 4 fails
    model = micro_model()
    with pytest.raises(NonFiniteLossError, match=r"at step 4 \(epoch 0"):
        train(model, ColourPairs(64, nan_from=24), micro_cfg(tmp_path, save_every_steps=1), shuffle=False)
    ck = torch.load(tmp_path / "latest.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == 3
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_export_evaluates_like_the_in_memory_model(tmp_path):
    from clip2video.modules.weights.factory import load_model

    model = micro_model()
    val = colour_val(8)
    train(model, ColourPairs(32), micro_cfg(tmp_path, epochs=1), val=val)
    export = tmp_path / "pytorch_model.bin.0"
    assert export.is_file()
    sd = torch.load(export, map_location="cpu", weights_only=True)
    assert set(sd) == set(model.state_dict())  # the release layout: clip.* + head names, nothing else
    loaded = load_model(export).eval()
    assert loaded.config == model.config
    m_mem = validate(model.eval(), val, device=torch.device("cpu"))
    m_exp = validate(loaded, val, device=torch.device("cpu"))
    assert m_mem == m_exp
    best = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=False)
    assert best["metric"] == m_mem


def test_gradient_accumulation_runs_and_counts_optimizer_steps(tmp_path):
    model = micro_model("meanP")
    res = train(model, ColourPairs(32), micro_cfg(tmp_path, gradient_accumulation_steps=2, epochs=2))
    assert res.state.step == 8  # 32 pairs / batch 8 × 2 epochs, whatever the accumulation
    assert all(math.isfinite(x) for x in res.losses)


# ----------------------------------------------------------------------------------------------- train.py end to end
def make_generic_data(root: Path) -> tuple[Path, Path]:
    """Frame folders of coloured noise (32×32 PNG, lossless) + a generic csv naming the colour."""
    return make_colour_clips(root, n_videos=16, frames=6, colours=8, size=(32, 32), noise=60)


def train_argv(csv: Path, feats: Path, out: Path, *extra: str) -> list[str]:
    return ["--tiny_clip", "--datatype", "generic", "--data_path", str(csv), "--features_path", str(feats),
            "--val_split", "val", "--output_dir", str(out), "--batch_size", "4", "--batch_size_val", "4",
            "--epochs", "2", "--max_frames", "4", "--max_words", "12", "--num_thread_reader", "0",
            "--variant", "tab_tdb", "--lr", "1e-3", "--coef_lr", "0.1", "--seed", "3", "--no_progress", *extra]


def losses_of(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_log(out / "log.jsonl") if "loss" in r]


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
    csv, feats = make_generic_data(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    # 12 training pairs / batch 4 = 3 steps per epoch, 2 epochs = 6 steps; checkpoint every step
    cmd = [sys.executable, str(ROOT / "train.py"), *train_argv(csv, feats, ref, "--save_every_steps", "1")]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)

    cmd = [sys.executable, str(ROOT / "train.py"), *train_argv(csv, feats, cut, "--save_every_steps", "1")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        latest = cut / "latest.pt"
        if latest.is_file():
            step = torch.load(latest, map_location="cpu", weights_only=False)["step"]
            if step >= 2:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert killed_at is not None and killed_at < 6, "the run finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL

    # resume in a fresh process too, so thread settings of the test process cannot change the arithmetic
    cmd = [sys.executable, str(ROOT / "train.py"),
           *train_argv(csv, feats, cut, "--save_every_steps", "1", "--resume", "latest")]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    a = torch.load(ref / "latest.pt", map_location="cpu", weights_only=False)
    b = torch.load(cut / "latest.pt", map_location="cpu", weights_only=False)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert losses_of(ref) == losses_of(cut)
    assert [r["val"] for r in read_log(ref / "log.jsonl") if "val" in r] == [
        r["val"] for r in read_log(cut / "log.jsonl") if "val" in r
    ]
    for n in (0, 1):
        assert (cut / f"pytorch_model.bin.{n}").is_file()
    args = json.loads((cut / "args.json").read_text())
    assert args["resume"] == "latest" and args["batch_size"] == 4

    # the last export, evaluated by infer_retrieval.py on the validation split, gives the logged metrics
    from clip2video.cli.infer_retrieval import main as infer

    metrics = tmp_path / "metrics.json"
    assert infer(["--checkpoint", str(cut), "--model_num", "1", "--datatype", "generic", "--data_path", str(csv),
                  "--split", "val", "--features_path", str(feats), "--max_frames", "4", "--max_words", "12",
                  "--batch_size_val", "4", "--num_thread_reader", "0", "--metrics_json", str(metrics)]) == 0
    last_val = [r["val"] for r in read_log(cut / "log.jsonl") if "val" in r][-1]
    got = json.loads(metrics.read_text())
    assert {d: got[d] for d in ("t2v", "v2t")} == last_val


# ----------------------------------------------------------------------------------------------- flags
def test_yaml_defaults_and_flag_override(tmp_path):
    from clip2video.cli.train import parse_args

    feats = tmp_path / "frames"
    feats.mkdir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.5\nbatch_size: 64\ncenterK: 7\nvariant: tdb\n")
    base = ["--config", str(cfg), "--tiny_clip", "--features_path", str(feats), "--output_dir", str(tmp_path)]
    a = parse_args(base)
    assert (a.lr, a.batch_size, a.centerK, a.variant, a.epochs) == (0.5, 64, 7, "tdb", 5)
    b = parse_args([*base, "--lr", "0.25", "--variant", "meanP"])
    assert (b.lr, b.batch_size, b.variant) == (0.25, 64, "meanP")


def test_paper_configs_parse(tmp_path):
    from clip2video.cli.train import parse_args

    feats = tmp_path / "frames"
    feats.mkdir()
    runs = ["msrvtt_9k", "msrvtt_full", "msvd", "vatex"]
    rows = ["meanP", "seqTransf", "tdb_sub", "tdb_mlp", "tdb", "tdb_all", "tab_base", "tab_transformer", "tab_tdb"]
    files = [ROOT / "configs" / "train" / f"{n}.yaml" for n in runs + [f"msrvtt_9k_ablation_{r}" for r in rows]]
    for f in files:
        a = parse_args(["--config", str(f), "--tiny_clip", "--features_path", str(feats), "--output_dir", "x"])
        assert a.lr == 1e-4 and a.coef_lr == 1e-3 and a.batch_size == 128 and a.epochs == 5, f.name
        assert a.recipe == "clip4clip" and a.gather_grad == "exact", f.name  # the paper's training step
        assert a.max_words == 32 and a.max_frames == 12 and a.center_weight == 0.5, f.name
        assert a.centerK == (7 if "vatex" in f.name else 5), f.name
        assert a.feature_framerate == (2 if "msrvtt" in f.name else 1), f.name
        if "ablation" in f.name:
            assert a.variant == f.stem.split("ablation_")[1]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config", "nope.yaml"], "--config nope.yaml: no such file"),
        (["--batch_size", "0"], "--batch_size must be >= 1"),
        (["--warmup_proportion", "1.5"], "--warmup_proportion must be in [0, 1)"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(tmp_path, capsys, extra, message):
    from clip2video.cli.train import main

    feats = tmp_path / "frames"
    feats.mkdir()
    rc = main(["--tiny_clip", "--features_path", str(feats), "--output_dir", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1


def test_missing_weights_flag_is_named(tmp_path, capsys):
    from clip2video.cli.train import main

    assert main(["--features_path", str(tmp_path), "--output_dir", str(tmp_path / "o")]) == 2
    assert "--clip_path" in capsys.readouterr().err
