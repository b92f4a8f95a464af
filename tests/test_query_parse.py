"""Query arithmetic without a model: the parser (quotes, weights, kinds, unicode, errors), the command-line
words joined back into one query, and how the parts' vectors are combined (``query_vectors.combine``)."""

from __future__ import annotations

import numpy as np
import pytest

from clip2video.search.query_parse import (
    MAX_PARTS,
    Part,
    QueryParseError,
    format_parts,
    has_sign_word,
    is_plain_text,
    join_words,
    parse_query,
)
from clip2video.search.query_vectors import QueryInputError, combine, sniff_image


def parts(q: str) -> list[tuple[float, str, str]]:
    return [(p.weight, p.kind, p.value) for p in parse_query(q)]


# ----------------------------------------------------------------------------------------------- grammar
@pytest.mark.parametrize("query, want", [
    ("a dog catches a frisbee", [(1.0, "text", "a dog catches a frisbee")]),
    ('"2:a dog" + photo.jpg - "snow"', [(2.0, "text", "a dog"), (1.0, "image", "photo.jpg"), (-1.0, "text", "snow")]),
    ("2:a dog + photo.jpg - snow", [(2.0, "text", "a dog"), (1.0, "image", "photo.jpg"), (-1.0, "text", "snow")]),
    ("a well-known dog - snow", [(1.0, "text", "a well-known dog"), (-1.0, "text", "snow")]),
    ("don't -stop + it's", [(1.0, "text", "don't -stop"), (1.0, "text", "it's")]),
    ("- snow", [(-1.0, "text", "snow")]),
    ("+ 0.5:snow", [(0.5, "text", "snow")]),
    (".25:x - 1000:y", [(0.25, "text", "x"), (-1000.0, "text", "y")]),
    ('"a + b" - "c - d"', [(1.0, "text", "a + b"), (-1.0, "text", "c - d")]),
    ('"a"+"b"', [(1.0, "text", "a"), (1.0, "text", "b")]),
    ('"say \\"hi\\" \\\\ now"', [(1.0, "text", 'say "hi" \\ now')]),
    ('the word "hello" in a song', [(1.0, "text", 'the word "hello" in a song')]),
    ("text:holiday.jpg + image:frame + clip:run.bin", [(1.0, "text", "holiday.jpg"), (1.0, "image", "frame"),
                                                      (1.0, "clip", "run.bin")]),
    ('"text:10:30 train"', [(1.0, "text", "10:30 train")]),
    ("10:30 train", [(10.0, "text", "30 train")]),  # a leading number and colon is a weight (documented)
    ("like:video 0001 - 2:like:ab/c", [(1.0, "like", "video 0001"), (-2.0, "like", "ab/c")]),
    ('"3:image:my photo.PNG" + Clip.MP4 + x.WebP', [(3.0, "image", "my photo.PNG"), (1.0, "clip", "Clip.MP4"),
                                                   (1.0, "image", "x.WebP")]),
    ("/abs/path/a b.jpeg - ./rel.mkv", [(1.0, "image", "/abs/path/a b.jpeg"), (-1.0, "clip", "./rel.mkv")]),
    # unicode: text, operands and whitespace of any script
    ("猫がボールを追いかける 🐈 - 犬", [(1.0, "text", "猫がボールを追いかける 🐈"), (-1.0, "text", "犬")]),
    ("café naïve\u00a0+\u30002:über", [(1.0, "text", "café naïve"), (2.0, "text", "über")]),
    ('"2:Ελληνικά" + 写真.jpg', [(2.0, "text", "Ελληνικά"), (1.0, "image", "写真.jpg")]),
    ("a −b", [(1.0, "text", "a −b")]),  # U+2212 is not a sign: text
])
def test_parse(query, want):
    assert parts(query) == want


@pytest.mark.parametrize("query, needle", [
    ("", "empty query"),
    ("   \t ", "empty query"),
    ('"unterminated', "unterminated quote at character 1"),
    ('a + "b', "unterminated quote at character 5"),
    ("a + - b", "two signs in a row at character 5"),
    ("a - + b", "two signs in a row at character 5"),
    ("+ - a", "two signs in a row at character 3"),
    ("a +", "'+' at character 3 is followed by nothing"),
    ("a -   ", "'-' at character 3 is followed by nothing"),
    ("-", "'-' at character 1 is followed by nothing"),
    ('"a" b', "expected + or - after the quoted part that ends at character 3"),
    ('"a" "b"', "expected + or -"),
    ('""', "empty quoted part at character 1"),
    ('a + "  "', "empty quoted part at character 5"),
    ("2:", "weight 2: is followed by nothing"),
    ("a + 2:   ", "weight 2: is followed by nothing"),
    ("0:a", "weight 0 must be above 0"),
    ("0.0:a", "must be above 0"),
    ("1001:a", "at most 1000"),
    ("-2:a", "a weight takes no sign"),
    ("a + +2:b", "a weight takes no sign"),
    ("image:", "image: is followed by nothing"),
    ("2:like:  ", "like: is followed by nothing"),
    ("https://example.com/cat.jpg", "is a URL; nothing is fetched"),
    ("image:file://x", "is a URL"),
    ("a\x00b", "control character '\\x00'"),
    ("a + b\x1b[31m", "control character '\\x1b' in the part at character 5"),
])
def test_parse_errors(query, needle):
    with pytest.raises(QueryParseError) as e:
        parse_query(query)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_bounds_and_helpers():
    assert len(parse_query(" + ".join(["x"] * MAX_PARTS))) == MAX_PARTS
    with pytest.raises(QueryParseError, match=f"more than {MAX_PARTS} parts"):
        parse_query(" + ".join(["x"] * (MAX_PARTS + 1)))
    with pytest.raises(QueryParseError, match="is a string"):
        parse_query(b"bytes")  # type: ignore[arg-type]
    assert is_plain_text(parse_query("a dog"))
    assert not is_plain_text(parse_query("2:a dog")) and not is_plain_text(parse_query("- a dog"))
    assert not is_plain_text(parse_query("dog.jpg")) and not is_plain_text(parse_query("a + b"))
    assert format_parts(parse_query('"2:a dog" - x.png')) == "+ 2:text:a dog - 1:image:x.png"
    assert Part(2.0, "text", "x").to_dict() == {"weight": 2.0, "kind": "text", "value": "x"}


