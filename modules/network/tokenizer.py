"""CLIP BPE tokenisation with the sequence rule of the original CLIP2Video.

The BPE is CLIP's, implemented here (``_ByteBPE``) so that tokenising never imports open_clip (whose package
import pulls in torchvision, timm and torch._dynamo): ftfy and double html clean-up, whitespace folding,
lower-casing, the CLIP pre-tokenising regex, byte-level BPE with CLIP's vocabulary file
(``bpe_simple_vocab_16e6.txt.gz``, shipped in this package under ``clip2video/assets/`` with CLIP's MIT licence
beside it, so tokenising depends on no other package's install layout). It gives the same
ids and the same decoded text as open_clip's ``SimpleTokenizer`` (checked in ``tests/test_tokenizer.py``).
What CLIP2Video adds is the sequence rule:

    [start=49406] + at most ``max_words - 2`` BPE tokens + [end=49407], padded with id 0 to ``max_words``

and a mask that is 1 on start, words and end. Unlike open_clip's ``tokenize`` (which keeps the end token by
overwriting the last position) the words are cut *before* the end token is appended, as the original did.
"""

from __future__ import annotations

import gzip
import html
import importlib.resources
from collections.abc import Sequence
from functools import lru_cache
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np
import torch

from clip2video.modules.runtime.lru import BoundedLRU

if TYPE_CHECKING:  # importlib.resources.abc is 3.11+; the package supports 3.10
    from importlib.resources.abc import Traversable

# CLIP's BPE ids: 256 bytes, their 256 end-of-word forms, 48,894 merges, then the two special tokens.
START_ID = 49406  # <start_of_text>
END_ID = 49407  # <end_of_text>
PAD_ID = 0
VOCAB_SIZE = END_ID + 1  # the rows of CLIP's token embedding

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# Memo sizes in bytes (estimated): a word memo holds a caption set's vocabulary (MSR-VTT's ~30k words take
# ~3 MB); a caption memo is a convenience for training epochs. Both are LRU, so a server fed endless distinct
# queries keeps a bounded footprint instead of growing by every query (measured in tests/test_reliability.py).
WORD_MEMO_BYTES = 4 << 20
CAPTION_MEMO_BYTES = 4 << 20
_N_MERGES = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of the file (after its header line)
_SPECIAL = ("<start_of_text>", "<end_of_text>")
_WORD_END = "</w>"


class ByteLRU(BoundedLRU):
    """The tokenizer's memos: keys are str, values tuples/lists of small ints, so an entry costs the key's
    characters, 8 bytes per element and CPython's per-object overheads (checked against ``tracemalloc`` in the
    tests)."""

    @staticmethod
    def cost(key: str, value: Sequence[int]) -> int:
        return 300 + len(key) * (1 if key.isascii() else 4) + 8 * len(value)


def _vocab_path() -> Traversable:
    """CLIP's BPE vocabulary as shipped in this package (``clip2video/assets``), through the package's resources
    so that it is found in a checkout, an installed wheel or a zipped install alike."""
    path = importlib.resources.files("clip2video") / "assets" / VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"CLIP's BPE vocabulary {VOCAB_FILE} not found at {path}; the clip2video "
                                "installation is incomplete (reinstall it)")
    return path


def _byte_alphabet() -> tuple[list[int], list[str]]:
    """CLIP's 256 byte symbols: (byte values, the character standing for each), in vocabulary order.

    Bytes that are visible Latin-1 characters stand for themselves and come first, in byte order; the other
    68 bytes (controls, space, DEL, NBSP, soft hyphen, ...) follow in byte order, standing for U+0100, U+0101, ...
    """
    visible = [b for b in range(256) if (0x21 <= b <= 0x7E) or (0xA1 <= b <= 0xFF and b != 0xAD)]
    hidden = sorted(set(range(256)) - set(visible))
    return visible + hidden, [chr(b) for b in visible] + [chr(0x100 + k) for k in range(len(hidden))]


