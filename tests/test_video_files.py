"""Real-world video files read directly: rotation, variable frame rate, start offsets, lying headers, bad files.

Every clip is written here (PyAV or OpenCV), so these run in a fresh clone. A bad file must give one line
naming it and a non-zero exit (evaluation and training), or be dropped and counted with ``--skip_missing``;
never a black frame.
"""

from __future__ import annotations

import csv
import math
import struct
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from clip2video.cli import infer_retrieval, sample_frame
from clip2video.dataloaders.frames import FrameError, load_video_file
from clip2video.dataloaders.video_io import (
    VideoReadError,
    decode_outputs,
    encode_video,
    probe,
    write_video,
)

from conftest import generic_eval_argv


def levels(n: int) -> list[np.ndarray]:
    """Flat grey frames 16, 24, 32, ...: a decoded frame tells which source frame it is, through H.264 too."""
    assert n <= 30
    return [np.full((32, 48, 3), 16 + 8 * k, np.uint8) for k in range(n)]


def which(frames: list[np.ndarray]) -> list[int]:
    return [round((float(f.mean()) - 16) / 8) for f in frames]


def expected_sources(times: list[float], end: float, fps: int) -> list[int]:
    """Output k at k/fps shows the last frame whose time (from the first) is <= k/fps (exact rationals)."""
    t = [Fraction(x).limit_denominator(90000) - Fraction(times[0]).limit_denominator(90000) for x in times]
    n_out = math.ceil((Fraction(end).limit_denominator(90000) - Fraction(times[0]).limit_denominator(90000)) * fps)
    return [max(i for i, ti in enumerate(t) if ti <= Fraction(k, fps)) for k in range(n_out)]


# ------------------------------------------------------------------------------------------- good files


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_metadata_is_applied(tmp_path, rotation):
    rng = np.random.default_rng(rotation)
    frames = [rng.integers(0, 256, (24, 40, 3), dtype=np.uint8) for _ in range(10)]
    path = tmp_path / f"phone{rotation}.mp4"
    encode_video(path, frames, fps=10, rotation=rotation)
    got = decode_outputs(path, [0, 2, 4], 5)
    upright = (40, 24, 3) if rotation in (90, 270) else (24, 40, 3)
    assert all(f.shape == upright for f in got)
    cap = cv2.VideoCapture(str(path))  # OpenCV rotates by the same metadata by default: same pixels
    ref = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        ref.append(f[..., ::-1])
    cap.release()
    assert all(np.array_equal(a, ref[2 * k]) for k, a in zip([0, 2, 4], got, strict=True))  # 10 fps -> 5 fps
    # and extraction stores them upright too
    (tmp_path / "in").mkdir()
    path.rename(tmp_path / "in" / path.name)
    assert sample_frame.main(["--input_path", str(tmp_path / "in"), "--output_path", str(tmp_path / "out"),
                              "--fps", "5", "--workers", "1", "--format", "png"]) == 0
    stored = cv2.imread(str(tmp_path / "out" / path.stem / "00000001.png"))
    assert stored.shape == upright and np.array_equal(stored[..., ::-1], got[0])


def test_variable_frame_rate_is_timed_by_timestamps(tmp_path):
    times = [0, 0.04, 0.08, 0.30, 0.31, 0.32, 0.70, 0.74, 1.10, 1.12, 1.14, 1.50, 1.90, 1.94]
    path = tmp_path / "vfr.mp4"
    encode_video(path, levels(len(times)), times=times, fps=25, gop=5)
    index = probe(path)
    last_end = times[-1] + float((index.end - index.pts[-1]) * index.time_base)
    assert 1.94 < last_end <= 2.0
    want = expected_sources(times, last_end, 5)
    assert index.n_output(5) == len(want) == 10
    got = decode_outputs(path, list(range(len(want))), 5)
    assert which(got) == want  # e.g. output 3 at 0.6 s is the frame shown from 0.32 s
    # a constant-rate reading (frame number / nominal rate) would have picked others
    assert want != [min(round(k / 5 * 25), len(times) - 1) for k in range(len(want))]


