"""search.py and clip2video.search.index on a tiny random model and synthetic frame folders.

The central check: for every caption, ``search.py query --json`` returns the top-10 videos, order and scores of
that caption's row of ``infer_retrieval.py --save_sim`` (same model, per_video layout), from frame folders
and from exported embeddings. Then incremental builds, crash safety, two processes, and one-line errors.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from search_utils import build_argv, one_line_error, query_json

from clip2video.cli import infer_retrieval, search
from clip2video.dataloaders.synthetic import make_synthetic_dataset
from clip2video.modules.network.backbone import ClipConfig
from clip2video.modules.weights.factory import create_model
from clip2video.modules.weights.release import export_original
from clip2video.search.index import SearchIndex
from clip2video.search.store import CURRENT, MANIFEST, IndexFormatError

ROOT = Path(__file__).resolve().parents[1]
N_VIDEOS = 14


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    make_synthetic_dataset(root / "synth", n_videos=N_VIDEOS, seed=3, size=32, n_frames=8, write="frames",
                           splits=(0.0, 0.0, 1.0))
    torch.manual_seed(0)
    model = create_model("tab_tdb", clip_config=ClipConfig.tiny(), center_k=3)
    ckpt = export_original(model, root / "ckpt" / "pytorch_model.bin.1")
    torch.manual_seed(1)
    other = export_original(create_model("tab_tdb", clip_config=ClipConfig.tiny(), center_k=3),
                            root / "other" / "pytorch_model.bin.1")
    sim, emb = root / "sim.npy", root / "emb"
    argv = eval_argv(root, ckpt) + ["--save_sim", str(sim), "--save_embeddings", str(emb)]
    assert infer_retrieval.main(argv) == 0
    captions = json.loads((emb / "text_ids.json").read_text())
    (root / "queries.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    ix = root / "ix"
    assert search.main(build_argv(root / "synth" / "frames", ix, ckpt)) == 0
    return {"root": root, "ckpt": ckpt, "other": other, "sim": np.load(sim), "emb": emb, "captions": captions,
            "video_ids": json.loads((emb / "video_ids.json").read_text()), "ix": ix}


def eval_argv(root, ckpt):
    return ["--datatype", "generic", "--data_path", str(root / "synth" / "annotations.csv"), "--split", "test",
            "--features_path", str(root / "synth" / "frames"), "--checkpoint", str(ckpt.parent), "--model_num", "1",
            "--max_words", "16", "--max_frames", "6", "--batch_size_val", "4", "--num_thread_reader", "0",
            "--device", "cpu"]


def assert_matches_sim(results, sim, captions, video_ids, k=10):
    assert len(results) == len(captions)
    for row, (res, cap) in enumerate(zip(results, captions, strict=True)):
        assert res["query"] == cap
        order = np.argsort(-sim[row], kind="stable")[:k]
        assert [r["video_id"] for r in res["results"]] == [video_ids[j] for j in order], cap
        got = np.array([r["score"] for r in res["results"]])
        np.testing.assert_allclose(got, sim[row, order], atol=1e-4, rtol=0)


def write_sealed_manifest(path: Path, manifest: dict) -> None:
    """Rewrite a manifest together with its recorded checksum (a consistent edit, unlike damage)."""
    import hashlib

    data = json.dumps(manifest).encode()
    path.write_bytes(data)
    (path.parent / "manifest.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  manifest.json\n")
    (path.parent / "verified").unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- embeddings
def test_save_embeddings_reproduce_save_sim(setup):
    emb, sim = setup["emb"], setup["sim"]
    meta = json.loads((emb / "meta.json").read_text())
    text, video = np.load(emb / "text.npy"), np.load(emb / "video.npy")
    assert text.dtype == video.dtype == np.float32 and text.shape[1] == video.shape[1] == 256  # [g, a] of 128
    assert text.shape[0] == len(setup["captions"]) and video.shape[0] == len(setup["video_ids"]) == N_VIDEOS
    np.testing.assert_allclose(meta["logit_scale"] * text @ video.T, sim, atol=1e-4, rtol=0)
    assert meta["mask_layout"] == "per_video" and meta["variant"] == "tab_tdb"
    assert meta["checkpoint"] == str(setup["ckpt"].resolve()) and len(meta["fingerprint"]) == 64
    assert meta["config"]["center_k"] == 3


# ----------------------------------------------------------------------------------------------- exactness
def test_query_equals_save_sim_from_frame_folders(setup, capsys):
    res = query_json(capsys, setup["ix"], "-k", "10", "--queries_file", str(setup["root"] / "queries.txt"))
    assert_matches_sim(res, setup["sim"], setup["captions"], setup["video_ids"])
    frames = setup["root"] / "synth" / "frames"
    assert res[0]["results"][0]["path"] == str(frames / res[0]["results"][0]["video_id"])


@pytest.mark.parametrize("runtime", ["onnx", "openvino", "auto"])
def test_query_equals_save_sim_whatever_text_runtime(setup, capsys, runtime):
    """The fast fp32 runtimes (``--text_encoder``; ``serve``'s default is auto) keep ``--save_sim``'s scores."""
    if runtime != "auto":
        pytest.importorskip("onnxruntime" if runtime == "onnx" else "openvino")
    res = query_json(capsys, setup["ix"], "--text_encoder", runtime, "--queries_file",
                     str(setup["root"] / "queries.txt"))
    assert_matches_sim(res, setup["sim"], setup["captions"], setup["video_ids"])


def test_query_equals_save_sim_from_embeddings(setup, tmp_path, capsys):
    ix = tmp_path / "emb_ix"
    assert search.main(["build", "--from_embeddings", str(setup["emb"]), "--index", str(ix)]) == 0
    res = query_json(capsys, ix, "--queries_file", str(setup["root"] / "queries.txt"))
    assert_matches_sim(res, setup["sim"], setup["captions"], setup["video_ids"])
    # and the two indexes hold the same vectors
    a, b = SearchIndex.open(ix), SearchIndex.open(setup["ix"])
    assert a.video_ids == b.video_ids and a.fingerprint == b.fingerprint
    np.testing.assert_allclose(a.vectors(range(len(a))), b.vectors(range(len(b))), atol=1e-5)


def test_api_similar_record_and_table(setup, capsys):
    index = SearchIndex.open(setup["ix"])
    assert len(index) == N_VIDEOS
    vid = setup["video_ids"][0]
    hits = index.similar(vid, 5)
    assert len(hits) == 5 and vid not in [h.video_id for h in hits]
    assert [h.score for h in hits] == sorted([h.score for h in hits], reverse=True)
    with pytest.raises(KeyError):
        index.similar("no-such-video", 3)
    rec = index.record(vid)
    assert rec.kind == "frames" and rec.frames == 8 and rec.path.is_dir()
    assert rec.thumbnails and all(t.is_file() and t.suffix == ".jpg" for t in rec.thumbnails)
    assert all(str(t).startswith(str(setup["ix"].resolve())) for t in rec.thumbnails)
    assert index.record("no-such-video") is None
    capsys.readouterr()
    assert search.main(["query", "--index", str(setup["ix"]), "-k", "3", "--like", vid, "a red circle"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"like: {vid}" and len(out) == 8 and out[4] == "query: 'a red circle'"


def test_query_text_edge_cases(setup, capsys):
    ix = setup["ix"]
    assert "query 2 is empty" in one_line_error(capsys, ["query", "--index", str(ix), "a dog", "  "], code=2)
    assert "characters long" in one_line_error(capsys, ["query", "--index", str(ix), "x" * 20_000], code=2)
    assert "give query texts" in one_line_error(capsys, ["query", "--index", str(ix)], code=2)
    # a long query is cut to max_words tokens like a caption: same result as its first 14 words
    words = [f"w{i % 50}" for i in range(1500)]
    long_q, res = " ".join(words), None
    res = query_json(capsys, ix, "-k", "5", long_q, " ".join(words[:14]))
    assert res[0]["results"] == res[1]["results"]
    uni = "猫がボールを追いかける 🐈 café naïve"
    res = query_json(capsys, ix, "-k", "4", uni)
    assert res[0]["query"] == uni and len(res[0]["results"]) == 4
    res = query_json(capsys, ix, "-k", "100", "a blue square")
    assert len(res[0]["results"]) == N_VIDEOS


# ----------------------------------------------------------------------------------------------- model check
def test_model_flags_must_match_the_fingerprint(setup, capsys):
    ix, ckpt, other = setup["ix"], setup["ckpt"], setup["other"]
    ok = ["query", "--index", str(ix), "--checkpoint", str(ckpt.parent), "--model_num", "1", "a red circle"]
    capsys.readouterr()
    assert search.main(ok) == 0
    bad = ["query", "--index", str(ix), "--checkpoint", str(other.parent), "--model_num", "1", "a red circle"]
    err = one_line_error(capsys, bad, code=2)
    assert "fingerprint" in err and "another model" in err
    # a checkpoint whose weights changed after the build is refused when the index loads the model
    moved = setup["root"] / "moved"
    shutil.copytree(ix, moved)
    manifest_path = moved / (moved / CURRENT).read_text().strip() / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["checkpoint"] = str(other.resolve())
    write_sealed_manifest(manifest_path, manifest)  # as if the build had recorded the other file
    err = one_line_error(capsys, ["query", "--index", str(moved), "a red circle"], code=1)
    assert "fingerprint differs" in err


# ----------------------------------------------------------------------------------------------- index folder errors
def test_missing_truncated_and_old_index_folders(setup, tmp_path, capsys):
    assert "no such index folder" in one_line_error(capsys, ["query", "--index", str(tmp_path / "nope"), "x"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a search index" in one_line_error(capsys, ["query", "--index", str(empty), "x"])

    def copy(name):
        d = tmp_path / name
        shutil.copytree(setup["ix"], d)
        return d, d / (d / CURRENT).read_text().strip()

    d, gen = copy("trunc_faiss")
    data = (gen / "faiss.index").read_bytes()
    (gen / "faiss.index").write_bytes(data[: len(data) // 2])
    err = one_line_error(capsys, ["query", "--index", str(d), "x"])
    assert f"{gen / 'faiss.index'}: {len(data) // 2} bytes" in err and "truncated" in err
    d, gen = copy("trunc_db")
    (gen / "meta.sqlite").write_bytes((gen / "meta.sqlite").read_bytes()[:600])
    assert f"{gen / 'meta.sqlite'}: 600 bytes" in one_line_error(capsys, ["query", "--index", str(d), "x"])
    d, gen = copy("trunc_shard")
    shard = next((d / "shards").glob("*.npy"))
    shard.write_bytes(shard.read_bytes()[:200])
    assert f"{shard}: 200 bytes" in one_line_error(capsys, ["query", "--index", str(d), "x"])
    d, gen = copy("trunc_manifest")
    (gen / MANIFEST).write_text((gen / MANIFEST).read_text()[:40])
    assert "truncated or damaged" in one_line_error(capsys, ["query", "--index", str(d), "x"])
    d, gen = copy("old_version")
    m = json.loads((gen / MANIFEST).read_text())
    m["format_version"] = 0
    (gen / MANIFEST).write_text(json.dumps(m))
    (gen / "manifest.sha256").unlink()  # version-1 indexes had none
    assert "format version 0" in one_line_error(capsys, ["query", "--index", str(d), "x"])
    old = tmp_path / "old_layout"
    old.mkdir()
    (old / "index.faiss").write_bytes(b"x")
    assert "older format" in one_line_error(capsys, ["query", "--index", str(old), "x"])
    with pytest.raises(IndexFormatError):
        SearchIndex.open(old)


def test_bad_build_input(setup, tmp_path, capsys):
    ckpt = setup["ckpt"]
    err = one_line_error(capsys, ["build", "--index", str(tmp_path / "i")], code=2)
    assert "--features_path" in err
    err = one_line_error(capsys, build_argv(tmp_path / "none", tmp_path / "i", ckpt), code=2)
    assert "--features_path" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    err = one_line_error(capsys, build_argv(setup["root"] / "synth" / "frames", busy, ckpt), code=1)
    assert "refusing" in err and (busy / "notes.txt").exists()
    err = one_line_error(capsys, ["build", "--from_embeddings", str(setup["emb"]), "--index", str(tmp_path / "j"),
                                  "--index_type", "IVFxx,Nope"], code=1)
    assert "--index_type IVFxx,Nope" in err
    # a second build of the same index while one holds its lock is refused, and leaves the index as it was
    import fcntl

    ix = tmp_path / "locked"
    assert search.main(["build", "--from_embeddings", str(setup["emb"]), "--index", str(ix)]) == 0
    with open(ix / ".build.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = one_line_error(capsys, ["build", "--from_embeddings", str(setup["emb"]), "--index", str(ix)], code=1)
    assert "another build" in err and len(SearchIndex.open(ix)) == N_VIDEOS


def test_unreadable_video_is_listed_and_skipped(setup, tmp_path, capsys):
    frames = tmp_path / "frames"
    shutil.copytree(setup["root"] / "synth" / "frames", frames)
    bad = frames / setup["video_ids"][3]
    next(iter(sorted(bad.iterdir()))).write_bytes(b"not a jpeg")
    capsys.readouterr()
    rc = search.main(build_argv(frames, tmp_path / "ix", setup["ckpt"]))
    err = capsys.readouterr().err
    assert rc == 1 and setup["video_ids"][3] in err and "1 video(s) could not be read" in err
    index = SearchIndex.open(tmp_path / "ix")
    assert len(index) == N_VIDEOS - 1 and setup["video_ids"][3] not in index.video_ids


# ----------------------------------------------------------------------------------------------- incremental
def test_incremental_rebuild_encodes_only_new_and_changed(setup, tmp_path, capsys, monkeypatch):
    from clip2video.search import build as index_build

    frames = tmp_path / "frames"
    shutil.copytree(setup["root"] / "synth" / "frames", frames)
    held = setup["video_ids"][5]
    shutil.move(frames / held, tmp_path / held)
    ix = tmp_path / "ix"
    calls: list[str] = []
    real = index_build.read_source
    monkeypatch.setattr(index_build, "read_source", lambda src, **kw: (calls.append(src.video_id), real(src, **kw))[1])
    assert search.main(build_argv(frames, ix, setup["ckpt"])) == 0
    assert len(calls) == N_VIDEOS - 1
    calls.clear()
    assert search.main(build_argv(frames, ix, setup["ckpt"])) == 0
    assert calls == []  # nothing changed, nothing encoded
    shutil.move(tmp_path / held, frames / held)
    assert search.main(build_argv(frames, ix, setup["ckpt"])) == 0
    assert calls == [held]  # only the new video
    res = query_json(capsys, ix, "--queries_file", str(setup["root"] / "queries.txt"))
    assert_matches_sim(res, setup["sim"], setup["captions"], setup["video_ids"])
    # a changed video (new mtime) is encoded again; a deleted one disappears from the results
    calls.clear()
    changed = setup["video_ids"][2]
    f = next(iter(sorted((frames / changed).iterdir())))
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    gone = setup["video_ids"][7]
    shutil.rmtree(frames / gone)
    assert search.main(build_argv(frames, ix, setup["ckpt"])) == 0
    assert calls == [changed]
    index = SearchIndex.open(ix)
    assert len(index) == N_VIDEOS - 1 and gone not in index.video_ids
    res = query_json(capsys, ix, "-k", "20", *setup["captions"][:4])
    assert all(gone not in [r["video_id"] for r in q["results"]] for q in res)
    assert all(len(q["results"]) == N_VIDEOS - 1 for q in res)
    # only the live generation and the shards it uses stay on disk
    gens = [p for p in ix.iterdir() if p.name.startswith("gen-") or p.name.startswith(".gen-")]
    assert len(gens) == 1
    used = set(json.loads((gens[0] / MANIFEST).read_text())["shards"])
    assert {p.stem for p in (ix / "shards").glob("*.npy")} == used


# ----------------------------------------------------------------------------------------------- crash safety
KILL_SCRIPT = """
import os, signal, sys
from clip2video.cli import search
from clip2video.search import build as index_build
real = index_build.build_from_folder
def killing(*a, **kw):
    kw["round_size"] = 2
    kw["on_encoded"] = lambda n: os.kill(os.getpid(), signal.SIGKILL) if n >= int(sys.argv[1]) else None
    return real(*a, **kw)
index_build.build_from_folder = killing
sys.exit(search.main(sys.argv[2:]))
"""


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def test_kill_during_build_then_rerun(setup, tmp_path, capsys):
    frames = tmp_path / "frames"
    shutil.copytree(setup["root"] / "synth" / "frames", frames)
    later = setup["video_ids"][8:]
    for v in later:
        shutil.move(frames / v, tmp_path / v)
    ix = tmp_path / "ix"
    assert search.main(build_argv(frames, ix, setup["ckpt"])) == 0
    before = query_json(capsys, ix, "-k", "20", *setup["captions"][:3])
    for v in later:
        shutil.move(tmp_path / v, frames / v)
    # kill -9 after two shards of new vectors are on disk, before the generation switch
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT, "4", *build_argv(frames, ix, setup["ckpt"])],
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert query_json(capsys, ix, "-k", "20", *setup["captions"][:3]) == before  # the previous state answers
    # kill -9 at arbitrary moments of a whole build (start-up, encoding, writing): always an index that opens
    for delay in (4.0, 7.0):
        proc = subprocess.Popen([sys.executable, str(ROOT / "search.py"), *build_argv(frames, ix, setup["ckpt"])],
                                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        n = len(SearchIndex.open(ix))
        assert n in (8, N_VIDEOS)
    from clip2video.search import build as index_build

    calls: list[str] = []
    real = index_build.read_source
    index_build.read_source = lambda src, **kw: (calls.append(src.video_id), real(src, **kw))[1]
    try:
        assert search.main(build_argv(frames, ix, setup["ckpt"])) == 0
    finally:
        index_build.read_source = real
    assert len(calls) <= len(later) - 4  # the shards written before the kill were reused
    res = query_json(capsys, ix, "--queries_file", str(setup["root"] / "queries.txt"))
    assert_matches_sim(res, setup["sim"], setup["captions"], setup["video_ids"])


# ----------------------------------------------------------------------------------------------- two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    rc = search.main(argv)
    if rc != 0:
        raise SystemExit(rc)


def test_two_gloo_processes_build_the_same_index(setup, tmp_path):
    import torch.multiprocessing as mp

    ix2 = tmp_path / "ix2"
    mp.spawn(_worker, args=(2, _free_port(), build_argv(setup["root"] / "synth" / "frames", ix2, setup["ckpt"])),
             nprocs=2, join=True)
    one, two = SearchIndex.open(setup["ix"]), SearchIndex.open(ix2)
    assert one.video_ids == two.video_ids and one.fingerprint == two.fingerprint
    np.testing.assert_allclose(one.vectors(range(len(one))), two.vectors(range(len(two))), atol=1e-5, rtol=0)
    assert [r.frames for r in map(one.record, one.video_ids)] == [r.frames for r in map(two.record, two.video_ids)]
    assert all(two.record(v).thumbnails for v in two.video_ids)


# ----------------------------------------------------------------------------------------------- approximate
def test_approximate_index_keeps_exact_scores(tmp_path, capsys):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 32)).astype(np.float32)
    x = centres[rng.integers(0, 40, 4000)] + 0.3 * rng.standard_normal((4000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    emb = tmp_path / "emb"
    emb.mkdir()
    np.save(emb / "video.npy", x)
    (emb / "video_ids.json").write_text(json.dumps([f"v{i}" for i in range(len(x))]))
    exact, approx = tmp_path / "exact", tmp_path / "ivf"
    assert search.main(["build", "--from_embeddings", str(emb), "--index", str(exact)]) == 0
    assert search.main(["build", "--from_embeddings", str(emb), "--index", str(approx), "--index_type",
                        "IVF32,SQ8", "--search_params", "nprobe=8"]) == 0
    a, b = SearchIndex.open(exact), SearchIndex.open(approx)
    assert a.manifest["index_type"] == "Flat" and b.manifest["index_type"] == "IVF32,SQ8" and not b.exact
    q = x[:50] + 0.1 * rng.standard_normal((50, 32)).astype(np.float32)
    ha, hb = a.search(q, 10), b.search(q, 10)
    rec = np.mean([len({h.video_id for h in u} & {h.video_id for h in v}) / 10 for u, v in zip(ha, hb, strict=True)])
    assert rec >= 0.9
    for qi, hits in enumerate(hb):  # every reported score is the exact inner product
        for h in hits:
            assert abs(h.score - float(x[int(h.video_id[1:])] @ q[qi])) < 1e-5
    # without meta.json there is no model: --like works, text queries say why they cannot
    capsys.readouterr()
    assert search.main(["query", "--index", str(approx), "--like", "v3", "-k", "3"]) == 0
    err = one_line_error(capsys, ["query", "--index", str(approx), "a dog"], code=1)
    assert "records no model" in err


# ----------------------------------------------------------------------------------------------- demo step
def test_demo_search_step(setup, tmp_path, capsys):
    import importlib.util

    from clip2video.dataloaders.annotations import load_eval_set

    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    root = setup["root"]
    run = tmp_path / "runs" / "tab_tdb"
    run.mkdir(parents=True)
    torch.manual_seed(0)
    model = create_model("tab_tdb", clip_config=ClipConfig.tiny(), center_k=3)
    torch.save({"model": model.state_dict(), "config": {"model": model.config.to_dict()}}, run / "best.pt")
    frames = root / "synth" / "frames"
    rset = load_eval_set("generic", data_path=str(root / "synth" / "annotations.csv"), features_path=str(frames),
                         split="test")
    capsys.readouterr()
    assert demo.search_step(tmp_path, frames, rset, 0) == 0
    out = capsys.readouterr().out
    assert out.count("query: ") == 3 and out.count("  5. ") == 3
    assert f"search.py serve --index {tmp_path / 'index'}" in out
    assert len(SearchIndex.open(tmp_path / "index")) == len(rset.video_ids)
    # each printed top-5 is the index's answer to that caption, every clip with that caption marked
    ix = SearchIndex.open(tmp_path / "index")
    clips_of = {}
    for text, v in zip(rset.captions, rset.caption_video, strict=True):
        clips_of.setdefault(text, set()).add(rset.video_ids[v])
    for block in out.split("query: ")[1:]:
        q = block.split(" (ground truth ")[0].strip("'\"")
        truth = set(block.split(" (ground truth ")[1].split(")")[0].split(", "))
        assert truth == clips_of[q]
        lines = [ln for ln in block.splitlines()[1:6]]
        hits = ix.query([q], 5)[0]
        assert [ln.split()[2] for ln in lines] == [h.video_id for h in hits]
        assert [ln.endswith("<- ground truth") for ln in lines] == [h.video_id in truth for h in hits]


# ----------------------------------------------------------------------------------------------- video files
def test_video_files_through_the_direct_decoder(setup, tmp_path, capsys):
    make_synthetic_dataset(tmp_path / "synth", n_videos=6, seed=4, size=32, n_frames=12, fps=10, write="mp4",
                           splits=(0.0, 0.0, 1.0))
    videos = tmp_path / "synth" / "videos"
    (videos / "broken.mp4").write_bytes(b"not a video")
    ckpt = setup["ckpt"]
    argv = ["--datatype", "generic", "--data_path", str(tmp_path / "synth" / "annotations.csv"), "--split", "test",
            "--features_path", str(videos), "--checkpoint", str(ckpt.parent), "--model_num", "1", "--max_words",
            "16", "--max_frames", "6", "--num_thread_reader", "0", "--device", "cpu", "--video_fps", "10",
            "--save_sim", str(tmp_path / "sim.npy"), "--save_embeddings", str(tmp_path / "emb")]
    assert infer_retrieval.main(argv) == 0
    capsys.readouterr()
    rc = search.main(build_argv(videos, tmp_path / "ix", ckpt, "--video_fps", "10"))
    assert rc == 1 and "broken" in capsys.readouterr().err  # listed, skipped, the rest indexed
    captions = json.loads((tmp_path / "emb" / "text_ids.json").read_text())
    res = query_json(capsys, tmp_path / "ix", *captions)
    assert_matches_sim(res, np.load(tmp_path / "sim.npy"), captions,
                       json.loads((tmp_path / "emb" / "video_ids.json").read_text()))
    rec = SearchIndex.open(tmp_path / "ix").record(res[0]["results"][0]["video_id"])
    assert rec.kind == "file" and rec.path.suffix == ".mp4" and abs(rec.duration - 1.2) < 1e-6
    assert len(rec.thumbnails) == 3 and all(t.is_file() for t in rec.thumbnails)


# ----------------------------------------------------------------------------------------------- segmented
SEGMENT_FLAGS = ("--segment_seconds", "0.8", "--segment_stride", "0.4")  # 8 frames at 5 fps: 3 segments a video


@pytest.fixture(scope="module")
def seg_ref(setup):
    """A segmented index of the synthetic frame folders, built in one go (the reference of the tests below)."""
    ix = setup["root"] / "seg_ix"
    assert search.main(build_argv(setup["root"] / "synth" / "frames", ix, setup["ckpt"], *SEGMENT_FLAGS)) == 0
    index = SearchIndex.open(ix)
    assert len(index) == N_VIDEOS and index.n_rows == 3 * N_VIDEOS
    return index


def same_segments(a: SearchIndex, b: SearchIndex) -> None:
    """Two indexes hold the same videos, segments and vectors."""
    assert a.video_ids == b.video_ids and a.fingerprint == b.fingerprint and a.n_rows == b.n_rows
    assert a.starts.tolist() == b.starts.tolist() and a.ends.tolist() == b.ends.tolist()
    assert a.row_video.tolist() == b.row_video.tolist()
    np.testing.assert_allclose(a.vectors(range(a.n_rows)), b.vectors(range(b.n_rows)), atol=1e-5, rtol=0)


def test_segmented_incremental_rebuild(setup, seg_ref, tmp_path, monkeypatch):
    from clip2video.search import build as index_build

    frames = tmp_path / "frames"
    shutil.copytree(setup["root"] / "synth" / "frames", frames)
    held = setup["video_ids"][5]
    shutil.move(frames / held, tmp_path / held)
    ix = tmp_path / "ix"
    calls: list[str] = []
    real = index_build._encode_segmented
    monkeypatch.setattr(index_build, "_encode_segmented", lambda mine, *a, **kw: (
        calls.extend(s.video_id for s in mine), real(mine, *a, **kw))[1])
    argv = build_argv(frames, ix, setup["ckpt"], *SEGMENT_FLAGS)
    assert search.main(argv) == 0 and len(calls) == N_VIDEOS - 1
    calls.clear()
    assert search.main(argv) == 0 and calls == []  # nothing changed, nothing encoded
    shutil.move(tmp_path / held, frames / held)
    assert search.main(argv) == 0 and calls == [held]  # only the new video, all its segments
    same_segments(SearchIndex.open(ix), seg_ref)
    calls.clear()
    changed, gone = setup["video_ids"][2], setup["video_ids"][7]
    f = next(iter(sorted((frames / changed).iterdir())))
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    shutil.rmtree(frames / gone)
    assert search.main(argv) == 0 and calls == [changed]
    index = SearchIndex.open(ix)
    assert len(index) == N_VIDEOS - 1 and gone not in index.video_ids and index.n_rows == 3 * (N_VIDEOS - 1)
    gens = [p for p in ix.iterdir() if p.name.startswith("gen-") or p.name.startswith(".gen-")]
    assert len(gens) == 1
    used = set(json.loads((gens[0] / MANIFEST).read_text())["shards"])
    assert {p.stem for p in (ix / "shards").glob("*.npy")} == used


def test_segmented_kill_during_build_then_rerun(setup, seg_ref, tmp_path, capsys):
    from clip2video.search import build as index_build

    frames = tmp_path / "frames"
    shutil.copytree(setup["root"] / "synth" / "frames", frames)
    later = setup["video_ids"][8:]
    for v in later:
        shutil.move(frames / v, tmp_path / v)
    ix = tmp_path / "ix"
    argv = build_argv(frames, ix, setup["ckpt"], *SEGMENT_FLAGS)
    assert search.main(argv) == 0
    before = query_json(capsys, ix, "-k", "20", *setup["captions"][:3])
    for v in later:
        shutil.move(tmp_path / v, frames / v)
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT, "4", *argv], env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert query_json(capsys, ix, "-k", "20", *setup["captions"][:3]) == before  # the previous state answers
    calls: list[str] = []
    real = index_build._encode_segmented
    index_build._encode_segmented = lambda mine, *a, **kw: (calls.extend(s.video_id for s in mine),
                                                            real(mine, *a, **kw))[1]
    try:
        assert search.main(argv) == 0
    finally:
        index_build._encode_segmented = real
    assert len(calls) <= len(later) - 4  # the shards written before the kill were reused
    same_segments(SearchIndex.open(ix), seg_ref)


def test_two_gloo_processes_build_the_same_segmented_index(setup, seg_ref, tmp_path):
    import torch.multiprocessing as mp

    ix2 = tmp_path / "ix2"
    mp.spawn(_worker, args=(2, _free_port(), build_argv(setup["root"] / "synth" / "frames", ix2, setup["ckpt"],
                                                       *SEGMENT_FLAGS)), nprocs=2, join=True)
    two = SearchIndex.open(ix2)
    same_segments(seg_ref, two)
    assert all(len(two.record(v).thumbnails) >= 3 for v in two.video_ids)
