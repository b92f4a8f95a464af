"""infer_retrieval.py on a tiny model and synthetic frames: outputs, options and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clip2video.cli import infer_retrieval
from clip2video.cli.common import model_fields
from clip2video.dataloaders.synthetic import make_synthetic_dataset
from clip2video.modules.network.backbone import ClipConfig
from clip2video.modules.weights.factory import create_model
from clip2video.modules.weights.release import export_original


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_synthetic_dataset(root / "synth", n_videos=16, seed=1, size=32, n_frames=12, write="frames")
    torch.manual_seed(0)
    model = create_model("tab_tdb", clip_config=ClipConfig.tiny(), center_k=3)
    ckpt = export_original(model, root / "ckpt" / "pytorch_model.bin.1")
    return root, ckpt, model


def base_argv(root, ckpt):
    return ["--datatype", "generic", "--data_path", str(root / "synth" / "annotations.csv"), "--split", "test",
            "--features_path", str(root / "synth" / "frames"), "--checkpoint", str(ckpt.parent), "--model_num", "1",
            "--max_words", "16", "--batch_size_val", "4", "--num_thread_reader", "0", "--device", "cpu"]


def test_outputs_visualize_dsl(setup, tmp_path, capsys):
    root, ckpt, model = setup
    argv = base_argv(root, ckpt) + ["--output_dir", str(tmp_path / "run"), "--save_sim", str(tmp_path / "s.npy"),
                                    "--metrics_json", str(tmp_path / "m.json"), "--dsl",
                                    "--visualize", "3", str(tmp_path / "grid.png")]
    assert infer_retrieval.main(argv) == 0
    sim = np.load(tmp_path / "s.npy")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {"t2v", "v2t", "dsl", "run"} and set(metrics["t2v"]) == {"R1", "R5", "R10", "MdR", "MnR"}
    assert metrics["run"]["post_processing"]["dsl"]["note"] == "uses all test queries; not a single-query method"
    assert sim.dtype == np.float32 and sim.shape[0] == 2 * sim.shape[1]  # two captions per clip
    assert (tmp_path / "run" / "log.txt").read_text().count("markdown: |") == 2
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size[1] > 3 * 96
    out = capsys.readouterr().out
    assert "mask layout per_video" in out and "dual-softmax" in out


def test_bf16_close_to_fp32(setup, tmp_path):
    root, ckpt, _ = setup
    for p in ("fp32", "bf16"):
        assert infer_retrieval.main(base_argv(root, ckpt) + ["--precision", p, "--save_sim",
                                                              str(tmp_path / f"{p}.npy")]) == 0
    a, b = np.load(tmp_path / "fp32.npy"), np.load(tmp_path / "bf16.npy")
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max() + 0.05


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda a: a.__setitem__(a.index("--model_num") + 1, "7"), "does not exist"),
        (lambda a: a.__setitem__(a.index("--datatype") + 1, "youtube"), "--datatype"),
        (lambda a: a.__setitem__(a.index("--features_path") + 1, "/nonexistent/frames"), "--features_path"),
        (lambda a: a.extend(["--variant", "tdb"]), "unexpected keys"),
        (lambda a: a.extend(["--variant", "tab_tdb", "--centerK", "5"]), "shape mismatch"),
        (lambda a: a.__setitem__(slice(a.index("--checkpoint"), a.index("--checkpoint") + 2), ["--zero_shot"]),
         "--zero_shot needs --clip_path"),
        (lambda a: a.extend(["--precision", "fp64"]), "--precision"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(setup, capsys, edit, needle):
    root, ckpt, _ = setup
    argv = base_argv(root, ckpt)
    edit(argv)
    rc = infer_retrieval.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert needle in err and err.count("\n") == 0, err


def test_missing_frames_of_a_listed_video(setup, tmp_path, capsys):
    import shutil

    from clip2video.dataloaders.annotations import load_eval_set

    root, ckpt, _ = setup
    frames = tmp_path / "frames"
    shutil.copytree(root / "synth" / "frames", frames)
    victim = load_eval_set("generic", data_path=str(root / "synth" / "annotations.csv"), split="test").video_ids[0]
    shutil.rmtree(frames / victim)
    argv = base_argv(root, ckpt)
    argv[argv.index("--features_path") + 1] = str(frames)
    rc = infer_retrieval.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and victim in err and err.count("\n") == 0, err
    # with --skip_missing the video is dropped (and logged) instead
    assert infer_retrieval.main(argv + ["--skip_missing"]) == 0


@pytest.mark.parametrize("name", ["msrvtt_1ka", "msrvtt_full", "msvd", "vatex_hgr", "vatex_1k5"])
def test_eval_configs_hold_the_papers_flags(name):
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[1] / "configs" / "eval" / f"{name}.yaml"
    args = infer_retrieval.parse_with_config(infer_retrieval.build_parser(), ["--config", str(cfg)])
    variant, fields = model_fields(args)
    assert variant == "tab_tdb" and fields["center_weight"] == 0.5
    assert fields["center_k"] == (7 if "vatex" in name else 5)
    assert args.feature_framerate == (2 if "msrvtt" in name else 1)
    assert args.max_words == 32 and args.max_frames == 12
    # flags on the command line win over the file
    args = infer_retrieval.parse_with_config(infer_retrieval.build_parser(),
                                             ["--config", str(cfg), "--batch_size_val", "8"])
    assert args.batch_size_val == 8