def test_start_offset_counts_from_the_first_frame(tmp_path):
    times = [k / 25 for k in range(30)]
    encode_video(tmp_path / "zero.mp4", levels(30), times=times, fps=25)
    encode_video(tmp_path / "late.mp4", levels(30), times=[1.5 + t for t in times], fps=25)
    a, b = probe(tmp_path / "zero.mp4"), probe(tmp_path / "late.mp4")
    assert b.pts[0] > 0 and a.n_output(5) == b.n_output(5) == 6  # 1.2 s at 5 fps
    ka = decode_outputs(tmp_path / "zero.mp4", list(range(6)), 5)
    kb = decode_outputs(tmp_path / "late.mp4", list(range(6)), 5)
    assert which(ka) == which(kb) == [0, 5, 10, 15, 20, 25]


def _avi_with_header_count(src: Path, dst: Path, count: int) -> None:
    """Rewrite the frame counts an AVI header states (main header, stream header, OpenDML header)."""
    data = bytearray(src.read_bytes())
    avih, strh, dmlh = data.find(b"avih"), data.find(b"strh"), data.find(b"dmlh")
    struct.pack_into("<I", data, avih + 8 + 16, count)  # dwTotalFrames
    struct.pack_into("<I", data, strh + 8 + 32, count)  # dwLength
    if dmlh >= 0:
        struct.pack_into("<I", data, dmlh + 8, count)
    dst.write_bytes(bytes(data))


def test_header_claiming_fewer_frames_is_overruled(tmp_path):
    write_video(tmp_path / "true.avi", [f[..., ::-1] for f in levels(20)], 10, fourcc="MJPG")
    _avi_with_header_count(tmp_path / "true.avi", tmp_path / "lies.avi", 5)
    assert av.open(str(tmp_path / "lies.avi")).streams.video[0].frames == 5  # the header does say 5
    index = probe(tmp_path / "lies.avi")
    assert index.n_source == 20 and "header reports 5 frames" in index.warnings[0]
    assert which(decode_outputs(tmp_path / "lies.avi", list(range(10)), 5)) == list(range(0, 20, 2))


def test_non_ascii_names_evaluate(tmp_path, tiny_ckpt):
    videos = tmp_path / "vidéos"
    ids = ["vidéo ünï 日本", "it's a clip", "plain"]
    write_clips(videos, ids)
    ann = write_csv(tmp_path / "ann.csv", ids)
    assert infer_retrieval.main(eval_argv(ann, videos, tiny_ckpt, tmp_path / "s.npy")) == 0
    assert np.load(tmp_path / "s.npy").shape == (3, 3)


# -------------------------------------------------------------------------------------------- bad files


def write_clips(folder: Path, ids: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n, v in enumerate(ids):
        rng = np.random.default_rng(n)
        frames = [np.clip(f.astype(int) + rng.integers(-20, 20, f.shape), 0, 255).astype(np.uint8)
                  for f in levels(30)]
        encode_video(folder / f"{v}.mp4", frames, fps=25, gop=10)


def write_csv(path: Path, ids: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("video_id", "caption", "split"))
        w.writerows((v, f"clip number {n}", "test") for n, v in enumerate(ids))
    return path


def eval_argv(ann: Path, features: Path, ckpt: Path, sim: Path, *extra: str) -> list[str]:
    return generic_eval_argv(ann, features, ckpt, sim, *extra, max_frames=4)


def _audio_only(path: Path) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        t = np.arange(16000) / 16000
        for i in range(0, 16000, 1024):
            frame = av.AudioFrame.from_ndarray((0.1 * np.sin(2 * np.pi * 440 * t[i:i + 1024])).astype(np.float32)[None],
                                               format="fltp", layout="mono")
            frame.sample_rate = 16000
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode():
            out.mux(p)


def _cut(path: Path, faststart: bool, keep: float = 0.6) -> None:
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(30)]  # noise: data dominates
    full = path.with_name("full" + path.suffix)
    encode_video(full, frames, fps=25, faststart=faststart)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: int(len(data) * keep)])


def _header_claims_more(path: Path) -> None:
    tmp = path.with_name("true.avi")
    write_video(tmp, [f[..., ::-1] for f in levels(20)], 10, fourcc="MJPG")
    _avi_with_header_count(tmp, path, 1000)
    tmp.unlink()


