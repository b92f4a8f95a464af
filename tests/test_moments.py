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
from search_utils import build_argv as search_build_argv
from search_utils import query_json

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
    return search_build_argv(features, ix, ckpt, "--feature_framerate", "2", "--video_fps", str(F), *extra)


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
    # the two indexes hold the same vectors (file read directly == its PNG extraction), as does a build whose
    # videos are read by two loader processes
    a, b = SearchIndex.open(ix_folder), SearchIndex.open(ix_file)
    np.testing.assert_allclose(a.vectors(range(a.n_rows)), b.vectors(range(b.n_rows)), atol=1e-5, rtol=0)
    if mode == "fixed":
        argv = build_argv(root / "videos", tmp_path / "ix_workers", tiny_ckpt, *flags)
        argv[argv.index("--num_thread_reader") + 1] = "2"
        assert search.main(argv) == 0
        c = SearchIndex.open(tmp_path / "ix_workers")
        np.testing.assert_allclose(c.vectors(range(c.n_rows)), b.vectors(range(b.n_rows)), atol=1e-5, rtol=0)


def test_segments_of_a_clip_vip_model(long_video, tmp_path, capsys):
    """CLIP-ViP has no per-frame features: its segments go through the whole video encoder, still exactly the
    cut-out frame folder's vectors."""
    import torch

    from clip2video.modules.network.backbone import ClipConfig
    from clip2video.modules.weights.factory import create_model

    torch.manual_seed(0)
    model = create_model("vip", clip_config=ClipConfig.tiny())
    ckpt = tmp_path / "vip" / "best.pt"
    ckpt.parent.mkdir()
    torch.save({"model": model.state_dict(), "config": {"model": model.config.to_dict()}}, ckpt)
    ix = tmp_path / "ix"
    argv = build_argv(long_video / "frames", ix, ckpt, "--segment_seconds", "4", "--segment_stride", "2.5")
    argv[argv.index("--checkpoint") + 1 : argv.index("--model_num") + 2] = [str(ckpt)]
    assert search.main(argv) == 0
    segs = segments_of(ix)
    assert len(segs) == 4
    csv_rows = ["video_id,caption,split"]
    cut = tmp_path / "cut"
    files = sorted((long_video / "frames" / "long").iterdir())
    for j, (s, e) in enumerate(segs):
        (cut / f"seg{j}").mkdir(parents=True)
        for k, f in enumerate(files):
            if _frac(s) <= Fraction(k, F) < _frac(e):
                shutil.copy(f, cut / f"seg{j}" / f.name)
        csv_rows.append(f"seg{j},{CAPTIONS[j]},test")
    (tmp_path / "cut.csv").write_text("\n".join(csv_rows) + "\n")
    eval_argv = generic_eval_argv(tmp_path / "cut.csv", cut, ckpt, tmp_path / "sim.npy", "--feature_framerate", "2",
                                  max_frames=6)
    eval_argv[eval_argv.index("--checkpoint") + 1 : eval_argv.index("--model_num") + 2] = [str(ckpt)]
    assert infer_retrieval.main(eval_argv) == 0
    sim = np.load(tmp_path / "sim.npy")
    got = index_scores(capsys, ix, CAPTIONS[: len(segs)])
    for c in range(len(segs)):
        for j, (s, _) in enumerate(segs):
            assert abs(got[(CAPTIONS[c], s)] - float(sim[c, j])) <= 1e-4


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


