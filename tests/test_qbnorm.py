"""QB-Norm (dynamic inverted softmax) against a direct, loop-based implementation of the paper's formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clip2video.modules.evaluation.qbnorm import (
    CLIP2VIDEO_BETA,
    BankStatistics,
    QBNormStats,
    bank_statistics,
    dynamic_inverted_softmax,
)


def direct_qbnorm(scores: list[list[float]], bank: list[list[float]], beta: float, k: int) -> list[list[float]]:
    """The formula written out: R = videos in some bank query's top-k (ties: first column first); a query
    whose top-1 (first column among equal maxima) is in R gets exp(β·s)/Σ_b exp(β·S_B(b, ·)), others keep s."""
    n_videos = len(bank[0])
    retrieved = set()
    for row in bank:
        order = sorted(range(n_videos), key=lambda v: (-row[v], v))
        retrieved.update(order[:k])
    sums = [sum(math.exp(beta * row[v]) for row in bank) for v in range(n_videos)]
    out = []
    for row in scores:
        top = 0
        for v in range(1, n_videos):
            if row[v] > row[top]:
                top = v
        if top in retrieved:
            out.append([math.exp(beta * row[v]) / sums[v] for v in range(n_videos)])
        else:
            out.append(list(row))
    return out


def _case(seed: int, n_q: int = 12, n_bank: int = 5, n_videos: int = 16, ties: bool = True):
    rng = np.random.default_rng(seed)
    # ×100-scale scores on a coarse grid so that rows hold exact ties
    scores = np.round(rng.normal(25, 6, size=(n_q, n_videos)) * 2) / 2 if ties else rng.normal(25, 6, (n_q, n_videos))
    bank = np.round(rng.normal(25, 6, size=(n_bank, n_videos)) * 2) / 2
    return scores, bank


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("beta", [CLIP2VIDEO_BETA, 1.0, 20.0 / 100])
def test_equals_the_direct_formula_with_ties_and_queries_outside_r(k, beta):
    for seed in range(4):
        scores, bank = _case(seed)
        # a tie for the top of a query, between a video in R and one outside it (column order decides)
        stats = bank_statistics(bank, beta, k)
        outside = np.flatnonzero(~stats.retrieved)
        inside = np.flatnonzero(stats.retrieved)
        assert len(outside) and len(inside), "the case must have videos on both sides of R"
        scores[0] = 10.0
        scores[0, [outside[0], inside[0]]] = 40.0  # top-1 = the smaller column index
        scores[1] = 10.0
        scores[1, outside[-1]] = 45.0  # top-1 clearly outside R: left unchanged
        want = np.array(direct_qbnorm(scores.tolist(), bank.tolist(), beta, k))
        got, norm = stats.apply(scores)
        assert got.shape == scores.shape and got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
        assert norm[0] == (inside[0] < outside[0]) and not norm[1]
        np.testing.assert_array_equal(got[1], scores[1])
        assert 0 < norm.sum() < len(norm)  # both kinds of queries occur
        np.testing.assert_allclose(dynamic_inverted_softmax(scores, bank, beta, k), want, rtol=1e-6)


def test_bank_tie_goes_to_the_first_column():
    bank = np.array([[5.0, 5.0, 1.0], [0.0, 2.0, 2.0]])
    stats = bank_statistics(bank, 1.0, 1)
    assert stats.retrieved.tolist() == [True, True, False]
    assert stats.n_bank == 2


def test_chunks_merges_and_single_queries_give_the_same_statistics():
    scores, bank = _case(7, n_bank=101, ties=False)
    whole = bank_statistics(bank, CLIP2VIDEO_BETA, 2)
    chunked = bank_statistics(bank, CLIP2VIDEO_BETA, 2, chunk=7)
    np.testing.assert_allclose(chunked.log_norm, whole.log_norm, rtol=1e-13)
    assert (chunked.retrieved == whole.retrieved).all()
    parts = [bank_statistics(bank[s : s + 40], CLIP2VIDEO_BETA, 2) for s in (0, 40, 80)]
    merged = parts[0].merge(parts[1:])
    np.testing.assert_allclose(merged.log_norm, whole.log_norm, rtol=1e-13)
    assert (merged.retrieved == whole.retrieved).all() and merged.n_bank == 101
    rows, norm = whole.apply(scores)
    for i, row in enumerate(scores):  # one query at a time, as a search would
        one, n1 = whole.apply(row)
        np.testing.assert_array_equal(one, rows[i])
        assert bool(n1[0]) == bool(norm[i])
    assert whole.apply(scores.astype(np.float32))[1].tolist() == norm.tolist()


def test_large_scores_do_not_overflow():
    """β·s = 900 overflows exp in float64 (and exp(β·s) for β·s > 88 in float32): the log-sum-exp does not."""
    bank = np.array([[900.0, 0.0], [900.0, 0.0], [0.0, 800.0]])
    stats = bank_statistics(bank, 1.0, 1)
    assert np.isfinite(stats.log_norm).all()
    assert stats.log_norm[0] == pytest.approx(900.0 + math.log(2))
    got, norm = stats.apply(np.array([[899.0, 10.0]]))
    assert norm[0]
    # exp(899) / (2·exp(900)) and exp(10) / (exp(800) + 2) (tiny but exact, not 0/0)
    assert got[0, 0] == pytest.approx(math.exp(-1) / 2, rel=1e-12)
    assert got[0, 1] == pytest.approx(math.exp(10 - 800), rel=1e-9)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="empty"):
        BankStatistics(3).result()
    with pytest.raises(ValueError, match="β must be a positive"):
        BankStatistics(3, beta=0.0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        BankStatistics(3, k=0)
    acc = BankStatistics(3)
    with pytest.raises(ValueError, match="NaN or infinite"):
        acc.add(np.array([[1.0, np.nan, 0.0]]))
    with pytest.raises(ValueError, match=r"expected \(n, 3\)"):
        acc.add(np.zeros((2, 4)))
    stats = QBNormStats(np.zeros(3), np.ones(3, dtype=bool), 1.0, 1, 1)
    with pytest.raises(ValueError, match="for 3 videos"):
        stats.apply(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="share the videos"):
        stats.merge([QBNormStats(np.zeros(4), np.ones(4, dtype=bool), 1.0, 1, 1)])
