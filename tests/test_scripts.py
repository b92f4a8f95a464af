"""scripts/*.sh and configs/train: the shared launchers, their wrappers, and the Table-1 configs."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
TABLE1 = ["meanP", "seqTransf", "tdb_sub", "tdb_mlp", "tdb", "tdb_all", "tab_base", "tab_transformer", "tab_tdb"]
need_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")


@need_bash
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_valid_bash(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", ["msrvtt_1ka", "msrvtt_full", "msvd", "vatex_1k5", "vatex_hgr"])
def test_eval_wrappers_call_the_shared_launcher(name):
    text = (ROOT / "scripts" / f"eval_{name}.sh").read_text()
    assert f'eval.sh" {name} "$@"' in text and (ROOT / "configs" / "eval" / f"{name}.yaml").is_file()


@pytest.mark.parametrize("name", ["msrvtt_9k", "msrvtt_full", "msvd", "vatex"])
def test_train_wrappers_call_the_shared_launcher(name):
    text = (ROOT / "scripts" / f"train_{name}.sh").read_text()
    assert f'train.sh" {name} "$@"' in text and (ROOT / "configs" / "train" / f"{name}.yaml").is_file()


def test_both_launchers_set_up_the_environment():
    for name in ("eval.sh", "train.sh"):
        assert "source scripts/env.sh" in (ROOT / "scripts" / name).read_text(), name


@need_bash
@pytest.mark.parametrize("argv, env, needle", [
    (["eval.sh", "msrvtt_7k"], {"DATA": "d", "FEATURES": "f", "CKPT": "c"}, "unknown protocol 'msrvtt_7k'"),
    (["train.sh", "msrvtt_7k"], {"DATA": "d", "FEATURES": "f", "CLIP": "c"}, "no configs/train/msrvtt_7k.yaml"),
    (["eval.sh", "msvd"], {}, "DATA"),
    (["train_ablation.sh"], {}, "VARIANT"),
])
def test_launchers_refuse_bad_arguments_before_setup(argv, env, needle):
    clean = {k: v for k, v in os.environ.items() if k not in ("DATA", "FEATURES", "CKPT", "CLIP", "VARIANT")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / argv[0]), *argv[1:]], capture_output=True, text=True,
                          env={**clean, **env, "CLIP2VIDEO_USE_CURRENT_PYTHON": "1"}, timeout=60)
    assert proc.returncode != 0 and needle in proc.stderr, proc.stderr


def test_ablation_configs_are_msrvtt_9k_with_another_variant(tmp_path):
    from clip2video.cli.train import parse_args

    feats = tmp_path / "frames"
    feats.mkdir()

    def parsed(name: str) -> dict:
        a = parse_args(["--config", str(ROOT / "configs" / "train" / f"{name}.yaml"), "--tiny_clip",
                        "--features_path", str(feats), "--output_dir", "x"])
        return {k: v for k, v in vars(a).items() if k != "config"}

    base = parsed("msrvtt_9k")
    assert base["variant"] == "tab_tdb"
    for row in TABLE1:
        text = (ROOT / "configs" / "train" / f"msrvtt_9k_ablation_{row}.yaml").read_text()
        assert "base: msrvtt_9k.yaml" in text, row
        got = parsed(f"msrvtt_9k_ablation_{row}")
        assert got["variant"] == row
        assert {**got, "variant": base["variant"]} == base, row  # everything else inherited unchanged


@need_bash
def test_eval_script_on_tiny_msvd_data(tmp_path):
    """scripts/eval_msvd.sh → eval.sh → infer_retrieval.py gives what infer_retrieval.main gives with the
    config's flags and the script's paths."""
    from clip2video.cli import infer_retrieval
    from clip2video.dataloaders.synthetic import make_synthetic_dataset
    from clip2video.modules.network.backbone import ClipConfig
    from clip2video.modules.weights.factory import create_model
    from clip2video.modules.weights.release import export_original

    synth = make_synthetic_dataset(tmp_path / "synth", n_videos=6, seed=2, size=32, n_frames=4, write="frames")
    meta = json.loads(Path(synth["videos_json"]).read_text())
    data = tmp_path / "msvd"
    data.mkdir()
    ids = sorted(meta)
    (data / "test_list.txt").write_text("\n".join(ids) + "\n")
    (data / "raw-captions.pkl").write_bytes(pickle.dumps({v: [c.split() for c in meta[v]["captions"]] for v in ids}))
    torch.manual_seed(0)
    ckpt = export_original(create_model("tab_tdb", clip_config=ClipConfig.tiny(), center_k=5),
                           tmp_path / "ckpt" / "pytorch_model.bin.2")
    extra = ["--num_thread_reader", "0", "--device", "cpu", "--batch_size_val", "4", "--max_words", "16"]
    env = {**os.environ, "DATA": str(data), "FEATURES": synth["media"], "CKPT": str(ckpt.parent),
           "OUT": str(tmp_path / "out"), "CLIP2VIDEO_USE_CURRENT_PYTHON": "1", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "eval_msvd.sh"), *extra], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (tmp_path / "out" / "eval.log").is_file()

    want_path = tmp_path / "direct.json"
    assert infer_retrieval.main(["--config", str(ROOT / "configs" / "eval" / "msvd.yaml"), "--data_path", str(data),
                                 "--features_path", synth["media"], "--checkpoint", str(ckpt.parent), "--model_num",
                                 "2", "--metrics_json", str(want_path), *extra]) == 0
    want = json.loads(want_path.read_text())
    assert set(got) == {"t2v", "v2t", "run"}
    for d in ("t2v", "v2t"):
        assert got[d] == pytest.approx(want[d], abs=1e-6)
