"""QB-Norm in search: ``search.py build --query_bank`` and its use by ``query`` and ``serve``.

The central check: on an exact index built with a query bank, ``search.py query --json`` gives for each caption
the order and the scores of that caption's row of ``infer_retrieval.py --qb_norm BANK --save_sim_qb`` (same tiny
model, videos and bank), including the captions QB-Norm leaves unchanged; ``--no_qb`` gives the plain row.
Then: incremental builds recompute the statistics (equal to a clean build, bank not encoded again), exported
embeddings, approximate indexes, the server's ``qb`` parameter, and one-line errors for bad banks.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from search_utils import build_argv, one_line_error, query_json
from server_utils import ServerThread, get_json

from clip2video.cli import infer_retrieval, search
from clip2video.dataloaders.synthetic import make_synthetic_dataset
from clip2video.modules.evaluation.qbnorm import CLIP2VIDEO_BETA, bank_statistics
from clip2video.search import qb as qbmod
from clip2video.search.index import SearchIndex
from clip2video.search.store import CURRENT, IndexFormatError

pytestmark = pytest.mark.usefixtures("one_thread")
N_VIDEOS = 14


def generation(ix: Path) -> Path:
    return ix / (ix / CURRENT).read_text().strip()


@pytest.fixture(scope="module")
def qb_setup(tmp_path_factory, tiny_ckpt):
    """An exact index with a bank chosen so that some test captions are normalised and others are not, and
    infer_retrieval's plain and QB-Norm matrices for the same videos and bank."""
    root = tmp_path_factory.mktemp("search_qb")
    make_synthetic_dataset(root / "synth", n_videos=N_VIDEOS, seed=3, size=32, n_frames=8, write="frames",
                           splits=(0.0, 0.0, 1.0))
    make_synthetic_dataset(root / "other", n_videos=20, seed=5, size=32, n_frames=2, write="frames",
                           splits=(1.0, 0.0, 0.0))
    with open(root / "other" / "annotations.csv", newline="", encoding="utf-8") as f:
        candidates = [r["caption"] for r in csv.DictReader(f)]
    full = root / "full.txt"
    full.write_text("\n".join(candidates) + "\n", encoding="utf-8")
    frames, ix = root / "synth" / "frames", root / "ix"
    assert search.main(build_argv(frames, ix, tiny_ckpt, "--query_bank", str(full))) == 0
    # with random weights a few videos are every caption's top-1; keep the bank captions that avoid the
    # test captions' most frequent top-1, so that R misses it: those captions stay unnormalised
    index = SearchIndex.open(ix)
    vecs = index.all_vectors()
    bank_top = (np.load(generation(ix) / qbmod.BANK_FILE) @ vecs.T).argmax(axis=1)
    with open(root / "synth" / "annotations.csv", newline="", encoding="utf-8") as f:
        test_caps = [r["caption"] for r in csv.DictReader(f)]
    test_top = (index.encode_text(test_caps) @ vecs.T).argmax(axis=1)
    hub = np.bincount(test_top).argmax()
    bank = root / "bank.txt"
    bank.write_text("\n".join(c for c, t in zip(candidates, bank_top, strict=True) if t != hub) + "\n",
                    encoding="utf-8")
    assert search.main(build_argv(frames, ix, tiny_ckpt, "--query_bank", str(bank))) == 0
    argv = ["--datatype", "generic", "--data_path", str(root / "synth" / "annotations.csv"), "--split", "test",
            "--features_path", str(frames), "--checkpoint", str(tiny_ckpt.parent), "--model_num", "1",
            "--max_words", "16", "--max_frames", "6", "--batch_size_val", "4", "--num_thread_reader", "0",
            "--device", "cpu", "--save_sim", str(root / "sim.npy"), "--save_embeddings", str(root / "emb"),
            "--qb_norm", str(bank), "--save_sim_qb", str(root / "qb.npy")]
    assert infer_retrieval.main(argv) == 0
    sim, qbm = np.load(root / "sim.npy"), np.load(root / "qb.npy")
    normalised = ~np.all(sim == qbm, axis=1)
    assert 0 < normalised.sum() < len(sim)  # both kinds of caption are tested
    return {"root": root, "ckpt": tiny_ckpt, "ix": ix, "frames": frames, "bank": bank, "full": full,
            "sim": sim, "qb": qbm, "normalised": normalised,
            "captions": json.loads((root / "emb" / "text_ids.json").read_text()),
            "video_ids": json.loads((root / "emb" / "video_ids.json").read_text())}


