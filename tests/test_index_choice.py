"""``--max_index_memory``: sizes, the index chosen for several budgets and sizes, memory estimates against
FAISS's own, and the build command printing its choice."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clip2video.cli import search
from clip2video.search import index_choice as ic
from clip2video.search.index import SearchIndex


@pytest.mark.parametrize("text,want", [("1GB", 10**9), ("1.5 GB", 1_500_000_000), ("512MiB", 512 * 2**20),
                                       ("200M", 200 * 10**6), ("1000", 1000), ("2gib", 2 * 2**30)])
def test_parse_size(text, want):
    assert ic.parse_size(text) == want


@pytest.mark.parametrize("text", ["", "GB", "1.5XB", "-1GB", "0", "one GB"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        ic.parse_size(text)
    assert ic.parse_size("0", allow_zero=True) == 0


def test_choices_by_size_and_budget():
    d = 1024
    assert ic.choose_index(10_000, d).factory == "Flat"
    assert ic.choose_index(ic.EXACT_MAX, d).factory == "Flat"
    # a million vectors: an inverted file of ~128-vector lists with 8-bit codes, ≤ 1.5 GB, recall ≥ 0.95
    auto = ic.choose_index(1_000_000, d)
    assert auto.factory == "IVF8192,SQ8" and auto.params == "nprobe=256" and auto.bytes <= 1.5e9
    assert auto.recall >= 0.95
    assert ic.choose_index(1_000_000, d, ic.parse_size("1.5GB")) == auto
    # less memory: product-quantised codes (d/8 bytes) with exact re-ranking, the same measured recall
    small = ic.choose_index(1_000_000, d, ic.parse_size("500MB"))
    assert small.factory == "IVF8192,PQ128" and "rerank=10" in small.params and small.bytes <= 500e6
    assert small.recall <= auto.recall
    with pytest.raises(ValueError, match="smallest index"):
        ic.choose_index(1_000_000, d, ic.parse_size("100MB"))
    # a small collection that fits stays exact; one that does not gets codes
    assert ic.choose_index(20_000, d, ic.parse_size("1GB")).factory == "Flat"
    with pytest.raises(ValueError):
        ic.choose_index(20_000, d, ic.parse_size("1MB"))
    # the flat scan is never picked above EXACT_MAX, however large the budget
    assert ic.choose_index(200_000, d, ic.parse_size("100GB")).factory != "Flat"
    for n in (60_000, 200_000, 1_000_000, 10_000_000):
        for budget in ("1GB", "1.5GB", "20GB"):
            try:
                c = ic.choose_index(n, d, ic.parse_size(budget))
            except ValueError:
                continue
            assert c.bytes <= ic.parse_size(budget)


def test_list_count_aims_at_128_vectors_a_list():
    assert ic.nlist_for(1_000_000) == 8192
    assert ic.nlist_for(200_000) == 2048
    for n in (60_000, 300_000, 5_000_000):
        assert 64 <= n / ic.nlist_for(n) <= 256


@pytest.mark.parametrize("factory", ["Flat", "IVF16,SQ8", "IVF16_HNSW32,SQ8", "IVF16,PQ8", "HNSW32_SQ8"])
def test_memory_estimate_matches_faiss(factory):
    import faiss

    from clip2video.search.store import build_faiss

    x = np.random.default_rng(0).standard_normal((4000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    real = faiss.serialize_index(build_faiss(x, factory)).nbytes
    assert abs(ic.estimate_bytes(factory, len(x), 64) - real) <= 0.15 * real, (factory, real)


def test_build_prints_its_choice_and_obeys_the_budget(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ic, "EXACT_MAX", 1000)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 128)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    emb = tmp_path / "emb"
    emb.mkdir()
    np.save(emb / "video.npy", x)
    (emb / "video_ids.json").write_text(json.dumps([f"v{i}" for i in range(len(x))]))
    for budget in ("1MB", "300kB"):
        ix = tmp_path / f"ix-{budget}"
        capsys.readouterr()
        assert search.main(["build", "--from_embeddings", str(emb), "--index", str(ix), "--max_index_memory",
                            budget]) == 0
        out = capsys.readouterr().out
        want = ic.choose_index(len(x), 128, ic.parse_size(budget))
        s = SearchIndex.open(ix)
        assert s.manifest["index_type"] == want.factory and s.manifest["search_params"] == want.params
        assert f"index: {want.factory}" in out and "expected recall@10" in out
        assert f"within --max_index_memory {ic.format_size(ic.parse_size(budget))}" in out
        hits = s.search(x[:5], 10)
        assert [h[0].video_id for h in hits] == [f"v{i}" for i in range(5)]  # each vector finds itself first
    assert SearchIndex.open(tmp_path / "ix-1MB").manifest["index_type"] == f"IVF{ic.nlist_for(len(x))},SQ8"
    assert "PQ" in SearchIndex.open(tmp_path / "ix-300kB").manifest["index_type"]
    # --index_type overrides the budget and says so
    capsys.readouterr()
    assert search.main(["build", "--from_embeddings", str(emb), "--index", str(tmp_path / "flat"), "--index_type",
                        "Flat", "--max_index_memory", "300kB"]) == 0
    out = capsys.readouterr().out
    assert "index: Flat (--index_type)" in out and "overrides" in out
    # a budget nothing fits in, and a size that is not one: one line each
    for size, code in (("10kB", 1), ("lots", 2)):
        capsys.readouterr()
        rc = search.main(["build", "--from_embeddings", str(emb), "--index", str(tmp_path / f"bad-{size}"),
                          "--max_index_memory", size])
        err = capsys.readouterr().err.strip()
        assert rc == code and err.count("\n") == 0 and "--max_index_memory" in err, err