# ----------------------------------------------------------------------------------------------- queries
def _random_index(folder: Path, index_type: str = "Flat", search_params: str | None = None, seed: int = 0):
    """A segmented index of random clustered vectors (no model): 60 videos of 1–30 segments under two folders,
    with varied durations and modification times. Returns (folder, vectors, per-row video number)."""
    from clip2video.search.store import Item, write_generation, write_shard

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, 32)).astype(np.float32)
    items, vecs = [], []
    for v in range(60):
        n_seg = int(rng.integers(1, 31))
        dur = 2.0 * n_seg
        path = f"/data/{'holiday' if v % 3 == 0 else 'work'}/clip{v:02d}.mp4"
        mtime = 1_700_000_000_000_000_000 + v * 86_400 * 10**9
        for j in range(n_seg):
            x = centres[(v + j) % 12] + 0.6 * rng.standard_normal(32).astype(np.float32)
            vecs.append(x / np.linalg.norm(x))
            items.append(Item(f"v{v:02d}", path, "file", 100, mtime, dur, 10 * n_seg, [], start=2.0 * j,
                              end=min(2.0 * j + 4.0, dur)))
    vecs = np.stack(vecs).astype(np.float32)
    folder.mkdir(parents=True)
    write_shard(folder, "s0", vecs, items, "k")
    write_generation(folder, [(it, "s0", r) for r, it in enumerate(items)],
                     model_meta={"dim": 32, "fingerprint": "random", "logit_scale": 1.0}, encoding={"key": "k"},
                     index_type=index_type, search_params=search_params,
                     segments={"mode": "fixed", "seconds": 4.0, "stride": 2.0})
    video_of = np.array([int(it.video_id[1:]) for it in items])
    return folder, vecs, video_of


def brute_force(index: SearchIndex, vecs, q, k, *, group=True, video=None, allowed_videos=None, moments=3):
    """The expected answer, computed the obvious way: (video id, start, score, [(start, score)]) rows."""
    video_of = index.row_video
    ok = np.ones(len(vecs), bool)
    if allowed_videos is not None:
        ok &= allowed_videos[video_of]
    if video is not None:
        ok &= video_of == index.video_ids.index(video)
    sc = vecs @ q
    rows = [r for r in np.lexsort((np.arange(len(sc)), -sc)) if ok[r]]
    if not group or video is not None:
        return [(index.video_ids[video_of[r]], index.starts[r], sc[r], []) for r in rows[:k]]
    out, seen = [], set()
    for r in rows:
        v = video_of[r]
        if v in seen:
            continue
        seen.add(v)
        rest = [x for x in rows if video_of[x] == v and x != r][:moments]
        out.append((index.video_ids[v], index.starts[r], sc[r], [(index.starts[x], sc[x]) for x in rest]))
    return out[:k]


def assert_same(hits, want):
    assert [(h.video_id, h.start) for h in hits] == [(w[0], w[1]) for w in want]
    np.testing.assert_allclose([h.score for h in hits], [w[2] for w in want], atol=1e-5, rtol=0)
    for h, w in zip(hits, want, strict=True):
        assert [m.start for m in h.moments] == [m[0] for m in w[3]]
        np.testing.assert_allclose([m.score for m in h.moments], [m[1] for m in w[3]], atol=1e-5, rtol=0)


FILTER_CASES = {
    "none": ({}, None),
    "path": ({"path": "/data/holiday/*"}, lambda ix: np.array(["/holiday/" in p for p in ix.paths])),
    "min_duration": ({"min_duration": 40.0}, lambda ix: ix.durations >= 40.0),
    "max_duration": ({"max_duration": 10.0}, lambda ix: ix.durations <= 10.0),
    "duration_range": ({"min_duration": 20.0, "max_duration": 30.0},
                       lambda ix: (ix.durations >= 20.0) & (ix.durations <= 30.0)),
    "modified_after": ({"modified_after": 1_700_000_000_000_000_000 + 45 * 86_400 * 10**9},
                       lambda ix: ix.mtimes > 1_700_000_000_000_000_000 + 45 * 86_400 * 10**9),
    "path_and_modified": ({"path": "*work*", "modified_after": 1_700_000_000_000_000_000 + 20 * 86_400 * 10**9},
                          lambda ix: np.array(["work" in p for p in ix.paths])
                          & (ix.mtimes > 1_700_000_000_000_000_000 + 20 * 86_400 * 10**9)),
}


