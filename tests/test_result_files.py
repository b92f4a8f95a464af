"""Result files say what they measured, metrics do not depend on the order of the annotation rows, and
QB-Norm runs through infer_retrieval.py (tiny model on synthetic frames; the parity fixture for the formula)."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

import clip2video
from clip2video.cli import infer_retrieval
from clip2video.dataloaders.synthetic import make_synthetic_dataset
from clip2video.modules.evaluation.metrics import ranks_of, t2v_metrics
from clip2video.modules.evaluation.qbnorm import CLIP2VIDEO_BETA

from conftest import generic_eval_argv


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """A generic test split of 10 clips with 1, 2 or 3 captions each (19 captions), the same rows shuffled
    (videos and captions in another order), and a query bank of training captions."""
    root = tmp_path_factory.mktemp("uneven")
    make_synthetic_dataset(root / "synth", n_videos=20, seed=3, size=32, n_frames=8, write="frames",
                           splits=(0.5, 0.0, 0.5))
    with open(root / "synth" / "annotations.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    test_videos = list(dict.fromkeys(r["video_id"] for r in rows if r["split"] == "test"))
    assert len(test_videos) == 10
    out = []
    for i, v in enumerate(test_videos):
        caps = [r["caption"] for r in rows if r["video_id"] == v]
        for j in range(1 + i % 3):
            out.append({"video_id": v, "caption": caps[j % len(caps)] + ("" if j < len(caps) else " again"),
                        "split": "test"})
    shuffled = out[:]
    random.Random(0).shuffle(shuffled)
    for name, data in (("ordered.csv", out), ("shuffled.csv", shuffled)):
        with open(root / name, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["video_id", "caption", "split"])
            w.writeheader()
            w.writerows(data)
    bank = root / "bank.txt"
    bank.write_text("\n".join(r["caption"] for r in rows if r["split"] == "train") + "\n\nun vidéo d'essai ✓\n",
                    encoding="utf-8")
    return root, out, shuffled, bank


def run_eval(root: Path, ann: str, ckpt: Path, out: Path, *extra: str) -> tuple[dict, np.ndarray]:
    out.mkdir(parents=True, exist_ok=True)
    argv = generic_eval_argv(root / ann, root / "synth" / "frames", ckpt, out / "sim.npy", "--metrics_json",
                             str(out / "m.json"), *extra, max_frames=8)
    assert infer_retrieval.main(argv) == 0
    return json.loads((out / "m.json").read_text()), np.load(out / "sim.npy")


def test_metrics_unchanged_by_row_order_with_unequal_captions(uneven, tiny_ckpt, tmp_path):
    root, ordered, shuffled, bank = uneven
    a, sim_a = run_eval(root, "ordered.csv", tiny_ckpt, tmp_path / "a", "--qb_norm", str(bank))
    b, sim_b = run_eval(root, "shuffled.csv", tiny_ckpt, tmp_path / "b", "--qb_norm", str(bank))
    assert sim_a.shape == (19, 10)  # unequal numbers of captions and videos
    counts = a["run"]["counts"]
    assert counts == {"captions": 19, "videos": 10, "captions_per_video": {"min": 1, "max": 3, "mean": 1.9}}
    assert b["run"]["counts"] == counts
    # the same (caption, video) pairs score the same wherever they sit in the file
    ids = {name: list(dict.fromkeys(r["video_id"] for r in rows)) for name, rows in (("a", ordered), ("b", shuffled))}
    assert ids["a"] != ids["b"]
    cols = [ids["b"].index(v) for v in ids["a"]]

    def grouped(rows, ids_):  # rows of the matrix: captions grouped by video in column order, file order within
        return [(r["video_id"], r["caption"]) for v in ids_ for r in rows if r["video_id"] == v]

    rows_a, rows_b = grouped(ordered, ids["a"]), grouped(shuffled, ids["b"])
    perm = []
    for pair in rows_a:
        perm.append(next(i for i, p in enumerate(rows_b) if p == pair and i not in perm))
    np.testing.assert_allclose(sim_b[np.ix_(perm, cols)], sim_a, rtol=0, atol=1e-4)
    for key in ("t2v", "v2t", "qb_norm"):
        assert a[key] == b[key], key


def test_result_file_fields_read_back(uneven, tiny_ckpt, tmp_path, capsys):
    root, _, _, bank = uneven
    m, sim = run_eval(root, "ordered.csv", tiny_ckpt, tmp_path, "--qb_norm", str(bank), "--qb_beta", "0.25",
                      "--dsl", "--save_sim_qb", str(tmp_path / "qb.npy"), "--precision", "fp32")
    run = m["run"]
    assert set(m) == {"t2v", "v2t", "dsl", "qb_norm", "run"} and set(m["qb_norm"]) == {"t2v"}
    assert run["protocol"]["name"] == "generic:ordered.csv" and run["protocol"]["multi_caption"] is True
    assert run["datatype"] == "generic" and run["split"] == "test"
    assert run["annotations"] == [{"path": str((root / "ordered.csv").resolve()), "sha256": sha(root / "ordered.csv"),
                                   "bytes": (root / "ordered.csv").stat().st_size}]
    assert run["checkpoint"]["sha256"] == sha(tiny_ckpt) and run["checkpoint"]["path"] == str(tiny_ckpt.resolve())
    assert run["checkpoint_config"]["sha256"] == sha(tiny_ckpt.with_name(tiny_ckpt.name + ".config.json"))
    assert run["clip"] is None
    assert run["mask_layout"] == "per_video" and run["precision"] == "fp32" and run["processes"] == 1
    assert run["flags"]["batch_size_val"] == 4 and run["flags"]["qb_beta"] == 0.25 and run["flags"]["dsl"] is True
    post = run["post_processing"]
    assert post["dsl"]["note"] == "uses all test queries; not a single-query method"
    qb = post["qb_norm"]
    assert qb["beta"] == 0.25 and qb["k"] == 1 and qb["directions"] == ["t2v"]
    lines = [ln for ln in bank.read_text(encoding="utf-8").splitlines() if ln.strip()]
    assert qb["bank"] == {"source": "file", "captions": len(lines),
                          "file": {"path": str(bank.resolve()), "sha256": sha(bank), "bytes": bank.stat().st_size}}
    assert 0 <= qb["normalised_queries"] <= 19 and 1 <= qb["retrieved_videos"] <= 10
    code = run["code"]
    assert code["package"] == "clip2video" and code["version"] == clip2video.__version__
    assert code["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", code["git_commit"])
    # the QB-Norm matrix: normalised rows are probabilities-like values, the others the plain scores
    qbm = np.load(tmp_path / "qb.npy")
    assert qbm.shape == sim.shape and qbm.dtype == np.float32
    same = np.all(qbm == sim, axis=1)
    assert int((~same).sum()) == qb["normalised_queries"]
    cv = np.repeat(np.arange(10), [1 + i % 3 for i in range(10)])
    assert m["qb_norm"]["t2v"] == pytest.approx(t2v_metrics(ranks_of(qbm.astype(np.float64), cv), True))
    log = (capsys.readouterr().out)
    assert "T2V +QB-Norm" in log and "measured: generic:ordered.csv" in log and "run record: {" in log


def _bad(argv: list[str], capsys) -> tuple[int, str]:
    rc = infer_retrieval.main(argv)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return rc, err


def test_qb_flags_and_banks_fail_with_one_line(uneven, tiny_ckpt, tmp_path, capsys):
    root, _, _, bank = uneven
    base = generic_eval_argv(root / "ordered.csv", root / "synth" / "frames", tiny_ckpt, tmp_path / "s.npy",
                             max_frames=8)
    assert _bad([*base, "--save_sim_qb", str(tmp_path / "q.npy")], capsys) == (
        2, "infer_retrieval.py: error: --save_sim_qb needs a query bank (--qb_norm BANK or --qb_norm_split SPLIT)")
    rc, err = _bad([*base, "--qb_norm", str(bank), "--qb_norm_split", "train"], capsys)
    assert rc == 2 and "exclude each other" in err
    rc, err = _bad([*base, "--qb_norm", str(bank), "--qb_k", "0"], capsys)
    assert rc == 2 and "--qb_k must be >= 1" in err
    rc, err = _bad([*base, "--qb_norm", str(tmp_path / "nope.txt")], capsys)
    assert rc == 2 and "--qb_norm" in err and "no such file" in err
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("a caption\nun vid\xe9o\n".encode("latin-1"))
    rc, err = _bad([*base, "--qb_norm", str(latin)], capsys)
    assert rc == 1 and f"{latin}: line 2 is not UTF-8" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    rc, err = _bad([*base, "--qb_norm", str(empty)], capsys)
    assert rc == 1 and f"{empty}: no captions" in err
    assert not (tmp_path / "s.npy").exists()  # nothing written by a run that failed on its input


def test_qb_norm_on_the_parity_fixture_equals_the_formula(parity_dir, parity_weights, tmp_path, capsys):
    """MSVD protocol of the parity fixture with the bank of its training split, read from the annotation files:
    both tables are printed and the saved QB-Norm matrix equals the direct formula on the same scores."""
    import torch
    from test_infer_parity import argv_for
    from test_qbnorm import direct_qbnorm

    from clip2video.dataloaders.annotations import load_caption_bank
    from clip2video.modules.evaluation.engine import encode_captions
    from clip2video.modules.network.tokenizer import ClipTokenizer

    argv = argv_for("msvd", parity_dir, parity_weights, tmp_path)
    extra = ["--save_sim", str(tmp_path / "sim.npy"), "--save_sim_qb", str(tmp_path / "qb.npy"), "--metrics_json",
             str(tmp_path / "m.json"), "--qb_norm_split", "train", "--save_embeddings", str(tmp_path / "emb"),
             "--num_thread_reader", "0", "--device", "cpu"]
    assert infer_retrieval.main(argv + extra) == 0
    out = capsys.readouterr().out
    assert re.search(r"\nT2V +[\d.]+ .*\nV2T ", out)  # the plain table
    side_by_side = r"QB-Norm \(dynamic inverted softmax; bank 6 captions.*\n.*R@1.*\nT2V +[\d. ]+\nT2V \+QB-Norm"
    assert re.search(side_by_side, out)
    m = json.loads((tmp_path / "m.json").read_text())
    want_plain = json.loads((parity_dir / "expected" / "msvd.metrics.json").read_text())
    assert {d: m[d] for d in ("t2v", "v2t")} == want_plain  # QB-Norm never changes the plain numbers
    bank_rec = m["run"]["post_processing"]["qb_norm"]["bank"]
    files = {Path(f["path"]).name: f["sha256"] for f in bank_rec["files"]}
    assert files == {"raw-captions.pkl": sha(parity_dir / "msvd" / "raw-captions.pkl"),
                     "train_list.txt": sha(parity_dir / "msvd" / "train_list.txt")}

    # the bank's scores, computed here from the model and the saved video vectors
    from clip2video.cli.common import model_spec
    from clip2video.modules.weights.spec import load_model

    args = infer_retrieval.parse_with_config(infer_retrieval.build_parser(), argv + extra)
    model = load_model(model_spec(args)).eval()
    captions, _ = load_caption_bank("msvd", data_path=str(parity_dir / "msvd"), split="train")
    assert len(captions) == bank_rec["captions"] == 6
    text = encode_captions(model, captions, ClipTokenizer(args.max_words), batch_size=8 * args.batch_size_val)
    video = torch.from_numpy(np.load(tmp_path / "emb" / "video.npy"))
    scale = float(model.logit_scale.detach().exp())
    bank_scores = (scale * (model.text_vector(text).float() @ video.t().contiguous())).numpy()
    sim = np.load(tmp_path / "sim.npy")
    want = np.array(direct_qbnorm(sim.astype(np.float64).tolist(), bank_scores.astype(np.float64).tolist(),
                                  CLIP2VIDEO_BETA, 1))
    got = np.load(tmp_path / "qb.npy")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    normalised = int((~np.all(got == sim, axis=1)).sum())
    assert 0 < normalised == m["run"]["post_processing"]["qb_norm"]["normalised_queries"]
    cv = np.asarray(json.loads((parity_dir / "expected" / "msvd.meta.json").read_text())["cut_off_points_minus1"])
    caption_video = np.searchsorted(cv, np.arange(sim.shape[0]))  # caption i belongs to the first group ending ≥ i
    assert m["qb_norm"]["t2v"] == pytest.approx(t2v_metrics(ranks_of(want, caption_video), True))
