"""CLIP BPE tokenisation with the sequence rule of the original CLIP2Video.

The BPE itself (lower-casing, ftfy/html clean-up, byte-level BPE with the bundled vocabulary) is open_clip's
``SimpleTokenizer``. What CLIP2Video adds is the sequence rule:

    [start=49406] + at most ``max_words - 2`` BPE tokens + [end=49407], padded with id 0 to ``max_words``

and a mask that is 1 on start, words and end. Unlike open_clip's ``tokenize`` (which keeps the end token by
overwriting the last position) the words are cut *before* the end token is appended, as the original did.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

START_ID = 49406
END_ID = 49407
PAD_ID = 0


@lru_cache(maxsize=1)
def _bpe():
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    if tok.sot_token_id != START_ID or tok.eot_token_id != END_ID:  # pragma: no cover - vocab sanity
        raise RuntimeError("open_clip's BPE vocabulary does not match CLIP's start/end token ids")
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
        self._cache: dict[str, list[int]] = {}

    def bpe_ids(self, caption: str) -> list[int]:
        """BPE ids of a caption without start/end tokens (memoised: captions repeat across epochs)."""
        ids = self._cache.get(caption)
        if ids is None:
            ids = _bpe().encode(caption)
            if len(self._cache) < 1_000_000:
                self._cache[caption] = ids
        return ids

    def __call__(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
        words = self.bpe_ids(caption)[: self.max_words - 2]
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
