"""``search.py query``'s queries: texts, query arithmetic, ``--image``, ``--clip``, ``--like``, in one plan.

Every query becomes a :class:`PlannedQuery`. Plain captions (and every line of ``--queries_file``, taken
literally) go through the batched text path as before; everything else is parsed
(``clip2video.search.query_parse``) and turned into a vector by ``clip2video.search.query_vectors``. Positional
words that hold a standing ``+`` or ``-`` are one query (the shell has split ``"2:a dog" + photo.jpg - snow``
into five words); otherwise each positional argument is its own query, itself possibly arithmetic.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clip2video.cli.common import UsageError
from clip2video.search.query_parse import (
    Part,
    QueryParseError,
    has_sign_word,
    is_plain_text,
    join_words,
    parse_query,
)

MAX_QUERY_CHARS = 10_000


@dataclass
class PlannedQuery:
    label: Any  # what ``--json`` prints as "query": the text, or {"like"|"image"|"clip": ...}, or {"expression"...}
    text: str | None = None  # a plain caption
    like: str | None = None  # --like: videos similar to an indexed one (itself left out)
    parts: list[Part] = field(default_factory=list)  # anything else

    def heading(self) -> str:
        """The line printed above the results in the table output."""
        if isinstance(self.label, str):
            return f"query: {self.label!r}"
        key = next(iter(self.label))
        return f"{key}: {self.label[key]}"


def add_query_args(q: argparse.ArgumentParser) -> None:
    """The flags of the rich queries (``--image``, ``--clip``); ``--like`` and the texts stay with ``query``."""
    q.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="videos like this image (read as a video of one frame); repeatable")
    q.add_argument("--clip", action="append", default=[], metavar="FILE",
                   help="videos like this video file (read with the index's frame settings); repeatable")


def _check_length(i: int, text: str) -> None:
    if not text.strip():
        raise UsageError(f"query {i} is empty")
    if len(text) > MAX_QUERY_CHARS:
        raise UsageError(f"query {i} is {len(text)} characters long; at most {MAX_QUERY_CHARS}")


def _parsed(i: int, text: str) -> list[Part]:
    try:
        parts = parse_query(text)
    except QueryParseError as e:
        raise UsageError(f"query {i} {text[:80]!r}: {e}") from None
    for p in parts:
        if p.kind in ("image", "clip") and not Path(p.value).is_file():
            raise UsageError(f"query {i}: {p.kind} {p.value}: no such file")
    return parts


def plan_queries(args: argparse.Namespace) -> list[PlannedQuery]:
    """The queries the flags ask for, in the order they are answered; usage errors in one line."""
    plan: list[PlannedQuery] = []
    if args.like:
        plan.append(PlannedQuery({"like": args.like}, like=args.like))
    for flag, kind in (("image", "image"), ("clip", "clip")):
        for path in getattr(args, flag, None) or []:
            if not Path(path).is_file():
                raise UsageError(f"--{flag} {path}: no such file")
            plan.append(PlannedQuery({kind: path}, parts=[Part(1.0, kind, path)]))
    words = list(args.texts)
    for i, w in enumerate(words, 1):
        if w not in ("+", "-"):
            _check_length(i, w)
    sources = [join_words(words)] if has_sign_word(words) else words
    for i, text in enumerate(sources, 1):
        parts = _parsed(i, text)
        if is_plain_text(parts):
            plan.append(PlannedQuery(text, text=parts[0].value))  # quotes or text: stripped, the rest as typed
        else:
            plan.append(PlannedQuery({"expression": text, "parts": [p.to_dict() for p in parts]}, parts=parts))
    if args.queries_file:
        path = Path(args.queries_file)
        if not path.is_file():
            raise UsageError(f"--queries_file {path}: no such file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UsageError(f"--queries_file {path}: not UTF-8 text") from None
        n0 = len(sources)
        for i, line in enumerate((ln for ln in lines if ln.strip()), n0 + 1):
            _check_length(i, line)
            plan.append(PlannedQuery(line, text=line))  # a file of captions: each line taken literally
    if not plan:
        raise UsageError("give query texts, --queries_file, --like VIDEO_ID, --image FILE or --clip FILE")
    return plan


def answer(index, plan: list[PlannedQuery], k: Any, *, qb: bool | None = None,
           start: float | None = None) -> list[list[Any]]:
    """The hits of every planned query, in plan order: captions in one batch, the rest one by one.

    ``k`` is a number or a ``moments.SearchRequest`` (grouping, one video, filters). ``qb`` (when not None)
    switches QB-Norm on or off for the captions; the other queries never get it. ``start`` makes ``--like``
    start from the moment of its video that starts there.
    """
    from clip2video.search.query_vectors import QueryEncoder

    out: list[list[Any] | None] = [None] * len(plan)
    texts = [(i, q.text) for i, q in enumerate(plan) if q.text is not None]
    if texts:
        found = index.query([t for _, t in texts], k) if qb is None else index.query([t for _, t in texts], k, qb=qb)
        for (i, _), hits in zip(texts, found, strict=True):
            out[i] = hits
    encoder = QueryEncoder(index)
    for i, q in enumerate(plan):
        if q.like is not None:
            try:
                out[i] = index.similar(q.like, k) if start is None else index.similar(q.like, k, start=start)
            except KeyError:
                if start is not None:
                    raise UsageError(f"--like {q.like} --start {start:g}: no such video moment in "
                                     f"{index.folder}") from None
                raise UsageError(f"--like {q.like}: no such video in {index.folder}") from None
        elif q.parts:
            out[i] = encoder.search(q.parts, k)
    return out
