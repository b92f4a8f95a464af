"""Annotation parsers (dataloaders/annotations.py): real split lists, the parity fixture, formats and errors."""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest

from clip2video.dataloaders.annotations import (
    DATATYPES,
    PARSERS,
    PairSet,
    RetrievalSet,
    load_eval_set,
    load_train_set,
    normalize_datatype,
    parser_for,
)

DATASETS = ("msrvtt", "msrvttfull", "msvd", "vatex")


def read_ids(path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def csv_ids(path) -> list[str]:
    lines = path.read_text().splitlines()
    col = lines[0].split(",").index("video_id")
    return [ln.split(",")[col] for ln in lines[1:] if ln.strip()]


def msrvtt_json(path, video_ids, per_video=1, shuffle_seed=None) -> list[tuple[str, str]]:
    """Synthetic MSRVTT_data.json; returns its (video_id, caption) sentences in file order."""
    sents = [(v, f"caption {k} of {v}") for v in video_ids for k in range(per_video)]
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(sents))
        sents = [sents[i] for i in order]
    data = {"info": {}, "videos": [{"video_id": v} for v in video_ids],
            "sentences": [{"video_id": v, "caption": c, "sen_id": i} for i, (v, c) in enumerate(sents)]}
    path.write_text(json.dumps(data))
    return sents


# ------------------------------------------------------------------------------------- real split lists


def test_msrvtt_1ka_real_csv(reference_dir):
    csv_path = reference_dir / "msrvtt_data" / "MSRVTT_JSFUSION_test.csv"
    r = load_eval_set("msrvtt", data_path=None, val_csv=csv_path)
    assert len(r.captions) == 1000 and len(r.video_ids) == 1000 and not r.multi_caption
    assert r.video_ids == csv_ids(csv_path) and len(set(r.video_ids)) == 1000
    assert r.caption_video.tolist() == list(range(1000))
    assert r.captions[0] == "a person is connecting something to system"
    b = r.video_batches(16)
    assert len(b) == 63 and b[0] == list(range(16)) and b[-1] == list(range(992, 1000))


def test_msrvtt_9k_training_real_csv(reference_dir, tmp_path):
    csv_path = reference_dir / "msrvtt_data" / "MSRVTT_train.9k.csv"
    listed = csv_ids(csv_path)
    extra = csv_ids(reference_dir / "msrvtt_data" / "MSRVTT_JSFUSION_test.csv")[:5]  # 1k-A: not in 9k
    assert not set(extra) & set(listed)
    msrvtt_json(tmp_path / "MSRVTT_data.json", listed + extra, per_video=1)
    p = load_train_set("msrvtt", data_path=tmp_path / "MSRVTT_data.json", train_csv=csv_path)
    assert len(p.video_ids) == 9000 and len(p.pairs) == 9000
    assert set(p.video_ids) == set(listed) and not set(extra) & set(p.video_ids)
    for name, n in (("MSRVTT_train.7k.csv", 7010), ("MSRVTT_train.full.csv", 6513)):
        ids = csv_ids(reference_dir / "msrvtt_data" / name)
        assert len(set(ids)) == n


def test_msrvtt_full_test_real_csv(reference_dir, tmp_path):
    csv_path = reference_dir / "msrvtt_data" / "MSRVTT_test.full.csv"
    listed = csv_ids(csv_path)
    val_csv = reference_dir / "msrvtt_data" / "MSRVTT_val.full.csv"
    sents = msrvtt_json(tmp_path / "d.json", listed + csv_ids(val_csv) + ["video0"], per_video=2, shuffle_seed=0)
    r = load_eval_set("msrvttfull", data_path=tmp_path / "d.json", val_csv=csv_path)
    assert len(r.video_ids) == 2990 and len(r.captions) == 5980 and r.multi_caption
    wanted = set(listed)
    first_seen = list(dict.fromkeys(v for v, _ in sents if v in wanted))
    assert r.video_ids == first_seen != listed  # columns follow the json, not the csv
    assert r.cut_off_points == list(range(1, 5980, 2))
    assert all(r.video_ids[v] in c for v, c in zip(r.caption_video.tolist(), r.captions, strict=True))
    val = load_eval_set("msrvttfull", data_path=tmp_path / "d.json", val_csv=val_csv)
    assert len(val.video_ids) == 497 and not set(val.video_ids) & wanted


def test_msvd_test_real_list(reference_dir, tmp_path):
    src = reference_dir / "msvd_data"
    listed = read_ids(src / "test_list.txt")
    for name in ("train_list.txt", "val_list.txt", "test_list.txt"):
        (tmp_path / name).write_text((src / name).read_text())
    caps = {v: [["a", "video", str(i)], ["second", str(i)]] for i, v in enumerate(listed)}
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps(caps))
    r = load_eval_set("msvd", data_path=tmp_path, split="test")
    assert len(r.video_ids) == 670 and r.video_ids == listed and len(r.captions) == 1340
    assert r.captions[:2] == ["a video 0", "second 0"]
    assert len(read_ids(src / "train_list.txt")) == 1200 and len(read_ids(src / "val_list.txt")) == 100


