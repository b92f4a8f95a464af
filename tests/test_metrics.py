"""modules/evaluation/metrics.py on small hand-built matrices whose ranks and metrics are worked out by hand below.

Rank = 1 + number of candidates scoring STRICTLY higher than the ground truth (ties favour the ground truth).
"""

from __future__ import annotations

import numpy as np
import pytest

from clip2video.modules.evaluation.metrics import (
    RankAccumulator,
    format_table,
    markdown_row,
    ranks_of,
    retrieval_metrics,
    video_to_text_matrix,
)

# 4 captions × 4 videos, caption i belongs to video i.
SINGLE = np.array([
    [0.9, 0.1, 0.2, 0.3],  # gt 0.9, nothing higher                   -> rank 1
    [0.8, 0.5, 0.6, 0.1],  # gt 0.5, higher: 0.8, 0.6                  -> rank 3
    [0.1, 0.2, 0.3, 0.4],  # gt 0.3, higher: 0.4                       -> rank 2
    [0.5, 0.5, 0.5, 0.5],  # gt 0.5, all tied, none strictly higher    -> rank 1
], dtype=np.float32)
# V2T reads the columns: video 0 [.9 .8 .1 .5] gt .9 -> 1; video 1 [.1 .5 .2 .5] gt .5 (tie) -> 1;
# video 2 [.2 .6 .3 .5] gt .3, higher .6 .5 -> 3; video 3 [.3 .1 .4 .5] gt .5 -> 1.


def test_ranks_with_ties():
    assert ranks_of(SINGLE, np.arange(4)).tolist() == [1, 3, 2, 1]
    assert ranks_of(SINGLE.T.copy(), np.arange(4)).tolist() == [1, 1, 3, 1]


def test_single_caption_metrics():
    m = retrieval_metrics(SINGLE, np.arange(4), multi_caption=False)
    # T2V ranks 1 3 2 1: R@1 2/4; median of 1 1 2 3 = (1 + 2) / 2; mean 7/4
    assert m["t2v"] == {"R1": 50.0, "R5": 100.0, "R10": 100.0, "MdR": 1.5, "MnR": 1.75}
    # V2T ranks 1 1 3 1: R@1 3/4; median of 1 1 1 3 = 1; mean 6/4
    assert m["v2t"] == {"R1": 75.0, "R5": 100.0, "R10": 100.0, "MdR": 1.0, "MnR": 1.5}


def test_recall_at_5_and_10_and_even_median():
    """Row i: ground truth 0.5, exactly (rank_i − 1) other columns at 1.0, the rest 0."""
    ranks = [1, 1, 2, 5, 6, 10, 11, 12, 3, 4, 7, 1]
    n = len(ranks)
    sim = np.zeros((n, n), dtype=np.float32)
    for i, r in enumerate(ranks):
        sim[i, i] = 0.5
        others = [j for j in range(n) if j != i][: r - 1]
        sim[i, others] = 1.0
    t2v = retrieval_metrics(sim, np.arange(n), multi_caption=False)["t2v"]
    # <= 1: three ranks; <= 5: 1 1 2 5 3 4 1 = seven; <= 10: plus 6 10 7 = ten
    assert t2v["R1"] == 25.0
    assert t2v["R5"] == pytest.approx(700 / 12, abs=1e-12)
    assert t2v["R10"] == pytest.approx(1000 / 12, abs=1e-12)
    # sorted 1 1 1 2 3 4 | 5 6 7 10 11 12: median (4 + 5) / 2; sum 63 / 12
    assert t2v["MdR"] == 4.5 and t2v["MnR"] == 5.25


