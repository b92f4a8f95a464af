"""Tokeniser: the original's sequence rule on real MSR-VTT captions and edge cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from clip2video.modules.tokenizer import END_ID, PAD_ID, START_ID, ClipTokenizer


def check_invariants(ids: np.ndarray, mask: np.ndarray, max_words: int) -> None:
    assert ids.shape == mask.shape == (max_words,)
    n = int(mask.sum())
    assert 2 <= n <= max_words
    assert mask[:n].all() and not mask[n:].any()  # contiguous prefix
    assert ids[0] == START_ID and ids[n - 1] == END_ID
    assert (ids[n:] == PAD_ID).all()
    assert ids.argmax() == n - 1  # the end token has the largest id: the global text feature sits there
    assert not np.isin(ids[1 : n - 1], [START_ID, END_ID]).any()


def test_real_msrvtt_captions(reference_dir):
    df = pd.read_csv(reference_dir / "msrvtt_data" / "MSRVTT_JSFUSION_test.csv")
    assert len(df) == 1000
    tok = ClipTokenizer(32)
    lengths = []
    for caption in df["sentence"]:
        ids, mask = tok(caption)
        check_invariants(ids, mask, 32)
        lengths.append(int(mask.sum()))
        # truncation keeps the first words: the sequence is a prefix of the untruncated one
        full = tok.bpe_ids(caption)
        assert list(ids[1 : lengths[-1] - 1]) == full[: 30]
    assert max(lengths) <= 32 and min(lengths) >= 3


@pytest.mark.parametrize("max_words", [4, 32, 77])
def test_lengths_and_truncation(max_words):
    tok = ClipTokenizer(max_words)
    long = "word " * 100
    ids, mask = tok(long)
    check_invariants(ids, mask, max_words)
    assert mask.sum() == max_words
    ids, mask = tok("")
    check_invariants(ids, mask, max_words)
    assert mask.sum() == 2


def test_cleaning_and_batch():
    tok = ClipTokenizer(16)
    a, _ = tok("A  Man &amp; his DOG")
    b, _ = tok("a man & his dog")
    assert np.array_equal(a, b)  # lower-cased, html-unescaped, whitespace-folded like CLIP
    ids, mask = tok.batch(["a cat", "a dog runs"])
    assert ids.shape == (2, 16) and mask.sum(1).tolist() == [4, 5]
    assert tok.decode(ids[1].tolist()) == "a dog runs"
    with pytest.raises(ValueError, match="max_words"):
        ClipTokenizer(1)