def assert_rows(results, matrix, captions, video_ids, rtol):
    """Each query's results are the full row of ``matrix``: order of a stable sort, scores within rtol."""
    assert len(results) == len(captions)
    for row, (res, cap) in enumerate(zip(results, captions, strict=True)):
        assert res["query"] == cap
        want = matrix[row].astype(np.float64)
        order = np.argsort(-want, kind="stable")
        assert [r["video_id"] for r in res["results"]] == [video_ids[j] for j in order], cap
        np.testing.assert_allclose([r["score"] for r in res["results"]], want[order], rtol=rtol, atol=0)


# ----------------------------------------------------------------------------------------------- exactness
def test_query_equals_save_sim_qb_rows(qb_setup, capsys):
    s = qb_setup
    res = query_json(capsys, s["ix"], "-k", str(N_VIDEOS), *s["captions"])
    assert_rows(res, s["qb"], s["captions"], s["video_ids"], rtol=1e-5)
    assert [r["qb_norm"] for r in res] == [{"enabled": True, "applied": bool(n)} for n in s["normalised"]]
    # k smaller than the index: the first k of the same row
    top3 = query_json(capsys, s["ix"], "-k", "3", *s["captions"][:4])
    for t, r in zip(top3, res[:4], strict=False):
        assert [h["video_id"] for h in t["results"]] == [h["video_id"] for h in r["results"][:3]]
        assert [h["score"] for h in t["results"]] == pytest.approx([h["score"] for h in r["results"][:3]], rel=1e-6)
    # the manifest records the bank and its settings
    meta = SearchIndex.open(s["ix"]).manifest["qb_norm"]
    lines = [ln for ln in s["bank"].read_text(encoding="utf-8").splitlines() if ln.strip()]
    assert meta["bank"]["captions"] == len(lines) and meta["bank"]["path"] == str(s["bank"].resolve())
    assert len(meta["bank"]["sha256"]) == 64 and meta["beta"] == CLIP2VIDEO_BETA and meta["k"] == 1


def test_filtered_queries_rank_by_the_qb_row(qb_setup, capsys):
    """A filter on an exact index with a bank: the QB-Norm row (normalised as a whole row), restricted to the
    videos that pass, in the same order and with the same scores."""
    s = qb_setup
    caps = s["captions"][:6]
    full = query_json(capsys, s["ix"], "-k", str(N_VIDEOS), *caps)
    assert query_json(capsys, s["ix"], "-k", str(N_VIDEOS), "--path", "*", *caps) == full
    some = query_json(capsys, s["ix"], "-k", str(N_VIDEOS), "--path", "*syn0000*", *caps)
    for f, r in zip(some, full, strict=True):
        want = [h for h in r["results"] if h["video_id"].startswith("syn0000")]
        assert len(want) == 10 and [h["video_id"] for h in f["results"]] == [h["video_id"] for h in want]
        assert [h["score"] for h in f["results"]] == pytest.approx([h["score"] for h in want], rel=1e-6)
        assert f["qb_norm"] == r["qb_norm"]


def test_query_bank_needs_whole_videos(qb_setup, tmp_path, capsys):
    s = qb_setup
    err = one_line_error(capsys, build_argv(s["frames"], tmp_path / "ix", s["ckpt"], "--query_bank",
                                                str(s["bank"]), "--segment_seconds", "1"), code=2)
    assert "--query_bank needs an index of whole videos" in err and not (tmp_path / "ix").exists()