BAD = {  # kind -> (file suffix, writer, words of the reason)
    "audio_only": (".mp4", _audio_only, "no video stream (audio only)"),
    "zero_length": (".mp4", lambda p: p.write_bytes(b""), "empty file"),
    "truncated_index_lost": (".mp4", lambda p: _cut(p, faststart=False), "cannot open"),
    "truncated_data_lost": (".mp4", lambda p: _cut(p, faststart=True), "holds only"),
    "header_claims_more": (".avi", _header_claims_more, "holds only 20 of the 1000 frames"),
    "not_a_video": (".mkv", lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)), "cannot open"),
}


def error_lines(stderr: str) -> list[str]:
    """Lines of stderr other than progress bars (tqdm redraws with carriage returns)."""
    lines = [ln for chunk in stderr.splitlines() for ln in chunk.split("\r")]
    return [ln for ln in lines if ln.strip() and "it/s]" not in ln and "s/it]" not in ln]


@pytest.fixture(scope="module")
def good_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("badfiles")
    ids = ["clip_a", "clip_b", "clip_c", "clip_d"]
    write_clips(root / "good", ids)
    return root, ids


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_file_is_one_line_or_a_counted_skip(good_set, tiny_ckpt, tmp_path, capsys, kind):
    root, ids = good_set
    suffix, write, reason = BAD[kind]
    videos = tmp_path / "videos"
    videos.mkdir()
    for v in ids[1:]:
        (videos / f"{v}.mp4").write_bytes((root / "good" / f"{v}.mp4").read_bytes())
    bad = videos / f"{ids[0]} ünï{suffix}"
    write(bad)
    listed = [bad.stem, *ids[1:]]
    ann = write_csv(tmp_path / "ann.csv", listed)
    # the decoder names the file and the problem
    with pytest.raises((VideoReadError, FrameError), match=reason.replace("(", r"\(").replace(")", r"\)")):
        load_video_file(bad, fps=5, max_frames=4, image_size=32)

    rc = infer_retrieval.main(eval_argv(ann, videos, tiny_ckpt, tmp_path / "s.npy"))
    err = error_lines(capsys.readouterr().err)
    assert rc != 0 and not (tmp_path / "s.npy").exists()
    assert len(err) == 1 and bad.name in err[0] and reason in err[0], err

    rc = infer_retrieval.main(eval_argv(ann, videos, tiny_ckpt, tmp_path / "s.npy", "--skip_missing"))
    out = capsys.readouterr().out
    assert rc == 0 and "dropped 1 of 4 listed videos whose video file is unusable" in out and bad.name in out
    assert np.load(tmp_path / "s.npy").shape == (3, 3)


def test_training_stops_on_a_bad_file_or_skips_it(good_set, tmp_path, capsys):
    from clip2video.cli import train

    root, ids = good_set
    videos = tmp_path / "videos"
    videos.mkdir()
    for v in ids:
        (videos / f"{v}.mp4").write_bytes((root / "good" / f"{v}.mp4").read_bytes())
    _cut(videos / "broken.mp4", faststart=True)
    ann = tmp_path / "ann.csv"
    with open(ann, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("video_id", "caption", "split"))
        w.writerows((v, f"clip {v}", "train") for v in [*ids, "broken"])
    argv = ["--tiny_clip", "--datatype", "generic", "--data_path", str(ann), "--features_path", str(videos),
            "--output_dir", str(tmp_path / "run"), "--batch_size", "5", "--epochs", "1", "--max_steps", "1",
            "--max_frames", "4", "--max_words", "12", "--num_thread_reader", "0", "--no_progress",
            "--device", "cpu"]
    assert train.main(argv) != 0
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "broken.mp4" in err[0] and "holds only" in err[0], err
    argv[argv.index("--batch_size") + 1] = "4"
    assert train.main([*argv, "--skip_missing"]) == 0
    assert "dropped 1 of 5 listed videos whose video file is unusable" in capsys.readouterr().out


def test_decoder_threads_never_oversubscribe():
    import os

    from clip2video.dataloaders.video_io import decoder_threads

    cores = len(os.sched_getaffinity(0))
    assert decoder_threads(0) == decoder_threads(1) == cores
    for workers in range(1, 4 * cores + 1):
        assert 1 <= decoder_threads(workers) and (workers * decoder_threads(workers) <= cores or workers > cores)
