"""Bad input to the entry points ends with one line naming what is wrong, a non-zero exit and no traceback.

Frame problems are raised inside DataLoader worker processes (``--num_thread_reader 2``, as the original's
scripts run), where torch replaces the message; :func:`clip2video.cli.common.one_line` must recover it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from clip2video.cli import common as cli
from clip2video.cli import infer_retrieval, train
from clip2video.dataloaders.annotations import load_eval_set, load_train_set
from clip2video.dataloaders.frames import FrameError
from clip2video.dataloaders.synthetic import make_synthetic_dataset
from clip2video.modules.network.backbone import ClipConfig
from clip2video.modules.weights.factory import create_model
from clip2video.modules.weights.release import export_original

from conftest import ROOT


# ----------------------------------------------------------------------------------------------- one_line
class _Failing(Dataset):
    def __init__(self, exc: Exception):
        self.exc = exc

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):
        if i == 2:
            raise self.exc
        return torch.zeros(1)


@pytest.mark.parametrize("exc", [
    FrameError("video 'v7': /data/frames/v7/00000003.jpg: cannot decode image (Truncated File Read)"),
    ValueError("bad: value: with: colons"),
    OSError("plain message"),
])
def test_one_line_recovers_a_worker_exception(exc):
    loader = DataLoader(_Failing(exc), batch_size=1, num_workers=1)
    with pytest.raises(type(exc)) as info:
        list(loader)
    wrapped = str(info.value)
    assert wrapped.startswith("Caught ") and "worker process" in wrapped  # what torch hands the main process
    assert cli.one_line(info.value) == str(exc)


def test_one_line_of_plain_exceptions():
    assert cli.one_line(ValueError("first line\nsecond line")) == "first line"
    assert cli.one_line(KeyError()) == "KeyError"
    # a message that merely looks like a worker's is left alone when there is no traceback under it
    assert cli.one_line(RuntimeError("Caught X in DataLoader worker process 0.")).startswith("Caught X")


def test_run_main_maps_errors_to_codes(capsys):
    assert cli.run_main("tool", lambda: (_ for _ in ()).throw(cli.UsageError("--x: bad"))) == 2
    assert capsys.readouterr().err == "tool: error: --x: bad\n"
    assert cli.run_main("tool", lambda: (_ for _ in ()).throw(FileNotFoundError("f: gone"))) == 1
    assert capsys.readouterr().err == "tool: error: f: gone\n"
    with pytest.raises(ZeroDivisionError):  # a genuine bug keeps its traceback
        cli.run_main("tool", lambda: 1 // 0)


# ----------------------------------------------------------------------------------------------- frame data
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("badinput")
    synth = make_synthetic_dataset(root / "synth", n_videos=8, seed=1, size=32, n_frames=6, write="frames")
    torch.manual_seed(0)
    ckpt = export_original(create_model("tab_tdb", clip_config=ClipConfig.tiny(), center_k=3),
                           root / "ckpt" / "pytorch_model.bin.1")
    csv = Path(synth["annotations"])
    test_video = load_eval_set("generic", data_path=str(csv), split="test").video_ids[0]
    train_video = load_train_set("generic", data_path=str(csv), split="train").video_ids[0]
    return {"root": root, "frames": Path(synth["media"]), "csv": csv, "ckpt": ckpt,
            "test": test_video, "train": train_video}


def infer_argv(data, frames: Path, *extra: str) -> list[str]:
    return ["--datatype", "generic", "--data_path", str(data["csv"]), "--split", "test", "--features_path",
            str(frames), "--checkpoint", str(data["ckpt"].parent), "--model_num", "1", "--max_words", "16",
            "--batch_size_val", "4", "--num_thread_reader", "2", "--device", "cpu", *extra]


def train_argv(data, frames: Path, out: Path, *extra: str) -> list[str]:
    return ["--tiny_clip", "--datatype", "generic", "--data_path", str(data["csv"]), "--features_path", str(frames),
            "--output_dir", str(out), "--batch_size", "4", "--epochs", "1", "--max_frames", "4", "--max_words",
            "12", "--num_thread_reader", "2", "--no_progress", "--device", "cpu", *extra]


def break_video(data, tmp_path: Path, video: str, kind: str) -> tuple[Path, list[str], str | None]:
    """A copy of the frames with one video broken: (frames root, extra flags, the file to be named or None)."""
    frames = tmp_path / "frames"
    shutil.copytree(data["frames"], frames)
    folder = frames / video
    files = sorted(folder.iterdir())
    if kind == "empty":
        for f in files:
            f.unlink()
        return frames, [], None
    if kind == "corrupt":  # the first frame is always sampled; a JPEG cut short
        files[0].write_bytes(files[0].read_bytes()[:120])
        return frames, [], files[0].name
    if kind == "missing":
        shutil.rmtree(folder)
        return frames, [], None
    if kind == "short":  # one file, decimation factor 2: no frame to sample
        for f in files[1:]:
            f.unlink()
        return frames, ["--feature_framerate", "2"], None
    raise AssertionError(kind)


def the_error_line(err: str, prog: str) -> str:
    """The single error line of stderr (progress bars may precede it), checking there is no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith(f"{prog}: error: "), err
    return errors[0]