def test_no_qb_gives_the_plain_scores(qb_setup, capsys):
    s = qb_setup
    res = query_json(capsys, s["ix"], "-k", str(N_VIDEOS), "--no_qb", *s["captions"])
    assert all(r["qb_norm"] == {"enabled": False, "applied": False} for r in res)
    for row, r in enumerate(res):
        order = np.argsort(-s["sim"][row], kind="stable")
        assert [h["video_id"] for h in r["results"]] == [s["video_ids"][j] for j in order]
        np.testing.assert_allclose([h["score"] for h in r["results"]], s["sim"][row, order], atol=1e-4, rtol=0)
    # the text output marks the normalised queries; --like (video to video) is never normalised
    capsys.readouterr()
    i = int(np.argmax(s["normalised"]))
    j = int(np.argmin(s["normalised"]))
    vid = s["video_ids"][0]
    assert search.main(["query", "--index", str(s["ix"]), "-k", "2", "--like", vid, s["captions"][i],
                        s["captions"][j]]) == 0
    heads = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith(" ")]
    assert heads == [f"like: {vid}", f"query: {s['captions'][i]!r}  [QB-Norm]", f"query: {s['captions'][j]!r}"]
    (like,) = query_json(capsys, s["ix"], "-k", "3", "--like", vid)
    assert like["qb_norm"] == {"enabled": False, "applied": False}
    plain = SearchIndex.open(s["ix"]).similar(vid, 3)
    assert [h["score"] for h in like["results"]] == pytest.approx([h.score for h in plain])
    assert not any(h.qb for h in plain)
    # query arithmetic (a weighted sum of parts, not a caption) is not normalised either
    (arith,) = query_json(capsys, s["ix"], "-k", "3", f"2:{s['captions'][i]}", "-", "snow")
    assert arith["qb_norm"] == {"enabled": False, "applied": False}
    index = SearchIndex.open(s["ix"])
    index.qb = None  # the same index without its statistics answers the same
    from clip2video.search.query_parse import parse_query
    from clip2video.search.query_vectors import QueryEncoder

    want = QueryEncoder(index).search(parse_query(f"2:{s['captions'][i]} - snow"), 3)
    assert [h["video_id"] for h in arith["results"]] == [h.video_id for h in want]
    assert [h["score"] for h in arith["results"]] == pytest.approx([h.score for h in want], rel=1e-6)