@pytest.mark.parametrize("split", ["test", "test1k5_sec"])
def test_vatex_test_real_lists(reference_dir, tmp_path, split):
    src = reference_dir / "vatex_data"
    listed = read_ids(src / f"{split}_list.txt")
    (tmp_path / f"{split}_list.txt").write_text((src / f"{split}_list.txt").read_text())
    (tmp_path / "vatex_data.json").write_text(json.dumps({v: {"enCap": [f"en {v}"] * 2, "chCap": ["zh"]}
                                                          for v in listed}))
    r = load_eval_set("vatex", data_path=tmp_path, split=split)  # no features_path: no folder filter
    assert len(r.video_ids) == 1500 and r.video_ids == listed and len(r.captions) == 3000
    assert r.name == f"vatexEnglish:{split}"


# ------------------------------------------------------------------------------------------ parity fixture


@pytest.mark.parametrize("ds", DATASETS)
def test_fixture_rows_columns_batches(parity_dir, ds):
    args = json.loads((parity_dir / "commands.json").read_text())[ds]["args"]
    meta = json.loads((parity_dir / "expected" / f"{ds}.meta.json").read_text())
    r = load_eval_set(args["datatype"], data_path=parity_dir / args["data_path"],
                      features_path=parity_dir / args["features_path"],
                      val_csv=parity_dir / args["val_csv"] if "val_csv" in args else None)
    assert r.video_ids == meta["video_ids"]
    assert [{"video_id": v, "caption": c} for v, c in r.rows()] == meta["text_rows"]
    assert r.multi_caption == meta["multi_sentence"]
    assert (r.cut_off_points if r.multi_caption else []) == meta["cut_off_points_minus1"]
    assert r.video_batches(int(args["batch_size_val"])) == meta["video_batches"]
    assert sorted(c for b in r.video_batches(8) for c in b) == list(range(len(r.video_ids)))


def test_fixture_vatex_drops_short_and_missing(parity_dir, caplog):
    with caplog.at_level(logging.WARNING):
        r = load_eval_set("vatexEnglish", data_path=parity_dir / "vatex", features_path=parity_dir / "vatex/frames")
    assert len(read_ids(parity_dir / "vatex" / "test_list.txt")) == 11 and len(r.video_ids) == 9
    assert "dropped 2 of 11" in caplog.text


# ------------------------------------------------------------------------------------------------ semantics


def test_video_batches_multi_caption_by_last_caption():
    # caption rows: v0 v0 v0 | v1 | v2 v2 v2 v2 | v3 ; batch 3 -> chunks [0,3) [3,6) [6,9)
    cv = np.array([0, 0, 0, 1, 2, 2, 2, 2, 3])
    r = RetrievalSet("t", ["a", "b", "c", "d"], [str(i) for i in range(9)], cv, multi_caption=True)
    assert r.cut_off_points == [2, 3, 7, 8]
    assert r.video_batches(3) == [[0], [1], [2, 3]]
    assert r.video_batches(100) == [[0, 1, 2, 3]]
    single = RetrievalSet("s", list("abcde"), list("12345"), np.arange(5), multi_caption=False)
    assert single.video_batches(2) == [[0, 1], [2, 3], [4]] and single.cut_off_points == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="contiguous"):
        RetrievalSet("x", ["a", "b"], ["1", "2", "3"], np.array([0, 1, 0]), multi_caption=True)


def test_msrvtt_training_pairs_follow_json_order(tmp_path):
    (tmp_path / "train.csv").write_text("video_id\nvideo2\nvideo1\n")
    sents = msrvtt_json(tmp_path / "d.json", ["video1", "video2", "video3"], per_video=3, shuffle_seed=1)
    p = load_train_set("msrvttfull", data_path=tmp_path / "d.json", train_csv=tmp_path / "train.csv")
    assert p.pairs == [s for s in sents if s[0] != "video3"]
    assert p.video_ids == list(dict.fromkeys(v for v, _ in p.pairs)) and isinstance(p, PairSet)


def test_msvd_and_vatex_training(tmp_path):
    (tmp_path / "train_list.txt").write_text("x1\nx2\n\n")
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({"x1": [["a", "b"]], "x2": [["c"], ["d", "e"]]}))
    assert load_train_set("msvd", data_path=tmp_path).pairs == [("x1", "a b"), ("x2", "c"), ("x2", "d e")]
    (tmp_path / "vatex_data.json").write_text(json.dumps({"x1": {"enCap": ["p", "q"]}, "x2": {"enCap": ["r"]}}))
    assert load_train_set("vatex", data_path=tmp_path).pairs == [("x1", "p"), ("x1", "q"), ("x2", "r")]


