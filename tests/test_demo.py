"""The built-in demo, shortened to seconds: videos → frames → training → evaluation → report + picture.

One ``--quick`` run serves every test below; each checks that what the demo prints and writes is what its
own saved outputs (similarity matrices, metrics files, checkpoints) say, so a table that drifted from the
numbers behind it, a wrong direction accuracy or a mislabelled row fails.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip2video import visualize
from clip2video.dataloaders.annotations import load_eval_set
from clip2video.dataloaders.frames import load_video
from clip2video.dataloaders.synthetic import direction_accuracy
from clip2video.modules.evaluation.metrics import markdown_row, retrieval_metrics
from clip2video.modules.weights.factory import load_model

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("meanP", "tdb", "tab_tdb", "vip")
NUM = r"(-?\d+(?:\.\d+)?)"

pytestmark = pytest.mark.slow


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run ``scripts/demo.py --quick`` once; return its module, output folder and printed text."""
    import contextlib
    import io

    mod = load_demo()
    out = tmp_path_factory.mktemp("demo") / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = mod.main(["--out", str(out), "--quick", "--seed", "0"])
    assert rc == 0, buf.getvalue()[-3000:]
    synth = out / "synthetic"
    rset = load_eval_set("generic", data_path=str(synth / "annotations.csv"), features_path=str(out / "frames"),
                         split="test")
    meta = json.loads((synth / "videos.json").read_text())
    return {"mod": mod, "out": out, "stdout": buf.getvalue(), "rset": rset, "meta": meta}


def _run(demo, v: str) -> dict:
    run = demo["out"] / "runs" / v
    sim = np.load(run / "test_sim.npy")
    metrics = json.loads((run / "test_metrics.json").read_text())
    acc = direction_accuracy(sim, demo["rset"].caption_video, demo["rset"].video_ids, demo["meta"])
    return {"sim": sim, "metrics": metrics, "acc": acc, "run": run}


def test_test_split_is_what_the_header_says(demo):
    meta, rset = demo["meta"], demo["rset"]
    test_ids = [v for v, m in meta.items() if m["split"] == "test"]
    n_caps = sum(len(meta[v]["captions"]) for v in test_ids)
    assert sorted(rset.video_ids) == sorted(test_ids) and len(rset.captions) == n_caps
    assert all(meta[v]["twin"] in test_ids for v in test_ids)  # twins share a split: direction acc is defined
    head = re.search(r"Synthetic test split: (\d+) captions × (\d+) clips \(seed 0\)", demo["stdout"])
    assert head and (int(head.group(1)), int(head.group(2))) == (n_caps, len(test_ids))


def test_printed_table_has_one_row_per_variant_matching_its_saved_metrics(demo):
    lines = demo["stdout"].splitlines()
    for v in VARIANTS:
        label = demo["mod"].LABELS[v]
        rows = [ln for ln in lines if re.fullmatch(re.escape(label) + r"\s+" + r"\s+".join([NUM] * 8)
                                                   + r"\s+" + NUM + r"%\s*" + NUM, ln)]
        assert len(rows) == 1, (label, rows)
        cells = re.findall(NUM, rows[0][len(label):])
        r = _run(demo, v)
        t, w = r["metrics"]["t2v"], r["metrics"]["v2t"]
        want = [t["R1"], t["R5"], t["R10"], t["MdR"], t["MnR"], w["R1"], w["R5"], w["R10"], 100 * r["acc"]]
        assert cells[:9] == [f"{x:.1f}" for x in want], (label, cells, want)
        assert float(cells[9]) >= 0  # train seconds


def test_saved_metrics_are_the_metrics_of_the_saved_matrix(demo):
    rset = demo["rset"]
    for v in VARIANTS:
        r = _run(demo, v)
        assert r["sim"].shape == (len(rset.captions), len(rset.video_ids))
        assert np.isfinite(r["sim"]).all()
        assert retrieval_metrics(r["sim"], rset.caption_video, rset.multi_caption) == {
            d: r["metrics"][d] for d in ("t2v", "v2t")}
        assert r["metrics"]["run"]["counts"]["captions"] == len(rset.captions)


def test_report_rows_equal_the_metrics_and_direction_accuracy(demo):
    report = (demo["out"] / "report.md").read_text().splitlines()
    table = [ln for ln in report if ln.startswith("| ") and not ln.startswith(("| model", "| ---"))]
    assert len(table) == len(VARIANTS)
    for v, row in zip(VARIANTS, table, strict=True):
        r = _run(demo, v)
        assert row == markdown_row(demo["mod"].LABELS[v], r["metrics"])[:-1] + f"| {100 * r['acc']:.1f}% |"
    assert "![top-5 retrievals of the TDB + TAB model](retrieval_tab_tdb.png)" in report