class _ByteBPE:
    """CLIP's byte-level BPE (Radford et al. 2021), as in OpenAI's and open_clip's tokenisers."""

    def __init__(self, path: Traversable):
        import ftfy
        import regex

        self._fix_text = ftfy.fix_text
        order, alphabet = _byte_alphabet()
        self._byte_char = [""] * 256  # byte value -> its stand-in character
        for b, ch in zip(order, alphabet, strict=True):
            self._byte_char[b] = ch
        self._char_byte = {ch: b for b, ch in zip(order, alphabet, strict=True)}

        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")[1 : _N_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        symbols = alphabet + [ch + _WORD_END for ch in alphabet] + ["".join(m) for m in merges] + list(_SPECIAL)
        self._id = {s: i for i, s in enumerate(symbols)}
        self._symbol = symbols
        self._rank = {m: r for r, m in enumerate(merges)}
        # a raw pre-token -> its ids (LRU, bounded in bytes); the special tokens, which the regex keeps whole,
        # are answered before it
        self._specials: dict[str, tuple[int, ...]] = {s: (self._id[s],) for s in _SPECIAL}
        self._memo = ByteLRU(WORD_MEMO_BYTES)
        self._split = regex.compile(
            "|".join(_SPECIAL) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        ).findall

    def clean(self, text: str) -> str:
        text = html.unescape(html.unescape(self._fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def _merge(self, token: str) -> tuple[int, ...]:
        """Ids of one pre-token: its bytes as characters, the last marked end-of-word, pairs merged by rank."""
        chars = [self._byte_char[b] for b in token.encode("utf-8")]
        parts = chars[:-1] + [chars[-1] + _WORD_END]
        rank = self._rank
        while len(parts) > 1:
            best, best_rank = None, len(rank)
            for pair in pairwise(parts):
                r = rank.get(pair, best_rank)
                if r < best_rank:
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            joined, merged, i, n = first + second, [], 0, len(parts)
            while i < n:
                if parts[i] == first and i + 1 < n and parts[i + 1] == second:
                    merged.append(joined)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self._id[p] for p in parts)

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """BPE ids of ``text``; with ``limit``, the pre-tokens after the first ``limit`` ids are not merged
        (the ids returned then start with the same ``limit`` ids as the full encoding, which is all a caption
        cut to ``max_words`` uses; a 1,000-character query then costs a few words' merging)."""
        ids: list[int] = []
        memo, specials = self._memo, self._specials
        for token in self._split(self.clean(text)):
            if limit is not None and len(ids) >= limit:
                break
            got = specials.get(token) or memo.get(token)
            if got is None:
                got = self._merge(token)
                memo.put(token, got)
            ids.extend(got)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        chars = "".join(self._symbol[int(i)] for i in ids)
        data = bytes(self._char_byte[c] for c in chars)
        return data.decode("utf-8", errors="replace").replace(_WORD_END, " ")


@lru_cache(maxsize=1)
def _bpe() -> _ByteBPE:
    """The process's BPE, built on first use (a mere import of this module reads no vocabulary)."""
    tok = _ByteBPE(_vocab_path())
    if tok._id[_SPECIAL[0]] != START_ID or tok._id[_SPECIAL[1]] != END_ID:  # pragma: no cover - vocab sanity
        raise RuntimeError(f"{VOCAB_FILE} does not give CLIP's start/end token ids")
    return tok


class ClipTokenizer:
    """Callable caption → (ids, mask), both int64 arrays of length ``max_words``.

    Args:
        max_words: total sequence length including start and end tokens (the original's ``--max_words``).
    """

    def __init__(self, max_words: int = 32):
        if max_words < 2:
            raise ValueError(f"max_words must be >= 2 (start + end token), got {max_words}")
        self.max_words = max_words
        self._cache = ByteLRU(CAPTION_MEMO_BYTES)  # caption -> its first max_words - 2 ids

    def bpe_ids(self, caption: str) -> list[int]:
        """BPE ids of a caption without start/end tokens (all of them, not memoised)."""
        return _bpe().encode(caption)

    def _words(self, caption: str) -> tuple[int, ...]:
        """The caption's first ``max_words - 2`` BPE ids (memoised: captions repeat across epochs)."""
        ids = self._cache.get(caption)
        if ids is None:
            n = self.max_words - 2
            ids = tuple(_bpe().encode(caption, limit=n)[:n])
            self._cache.put(caption, ids)
        return ids

    def __call__(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
        words = self._words(caption)
        seq = [START_ID, *words, END_ID]
        ids = np.full(self.max_words, PAD_ID, dtype=np.int64)
        mask = np.zeros(self.max_words, dtype=np.int64)
        ids[: len(seq)] = seq
        mask[: len(seq)] = 1
        return ids, mask

    def batch(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise a list of captions → ids (N, L) long, mask (N, L) long."""
        if len(captions) == 0:
            z = torch.zeros(0, self.max_words, dtype=torch.long)
            return z, z.clone()
        pairs = [self(c) for c in captions]
        ids = torch.from_numpy(np.stack([p[0] for p in pairs]))
        mask = torch.from_numpy(np.stack([p[1] for p in pairs]))
        return ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a sequence of ids, special and padding tokens dropped (for logs and figures)."""
        keep = [int(i) for i in ids if int(i) not in (START_ID, END_ID, PAD_ID)]
        return _bpe().decode(keep).strip()


def real_length(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Number of leading positions of a (B, L) batch that hold a real token in some row (start, words, end).

    Under CLIP's causal mask, position i attends to positions ≤ i only, so the features of positions before
    this length do not depend on the padding after it: the text tower may run on ``ids[:, :n]`` and give the
    same end-token features and the same masked TAB tokens. A position counts as real where its id is not
    padding or its mask is set, so a mask with holes or ids without an end token are still covered.
    """
    if ids.shape[1] == 0:
        return 0
    real = (ids != PAD_ID) | (mask != 0)  # (B, L)
    positions = torch.arange(1, ids.shape[1] + 1, device=ids.device)
    return int((real * positions).amax()) if real.numel() else ids.shape[1]