def test_generic_csv_and_jsonl(tmp_path):
    rows = [("v1", "a dog", "test"), ("v2", "a cat, sleeping", "test"), ("v1", "a puppy", "test"),
            ("v3", "train only", "train")]
    (tmp_path / "ann.csv").write_text("video_id,caption,split\n" + "".join(f'{v},"{c}",{s}\n' for v, c, s in rows))
    (tmp_path / "ann.jsonl").write_text("".join(json.dumps({"video_id": v, "caption": c, "split": s}) + "\n"
                                                for v, c, s in rows))
    for f in ("ann.csv", "ann.jsonl"):
        r = load_eval_set("generic", data_path=tmp_path / f)
        assert r.video_ids == ["v1", "v2"] and r.multi_caption
        assert r.rows() == [("v1", "a dog"), ("v1", "a puppy"), ("v2", "a cat, sleeping")]
        p = load_train_set("generic", data_path=tmp_path / f)
        assert p.pairs == [("v3", "train only")]
    (tmp_path / "one.csv").write_text("video_id,caption\nv1,x\nv2,y\n")
    r = load_eval_set("generic", data_path=tmp_path / "one.csv")
    assert not r.multi_caption and r.rows() == [("v1", "x"), ("v2", "y")]
    assert load_train_set("generic", data_path=tmp_path / "one.csv").pairs == [("v1", "x"), ("v2", "y")]


def test_datatypes_and_alias():
    assert DATATYPES == ("msrvtt", "msrvttfull", "msvd", "vatexEnglish", "generic")
    assert normalize_datatype("vatex") == "vatexEnglish"
    with pytest.raises(ValueError, match="'youcook'.*msrvtt"):
        normalize_datatype("youcook")


def test_one_parser_per_datatype_serves_both_sides(tmp_path):
    assert tuple(PARSERS) == DATATYPES and parser_for("vatex") is PARSERS["vatexEnglish"]
    (tmp_path / "val_list.txt").write_text("x2\nx1\n")
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({"x1": [["a", "b"]], "x2": [["c"], ["d", "e"]]}))
    (tmp_path / "vatex_data.json").write_text(json.dumps({"x1": {"enCap": ["p", "q"]}, "x2": {"enCap": ["r"]}}))
    for dt in ("msvd", "vatexEnglish"):  # the same split read for training and for evaluation: the same rows
        ev = parser_for(dt).eval_set(data_path=tmp_path, split="val")
        tr = parser_for(dt).train_set(data_path=tmp_path, split="val")
        assert ev.rows() == tr.pairs and ev.video_ids == tr.video_ids == ["x2", "x1"], dt


# --------------------------------------------------------------------------------------------------- errors


def test_missing_files_name_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="--val_csv .*nope.csv: no such file"):
        load_eval_set("msrvtt", data_path=None, val_csv=tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="--val_csv is required"):
        load_eval_set("msrvttfull", data_path=tmp_path / "d.json")
    with pytest.raises(FileNotFoundError, match="--data_path .*msvd_missing: no such folder"):
        load_eval_set("msvd", data_path=tmp_path / "msvd_missing")
    tmp_path.joinpath("test_list.txt").write_text("a\n")
    with pytest.raises(FileNotFoundError, match="raw-captions.pkl: no such file"):
        load_eval_set("msvd", data_path=tmp_path)
    with pytest.raises(ValueError, match="split 'dev' is not one of train, val, test"):
        load_eval_set("msvd", data_path=tmp_path, split="dev")


def test_bad_csv_column_names_file_and_column(tmp_path):
    bad = tmp_path / "MSRVTT_test.full.csv"
    bad.write_text("vid\nvideo1\n")
    msrvtt_json(tmp_path / "d.json", ["video1"])
    with pytest.raises(ValueError, match="MSRVTT_test.full.csv: missing column\\(s\\) video_id"):
        load_eval_set("msrvttfull", data_path=tmp_path / "d.json", val_csv=bad)
    full = tmp_path / "full.csv"
    full.write_text("video_id\nvideo1\n")
    with pytest.raises(ValueError, match="full.csv: missing column sentence.*--datatype msrvttfull"):
        load_eval_set("msrvtt", data_path=None, val_csv=full)
    (tmp_path / "g.csv").write_text("video,text\nv1,x\n")
    with pytest.raises(ValueError, match="g.csv: missing column\\(s\\) video_id, caption"):
        load_eval_set("generic", data_path=tmp_path / "g.csv")
    (tmp_path / "g.jsonl").write_text('{"video_id": "v1"}\n')
    with pytest.raises(ValueError, match="g.jsonl: line 1 has no 'caption'"):
        load_train_set("generic", data_path=tmp_path / "g.jsonl")


