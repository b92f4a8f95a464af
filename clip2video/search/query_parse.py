"""Query arithmetic: ``"2:a dog" + photo.jpg - snow`` → weighted parts (text, image, clip, indexed video).

A query is a sum of parts. Each part is a piece of text, an image file, a video clip file, or a video already in
the index, with a signed weight; the combined query vector is the weighted sum of the parts' vectors
(``query_vectors.py``). The syntax follows the weighted arithmetic rclip (yurijmikhalevich/rclip) accepts on its
command line, written as one strict grammar so that the command line, the HTTP API and the page share it:

    query    := [sign] operand (sign operand)*
    sign     := "+" | "-"                       standing alone: whitespace (or a quote) on both sides
    operand  := bare words | "quoted text"      a quote opens only at the start of an operand;
                                                inside it \\" is a quote and \\\\ a backslash
    content  := [weight ":"] [kind ":"] value   weight: 2, 0.5, .25 (unsigned, > 0, ≤ MAX_WEIGHT)
    kind     := text | image | clip | like      without one: a value ending in an image extension is an
                                                image file, in a video extension a clip file, else text

Quotes only group: what is inside is read as the content of an operand exactly as bare words are (so
``"2:a dog"`` is the text "a dog" with weight 2, the spelling rclip's users know). Bare words run up to the next
standing ``+``/``-``, so ``a well-known dog`` is one text; ``a dog - snow`` is two parts. ``text:`` forces text
(``"text:10:30 train"``, ``text:holiday.jpg``). ``like:ID`` names an indexed video (``--like ID``'s video).
Anything else is refused with one line saying where: an empty query or operand, an unterminated quote, two
signs in a row, a sign with nothing after it, a quoted operand followed by something other than a sign, a signed
or zero or oversized weight, control characters, too many parts, or a URL (nothing is fetched).

The parser knows no files and no index: whether a path exists or an id is indexed is checked by the caller.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

KINDS = ("text", "image", "clip", "like")
MAX_PARTS = 16
MAX_WEIGHT = 1000.0
OPERATORS = "+-"

_WEIGHT = re.compile(r"([+-]?)(\d+(?:\.\d+)?|\.\d+)\s*:(.*)\Z", re.S)
_KIND = re.compile(r"(text|image|clip|like)\s*:(.*)\Z", re.S)


class QueryParseError(ValueError):
    """A malformed query; the message is one line saying what and at which character (1-based)."""


@dataclass(frozen=True)
class Part:
    """One term of a query: ``weight`` (signed) × the vector of ``value`` read as ``kind``."""

    weight: float
    kind: str  # one of KINDS
    value: str  # the text, the file path (or uploaded file name), or the indexed video id

    def to_dict(self) -> dict:
        return {"weight": self.weight, "kind": self.kind, "value": self.value}


def is_plain_text(parts: Sequence[Part]) -> bool:
    """A single text with weight +1: exactly a caption query (the batched text path answers it)."""
    return len(parts) == 1 and parts[0].kind == "text" and parts[0].weight == 1.0


def _is_operator(s: str, i: int) -> bool:
    """A ``+``/``-`` standing alone: start/whitespace/quote before it and end/whitespace/quote after it."""
    n = len(s)
    return (s[i] in OPERATORS and (i == 0 or s[i - 1].isspace() or s[i - 1] == '"')
            and (i + 1 == n or s[i + 1].isspace() or s[i + 1] == '"'))


def _skip_space(s: str, i: int) -> int:
    while i < len(s) and s[i].isspace():
        i += 1
    return i


def _read_quoted(s: str, i: int) -> tuple[str, int]:
    """The text of the quoted operand opening at ``s[i]`` and the index after its closing quote."""
    out: list[str] = []
    j = i + 1
    while j < len(s):
        c = s[j]
        if c == "\\" and j + 1 < len(s) and s[j + 1] in '"\\':
            out.append(s[j + 1])
            j += 2
        elif c == '"':
            return "".join(out), j + 1
        else:
            out.append(c)
            j += 1
    raise QueryParseError(f"unterminated quote at character {i + 1}")


def _check_chars(content: str, at: int) -> None:
    for c in content:
        if unicodedata.category(c) == "Cc" and c not in "\t\n\r":
            raise QueryParseError(f"control character {c!r} in the part at character {at + 1}")


def classify(content: str, sign: float = 1.0, at: int = 0) -> Part:
    """The part an operand's content describes (weight, kind, value); ``at`` (0-based) is for messages."""
    _check_chars(content, at)
    text = content.strip()
    where = f"the part at character {at + 1}"
    weight = 1.0
    m = _WEIGHT.match(text)
    if m:
        if m.group(1):
            raise QueryParseError(f"{where}: a weight takes no sign ({text[:40]!r}); put + or - before the part")
        weight = float(m.group(2))
        if not 0 < weight <= MAX_WEIGHT:
            raise QueryParseError(f"{where}: weight {m.group(2)} must be above 0 and at most {MAX_WEIGHT:g}")
        text = m.group(3).strip()
        if not text:
            raise QueryParseError(f"{where}: weight {m.group(2)}: is followed by nothing")
    m = _KIND.match(text)
    if m:
        kind, value = m.group(1), m.group(2).strip()
        if not value:
            raise QueryParseError(f"{where}: {kind}: is followed by nothing")
    else:
        from clip2video.dataloaders.video_io import VIDEO_EXTS  # here: the command line imports this module early
        from clip2video.search.build import IMAGE_EXTS  # what a frame folder's frames are

        value = text
        low = value.lower()
        kind = "image" if low.endswith(IMAGE_EXTS) else "clip" if low.endswith(VIDEO_EXTS) else "text"
    if kind in ("image", "clip") and "://" in value:
        raise QueryParseError(f"{where}: {value[:60]!r} is a URL; nothing is fetched: save the file and give its path")
    return Part(sign * weight, kind, value)


