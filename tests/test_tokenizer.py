"""Tokeniser: the original's sequence rule on real MSR-VTT captions and edge cases; our BPE against
open_clip's ``SimpleTokenizer``; no open_clip import."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from clip2video.modules.network import tokenizer as tokenizer_module
from clip2video.modules.network.tokenizer import END_ID, PAD_ID, START_ID, VOCAB_FILE, ClipTokenizer, _bpe

from conftest import REFERENCE, ROOT, need

HARD_CASES = [
    "",
    "   ",
    "a man &amp; his dog",
    "it&#39;s &quot;fine&quot; &lt;b&gt;bold&lt;/b&gt; &amp;amp; &amp;amp;amp; &nbsp;x",
    "cafÃ© â€œquotedâ€\x9d donâ€™t",  # mojibake that ftfy repairs
    "café naïve résumé Über Ångström façade",
    "一个男人在厨房里做饭 日本語のテキスト 한국어 문장",
    "สวัสดี नमस्ते مرحبا שלום",
    "emoji 👍🏽 🇯🇵 👨‍👩‍👧 ❤️ 😂😂😂",
    "in 1999 he paid $3.14 for 1,000,000 items at 10:30pm; ١٢٣ ½ ²",
    "don't It's we're they've I'm you'll he'd DON'T IT'S 'ſ",
    "multiple   spaces\tand\ttabs\nand\r\nnewlines \x0b\x0c\x1c end\u00a0nbsp\u3000ideographic",
    "a" * 300,
    "supercalifragilisticexpialidocious" * 8,
    "pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
    "!!!??? ... --- *** ((()))[[ ]]{{}} ~~~ @#$%^&*_+=|\\/<> -->",
    "ﬁne ligatures ＦＵＬＬＷＩＤＴＨ “curly” ‘quotes’ — dash … ellipsis",
    "İstanbul ǅ ẞ ΣΊΣΥΦΟΣ ß",
    "zero\u200bwidth\u200djoin control\x07bell\x7fdel soft\u00adhyphen",
    "literal </w> marker and <start_of_text> <end_of_text> tokens",
    "A Man Is COOKING In The Kitchen.",
]


@pytest.fixture(scope="module")
def open_clip_bpe():
    tokenizer = pytest.importorskip("open_clip.tokenizer")
    return tokenizer.SimpleTokenizer()


def msrvtt_sentences() -> list[str]:
    """Every sentence in the MSR-VTT annotation files beside the checkout (those with a sentence column)."""
    sentences = []
    for path in sorted(need(REFERENCE / "msrvtt_data").glob("*.csv")):
        df = pd.read_csv(path)
        if "sentence" in df.columns:
            sentences.extend(df["sentence"].astype(str))
    for path in sorted((REFERENCE / "msrvtt_data").glob("*.json")):
        data = json.loads(path.read_text())
        sentences.extend(str(s["caption"]) for s in data.get("sentences", []) if "caption" in s)
    assert sentences, "no MSR-VTT sentences found"
    return sentences


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


def test_ids_equal_open_clip_on_msrvtt_sentences(open_clip_bpe):
    sentences = msrvtt_sentences()
    ours = _bpe()
    for sentence in sentences:
        assert ours.encode(sentence) == open_clip_bpe.encode(sentence), sentence


@pytest.mark.parametrize("text", HARD_CASES)
def test_ids_and_decode_equal_open_clip_on_hard_cases(open_clip_bpe, text):
    ours = _bpe()
    ids = ours.encode(text)
    assert ids == open_clip_bpe.encode(text)
    assert ours.encode(text) == ids  # the memoised second pass gives the same
    assert ours.decode(ids) == open_clip_bpe.decode(ids)
    words = [i for i in ids if i not in (START_ID, END_ID)]
    assert ClipTokenizer(77).decode(words) == open_clip_bpe.decode(words).strip()


def test_decode_of_arbitrary_ids_equals_open_clip(open_clip_bpe):
    rng = np.random.default_rng(0)
    ours = _bpe()
    for _ in range(200):  # split multi-byte characters included: both replace them the same way
        ids = rng.integers(1, START_ID, size=int(rng.integers(1, 20))).tolist()
        assert ours.decode(ids) == open_clip_bpe.decode(ids)


def test_tokenising_imports_no_open_clip():
    code = (
        "import sys; from clip2video.modules.network.tokenizer import ClipTokenizer; "
        "ClipTokenizer(32).batch(['a man is cooking']); "
        "print(sorted(m for m in ('open_clip','torchvision','timm','torch._dynamo') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_vocabulary_is_a_clear_error(monkeypatch, tmp_path):
    """The vocabulary is read from the package's own resources; a package without it fails with one line
    naming where it looked."""
    (tmp_path / "assets").mkdir()
    _bpe.cache_clear()
    try:
        monkeypatch.setattr(tokenizer_module.importlib.resources, "files",
                            lambda package: tmp_path if package == "clip2video" else None)
        with pytest.raises(FileNotFoundError, match=VOCAB_FILE) as err:
            ClipTokenizer(8)("a cat")
        assert str(tmp_path / "assets") in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(FileNotFoundError, match=f"{VOCAB_FILE}.*reinstall"):
            ClipTokenizer(8).decode([320])
    finally:
        monkeypatch.undo()
        _bpe.cache_clear()
    assert ClipTokenizer(8).decode([320]) == "a"


def test_vocabulary_is_shipped_in_the_package_with_its_licence():
    assets = ROOT / "clip2video" / "assets"
    assert tokenizer_module._vocab_path() == assets / VOCAB_FILE
    licence = (assets / "LICENSE-CLIP-BPE.txt").read_text()
    assert "MIT License" in licence and "Copyright (c) 2021 OpenAI" in licence and VOCAB_FILE in licence


def test_tokenising_works_without_open_clip_importable():
    """open_clip absent (an import of it fails): the shipped vocabulary still gives CLIP's ids."""
    code = (
        "import sys; sys.modules['open_clip'] = None\n"
        "from clip2video.modules.network.tokenizer import ClipTokenizer\n"
        "print(ClipTokenizer(8)('a man is cooking')[0].tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    ids = json.loads(out.stdout)
    assert ids[0] == START_ID and END_ID in ids and ids == ClipTokenizer(8)("a man is cooking")[0].tolist()