def test_listed_video_without_caption(tmp_path):
    (tmp_path / "test.csv").write_text("video_id\nvideo1\nvideo2\n")
    msrvtt_json(tmp_path / "d.json", ["video1"])
    with pytest.raises(ValueError, match="d.json: no caption for 1 video.*test.csv: video2"):
        load_eval_set("msrvttfull", data_path=tmp_path / "d.json", val_csv=tmp_path / "test.csv")
    (tmp_path / "test_list.txt").write_text("a\nb\n")
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({"a": [["x"]]}))
    with pytest.raises(ValueError, match="raw-captions.pkl: no caption for 1 video.*: b"):
        load_eval_set("msvd", data_path=tmp_path)


def test_wrong_pickle_shape(tmp_path):
    (tmp_path / "test_list.txt").write_text("a\n")
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({"a": ["a flat string caption"]}))
    with pytest.raises(ValueError, match="raw-captions.pkl: captions of 'a' are not a list of token lists"):
        load_eval_set("msvd", data_path=tmp_path)
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps([["a"]]))
    with pytest.raises(ValueError, match="raw-captions.pkl: expected a dict"):
        load_eval_set("msvd", data_path=tmp_path)
    (tmp_path / "vatex_data.json").write_text(json.dumps({"a": {"chCap": ["x"]}}))
    with pytest.raises(ValueError, match="vatex_data.json: entry 'a' has no 'enCap'"):
        load_eval_set("vatex", data_path=tmp_path)


def test_missing_frame_folder_error_and_skip(tmp_path, caplog):
    (tmp_path / "test_list.txt").write_text("a\nb\nc\n")
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({k: [["x", k]] for k in "abc"}))
    frames = tmp_path / "frames"
    (frames / "a").mkdir(parents=True)
    (frames / "c").mkdir()
    with pytest.raises(FileNotFoundError, match="no frame folder for MSVD test video 'b'"):
        load_eval_set("msvd", data_path=tmp_path, features_path=frames)
    with caplog.at_level(logging.WARNING):
        r = load_eval_set("msvd", data_path=tmp_path, features_path=frames, skip_missing=True)
    assert r.video_ids == ["a", "c"] and r.rows() == [("a", "x a"), ("c", "x c")]
    assert "dropped 1 of 3" in caplog.text


def test_vatex_folder_rule(tmp_path):
    (tmp_path / "val_list.txt").write_text("five\nsix\nabsent\n")
    (tmp_path / "vatex_data.json").write_text(json.dumps({k: {"enCap": [k]} for k in ("five", "six", "absent")}))
    for name, n in (("five", 5), ("six", 6)):
        (tmp_path / "f" / name).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "f" / name / f"{i:08d}.jpg").write_bytes(b"")
    r = load_eval_set("vatexEnglish", data_path=tmp_path, features_path=tmp_path / "f", split="val")
    assert r.video_ids == ["six"]


def test_annotation_files_and_caption_banks_of_training_splits(tmp_path):
    """What result files hash per datatype, and a query bank read from a training split's own files."""
    from clip2video.dataloaders.annotations import annotation_files, load_caption_bank

    data = tmp_path / "MSRVTT_data.json"
    data.write_text(json.dumps({"sentences": [{"video_id": v, "caption": f"{v} caption {i}"}
                                               for i in range(2) for v in ("v1", "v2", "v3")]}))
    train = tmp_path / "train.csv"
    train.write_text("video_id\nv3\nv1\n")
    test = tmp_path / "test.csv"
    captions, files = load_caption_bank("msrvtt", data_path=str(data), split=str(train))
    assert captions == ["v1 caption 0", "v3 caption 0", "v1 caption 1", "v3 caption 1"]  # json order
    assert files == [train, data]
    assert annotation_files("msrvtt", data_path=str(data), csv_path=str(test)) == [test]  # 1k-A reads the csv only
    assert annotation_files("msrvttfull", data_path=str(data), csv_path=str(test)) == [test, data]
    assert annotation_files("msvd", data_path=str(tmp_path), split="test") == [tmp_path / "raw-captions.pkl",
                                                                               tmp_path / "test_list.txt"]
    assert annotation_files("vatex", data_path=str(tmp_path), split="test1k5_sec") == [
        tmp_path / "vatex_data.json", tmp_path / "test1k5_sec_list.txt"]
    gen = tmp_path / "g.csv"
    gen.write_text("video_id,caption,split\na,one,train\nb,two,test\na,three,train\n")
    assert load_caption_bank("generic", data_path=str(gen), split="train") == (["one", "three"], [gen])
    with pytest.raises(ValueError, match="no rows with split == 'val'"):
        load_caption_bank("generic", data_path=str(gen), split="val")
