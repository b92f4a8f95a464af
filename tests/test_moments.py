"""Moments: videos indexed as segments (``search.py build --segment_seconds S`` / ``--segments scenes``).

The central check (the definition of a segment): a segment's score equals ``infer_retrieval.py --save_sim``'s
score of the same caption against a frame folder holding exactly the frames ``k/F`` in ``[start, end)``, for
an index built from a frame folder and one built from the video file read directly. Then the plan itself
(windows, the tail, shots), one decoding pass and one image-tower pass per frame, bounded memory, settings
recorded and a change of settings re-encoding, and one-line errors for bad flags.
"""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from clip2video.cli import infer_retrieval, sample_frame, search
from clip2video.dataloaders.synthetic import make_synthetic_dataset
from clip2video.dataloaders.video_io import encode_video, probe, read_frames
from clip2video.search.index import SearchIndex
from clip2video.search.segments import CHUNK_FRAMES, ShotCutter, fixed_segments

from conftest import generic_eval_argv

F = 5  # --video_fps: output frames per second
SRC_FPS = 10
CLIP_FRAMES = 16  # source frames per synthetic clip: 1.6 s, 8 output frames
N_CLIPS = 6
CAPTIONS = ["a red circle moves left", "a blue square moves up", "a shape grows", "something moves down"]


def _frac(x: float) -> Fraction:
    return Fraction(repr(float(x)))


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """Six synthetic clips (each its own background) joined into one 9.6 s H.264 file (10 fps, B-frames, a
    keyframe every 8 frames), and its PNG extraction at 5 fps as a frame folder."""
    root = tmp_path_factory.mktemp("moments")
    make_synthetic_dataset(root / "clips", n_videos=2 * N_CLIPS, seed=5, size=48, n_frames=CLIP_FRAMES,
                           fps=SRC_FPS, write="mp4", splits=(0.0, 0.0, 1.0))
    meta = json.loads((root / "clips" / "videos.json").read_text())
    pairs = {}
    for vid in sorted(meta):  # one clip of each time-reversed pair: twins share their background
        pairs.setdefault(meta[vid]["pair"], vid)
    frames = []
    for p in [root / "clips" / "videos" / f"{v}.mp4" for v in sorted(pairs.values())][:N_CLIPS]:
        got = read_frames(p)
        assert len(got) == CLIP_FRAMES
        frames += [np.ascontiguousarray(f[..., ::-1]) for f in got]
    (root / "videos").mkdir()
    encode_video(root / "videos" / "long.mp4", frames, fps=SRC_FPS, gop=8)
    assert sample_frame.main(["--input_path", str(root / "videos"), "--output_path", str(root / "frames"),
                              "--fps", str(F), "--workers", "1", "--format", "png"]) == 0
    n = len(list((root / "frames" / "long").iterdir()))
    assert n == probe(root / "videos" / "long.mp4").n_output(F) == N_CLIPS * CLIP_FRAMES * F // SRC_FPS
    return root


