"""Frame extraction CLI (sample_frame.py) on tiny videos written here with OpenCV."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from clip2video.cli import sample_frame
from clip2video.dataloaders import video_io
from clip2video.dataloaders.video_io import (
    FrameResampler,
    VideoReadError,
    expected_output_frames,
    read_frames,
    write_video,
)

SRC_FPS = 10
N_SRC = 20  # 2 s at 10 fps
GOOD = ("a b.mp4", "quote's.mp4", "semi;colon.mp4", "ünï.mp4")
BAD = {  # file name -> words its failure reason must contain
    "corrupt.mp4": "cannot open",
    "empty.mp4": "empty file",
    "truncated.mp4": "cannot open",  # an mp4 cut short loses its index (moov atom at the end)
    "cut short.avi": "holds only",  # an AVI cut short demuxes partway: caught by the header's frame count
}


def _level(k: int) -> int:
    """Grey level of source frame k: lets a test read back which source frame an output frame came from."""
    return 20 + 10 * k


def _frames(n: int = N_SRC, size: int = 32) -> list[np.ndarray]:
    return [np.full((size, size, 3), _level(k), np.uint8) for k in range(n)]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("videos")
    write_video(d / GOOD[0], _frames(), SRC_FPS)
    for name in GOOD[1:]:
        (d / name).write_bytes((d / GOOD[0]).read_bytes())
    (d / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (d / "empty.mp4").write_bytes(b"")
    data = (d / GOOD[0]).read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    # Noisy frames, so that frame data (not the header) makes up most of the file and a cut lands mid-stream.
    noisy = [np.random.default_rng(k).integers(0, 256, (32, 32, 3), dtype=np.uint8) for k in range(N_SRC)]
    write_video(d / "full.avi", noisy, SRC_FPS, fourcc="MJPG")
    avi = (d / "full.avi").read_bytes()
    (d / "full.avi").unlink()
    (d / "cut short.avi").write_bytes(avi[: len(avi) // 2])
    (d / "notes.txt").write_text("not a video")
    return d


def _run(videos: Path, out: Path, *extra: str) -> int:
    return sample_frame.main(["--input_path", str(videos), "--output_path", str(out), "--workers", "1", *extra])


def _snapshot(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*"))}


def test_batch_extracts_good_reports_bad_and_rerun_skips(videos, tmp_path, capsys):
    out = tmp_path / "frames"
    assert _run(videos, out, "--fps", "5") == 1  # some failed

    std = capsys.readouterr()
    assert "8 videos: done 4 (40 frames" in std.out
    assert "skipped 0, failed 4" in std.out
    for name, why in BAD.items():
        line = next(ln for ln in std.err.splitlines() if ln.startswith(f"FAILED {name}:"))
        assert why in line
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(n).stem for n in GOOD)  # no temp, no bad ones
    for name in GOOD:
        files = sorted(os.listdir(out / Path(name).stem))
        assert files == [f"{k:08d}.jpg" for k in range(1, 11)]  # 2 s at 5 fps
        # Output frame k (0-based) is shown at k/5 s: source frame 2k.
        levels = np.array([cv2.imread(str(out / Path(name).stem / f)).mean() for f in files])
        nearest_source = np.abs(levels[:, None] - [_level(j) for j in range(N_SRC)]).argmin(1)
        assert nearest_source.tolist() == [2 * k for k in range(10)]

    before = _snapshot(out)
    assert _run(videos, out, "--fps", "5") == 1
    std = capsys.readouterr()
    assert "done 0 (0 frames" in std.out and "skipped 4, failed 4" in std.out
    assert _snapshot(out) == before  # finished videos untouched


@pytest.mark.parametrize("fps, n_out", [(5, 10), (3, 6), (2.5, 5), (10, 20), (20, 40)])
def test_output_count_follows_requested_rate(videos, tmp_path, fps, n_out):
    n = sample_frame.extract_video(videos / "a b.mp4", tmp_path / "v", fps=fps, quality=90)
    assert n == n_out == expected_output_frames(N_SRC, SRC_FPS, fps)
    assert len(os.listdir(tmp_path / "v")) == n_out


def test_resampler_picks_frames_by_timestamp_for_ntsc_rates():
    # 29.97 fps -> 5 fps: output k at k/5 s is source frame floor(k/5 * 29.97); exact rationals, no drift.
    src = 30000 / 1001
    assert expected_output_frames(300, src, 5) == 51  # 300 frames = 10.01 s -> outputs at 0, 0.2, ..., 10.0 s
    assert expected_output_frames(0, src, 5) == 0


def test_process_pool_gives_same_result(videos, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(videos, a, "--fps", "5") == 1
    argv = ["--input_path", str(videos), "--output_path", str(b), "--fps", "5", "--workers", "2"]
    assert sample_frame.main(argv) == 1
    assert "done 4 (40 frames" in capsys.readouterr().out
    for name in GOOD:
        vid = Path(name).stem
        assert sorted(os.listdir(a / vid)) == sorted(os.listdir(b / vid))
        assert all((a / vid / f).read_bytes() == (b / vid / f).read_bytes() for f in os.listdir(a / vid))


def test_interrupted_video_leaves_no_folder_and_next_run_completes(videos, tmp_path, monkeypatch, capsys):
    out = tmp_path / "frames"
    real = sample_frame._write_frame

    def dies_midway(path, frame, quality):
        if "semi;colon" in path.parent.name and path.name == "00000004.jpg":
            raise KeyboardInterrupt  # Ctrl-C (or any exception) in the middle of one video
        real(path, frame, quality)

    monkeypatch.setattr(sample_frame, "_write_frame", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        _run(videos, out, "--fps", "5")
    left = sorted(p.name for p in out.iterdir())
    assert "semi;colon" not in left and not any(n.startswith(".tmp-") for n in left)
    assert all(len(os.listdir(out / n)) == 10 for n in left)  # only whole videos are visible
    finished = len(left)

    monkeypatch.setattr(sample_frame, "_write_frame", real)
    assert _run(videos, out, "--fps", "5") == 1
    summary = capsys.readouterr().out
    assert f"done {4 - finished} " in summary and f"skipped {finished}, failed 4" in summary
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(n).stem for n in GOOD)
    assert all(len(os.listdir(out / Path(n).stem)) == 10 for n in GOOD)


def test_stale_temp_folders_removed_live_ones_kept(videos, tmp_path, capsys):
    out = tmp_path / "frames"
    out.mkdir()
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True, check=True).stdout)
    stale = out / f".tmp-a b-{dead_pid}"  # what a killed run (SIGKILL, power loss) leaves behind
    stale.mkdir()
    (stale / "00000001.jpg").write_bytes(b"partial")
    own = out / f".tmp-ünï-{os.getpid()}"  # ours: nothing of ours runs while a batch starts
    own.mkdir()
    live_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = out / f".tmp-quote's-{live_proc.pid}"  # another run still working: leave it alone
        live.mkdir()
        assert _run(videos, out, "--fps", "5") == 1
        assert "removed 2 unfinished folder(s)" in capsys.readouterr().err
        assert not stale.exists() and not own.exists() and live.exists()
    finally:
        live_proc.kill()
        live_proc.wait()
    assert all(len(os.listdir(out / Path(n).stem)) == 10 for n in GOOD)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--input_path", "{missing}", "--output_path", "{out}"], "--input_path"),
        (["--input_path", "{videos}", "--output_path", "{videos}/frames"], "--output_path"),
        (["--input_path", "{videos}", "--output_path", "{videos}"], "--output_path"),
        (["--input_path", "{videos}", "--output_path", "{out}", "--fps", "0"], "--fps"),
        (["--input_path", "{videos}", "--output_path", "{out}", "--fps", "-2"], "--fps"),
        (["--input_path", "{videos}", "--output_path", "{out}", "--fps", "five"], "--fps"),
        (["--input_path", "{videos}", "--output_path", "{out}", "--quality", "0"], "--quality"),
        (["--input_path", "{videos}", "--output_path", "{out}", "--workers", "0"], "--workers"),
        (["--input_path", "{videos}", "--output_path", "{out}", "--ext", ".xyz"], "--ext"),
        (["--input_path", "{videos}", "--output_path", "{out}", "--format", "gif"], "--format"),
        (["--output_path", "{out}"], "--input_path"),
    ],
)
def test_bad_flags_one_line_exit_2(videos, tmp_path, capsys, argv, flag):
    fill = {"missing": str(tmp_path / "nope"), "out": str(tmp_path / "out"), "videos": str(videos)}
    assert sample_frame.main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and err[0].startswith("sample_frame.py: error:")
    assert not (tmp_path / "out").exists()


def test_unknown_source_fps_assumes_fallback(videos, tmp_path, monkeypatch):
    # A stream without timestamps or a usable rate is timed by frame number at the fallback rate.
    real_demux = video_io._demux

    def untimed(container, stream):
        packets, damaged = real_demux(container, stream)
        return [(None, None, key, 0) for _, _, key, _ in packets], damaged

    monkeypatch.setattr(video_io, "_demux", untimed)
    monkeypatch.setattr(video_io, "_nominal_rate", lambda stream: None)
    video_io._index_cache.clear()
    reader = FrameResampler(videos / "a b.mp4", 5, fallback_fps=25)
    assert len(list(reader)) == 4  # 20 frames taken as 0.8 s at 25 fps -> 4 frames at 5 fps
    assert not reader.fps_known and "assumed 25" in reader.warnings[0]
    n, warnings = sample_frame._extract(videos / "a b.mp4", tmp_path / "v", 5, 90, fallback_fps=10)
    assert n == 10 and "assumed 10" in warnings[0]
    video_io._index_cache.clear()


def test_zero_frame_video_is_a_failure(videos, tmp_path, monkeypatch):
    monkeypatch.setattr(video_io, "_demux", lambda container, stream: ([], None))
    video_io._index_cache.clear()
    with pytest.raises(VideoReadError, match="holds no video frames"):
        sample_frame.extract_video(videos / "a b.mp4", tmp_path / "v", 5, 90)
    assert list(tmp_path.iterdir()) == []  # no final folder, no temp
    video_io._index_cache.clear()


def test_allow_truncated_keeps_decodable_part(videos, tmp_path, capsys):
    decoded = len(read_frames(videos / "cut short.avi"))
    assert 0 < decoded < N_SRC
    assert _run(videos, tmp_path / "f", "--fps", "5", "--allow_truncated") == 1  # the unopenable ones still fail
    assert len(os.listdir(tmp_path / "f" / "cut short")) == expected_output_frames(decoded, SRC_FPS, 5)
    assert "WARNING cut short.avi: " in capsys.readouterr().err


def test_extract_video_refuses_existing_output(videos, tmp_path):
    assert sample_frame.extract_video(videos / "ünï.mp4", tmp_path / "v", 5, 90) == 10
    with pytest.raises(FileExistsError):
        sample_frame.extract_video(videos / "ünï.mp4", tmp_path / "v", 5, 90)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_duplicate_video_ids_fail_not_overwrite(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    write_video(d / "clip.mp4", _frames(), SRC_FPS)
    write_video(d / "clip.avi", _frames(), SRC_FPS, fourcc="MJPG")
    assert sample_frame.main(["--input_path", str(d), "--output_path", str(tmp_path / "o"), "--workers", "1"]) == 1
    assert "FAILED clip.mp4: video id 'clip' already taken by clip.avi" in capsys.readouterr().err