# ----------------------------------------------------------------------------------------------- rebuilds
def _stats(ix: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    index = SearchIndex.open(ix)
    return index.video_ids, index.qb.log_norm, index.qb.retrieved


def test_incremental_rebuild_recomputes_statistics(qb_setup, tmp_path, capsys, monkeypatch):
    s = qb_setup
    frames = tmp_path / "frames"
    shutil.copytree(s["frames"], frames)
    held = s["video_ids"][5:9]
    for v in held:
        shutil.move(frames / v, tmp_path / v)
    ix = tmp_path / "ix"
    encoded: list[int] = []
    real = qbmod.encode_bank
    monkeypatch.setattr("clip2video.search.build.encode_bank",
                        lambda model, caps, **kw: (encoded.append(len(caps)), real(model, caps, **kw))[1])
    assert search.main(build_argv(frames, ix, s["ckpt"], "--query_bank", str(s["bank"]))) == 0
    n_bank = len(np.load(generation(ix) / qbmod.BANK_FILE))
    assert encoded == [n_bank]
    ids0, log0, _ = _stats(ix)
    assert len(ids0) == len(log0) == N_VIDEOS - len(held)
    # videos added and one changed, no --query_bank: the stored bank is kept, not encoded again
    for v in held:
        shutil.move(tmp_path / v, frames / v)
    assert search.main(build_argv(frames, ix, s["ckpt"])) == 0
    assert encoded == [n_bank]
    ids1, log1, ret1 = _stats(ix)
    want_ids, want_log, want_ret = _stats(s["ix"])  # a clean build of all videos with the same bank
    assert ids1 == want_ids
    np.testing.assert_allclose(log1, want_log, rtol=1e-6, atol=0)
    assert np.array_equal(ret1, want_ret)
    # log sums of the rows that were there before are unchanged; the new rows have their own
    keep = [want_ids.index(v) for v in ids0]
    np.testing.assert_allclose(log1[keep], log0, rtol=1e-6, atol=0)
    # and the statistics are the bank's, recomputed from its stored vectors against every row
    index = SearchIndex.open(ix)
    direct = bank_statistics(index.logit_scale * (np.load(generation(ix) / qbmod.BANK_FILE)
                                                  @ index.all_vectors().T), CLIP2VIDEO_BETA, 1)
    np.testing.assert_allclose(index.qb.log_norm, direct.log_norm, rtol=1e-6, atol=0)
    assert np.array_equal(index.qb.retrieved, direct.retrieved)
    res = query_json(capsys, ix, "-k", str(N_VIDEOS), *s["captions"])
    assert_rows(res, s["qb"], s["captions"], s["video_ids"], rtol=1e-5)
    # the same bank file again: not encoded again; β and k changed: statistics recomputed with them
    assert search.main(build_argv(frames, ix, s["ckpt"], "--query_bank", str(s["bank"]), "--qb_beta", "0.25",
                                  "--qb_k", "2")) == 0
    assert encoded == [n_bank]
    index = SearchIndex.open(ix)
    assert (index.qb.beta, index.qb.k) == (0.25, 2)
    direct = bank_statistics(index.logit_scale * (np.load(generation(ix) / qbmod.BANK_FILE)
                                                  @ index.all_vectors().T), 0.25, 2)
    np.testing.assert_allclose(index.qb.log_norm, direct.log_norm, rtol=1e-6, atol=0)
    assert np.array_equal(index.qb.retrieved, direct.retrieved)
    # a changed bank file is encoded again; --no_query_bank drops the bank and its files
    assert search.main(build_argv(frames, ix, s["ckpt"], "--query_bank", str(s["full"]))) == 0
    assert len(encoded) == 2 and SearchIndex.open(ix).manifest["qb_norm"]["bank"]["captions"] == encoded[-1]
    assert search.main(build_argv(frames, ix, s["ckpt"], "--no_query_bank")) == 0
    index = SearchIndex.open(ix)
    assert index.qb is None and "qb_norm" not in index.manifest
    assert not list(generation(ix).glob("qb_*"))
    res = query_json(capsys, ix, "-k", "3", s["captions"][0])
    assert res[0]["qb_norm"] == {"enabled": False, "applied": False}


def test_from_embeddings_and_approximate_index(qb_setup, tmp_path, capsys):
    s = qb_setup
    exact = tmp_path / "emb_ix"
    assert search.main(["build", "--from_embeddings", str(s["root"] / "emb"), "--index", str(exact),
                        "--query_bank", str(s["bank"])]) == 0
    res = query_json(capsys, exact, "-k", str(N_VIDEOS), *s["captions"])
    assert_rows(res, s["qb"], s["captions"], s["video_ids"], rtol=1e-5)
    # approximate: QB-Norm applies to the re-scored candidates (here every list is probed: all rows)
    ivf = tmp_path / "ivf_ix"
    assert search.main(["build", "--from_embeddings", str(s["root"] / "emb"), "--index", str(ivf), "--index_type",
                        "IVF2,Flat", "--search_params", "nprobe=2", "--query_bank", str(s["bank"])]) == 0
    index = SearchIndex.open(ivf)
    assert not index.exact
    res = query_json(capsys, ivf, "-k", str(N_VIDEOS), *s["captions"])
    assert_rows(res, s["qb"], s["captions"], s["video_ids"], rtol=1e-5)
    # with k=2 the candidates are a part of the rows: their normalised scores, re-sorted
    vec = index.encode_text(s["captions"])
    for qi, hits in enumerate(index.search(vec, 2)):
        for h in hits:
            r = index.video_ids.index(h.video_id)
            plain = index.logit_scale * float(index.all_vectors()[r] @ vec[qi])
            want = np.exp(index.qb.beta * plain - index.qb.log_norm[r]) if h.qb else plain
            assert h.score == pytest.approx(want, rel=1e-6)


def test_candidate_normalisation_equals_the_row_formula():
    rng = np.random.default_rng(0)
    bank, rows = rng.standard_normal((30, 8)), rng.standard_normal((12, 8))
    bank[3:] = bank[:3].repeat(9, axis=0) + 0.01 * bank[3:]  # three directions: R holds few rows
    stats = qbmod.row_statistics(bank.astype(np.float32), rows.astype(np.float32), 10.0, 0.5, 1, block=40)
    direct = bank_statistics(10.0 * (bank.astype(np.float32) @ rows.astype(np.float32).T), 0.5, 1)
    np.testing.assert_allclose(stats.log_norm, direct.log_norm, rtol=1e-6)  # float32 scores in other blocks
    q = 10.0 * (rng.standard_normal((20, 8)) @ rows.T)
    full, applied = stats.apply(q)
    assert 0 < applied.sum() < len(q)
    for i in range(len(q)):
        got, app = qbmod.normalise_candidates(stats, np.arange(12), q[i])
        assert app == applied[i]
        np.testing.assert_allclose(got, full[i], rtol=1e-12)
        order = qbmod.top_k(full[i], 5)
        assert order.tolist() == np.argsort(-full[i], kind="stable")[:5].tolist()
    ties = np.array([1.0, 3.0, 3.0, 2.0, 3.0])
    assert qbmod.top_k(ties, 3).tolist() == [1, 2, 4] and qbmod.top_k(ties, 9).tolist() == [1, 2, 4, 3, 0]


# ----------------------------------------------------------------------------------------------- server
def test_server_applies_qb_unless_asked_not_to(qb_setup, capsys):
    from clip2video.search.app import create_app

    s = qb_setup
    index = SearchIndex.open(s["ix"])
    i = int(np.argmax(s["normalised"]))
    cap = s["captions"][i]
    (want_qb,) = query_json(capsys, s["ix"], "-k", "5", cap)
    (want_plain,) = query_json(capsys, s["ix"], "-k", "5", "--no_qb", cap)
    with ServerThread(create_app(index)) as srv:
        from urllib.parse import quote

        status, health = get_json(srv.port, "/api/health")
        assert status == 200 and health["qb_norm"] is True
        for suffix, want in (("", want_qb), ("&qb=1", want_qb), ("&qb=0", want_plain)):
            status, body = get_json(srv.port, f"/api/search?q={quote(cap)}&k=5{suffix}")
            assert status == 200 and body["qb_norm"] == want["qb_norm"], suffix
            assert [r["video_id"] for r in body["results"]] == [r["video_id"] for r in want["results"]]
            assert [r["score"] for r in body["results"]] == pytest.approx([r["score"] for r in want["results"]],
                                                                          rel=1e-6)
        status, body = get_json(srv.port, "/api/search?q=a+dog&qb=maybe")
        assert status == 400 and "qb must be 0 or 1" in body["error"]
        status, body = get_json(srv.port, f"/api/search?q={quote('2:' + cap + ' - snow')}&k=5")
        assert status == 200 and body["parts"] and body["qb_norm"] == {"enabled": False, "applied": False}
    with ServerThread(create_app(index, qb_default=False)) as srv:  # serve --no_qb
        status, body = get_json(srv.port, f"/api/search?q={quote(cap)}&k=5")
        assert body["qb_norm"] == {"enabled": False, "applied": False}
        assert [r["video_id"] for r in body["results"]] == [r["video_id"] for r in want_plain["results"]]


# ----------------------------------------------------------------------------------------------- errors
def test_bad_bank_files_are_one_line(qb_setup, tmp_path, capsys):
    s = qb_setup
    ix = tmp_path / "ix"
    base = build_argv(s["frames"], ix, s["ckpt"])
    err = one_line_error(capsys, [*base, "--query_bank", str(tmp_path / "nope.txt")], code=2)
    assert "--query_bank" in err and "no such file" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    err = one_line_error(capsys, [*base, "--query_bank", str(empty)])
    assert "--query_bank" in err and "no captions" in err
    latin = tmp_path / "latin.txt"
    latin.write_bytes("a caption\nun caf\xe9 noir\n".encode("latin-1"))
    err = one_line_error(capsys, [*base, "--query_bank", str(latin)])
    assert "--query_bank" in err and "line 2 is not UTF-8" in err
    err = one_line_error(capsys, [*base, "--query_bank", str(s["bank"]), "--qb_k", "0"], code=2)
    assert "--qb_k must be >= 1" in err
    err = one_line_error(capsys, [*base, "--query_bank", str(s["bank"]), "--qb_beta", "-1"], code=2)
    assert "--qb_beta must be a positive number" in err
    err = one_line_error(capsys, [*base, "--query_bank", str(s["bank"]), "--no_query_bank"], code=2)
    assert "--no_query_bank excludes" in err
    assert not ix.exists() or not (ix / CURRENT).exists()  # nothing was built
    err = one_line_error(capsys, [*base, "--qb_beta", "0.3"], code=1)  # no bank given, none stored
    assert "need a query bank" in err
    # vectors without a model cannot encode a bank
    emb = tmp_path / "emb"
    emb.mkdir()
    np.save(emb / "video.npy", np.eye(4, dtype=np.float32))
    (emb / "video_ids.json").write_text(json.dumps(["a", "b", "c", "d"]))
    err = one_line_error(capsys, ["build", "--from_embeddings", str(emb), "--index", str(tmp_path / "e"),
                                      "--query_bank", str(s["bank"])], code=1)
    assert "names no model" in err


def test_damaged_statistics_are_detected(qb_setup, tmp_path, capsys):
    s = qb_setup
    for name in (qbmod.LOG_NORM_FILE, qbmod.RETRIEVED_FILE):
        d = tmp_path / name
        shutil.copytree(s["ix"], d)
        f = generation(d) / name
        f.write_bytes(f.read_bytes()[:100])
        err = one_line_error(capsys, ["query", "--index", str(d), "a dog"], code=1)
        assert f"{f}: 100 bytes" in err  # the generation's checksums name the file first
        with pytest.raises(IndexFormatError):
            SearchIndex.open(d)
        manifest = json.loads((generation(d) / "manifest.json").read_text())
        with pytest.raises(IndexFormatError, match="QB-Norm statistics"):  # and the statistics' own check
            qbmod.load_statistics(generation(d), manifest)