def parse_query(query: str, *, max_parts: int = MAX_PARTS) -> list[Part]:
    """The parts of a query string (see the module doc); QueryParseError with one line when malformed."""
    if not isinstance(query, str):
        raise QueryParseError(f"a query is a string, got {type(query).__name__}")
    s, n = query, len(query)
    i = _skip_space(s, 0)
    if i == n:
        raise QueryParseError("empty query")
    sign, op_at = 1.0, None
    if _is_operator(s, i):
        sign, op_at = (1.0 if s[i] == "+" else -1.0), i
        i = _skip_space(s, i + 1)
    parts: list[Part] = []
    while True:
        if i == n:
            raise QueryParseError(f"{s[op_at]!r} at character {op_at + 1} is followed by nothing")
        if _is_operator(s, i):
            raise QueryParseError(f"two signs in a row at character {i + 1}")
        start = i
        if s[i] == '"':
            content, i = _read_quoted(s, i)
            if not content.strip():
                raise QueryParseError(f"empty quoted part at character {start + 1}")
            j = _skip_space(s, i)
            if j < n and not _is_operator(s, j):
                raise QueryParseError(f"expected + or - after the quoted part that ends at character {i}, "
                                      f"got {s[j:j + 20]!r}")
            i = j
        else:
            j = i
            while j < n and not (_is_operator(s, j) and s[j - 1].isspace()):
                j += 1
            content, i = s[start:j], j
        parts.append(classify(content, sign, start))
        if len(parts) > max_parts:
            raise QueryParseError(f"more than {max_parts} parts")
        if i == n:
            return parts
        sign, op_at = (1.0 if s[i] == "+" else -1.0), i
        i = _skip_space(s, i + 1)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def join_words(words: Sequence[str]) -> str:
    """Command-line words (the shell has removed its quotes) as one query string: each standing ``+``/``-``
    is a sign, and the words between two signs are one operand (quoted, so signs and quotes inside stay
    literal). ``['2:a dog', '+', 'photo.jpg']`` → ``"2:a dog" + "photo.jpg"``."""
    out: list[str] = []
    group: list[str] = []
    for w in words:
        if w in ("+", "-"):
            if group:
                out.append(_quote(" ".join(group)))
                group = []
            out.append(w)
        else:
            group.append(w)
    if group:
        out.append(_quote(" ".join(group)))
    return " ".join(out)


def has_sign_word(words: Sequence[str]) -> bool:
    """Whether command-line words hold a standing ``+``/``-`` (they are then one query, not one per word)."""
    return any(w in ("+", "-") for w in words)


def format_parts(parts: Sequence[Part]) -> str:
    """A canonical spelling of parsed parts (``+ 2:text:a dog - 1:image:photo.jpg``), for logs and tests."""
    return " ".join(f"{'+' if p.weight > 0 else '-'} {abs(p.weight):g}:{p.kind}:{p.value}" for p in parts)