@pytest.mark.parametrize("exact_rows", [20_000, 0], ids=["exact-scan", "faiss-selector"])
def test_grouping_video_and_filters_equal_brute_force(tmp_path, monkeypatch, exact_rows):
    from clip2video.search import moments
    from clip2video.search.moments import Filters, SearchRequest

    monkeypatch.setattr(moments, "EXACT_FILTERED_ROWS", exact_rows)
    folder, vecs, _ = _random_index(tmp_path / "flat")
    index = SearchIndex.open(folder)
    assert index.exact and len(index) == 60 and index.n_rows == len(vecs)
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((6, 32)).astype(np.float32)
    for name, (kw, allow) in FILTER_CASES.items():
        allowed = None if allow is None else allow(index)
        f = Filters(**kw)
        for k in (1, 5, 20, 100):
            for group in (True, False):
                req = SearchRequest(k, group=group, filters=f)
                got = index.search(queries, req)
                for q, hits in zip(queries, got, strict=True):
                    want = brute_force(index, vecs, q, k, group=group, allowed_videos=allowed)
                    assert_same(hits, want)
                    if allowed is not None:  # k under filters: as many hits as rows/videos pass
                        n_ok = int(allowed.sum()) if group else int(allowed[index.row_video].sum())
                        assert len(hits) == min(k, n_ok), (name, k, group)
        video = index.video_ids[7]
        for q in queries[:2]:
            (hits,) = index.search(q[None], SearchRequest(50, video_id=video, filters=f))
            assert_same(hits, brute_force(index, vecs, q, 50, video=video, allowed_videos=allowed))
    # grouped hits carry the video's next best segments; moments=0 leaves them out
    (hits,) = index.search(queries[:1], SearchRequest(5, moments=0))
    assert all(h.moments == () for h in hits) and len({h.video_id for h in hits}) == 5


def test_filters_with_an_approximate_index_still_return_k(tmp_path, monkeypatch):
    from clip2video.search import moments
    from clip2video.search.moments import Filters, SearchRequest

    folder, vecs, _ = _random_index(tmp_path / "ivf", index_type="IVF8,Flat", search_params="nprobe=1")
    index = SearchIndex.open(folder)
    assert not index.exact
    selectors = []
    real_params = moments._search_params
    monkeypatch.setattr(moments, "_search_params", lambda ix, sel: selectors.append(real_params(ix, sel))
                        or selectors[-1])
    rng = np.random.default_rng(2)
    queries = rng.standard_normal((8, 32)).astype(np.float32)
    for exact_rows in (20_000, 0):  # exact scan of the passing rows / FAISS selector + over-fetch
        monkeypatch.setattr(moments, "EXACT_FILTERED_ROWS", exact_rows)
        for name, (kw, allow) in FILTER_CASES.items():
            allowed = np.ones(60, bool) if allow is None else allow(index)
            for k in (3, 20, 60):
                for group in (True, False):
                    got = index.search(queries, SearchRequest(k, group=group, filters=Filters(**kw)))
                    n_ok = int(allowed.sum()) if group else int(allowed[index.row_video].sum())
                    for q, hits in zip(queries, got, strict=True):
                        assert len(hits) == min(k, n_ok), (name, k, group, exact_rows)
                        assert all(allowed[index.video_ids.index(h.video_id)] for h in hits)
                        if group:
                            assert len({h.video_id for h in hits}) == len(hits)
                        # every score is the exact one
                        for h in hits:
                            r = np.nonzero((index.row_video == index.video_ids.index(h.video_id))
                                           & (index.starts == h.start))[0][0]
                            assert abs(h.score - float(vecs[r] @ q)) < 1e-5
    assert selectors and all(p is not None and p.nprobe == 1 for p in selectors)  # the selector path ran
    # probing every list makes the approximate index exact: then the answers equal brute force
    index._index.nprobe = 8
    monkeypatch.setattr(moments, "EXACT_FILTERED_ROWS", 0)
    for kw, allow in FILTER_CASES.values():
        for q in queries[:3]:
            (hits,) = index.search(q[None], SearchRequest(10, filters=Filters(**kw)))
            assert_same(hits, brute_force(index, vecs, q, 10, allowed_videos=None if allow is None else allow(index)))