def build_argv(features: Path, ix: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["build", "--features_path", str(features), "--index", str(ix), "--checkpoint", str(ckpt.parent),
            "--model_num", "1", "--max_words", "16", "--max_frames", "6", "--feature_framerate", "2",
            "--num_thread_reader", "0", "--device", "cpu", "--no_progress", "--video_fps", str(F), *extra]


def query_json(capsys, ix: Path, *args: str) -> list[dict]:
    capsys.readouterr()
    assert search.main(["query", "--index", str(ix), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def cut_out_scores(frames: Path, segments: list[tuple[float, float]], ckpt: Path, tmp: Path) -> np.ndarray:
    """``infer_retrieval.py --save_sim`` over one frame folder per segment, each holding exactly the frames
    k/F in [start, end) of ``frames`` (their files copied as they are): (captions, segments)."""
    files = sorted(frames.iterdir())
    cut = tmp / "cut"
    rows = ["video_id,caption,split"]
    for j, (s, e) in enumerate(segments):
        d = cut / f"seg{j:03d}"
        d.mkdir(parents=True)
        keep = [f for k, f in enumerate(files) if _frac(s) <= Fraction(k, F) < _frac(e)]
        assert keep, (s, e)
        for f in keep:
            shutil.copy(f, d / f.name)
    for j in range(len(segments)):
        rows.append(f"seg{j:03d},{CAPTIONS[j % len(CAPTIONS)]},test")
    (tmp / "cut.csv").write_text("\n".join(rows) + "\n")
    sim = tmp / "sim.npy"
    assert infer_retrieval.main(generic_eval_argv(tmp / "cut.csv", cut, ckpt, sim, "--feature_framerate", "2",
                                                  max_frames=6)) == 0
    return np.load(sim)


def index_scores(capsys, ix: Path, captions: list[str]) -> dict[tuple[str, float], float]:
    """(caption, segment start) → score, from ``query --video long`` (every segment of the video)."""
    out = {}
    for res in query_json(capsys, ix, "--video", "long", "-k", "1000", *captions):
        for r in res["results"]:
            out[(res["query"], r["start"])] = r["score"]
    return out


def segments_of(ix: Path) -> list[tuple[float, float]]:
    index = SearchIndex.open(ix)
    return [(float(a), float(b)) for a, b in zip(index.starts, index.ends, strict=True)]


# ----------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("mode", ["fixed", "scenes"])
def test_segment_score_equals_cut_out_frame_folder(long_video, tiny_ckpt, tmp_path, capsys, mode):
    root = long_video
    flags = (["--segment_seconds", "3", "--segment_stride", "1.3"] if mode == "fixed"
             else ["--segments", "scenes", "--segment_seconds", "10"])
    ix_folder, ix_file = tmp_path / "ix_folder", tmp_path / "ix_file"
    assert search.main(build_argv(root / "frames", ix_folder, tiny_ckpt, *flags)) == 0
    assert search.main(build_argv(root / "videos", ix_file, tiny_ckpt, *flags)) == 0
    segs = segments_of(ix_folder)
    assert segs == segments_of(ix_file)
    if mode == "fixed":  # windows [k·1.3, k·1.3 + 3), the last one ending at the video's end (9.6 s)
        want = [(round(k * 1.3, 6), min(round(k * 1.3 + 3, 6), 9.6)) for k in range(7)]
        assert [(round(a, 6), round(b, 6)) for a, b in segs] == want
    else:  # one shot per clip: cuts where the background changes, every 1.6 s
        want = [(round(1.6 * j, 6), round(1.6 * (j + 1), 6)) for j in range(N_CLIPS)]
        assert [(round(a, 6), round(b, 6)) for a, b in segs] == want
    sim = cut_out_scores(root / "frames" / "long", segs, tiny_ckpt, tmp_path)
    captions = [CAPTIONS[j % len(CAPTIONS)] for j in range(len(segs))]
    for ix in (ix_folder, ix_file):
        got = index_scores(capsys, ix, sorted(set(captions)))
        assert len(got) == len(set(captions)) * len(segs)
        worst = 0.0
        for c in range(len(segs)):
            for j, (s, _) in enumerate(segs):
                worst = max(worst, abs(got[(captions[c], s)] - float(sim[c, j])))
        assert worst <= 1e-4, (ix.name, worst)
    # the two indexes hold the same vectors (file read directly == its PNG extraction)
    a, b = SearchIndex.open(ix_folder), SearchIndex.open(ix_file)
    np.testing.assert_allclose(a.vectors(range(a.n_rows)), b.vectors(range(b.n_rows)), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- the plan
def test_fixed_plan_windows_tail_and_short_videos():
    plan = fixed_segments(Fraction(96, 10), 48, F, 3, 1.3, framerate=2, max_frames=6)
    assert [(s.start, s.end) for s in plan] == [(Fraction(13 * k, 10), min(Fraction(13 * k, 10) + 3, Fraction(96, 10)))
                                               for k in range(7)]
    for s in plan:  # the frames whose time k/F lies in [start, end)
        assert (s.first, s.stop) == (min(k for k in range(48) if Fraction(k, F) >= s.start),
                                     max(k for k in range(48) if Fraction(k, F) < s.end) + 1)
        assert s.positions[0] == s.first and s.positions[-1] < s.stop and len(s.positions) <= 6
    # a video not longer than S is one segment
    (one,) = fixed_segments(Fraction(2), 10, F, 3, 1.5)
    assert (one.start, one.end, one.first, one.stop) == (0, 2, 0, 10)
    # a final window too short to sample (framerate 2, one frame left) is merged into the one before it
    plan = fixed_segments(Fraction(41, 10), 21, F, 2, 2, framerate=2)
    assert [(s.start, s.end) for s in plan] == [(0, 2), (2, Fraction(41, 10))]
    plan = fixed_segments(Fraction(43, 10), 22, F, 2, 2, framerate=2)
    assert [(s.start, s.end) for s in plan] == [(0, 2), (2, 4), (4, Fraction(43, 10))]


def test_shot_cutter_minimum_and_maximum():
    def frames(levels):
        return [np.full((8, 8, 3), v, np.uint8) for v in levels]

    # shots of 3, 1 and 6 frames at 1 fps; minimum 2 s: the 1-frame shot joins the next; maximum 4 s splits
    levels = [0] * 3 + [200] * 1 + [50] * 6
    cut = ShotCutter(1, seconds=4, min_seconds=2, threshold=12)
    shots = []
    for k, f in enumerate(frames(levels)):
        shots += cut.push(k, f)
    shots += cut.finish(len(levels))
    assert shots == [(0, 3), (3, 7), (7, 10)]
    # a last shot shorter than the minimum joins the one before it
    cut = ShotCutter(1, seconds=10, min_seconds=2, threshold=12)
    shots = []
    for k, f in enumerate(frames([0] * 4 + [200])):
        shots += cut.push(k, f)
    assert shots + cut.finish(5) == [(0, 5)]


# ----------------------------------------------------------------------------------------------- cost
def test_one_decoding_pass_one_tower_pass_per_frame_and_bounded_memory(long_video, tiny_ckpt, tmp_path,
                                                                       monkeypatch):
    from clip2video.dataloaders import video_io
    from clip2video.search import segments as seg_mod

    passes, encoders = [], []
    real_outputs = video_io.FrameResampler.outputs

    def counting(self, wanted=None):
        passes.append(self.path.name)
        yield from real_outputs(self, wanted)

    monkeypatch.setattr(video_io.FrameResampler, "outputs", counting)
    real_init = seg_mod.SegmentEncoder.__init__

    def keep(self, *a, **kw):
        real_init(self, *a, **kw)
        encoders.append(self)

    monkeypatch.setattr(seg_mod.SegmentEncoder, "__init__", keep)
    videos = tmp_path / "videos"
    videos.mkdir()
    base = read_frames(long_video / "videos" / "long.mp4")
    encode_video(videos / "long.mp4", [f[..., ::-1] for f in base], fps=SRC_FPS, gop=8)
    encode_video(videos / "longer.mp4", [f[..., ::-1] for f in base * 3], fps=SRC_FPS, gop=8)
    ix = tmp_path / "ix"
    assert search.main(build_argv(videos, ix, tiny_ckpt, "--segment_seconds", "2", "--segment_stride", "0.4")) == 0
    assert passes == ["long.mp4", "longer.mp4"]  # each video decoded in one pass
    (enc,) = encoders
    plans = [fixed_segments(probe(videos / n).duration, probe(videos / n).n_output(F), F, 2, 0.4, framerate=2,
                            max_frames=6) for n in ("long.mp4", "longer.mp4")]
    needed = sum(len({p for s in plan for p in s.positions}) for plan in plans)
    overlapping = sum(len(s.positions) for plan in plans for s in plan)
    assert enc.timings["frames"] == needed < overlapping  # each sampled frame through the tower once
    assert enc.timings["segments"] == sum(len(p) for p in plans) == SearchIndex.open(ix).n_rows
    # features held at once: one message of frames plus one window's (10 frames), however long the video
    longer_needed = len({p for s in plans[1] for p in s.positions})
    assert enc.peak_features <= CHUNK_FRAMES + 10 < longer_needed


# ----------------------------------------------------------------------------------------------- settings
def test_settings_recorded_and_other_settings_reencode(long_video, tiny_ckpt, tmp_path, capsys, monkeypatch):
    from clip2video.search import build as index_build

    calls = []
    real = index_build._encode_segmented
    monkeypatch.setattr(index_build, "_encode_segmented",
                        lambda mine, *a, **kw: (calls.append([s.video_id for s in mine]), real(mine, *a, **kw))[1])
    ix = tmp_path / "ix"
    argv = build_argv(long_video / "videos", ix, tiny_ckpt, "--segment_seconds", "3")
    assert search.main(argv) == 0
    m = SearchIndex.open(ix).manifest
    assert m["segments"] == {"mode": "fixed", "seconds": 3.0, "stride": 1.5} and m["encoding"]["video_fps"] == F
    assert m["videos"] == 1 and m["count"] == SearchIndex.open(ix).n_rows == 6
    assert search.main(argv) == 0 and calls == [["long"]]  # unchanged: nothing encoded again
    assert search.main(argv[:-1] + ["4"]) == 0 and calls == [["long"], ["long"]]  # another setting: re-encoded
    assert SearchIndex.open(ix).manifest["segments"]["seconds"] == 4.0
    # without the flags: one vector per video, as before
    assert search.main(build_argv(long_video / "videos", tmp_path / "whole", tiny_ckpt)) == 0
    whole = SearchIndex.open(tmp_path / "whole")
    assert "segments" not in whole.manifest and whole.n_rows == len(whole) == 1
    (res,) = query_json(capsys, tmp_path / "whole", "a red circle moves left")
    assert res["results"][0]["start"] == 0.0 and abs(res["results"][0]["end"] - 9.6) < 1e-9


def test_bad_segment_flags(long_video, tiny_ckpt, tmp_path, capsys):
    cases = [(["--segment_seconds", "0"], "--segment_seconds must be > 0"),
             (["--segment_seconds", "-2"], "--segment_seconds must be > 0"),
             (["--segment_seconds", "3", "--segment_stride", "0"], "--segment_stride must be > 0 and at most"),
             (["--segment_seconds", "3", "--segment_stride", "4"], "--segment_stride must be > 0 and at most"),
             (["--segment_stride", "1"], "--segment_stride needs --segment_seconds"),
             (["--segment_seconds", "nan"], "--segment_seconds must be a finite number"),
             (["--segments", "scenes", "--segment_seconds", "3", "--min_segment_seconds", "5"],
              "--min_segment_seconds must be")]
    for flags, words in cases:
        capsys.readouterr()
        rc = search.main(build_argv(long_video / "videos", tmp_path / "ix", tiny_ckpt, *flags))
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.count("\n") == 0 and words in err, (flags, err)
    assert not (tmp_path / "ix").exists()