KINDS = ["empty", "corrupt", "missing", "short"]
WORDS = {"empty": "empty", "corrupt": "cannot decode", "missing": "no frame folder", "short": "feature_framerate 2"}


@pytest.mark.parametrize("kind", KINDS)
def test_infer_bad_frames_one_line(data, tmp_path, capsys, kind):
    frames, extra, file = break_video(data, tmp_path, data["test"], kind)
    rc = infer_retrieval.main(infer_argv(data, frames, *extra))
    line = the_error_line(capsys.readouterr().err, "infer_retrieval.py")
    assert rc == 1
    assert f"'{data['test']}'" in line and WORDS[kind] in line, line
    if file:
        assert f"{data['test']}/{file}" in line, line


@pytest.mark.parametrize("kind", KINDS)
def test_train_bad_frames_one_line(data, tmp_path, capsys, kind):
    frames, extra, file = break_video(data, tmp_path, data["train"], kind)
    rc = train.main(train_argv(data, frames, tmp_path / "out", *extra))
    line = the_error_line(capsys.readouterr().err, "train.py")
    assert rc == 1
    assert f"'{data['train']}'" in line and WORDS[kind] in line, line
    if file:
        assert f"{data['train']}/{file}" in line, line
    assert not (tmp_path / "out" / "latest.pt").exists()


def test_train_bad_validation_video_one_line(data, tmp_path, capsys):
    """Validation runs its own DataLoader (workers too): a broken validation video is named the same way."""
    val_video = load_eval_set("generic", data_path=str(data["csv"]), split="val").video_ids[0]
    frames, _, file = break_video(data, tmp_path, val_video, "corrupt")
    rc = train.main(train_argv(data, frames, tmp_path / "out", "--val_split", "val", "--max_steps", "1"))
    line = the_error_line(capsys.readouterr().err, "train.py")
    assert rc == 1 and f"'{val_video}'" in line and f"{val_video}/{file}" in line, line


# ----------------------------------------------------------------------------------------------- named paths
INFER_PATH_FLAGS = ["clip_path", "checkpoint", "init_model", "data_path", "val_csv"]
TRAIN_PATH_FLAGS = ["clip_path", "init_model", "data_path", "val_csv", "train_csv"]


def _set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    if f"--{flag}" in argv:
        argv[argv.index(f"--{flag}") + 1] = value
    else:
        argv += [f"--{flag}", value]
    return argv


@pytest.mark.parametrize("flag", INFER_PATH_FLAGS)
def test_infer_nonexistent_path_is_named(data, tmp_path, capsys, flag):
    bad = str(tmp_path / "no" / "such.file")
    argv = _set_flag(infer_argv(data, data["frames"]), flag, bad)
    if flag == "init_model":
        argv = argv[:argv.index("--checkpoint")] + argv[argv.index("--checkpoint") + 2:]
    rc = infer_retrieval.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err == f"infer_retrieval.py: error: --{flag} {bad}: no such " + (
        "file\n" if flag in cli.PATH_FLAGS_FILES else "file or folder\n"), err


@pytest.mark.parametrize("flag", TRAIN_PATH_FLAGS)
def test_train_nonexistent_path_is_named(data, tmp_path, capsys, flag):
    bad = str(tmp_path / "no" / "such.file")
    argv = _set_flag(train_argv(data, data["frames"], tmp_path / "out"), flag, bad)
    if flag == "clip_path":
        argv.remove("--tiny_clip")
    rc = train.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err == f"train.py: error: --{flag} {bad}: no such " + (
        "file\n" if flag in cli.PATH_FLAGS_FILES else "file or folder\n"), err
    assert not (tmp_path / "out").exists()  # nothing written before the check


def test_folder_where_a_file_is_expected(data, tmp_path, capsys):
    rc = infer_retrieval.main(infer_argv(data, data["frames"], "--clip_path", str(tmp_path)))
    assert rc == 2 and capsys.readouterr().err == f"infer_retrieval.py: error: --clip_path {tmp_path}: not a file\n"


def test_exit_process_runs_exit_handlers_flushes_and_keeps_the_code(tmp_path):
    marker, log = tmp_path / "atexit.txt", tmp_path / "run.log"
    code = (
        "import atexit, logging, sys\n"
        "from clip2video.cli.common import exit_process\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))\n"
        f"logging.basicConfig(filename={str(log)!r}, level=logging.INFO)\n"
        "logging.getLogger('t').info('last line')\n"
        "sys.stdout.write('unflushed output')\n"
        "exit_process(3)\n"
        "print('never')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 3
    assert out.stdout == "unflushed output"
    assert marker.read_text() == "ran" and "last line" in log.read_text()


def test_exit_process_waits_for_a_live_thread(tmp_path):
    done = tmp_path / "thread.txt"
    code = (
        "import threading, time\n"
        "from clip2video.cli.common import exit_process\n"
        f"t = threading.Thread(target=lambda: (time.sleep(0.5), open({str(done)!r}, 'w').write('done')))\n"
        "t.start()\n"
        "exit_process(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and done.read_text() == "done"
