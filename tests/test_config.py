"""YAML configs: ``base:`` chains, the protocol's annotation files (``annotations:`` + ``--data_root``), and the
launch scripts that only pick a config and pass paths."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from clip2video.cli import infer_retrieval, train
from clip2video.cli.common import ANNOTATION_FLAGS, UsageError, load_config, parse_with_config

from conftest import ROOT

EVAL_CONFIGS = sorted(p.stem for p in (ROOT / "configs" / "eval").glob("*.yaml"))
TRAIN_CONFIGS = sorted(p.stem for p in (ROOT / "configs" / "train").glob("*.yaml"))
need_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def parse_eval(argv: list[str]):
    return parse_with_config(infer_retrieval.build_parser(), argv)


def parse_train(argv: list[str]):
    return parse_with_config(train.build_parser(), argv)


# ----------------------------------------------------------------------------------------------- base chains
def test_base_chain_of_depth_three_overrides_a_key_at_each_level(tmp_path):
    write(tmp_path, "c.yaml", "max_words: 20\nmax_frames: 8\nfeature_framerate: 3\nbatch_size_val: 7\n")
    write(tmp_path, "b.yaml", "base: c.yaml\nmax_frames: 10\nfeature_framerate: 4\n")
    a = write(tmp_path, "a.yaml", "base: b.yaml\nfeature_framerate: 5\n")
    assert load_config(a) == {"max_words": 20, "max_frames": 10, "feature_framerate": 5, "batch_size_val": 7}
    args = parse_eval(["--config", str(a), "--batch_size_val", "9"])
    assert (args.max_words, args.max_frames, args.feature_framerate, args.batch_size_val) == (20, 10, 5, 9)
    assert {"max_words", "max_frames", "feature_framerate", "batch_size_val"} <= set(args.given_flags)


def test_base_in_a_sub_folder_is_relative_to_the_file_naming_it(tmp_path):
    (tmp_path / "lib").mkdir()
    write(tmp_path / "lib", "root.yaml", "max_words: 24\n")
    write(tmp_path / "lib", "mid.yaml", "base: root.yaml\nmax_frames: 6\n")
    top = write(tmp_path, "top.yaml", "base: lib/mid.yaml\n")
    assert load_config(top) == {"max_words": 24, "max_frames": 6}


def test_base_chain_that_loops_is_refused_in_one_line(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\nmax_words: 20\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(UsageError) as e:
        load_config(tmp_path / "a.yaml")
    assert str(e.value) == f"--config {tmp_path / 'a.yaml'}: base chain loops: a.yaml → b.yaml → a.yaml"
    write(tmp_path, "self.yaml", "base: self.yaml\n")
    with pytest.raises(UsageError, match="base chain loops: self.yaml → self.yaml$"):
        load_config(tmp_path / "self.yaml")


def test_base_chain_loop_through_the_command_line_exits_2(tmp_path, capsys):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: c.yaml\n")
    write(tmp_path, "c.yaml", "base: b.yaml\n")
    rc = infer_retrieval.main(["--config", str(tmp_path / "a.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "base chain loops: a.yaml → b.yaml → c.yaml → b.yaml" in err


def test_missing_base_deep_in_the_chain_is_one_line(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: gone.yaml\n")
    with pytest.raises(UsageError) as e:
        load_config(tmp_path / "a.yaml")
    msg = str(e.value)
    assert msg.startswith(f"--config {tmp_path / 'a.yaml'}:") and "'gone.yaml' of b.yaml not found" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("text, needle", [
    ("base: [a, b]\n", "base must be a file name"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_config_files_are_one_line(tmp_path, text, needle):
    bad = write(tmp_path, "bad.yaml", text)
    top = write(tmp_path, "top.yaml", "base: bad.yaml\n")
    for path in (bad, top):
        with pytest.raises(UsageError, match=needle) as e:
            load_config(path)
        assert "\n" not in str(e.value)


def test_unknown_key_inherited_from_a_base_is_named(tmp_path):
    write(tmp_path, "base.yaml", "no_such_flag: 1\n")
    top = write(tmp_path, "top.yaml", "base: base.yaml\n")
    with pytest.raises(UsageError, match="unknown keys no_such_flag"):
        parse_eval(["--config", str(top)])


# ----------------------------------------------------------------------------------------------- annotations
def test_annotations_fill_the_flags_inside_data_root(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    cfg = write(tmp_path, "p.yaml", "annotations:\n  val_csv: test.csv\n  data_path: ann.json\n")
    args = parse_eval(["--config", str(cfg), "--data_root", str(data)])
    assert args.val_csv == str(data / "test.csv") and args.data_path == str(data / "ann.json")
    assert {"val_csv", "data_path"} <= set(args.given_flags)
    # a flag on the command line wins; without --data_root the names are not used at all
    args = parse_eval(["--config", str(cfg), "--data_root", str(data), "--val_csv", "mine.csv"])
    assert args.val_csv == "mine.csv" and args.data_path == str(data / "ann.json")
    args = parse_eval(["--config", str(cfg)])
    assert args.val_csv is None and args.data_path is None and "val_csv" not in args.given_flags


def test_annotations_are_inherited_through_base(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write(tmp_path, "base.yaml", "annotations:\n  train_csv: t.csv\n  data_path: d.json\n")
    cfg = write(tmp_path, "run.yaml", "base: base.yaml\nmax_frames: 4\n")
    args = parse_train(["--config", str(cfg), "--data_root", str(data), "--output_dir", "x"])
    assert (args.train_csv, args.data_path, args.max_frames) == (str(data / "t.csv"), str(data / "d.json"), 4)


@pytest.mark.parametrize("text, argv, needle", [
    ("annotations:\n  train_csv: t.csv\n", [], "annotations: unknown flag 'train_csv'"),  # not an eval flag
    ("annotations:\n  features_path: f\n", [], "annotations: unknown flag 'features_path'"),
    ("annotations: t.csv\n", [], "annotations must be a mapping"),
    ("annotations:\n  val_csv: 3\n", [], "val_csv must be a file name"),
    ("max_words: 20\n", ["--data_root", "{data}"], "needs a --config that names the annotation files"),
    ("annotations:\n  val_csv: t.csv\n", ["--data_root", "{data}/nope"], "--data_root .*nope: no such folder"),
])
def test_bad_annotations_are_one_line(tmp_path, text, argv, needle):
    (tmp_path / "data").mkdir()
    cfg = write(tmp_path, "p.yaml", text)
    argv = [a.format(data=tmp_path / "data") for a in argv]
    with pytest.raises(UsageError, match=needle) as e:
        parse_eval(["--config", str(cfg), *argv])
    assert "\n" not in str(e.value)


def test_data_root_without_any_config_is_one_line_exit_2(tmp_path, capsys):
    rc = infer_retrieval.main(["--data_root", str(tmp_path), "--features_path", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--data_root" in err and "annotations:" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------- shipped configs
# The protocol's annotation files (data/README.md), inside the annotation folder; "." is the folder itself.
MSRVTT_JSON = "MSRVTT_data.json"
EVAL_FILES = {
    "msrvtt_1ka": {"val_csv": "MSRVTT_JSFUSION_test.csv", "data_path": MSRVTT_JSON},
    "msrvtt_full": {"val_csv": "MSRVTT_test.full.csv", "data_path": MSRVTT_JSON},
    "msvd": {"data_path": "."},
    "vatex_1k5": {"data_path": "."},
    "vatex_hgr": {"data_path": "."},
}


def test_every_eval_protocol_is_described():
    assert sorted(EVAL_FILES) == EVAL_CONFIGS


@pytest.mark.parametrize("name", EVAL_CONFIGS)
def test_eval_configs_name_their_annotation_files_and_checkpoint(name, tmp_path):
    args = parse_eval(["--config", str(ROOT / "configs" / "eval" / f"{name}.yaml"), "--data_root", str(tmp_path)])
    for flag in ANNOTATION_FLAGS:
        want = EVAL_FILES[name].get(flag)
        assert getattr(args, flag, None) == (None if want is None else str(tmp_path / want)), flag
    assert str(args.model_num) == ("22" if name.startswith("vatex") else "2")  # the released checkpoints
    assert args.datatype == {"msrvtt_1ka": "msrvtt", "msrvtt_full": "msrvttfull", "msvd": "msvd"}.get(
        name, "vatexEnglish")


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_train_configs_name_annotation_files_that_fit_their_datatype(name, tmp_path):
    args = parse_train(["--config", str(ROOT / "configs" / "train" / f"{name}.yaml"), "--data_root",
                        str(tmp_path), "--output_dir", "x"])
    if name.startswith("msrvtt_9k"):
        assert (args.datatype, args.val_datatype, args.val_csv) == ("msrvtt", "msrvttfull", None)
        assert args.train_csv == str(tmp_path / "MSRVTT_train.9k.csv")
        assert args.data_path == str(tmp_path / MSRVTT_JSON)
    elif name.startswith("msrvtt_full"):
        assert args.datatype == args.val_datatype == "msrvttfull"
        assert (args.train_csv, args.val_csv, args.data_path) == tuple(
            str(tmp_path / f) for f in ("MSRVTT_train.full.csv", "MSRVTT_val.full.csv", MSRVTT_JSON))
    else:  # MSVD / VATEX read split lists from the annotation folder itself
        assert args.datatype in ("msvd", "vatexEnglish") and args.val_split == "val"
        assert args.data_path == str(tmp_path) and args.train_csv is None and args.val_csv is None


def test_launch_scripts_hold_no_protocol_knowledge():
    """File names, datatypes and checkpoint numbers live in configs/; the scripts only pass paths."""
    scripts = [ROOT / "scripts" / n for n in ("eval.sh", "train.sh", "train_ablation.sh")]
    for script in [*scripts, *(ROOT / "scripts").glob("eval_*.sh"), *(ROOT / "scripts").glob("train_*.sh")]:
        text = script.read_text()
        for needle in ("MSRVTT_", ".csv", "--data_path", "--train_csv", "--datatype", "--val_datatype", "case "):
            assert needle not in text, (script.name, needle)


# ----------------------------------------------------------------------------------------------- scripts → flags
@pytest.fixture
def recorded(tmp_path):
    """A PATH whose ``python`` and ``torchrun`` only write their arguments down (one per line)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "argv.txt"
    for tool in ("python", "torchrun"):
        fake = bin_dir / tool
        fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{log}"\n')
        fake.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in ("MODEL_NUM", "VAL_CSV", "OUT", "NNODES", "RDZV")}
    env = {**clean, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CLIP2VIDEO_USE_CURRENT_PYTHON": "1",
           "NPROC": "1", "DATA": str(tmp_path), "FEATURES": str(tmp_path), "CKPT": str(tmp_path),
           "CLIP": str(tmp_path / "ViT-B-32.pt"), "OUT": str(tmp_path / "out")}

    def run(script: str, *args: str, **extra: str) -> list[str]:
        proc = subprocess.run(["bash", str(ROOT / "scripts" / script), *args], env={**env, **extra},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return log.read_text().splitlines()

    return run


@need_bash
@pytest.mark.parametrize("name", EVAL_CONFIGS)
def test_eval_script_passes_the_config_and_the_paths(recorded, tmp_path, name):
    argv = recorded(f"eval_{name}.sh", "--precision", "bf16")
    assert argv[0] == "infer_retrieval.py"
    args = parse_eval(argv[1:])
    assert args.config == f"configs/eval/{name}.yaml" and args.precision == "bf16"
    assert args.data_path == str(tmp_path / EVAL_FILES[name]["data_path"])
    assert args.val_csv == (str(tmp_path / EVAL_FILES[name]["val_csv"]) if "val_csv" in EVAL_FILES[name] else None)
    assert str(args.model_num) == ("22" if name.startswith("vatex") else "2")
    args = parse_eval(recorded(f"eval_{name}.sh", MODEL_NUM="7")[1:])
    assert args.model_num == "7"


@need_bash
def test_train_script_passes_the_config_the_paths_and_a_held_out_list(recorded, tmp_path):
    argv = recorded("train_ablation.sh", VARIANT="tdb")
    assert argv[:4] == ["--nproc_per_node", "1", "--standalone", "train.py"]
    args = parse_train(argv[4:])
    assert args.config == "configs/train/msrvtt_9k_ablation_tdb.yaml" and args.variant == "tdb"
    assert args.train_csv == str(tmp_path / "MSRVTT_train.9k.csv") and args.val_csv is None
    held_out = str(tmp_path / "held_out.csv")
    args = parse_train(recorded("train_msrvtt_9k.sh", VAL_CSV=held_out)[4:])
    assert (args.val_csv, args.val_datatype) == (held_out, "msrvttfull")
    args = parse_train(recorded("train_msvd.sh")[4:])
    assert args.data_path == str(tmp_path) and args.val_split == "val"