# 6 captions, 3 videos: video 0 has captions 0-1, video 1 caption 2, video 2 captions 3-5.
MULTI_CV = np.array([0, 0, 1, 2, 2, 2])
MULTI = np.array([
    [0.2, 0.9, 0.1],   # v0: gt .2, higher .9            -> 2
    [0.7, 0.3, 0.6],   # v0: gt .7                       -> 1
    [0.4, 0.4, 0.8],   # v1: gt .4, tie .4, higher .8    -> 2
    [0.1, 0.2, 0.3],   # v2: gt .3                       -> 1
    [0.9, 0.8, 0.0],   # v2: gt 0, higher .9 .8          -> 3
    [0.5, 0.6, 0.65],  # v2: gt .65                      -> 1
], dtype=np.float32)
# V2T: [video i, caption group j] = best score of video i over the captions of video j:
#   group 0 (rows 0, 1): max(.2,.7) max(.9,.3) max(.1,.6) = .7 .9 .6
#   group 1 (row 2):     .4 .4 .8
#   group 2 (rows 3-5):  max(.1,.9,.5) max(.2,.8,.6) max(.3,0,.65) = .9 .8 .65
MULTI_V2T = np.array([
    [0.7, 0.4, 0.9],   # video 0: gt .7, higher .9       -> 2
    [0.9, 0.4, 0.8],   # video 1: gt .4, higher .9 .8    -> 3
    [0.6, 0.8, 0.65],  # video 2: gt .65, higher .8      -> 2
], dtype=np.float32)


def test_multi_caption_v2t_is_max_over_each_videos_captions():
    np.testing.assert_array_equal(video_to_text_matrix(MULTI, MULTI_CV), MULTI_V2T)


def test_multi_caption_metrics():
    m = retrieval_metrics(MULTI, MULTI_CV, multi_caption=True)
    t2v, v2t = m["t2v"], m["v2t"]
    # T2V ranks 2 1 2 1 3 1: R@1 3/6. The multi-caption T2V median is the LOWER middle value (torch.median):
    # sorted 1 1 1 | 2 2 3 -> 1, where the mean of the middle two would be 1.5. Mean 10/6.
    assert t2v["R1"] == pytest.approx(50.0) and t2v["R5"] == 100.0 and t2v["R10"] == 100.0
    assert t2v["MdR"] == 1.0
    assert t2v["MnR"] == pytest.approx(10 / 6, abs=1e-12)
    # V2T ranks 2 3 2: no R@1; median 2; mean 7/3
    assert v2t["R1"] == 0.0 and v2t["R5"] == 100.0 and v2t["MdR"] == 2.0
    assert v2t["MnR"] == pytest.approx(7 / 3, abs=1e-12)


def test_multi_caption_r1_is_float32_division():
    """R@K of multi-caption T2V is int * 100 / n in float32 (the original's torch arithmetic): 1/3 of 100."""
    sim = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)  # ranks 1, 1, 2
    t2v = retrieval_metrics(sim, np.array([0, 1, 1]), multi_caption=True)["t2v"]
    assert t2v["R1"] == float(np.float32(200) / np.float32(3)) != 200 / 3


def test_chunked_accumulation_equals_whole_matrix():
    """Rows arrive in chunks that split video 2's captions; the group maxima must still combine."""
    acc = RankAccumulator(MULTI_CV, 3)
    acc.add(0, MULTI[:4])
    acc.add(4, MULTI[4:])
    np.testing.assert_array_equal(acc.v2t, MULTI_V2T)
    assert acc.metrics(True) == retrieval_metrics(MULTI, MULTI_CV, True)


def test_one_caption_per_video_in_the_multi_caption_path_matches_single():
    """With one caption per video, V2T is the transpose; both flavours agree on R@K and MnR."""
    single = retrieval_metrics(SINGLE, np.arange(4), multi_caption=False)
    multi = retrieval_metrics(SINGLE, np.arange(4), multi_caption=True)
    np.testing.assert_array_equal(video_to_text_matrix(SINGLE, np.arange(4)), SINGLE.T)
    assert multi["v2t"] == single["v2t"]
    for k in ("R1", "R5", "R10", "MnR"):
        assert multi["t2v"][k] == pytest.approx(single["t2v"][k])
    assert multi["t2v"]["MdR"] == 1.0 and single["t2v"]["MdR"] == 1.5  # lower middle vs mean of the middle


def test_single_caption_needs_one_caption_per_video():
    with pytest.raises(ValueError, match="one caption per video"):
        retrieval_metrics(MULTI, MULTI_CV, multi_caption=False)


def test_table_and_markdown_show_the_numbers():
    m = retrieval_metrics(SINGLE, np.arange(4), multi_caption=False)
    assert markdown_row("x", m) == "| x | 50.0 | 100.0 | 100.0 | 1.5 | 1.8 | 75.0 | 100.0 | 100.0 | 1.0 | 1.5 |"
    lines = format_table(m, "title").splitlines()
    assert lines[0] == "title" and lines[2].split() == ["T2V", "50.0", "100.0", "100.0", "1.5", "1.8"]
