"""Synthetic moving-shape data (dataloaders/synthetic.py): twins, determinism, splits, metric, mp4 round trip."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from clip2video.cli import sample_frame
from clip2video.cli.synthetic import main
from clip2video.dataloaders.synthetic import (
    COLOURS,
    DIRECTIONS,
    OPPOSITE,
    direction_accuracy,
    make_synthetic_dataset,
    render_pair,
)
from clip2video.dataloaders.video_io import read_frames

N_FRAMES = 8


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "annotations.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def frames_set(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("syn") / "ds"
    summary = make_synthetic_dataset(out, n_videos=20, seed=3, size=48, n_frames=N_FRAMES, write="frames")
    return out, summary


def test_layout_and_annotations(frames_set):
    out, summary = frames_set
    meta = json.loads((out / "videos.json").read_text())
    rows = _rows(out)
    assert sorted(os.listdir(out)) == ["annotations.csv", "frames", "videos.json"]
    assert list(rows[0]) == ["video_id", "caption", "split"]
    assert len(meta) == 20 and len(rows) == 40 == summary["n_captions"]  # 2 captions per clip
    for vid, m in meta.items():
        assert sorted(os.listdir(out / "frames" / vid)) == [f"{k:08d}.jpg" for k in range(1, N_FRAMES + 1)]
        caps = [r["caption"] for r in rows if r["video_id"] == vid]
        assert caps == m["captions"] and len(caps) == 2
        assert all(m["colour"] in c and m["shape"] in c for c in caps)
        assert {r["split"] for r in rows if r["video_id"] == vid} == {m["split"]}


def test_twins_are_reversed_with_opposite_captions(frames_set):
    out, _ = frames_set
    meta = json.loads((out / "videos.json").read_text())
    word = {"left": "left", "right": "right", "up": "up", "down": "down"}
    for vid, m in meta.items():
        twin = meta[m["twin"]]
        assert twin["twin"] == vid and twin["motion"] == OPPOSITE[m["motion"]]
        assert (twin["colour"], twin["shape"], twin["split"]) == (m["colour"], m["shape"], m["split"])
        assert all(word[m["motion"]] in c and word[twin["motion"]] not in c for c in m["captions"])
        mine = [(out / "frames" / vid / f"{k:08d}.jpg").read_bytes() for k in range(1, N_FRAMES + 1)]
        theirs = [(out / "frames" / m["twin"] / f"{k:08d}.jpg").read_bytes() for k in range(1, N_FRAMES + 1)]
        assert mine == theirs[::-1] and mine != theirs


@pytest.mark.parametrize("pair", range(12))
def test_pixels_move_as_the_caption_says(pair):
    frames, attrs = render_pair(0, pair, size=64, n_frames=16)
    stack = np.stack(frames).astype(np.float32)
    background = np.median(stack, axis=0)  # the shape moves, so each pixel shows background most of the time
    centroids = []
    for f in stack:
        ys, xs = np.nonzero(np.abs(f - background).max(-1) > 40)
        centroids.append((xs.mean(), ys.mean()))
    (x0, y0), (x1, y1) = centroids[0], centroids[-1]
    dx, dy = x1 - x0, y1 - y0
    expected = {"right": dx > 10, "left": dx < -10, "down": dy > 10, "up": dy < -10}
    assert attrs["motion"] in DIRECTIONS and expected[attrs["motion"]], (attrs, dx, dy)


@pytest.mark.parametrize("pair", range(4))
def test_grows_and_shrinks(pair):
    frames, attrs = render_pair(5, pair, size=64, n_frames=10, motions=("grows", "shrinks"))
    colour = np.array(COLOURS[attrs["colour"]])
    area = [int((np.abs(f.astype(int) - colour).max(-1) < 30).sum()) for f in frames]
    assert (area[-1] > 2 * area[0]) if attrs["motion"] == "grows" else (area[0] > 2 * area[-1]), (attrs, area)


def test_deterministic_and_seed_dependent(frames_set, tmp_path):
    out, _ = frames_set
    again = tmp_path / "again"
    make_synthetic_dataset(again, n_videos=20, seed=3, size=48, n_frames=N_FRAMES, write="frames")
    assert _tree_digest(again) == _tree_digest(out)  # byte for byte
    other = tmp_path / "other"
    make_synthetic_dataset(other, n_videos=20, seed=4, size=48, n_frames=N_FRAMES, write="frames")
    assert _tree_digest(other) != _tree_digest(out)
    # A clip does not depend on how many clips are made.
    fewer = tmp_path / "fewer"
    make_synthetic_dataset(fewer, n_videos=4, seed=3, size=48, n_frames=N_FRAMES, write="frames")
    assert _tree_digest(fewer / "frames" / "syn00003") == _tree_digest(out / "frames" / "syn00003")


def test_splits_keep_twins_together(tmp_path):
    summary = make_synthetic_dataset(tmp_path / "d", n_videos=60, seed=1, size=32, n_frames=2, write="frames",
                                     captions_per_video=1)
    meta = json.loads(Path(summary["videos_json"]).read_text())
    assert summary["videos_per_split"] == {"train": 42, "val": 6, "test": 12}  # 30 pairs -> 21 / 3 / 6
    assert all(meta[m["twin"]]["split"] == m["split"] for m in meta.values())
    assert len(_rows(tmp_path / "d")) == 60
    # Tiny sets still give every split with a positive share at least one pair.
    small = make_synthetic_dataset(tmp_path / "s", n_videos=6, seed=1, size=32, n_frames=2, write="frames")
    assert small["videos_per_split"] == {"train": 2, "val": 2, "test": 2}


def test_direction_accuracy_on_hand_made_matrix():
    meta = {
        "A": {"twin": "B"}, "B": {"twin": "A"},
        "C": {"twin": "D"}, "D": {"twin": "C"},
        "E": {"twin": "F"},  # F is not a column: E's captions are not counted
    }
    video_ids = ["A", "B", "C", "D", "E"]
    sim = np.array([
        [0.9, 0.1, 0.0, 0.0, 0.0],  # A above twin B: 1
        [0.2, 0.8, 0.0, 0.0, 0.0],  # B above twin A: 1
        [0.0, 0.0, 0.3, 0.7, 0.0],  # C below twin D: 0
        [0.0, 0.0, 0.5, 0.5, 0.0],  # D ties with C: 0.5
        [0.0, 0.0, 0.0, 0.0, 1.0],  # E: ignored
        [0.6, 0.5, 0.0, 0.0, 9.0],  # A again, above B (E's huge score does not matter): 1
    ])
    caption_video = np.array([0, 1, 2, 3, 4, 0])
    assert direction_accuracy(sim, caption_video, video_ids, meta) == pytest.approx(3.5 / 5)
    # An order-blind model: twins score equal up to float noise -> chance with a tolerance.
    blind = np.array([[0.5, 0.5 + 1e-9], [0.3, 0.3 - 1e-9]])
    assert direction_accuracy(blind, np.array([0, 1]), ["A", "B"], meta, tie_tol=1e-6) == 0.5
    with pytest.raises(ValueError, match="twin"):
        direction_accuracy(sim[4:5], caption_video[4:5], video_ids, meta)
    with pytest.raises(ValueError, match="caption_video"):
        direction_accuracy(sim, caption_video[:3], video_ids, meta)
    with pytest.raises(ValueError, match="video_ids"):
        direction_accuracy(sim, caption_video, video_ids[:4], meta)


def test_mp4_round_trip_and_extraction(tmp_path, capsys):
    summary = make_synthetic_dataset(tmp_path / "d", n_videos=4, seed=0, size=64, n_frames=12, fps=10)
    videos = Path(summary["media"])
    assert sorted(os.listdir(videos)) == [f"syn{k:05d}.mp4" for k in range(4)]
    frames, _ = render_pair(0, 0, size=64, n_frames=12)
    decoded = read_frames(videos / "syn00000.mp4")
    assert len(decoded) == 12
    assert min(cv2.PSNR(a, b) for a, b in zip(frames, decoded, strict=True)) > 30
    twin = read_frames(videos / "syn00001.mp4")
    assert len(twin) == 12
    assert min(cv2.PSNR(a, b) for a, b in zip(frames[::-1], twin, strict=True)) > 30

    out = tmp_path / "frames"
    argv = ["--input_path", str(videos), "--output_path", str(out), "--fps", "10", "--workers", "1"]
    assert sample_frame.main(argv) == 0
    assert all(len(os.listdir(out / f"syn{k:05d}")) == 12 for k in range(4))
    assert "done 4 (48 frames" in capsys.readouterr().out


def test_cli_and_bad_arguments(tmp_path, capsys):
    out = tmp_path / "cli"
    small = ["--size", "32", "--n_frames", "3", "--write", "frames"]
    assert main([str(out), "--n_videos", "4", "--seed", "0", *small]) == 0
    assert json.loads(capsys.readouterr().out)["n_videos"] == 4
    before = _tree_digest(out)
    assert main([str(out), "--n_videos", "4", "--write", "frames"]) == 2  # exists: refuse, untouched
    assert "already exists" in capsys.readouterr().err and _tree_digest(out) == before
    assert main([str(out), "--n_videos", "6", *small, "--overwrite"]) == 0
    assert len(json.loads((out / "videos.json").read_text())) == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    for argv, word in [
        (["--n_videos", "5"], "even"),
        (["--splits", "0.5,0.5"], "splits"),
        (["--splits", "a,b,c"], "--splits"),
        (["--motions", "left,sideways"], "motions"),
        (["--n_frames", "1"], "n_frames"),
    ]:
        capsys.readouterr()
        assert main([str(tmp_path / "bad"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0]
    assert not (tmp_path / "bad").exists()