def test_query_flags_moments_and_filters(long_video, tiny_ckpt, tmp_path, capsys):
    """``query`` flags through the command line: JSON fields, grouping, --per_segment, --video, filters."""
    from clip2video.search.moments import Filters, SearchRequest

    videos = tmp_path / "videos"
    (videos / "trips").mkdir(parents=True)
    shutil.copy(long_video / "videos" / "long.mp4", videos / "trips" / "long.mp4")
    frames = read_frames(long_video / "videos" / "long.mp4")
    encode_video(videos / "short.mp4", [f[..., ::-1] for f in frames[:30]], fps=SRC_FPS, gop=8)
    ix = tmp_path / "ix"
    assert search.main(build_argv(videos, ix, tiny_ckpt, "--segment_seconds", "2")) == 0
    index = SearchIndex.open(ix)
    assert index.video_ids == ["short", "trips/long"] and index.n_rows == 2 + 9
    q = "a red circle moves left"
    qv = index.encode_text([q])

    def hits_json(request):
        return [{"video_id": h.video_id, "start": h.start, "end": h.end} for h in index.search(qv, request)[0]]

    def trim(res):
        return [{k: r[k] for k in ("video_id", "start", "end")} for r in res[0]["results"]]

    (res,) = query_json(capsys, ix, q)
    assert set(res["results"][0]) == {"video_id", "score", "path", "start", "end", "moments"}
    assert [r["video_id"] for r in res["results"]] in (["short", "trips/long"], ["trips/long", "short"])
    assert all(set(m) == {"start", "end", "score"} for r in res["results"] for m in r["moments"])
    assert trim(query_json(capsys, ix, "--per_segment", "-k", "5", q)) == hits_json(SearchRequest(5, group=False))
    got = query_json(capsys, ix, "--video", "trips/long", "-k", "20", q)[0]["results"]
    assert len(got) == 9 and {r["video_id"] for r in got} == {"trips/long"} and "moments" not in got[0]
    assert [r["score"] for r in got] == sorted((r["score"] for r in got), reverse=True)
    assert trim(query_json(capsys, ix, "--path", "*/trips/*", q)) == \
        hits_json(SearchRequest(10, filters=Filters(path="*/trips/*")))
    assert {r["video_id"] for r in query_json(capsys, ix, "--max_duration", "5", q)[0]["results"]} == {"short"}
    assert {r["video_id"] for r in query_json(capsys, ix, "--min_duration", "5", q)[0]["results"]} == {"trips/long"}
    assert query_json(capsys, ix, "--modified_after", "2999-01-01", q)[0]["results"] == []
    assert len(query_json(capsys, ix, "--modified_after", "2000-01-01T00:00", q)[0]["results"]) == 2
    like = query_json(capsys, ix, "--like", "trips/long", "--start", "4", "--per_segment", "-k", "20")[0]
    assert all(not (r["video_id"] == "trips/long" and r["start"] < 6 and r["end"] > 4) for r in like["results"])
    assert len(like["results"]) == 11 - 3  # the moment and the two overlapping it are left out
    # query arithmetic naming an indexed video leaves out all its segments, before k
    mixed = query_json(capsys, ix, q, "+", "like:short", "--per_segment", "-k", "20")[0]["results"]
    assert len(mixed) == 9 and {r["video_id"] for r in mixed} == {"trips/long"}
    for flags, words in ((["--video", "nope", q], "--video nope: no such video"),
                         (["--modified_after", "yesterday", q], "--modified_after 'yesterday': not a date"),
                         (["--min_duration", "5", "--max_duration", "2", q], "is above --max_duration"),
                         (["--min_duration", "-1", q], "--min_duration must be"),
                         (["--like", "trips/long", "--start", "3.3"], "no such video moment"),
                         (["--start", "3", q], "--start goes with --like"),
                         (["--moments", "99", q], "--moments must be from 0 to")):
        capsys.readouterr()
        rc = search.main(["query", "--index", str(ix), *flags])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.count("\n") == 0 and words in err, (flags, err)


# ----------------------------------------------------------------------------------------------- export
def _nearest(frame: np.ndarray, source: list[np.ndarray]) -> int:
    d = [np.abs(frame.astype(np.int16) - s.astype(np.int16)).mean() for s in source]
    return int(np.argmin(d))


@pytest.fixture(scope="module")
def export_index(long_video, tiny_ckpt, tmp_path_factory):
    """A segmented index of the 9.6 s file (10 fps, keyframe every 8 frames) and of its 5 fps frame folder."""
    root = tmp_path_factory.mktemp("export")
    (root / "media").mkdir()
    shutil.copy(long_video / "videos" / "long.mp4", root / "media" / "long.mp4")
    shutil.copytree(long_video / "frames" / "long", root / "media" / "long_frames")
    ix = root / "ix"
    assert search.main(build_argv(root / "media", ix, tiny_ckpt, "--segment_seconds", "2")) == 0
    return ix, root / "media"