def test_command_line_words():
    """The shell splits ``"2:a dog" + photo.jpg - snow`` into words; joined back they parse as typed."""
    words = ["2:a dog", "+", "photo.jpg", "-", "snow", "storm"]
    assert has_sign_word(words) and not has_sign_word(["a dog", "a+b", "-x"])
    assert join_words(words) == '"2:a dog" + "photo.jpg" - "snow storm"'
    assert parts(join_words(words)) == [(2.0, "text", "a dog"), (1.0, "image", "photo.jpg"),
                                        (-1.0, "text", "snow storm")]
    # quotes, backslashes and signs inside a word stay literal
    tricky = ['say "hi" \\ + now', "+", "a - b"]
    assert parts(join_words(tricky)) == [(1.0, "text", 'say "hi" \\ + now'), (1.0, "text", "a - b")]
    assert parts(join_words(["-", "snow"])) == [(-1.0, "text", "snow")]
    with pytest.raises(QueryParseError, match="followed by nothing"):
        parse_query(join_words(["a", "+"]))
    with pytest.raises(QueryParseError, match="two signs"):
        parse_query(join_words(["a", "+", "-", "b"]))


# ----------------------------------------------------------------------------------------------- combining
def _unit(rng, n):
    v = rng.standard_normal(n).astype(np.float32)
    return v / np.linalg.norm(v)


def test_combine_is_normalised_as_a_caption():
    rng = np.random.default_rng(0)
    halves = [(_unit(rng, 8), _unit(rng, 8)) for _ in range(3)]
    w = 0.3
    # one part: used as it is, [w·g, (1−w)·a]; a negative weight flips it
    one = combine([1.0], halves[:1], w)
    assert np.array_equal(one, np.concatenate([w * halves[0][0], (1 - w) * halves[0][1]]))
    assert np.array_equal(combine([5.0], halves[:1], w), one)
    assert np.array_equal(combine([-2.0], halves[:1], w), -one)
    # several: each half summed with the weights and put back to unit length, then weighted w / 1−w
    weights = [2.0, 1.0, -1.0]
    got = combine(weights, halves, w)
    g = sum(k * h[0].astype(np.float64) for k, h in zip(weights, halves, strict=True))
    a = sum(k * h[1].astype(np.float64) for k, h in zip(weights, halves, strict=True))
    want = np.concatenate([w * g / np.linalg.norm(g), (1 - w) * a / np.linalg.norm(a)])
    assert got.dtype == np.float32 and np.allclose(got, want, atol=1e-6)
    assert np.isclose(np.linalg.norm(got[:8]), w) and np.isclose(np.linalg.norm(got[8:]), 1 - w)
    # scaling every weight changes nothing
    assert np.allclose(combine([4.0, 2.0, -2.0], halves, w), got, atol=1e-6)
    # a model without TAB: one half, unit
    g_only = combine([1.0, 1.0], [(h[0], None) for h in halves[:2]], w)
    assert g_only.shape == (8,) and np.isclose(np.linalg.norm(g_only), 1.0)
    # parts that cancel out leave no direction
    with pytest.raises(QueryInputError, match="cancel out"):
        combine([1.0, -1.0], [halves[0], halves[0]], w)
    with pytest.raises(QueryInputError, match="cancel out"):
        combine([2.0, -1.0, -1.0], [halves[1], halves[1], halves[1]], w)


def test_sniff_image():
    assert sniff_image(b"\xff\xd8\xff\xe0rest") == "JPEG"
    assert sniff_image(b"\x89PNG\r\n\x1a\nrest") == "PNG"
    assert sniff_image(b"BM" + b"\0" * 20) == "BMP"
    assert sniff_image(b"RIFF\x10\0\0\0WEBPVP8 ") == "WEBP"
    for not_image in (b"", b"GIF89a", b"RIFF\x10\0\0\0AVI ", b"<svg xmlns=", b"%PDF-1.4", b"\xff\xd8"):
        assert sniff_image(not_image) is None


def test_parsing_imports_neither_torch_nor_the_decoder():
    """``search.py``'s parser is built at every start (``--help`` included): the query modules it imports
    stay light (the extension lists are looked up when a part is classified)."""
    import subprocess
    import sys

    code = ("import sys, clip2video.cli.search, clip2video.search.query_parse; "
            "print([m for m in ('torch', 'av') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])