def test_retrieval_picture_has_the_grid_geometry(demo):
    png = demo["out"] / "retrieval_tab_tdb.png"
    n_rows = min(6, len(demo["rset"].captions))  # the demo asks for 6 queries
    cell_w = visualize.FRAMES_PER_CELL * visualize.THUMB + 2 * visualize.PAD
    width = visualize.TEXT_W + 5 * (cell_w + visualize.PAD) + visualize.PAD
    height = n_rows * (visualize.THUMB + 2 * visualize.PAD + 18) + visualize.PAD
    with Image.open(png) as im:
        assert im.size == (width, height)
        colours = np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)
        assert len(colours) > 50  # thumbnails were drawn, not a blank canvas


def test_mean_pooling_is_blind_to_frame_order_and_tdb_is_not(demo):
    """Why mean pooling sits at chance in the direction column: reversing a clip's frames leaves its vector
    unchanged, while the TDB model's vector moves."""
    vid = demo["rset"].video_ids[0]
    vectors = {}
    for v in ("meanP", "tdb"):
        model = load_model(demo["out"] / "runs" / v / "best.pt").eval()
        frames, mask, _ = load_video(demo["out"] / "frames" / vid, max_frames=12, framerate=1,
                                     image_size=model.config.clip.image_size)
        n = int(mask.sum())
        assert n >= 3
        reversed_frames = frames.clone()
        reversed_frames[:n] = frames[:n].flip(0)
        with torch.no_grad():
            a = model.video_vector(model.encode_video(frames[None], mask[None]))
            b = model.video_vector(model.encode_video(reversed_frames[None], mask[None]))
        vectors[v] = (a, b)
    a, b = vectors["meanP"]
    assert torch.allclose(a, b, atol=1e-5)
    a, b = vectors["tdb"]
    assert (a - b).abs().max() > 1e-3


def test_every_variant_left_a_validation_checkpoint(demo):
    for v in VARIANTS:
        run = demo["out"] / "runs" / v
        assert (run / "best.pt").is_file() and (run / "test_metrics.json").is_file()
        assert not list(run.glob("pytorch_model.bin.*"))  # the demo trains with --no_export


def test_moments_step_finds_ranges_in_the_long_video(demo):
    """The long video is the chosen test clips end to end; each printed "found" range is the segment index's top
    hit for that caption, each "true range" is where that clip lies, and the IoU is computed from the two."""
    from clip2video.dataloaders.video_io import probe
    from clip2video.search.index import SearchIndex

    mod, out, rset, meta = demo["mod"], demo["out"], demo["rset"], demo["meta"]
    clips = mod.long_video_clips(rset, meta)
    assert len({meta[v]["captions"][0] for v in clips}) == len(clips) >= 2
    assert all(meta[b]["twin"] != a for a, b in zip(clips, clips[1:], strict=False))
    lengths = [float(probe(out / "synthetic" / "videos" / f"{v}.mp4").duration) for v in clips]
    assert float(probe(out / "long" / "long.mp4").duration) == pytest.approx(sum(lengths), abs=1e-6)
    starts = dict(zip(clips, np.cumsum([0.0, *lengths[:-1]]).tolist(), strict=True))
    ix = SearchIndex.open(out / "moments_index")
    assert ix.manifest["segments"] == {"mode": "fixed", "seconds": 2.3, "stride": 0.5}
    blocks = demo["stdout"].split("moment query: ")[1:]
    assert len(blocks) == 2
    for block in blocks:
        q = block.split("\n")[0].strip("'\"")
        m = re.search(r"found\s+" + NUM + r"–\s*" + NUM + r" s in long \(score " + NUM + r"\); true range\s+" + NUM
                      + r"–\s*" + NUM + r" s \((\w+)\); IoU " + NUM, block)
        assert m, block
        found, truth, vid = (float(m.group(1)), float(m.group(2))), (float(m.group(4)), float(m.group(5))), m.group(6)
        (hit,) = ix.query([q], 1)[0]
        assert (round(hit.start, 1), round(hit.end, 1)) == found and f"{hit.score:.3f}" == m.group(3)
        assert meta[vid]["captions"][0] == q
        span = (starts[vid], starts[vid] + lengths[clips.index(vid)])
        assert truth == (round(span[0], 1), round(span[1], 1))
        assert float(m.group(7)) == pytest.approx(mod.iou((hit.start, hit.end), span), abs=0.01)