def test_export_exact_copy_and_errors(export_index, tmp_path, capsys):
    ix, media = export_index
    source = read_frames(media / "long.mp4")  # 96 frames at 10 fps
    for start, end in ((2.34, 4.5), (0.0, 9.6), (9.55, 9.6), (3.0, 3.05)):
        out = tmp_path / f"clip_{start}_{end}.mp4"
        capsys.readouterr()
        assert search.main(["export", "--index", str(ix), "--video_id", "long", "--start", str(start), "--end",
                            str(end), str(out)]) == 0
        assert "re-encoded, frame-exact" in capsys.readouterr().out
        got = read_frames(out)
        first = int(Fraction(repr(start)) * SRC_FPS)  # the frame on screen at start
        last = -(-int(Fraction(repr(end)) * SRC_FPS * 1000) // 1000) - 1  # the last frame before end
        assert len(got) == last - first + 1, (start, end)
        assert _nearest(got[0], source) == first and _nearest(got[-1], source) == last
        assert abs(float(probe(out).duration) - (end - start)) < 1e-3  # the asked duration
    # stream copy: whole groups of pictures, and it says which range it holds
    out = tmp_path / "copy.mp4"
    capsys.readouterr()
    assert search.main(["export", "--index", str(ix), "--video_id", "long", "--start", "2.34", "--end", "4.5",
                        "--copy", str(out)]) == 0
    line = capsys.readouterr().out
    keys = [float((k - probe(media / "long.mp4").pts[0]) * probe(media / "long.mp4").time_base)
            for k in probe(media / "long.mp4").keyframe_pts]
    k0 = max(k for k in keys if k <= 2.3 + 1e-9)
    k1 = min((k for k in keys if k >= 4.5 - 1e-9), default=9.6)
    assert f"{k0:.3f}–{k1:.3f} s" in line and "cut at keyframes" in line and "asked 2.340–4.500 s" in line
    got = read_frames(out)
    assert len(got) == round((k1 - k0) * SRC_FPS) and _nearest(got[0], source) == round(k0 * SRC_FPS)
    # a frame folder is exported from its frames (5 fps)
    out = tmp_path / "frames.mp4"
    assert search.main(["export", "--index", str(ix), "--video_id", "long_frames", "--start", "1", "--end", "2.1",
                        str(out)]) == 0
    assert len(read_frames(out)) == 6  # frames at 1.0, 1.2, ..., 2.0 s
    for flags, words in (
            (["--video_id", "long", "--start", "4", "--end", "4"], "start 4 s is not before end 4 s"),
            (["--video_id", "long", "--start", "5", "--end", "3"], "is not before end"),
            (["--video_id", "long", "--start", "8", "--end", "12"], "outside the video (0–9.600 s)"),
            (["--video_id", "long", "--start", "-1", "--end", "2"], "before the video's beginning"),
            (["--video_id", "nope", "--start", "1", "--end", "2"], "--video_id nope: no such video"),
            (["--video_id", "long_frames", "--start", "1", "--end", "2", "--copy"], "--copy needs a video file")):
        capsys.readouterr()
        rc = search.main(["export", "--index", str(ix), *flags, str(tmp_path / "bad.mp4")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.count("\n") == 0 and words in err, (flags, err)
        assert not (tmp_path / "bad.mp4").exists()
    capsys.readouterr()
    assert search.main(["export", "--index", str(ix), "--video_id", "long", "--start", "1", "--end", "2",
                        str(tmp_path / "x.avi")]) == 2
    assert "ending in .mp4" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- API
def test_api_moments_filters_and_clips(export_index, tmp_path):
    pytest.importorskip("fastapi")
    from server_utils import ServerThread, get_json, raw_get

    from clip2video.search.app import create_app
    from clip2video.search.moments import Filters, SearchRequest

    ix, _ = export_index
    index = SearchIndex.open(ix)
    q = "a red circle moves left"
    qv = index.encode_text([q])
    with ServerThread(create_app(index, max_clip_seconds=5)) as srv:
        port = srv.port

        def api(path):
            return get_json(port, path)

        status, body = api(f"/api/search?q={q.replace(' ', '+')}&k=5")
        assert status == 200
        want = index.search(qv, SearchRequest(5))[0]
        assert [(r["video_id"], r["start"], r["end"]) for r in body["results"]] == \
            [(h.video_id, h.start, h.end) for h in want]
        r0 = body["results"][0]
        assert [m["start"] for m in r0["moments"]] == [m.start for m in want[0].moments]
        assert r0["clip"] == f"/api/clip?video_id={r0['video_id']}&start={r0['start']:g}&end={r0['end']:g}"
        assert 1 <= len(r0["thumbnails"]) <= 3  # this segment's own thumbnails
        status, body = api(f"/api/search?q={q.replace(' ', '+')}&k=7&group=0")
        assert [(r["video_id"], r["start"]) for r in body["results"]] == \
            [(h.video_id, h.start) for h in index.search(qv, SearchRequest(7, group=False))[0]]
        status, body = api(f"/api/search?q={q.replace(' ', '+')}&k=20&video_id=long")
        assert {r["video_id"] for r in body["results"]} == {"long"} and len(body["results"]) == 9
        status, body = api(f"/api/search?q={q.replace(' ', '+')}&path=*frames*")
        assert [r["video_id"] for r in body["results"]] == ["long_frames"]
        assert [(r["video_id"], r["start"]) for r in body["results"]] == \
            [(h.video_id, h.start) for h in index.search(qv, SearchRequest(10, filters=Filters(path="*frames*")))[0]]
        status, body = api("/api/search?q=x&max_duration=5")
        assert status == 200 and body["results"] == []
        status, body = api("/api/search?q=x&modified_after=2000-01-01")
        assert status == 200 and len(body["results"]) == 2
        for bad, code, words in (("group=2", 400, "group must be 0 or 1"), ("video_id=nope", 404, "unknown video_id"),
                                 ("min_duration=-3", 400, "min_duration must be"),
                                 ("modified_after=soon", 400, "not a date"), ("moments=500", 400, "moments must be")):
            status, body = api(f"/api/search?q=x&{bad}")
            assert status == code and words in body["error"], (bad, body)
        status, body = api("/api/similar?video_id=long&start=2&k=20&group=0")
        assert status == 200 and body["start"] == 2.0
        assert all(not (r["video_id"] == "long" and r["start"] < 4 and r["end"] > 2) for r in body["results"])
        assert api("/api/similar?video_id=long&start=2.5")[0] == 404
        # clips: the range as MP4, frame-exact; bounded length; bad ranges are 400
        status, headers, data = raw_get(port, "/api/clip?video_id=long&start=2.34&end=4.5")
        assert status == 200 and headers["content-type"] == "video/mp4" and headers["x-clip-exact"] == "1"
        assert 'filename="long_2.34-4.5.mp4"' in headers["content-disposition"]
        (tmp_path / "c.mp4").write_bytes(data)
        assert len(read_frames(tmp_path / "c.mp4")) == 44 - 23 + 1  # frames at 2.3 (on screen at 2.34) … 4.4 s
        status, headers, _ = raw_get(port, "/api/clip?video_id=long&start=2.34&end=4.5&copy=1")
        assert status == 200 and headers["x-clip-exact"] == "0"
        for bad, code, words in (("video_id=long&start=0&end=6", 400, "the limit is 5 s"),
                                 ("video_id=long&start=3&end=3", 400, "is not before end"),
                                 ("video_id=long&start=8&end=11", 400, "outside the video"),
                                 ("video_id=long&start=x&end=2", 400, "start must be a number"),
                                 ("video_id=long&start=1", 400, "give start and end"),
                                 ("video_id=nope&start=1&end=2", 404, "unknown video_id")):
            status, body = api(f"/api/clip?{bad}")
            assert status == code and words in body["error"], (bad, body)
    assert srv.stopped_cleanly
    assert not list(Path(__import__("tempfile").gettempdir()).glob("clip2video-clip-*"))
