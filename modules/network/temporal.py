"""Temporal transformers and the Temporal Difference Block (TDB) of CLIP2Video.

The blocks are CLIP-style residual attention blocks (pre-LN with the original's ε = 1e-12 ``TemporalLayerNorm``,
MLP ×4 with the backbone's activation: QuickGELU for OpenAI weights) with parameter names identical to the
original's ``transformerClip`` / ``frame2t_attention`` / ``actionClip`` modules, so a released state dict loads
without renaming.

Attention-mask layout (a property of the model, see ``MASK_LAYOUTS``): the original repeated the (B, L, L)
key mask ``heads`` times along dim 0 (``mask.repeat(heads, 1, 1)``), but ``nn.MultiheadAttention`` reads a
(B·heads, L, L) mask batch-major. Head h of video b therefore used the key mask of video (b·heads + h) mod B.
The released checkpoints were trained and evaluated that way, so ``original`` reproduces it; ``per_video``
gives every video its own mask (what one means, and the only layout under which a video's vector depends on
that video alone).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from .backbone import activation_module

MASK_LAYOUTS = ("original", "per_video")
NEG = -1000000.0  # the original's additive mask value; kept because it changes fp32 rounding of scores


class TemporalLayerNorm(nn.LayerNorm):
    """The LayerNorm of the original's temporal blocks: BERT/TF style, ε = 1e-12 inside the square root.

    The original's temporal transformers are not built from CLIP's blocks but from its ``module_cross`` ones,
    whose LayerNorm is ``(x − mean) / sqrt(var + 1e-12) · w + b`` rather than torch's ε = 1e-5. The
    difference is small per token, but it decides how scores round in heads whose keys are all masked (a score
    s − 1e6 in fp32 keeps s only on a 0.0625 grid), and there it moves video vectors by orders more.
    Computed in float32 whatever the input dtype, like CLIP's own LayerNorm under reduced precision.
    """

    def __init__(self, width: int):
        super().__init__(width, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        mean = h.mean(-1, keepdim=True)
        var = (h - mean).pow(2).mean(-1, keepdim=True)
        h = (h - mean) / torch.sqrt(var + self.eps)
        return (self.weight.float() * h + self.bias.float()).to(x.dtype)


class ResidualBlock(nn.Module):
    """Pre-LN transformer block; names (attn, ln_1, mlp.c_fc, mlp.c_proj, ln_2) follow OpenAI CLIP."""

    def __init__(self, width: int, heads: int, activation: str = "quick_gelu"):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)  # sequence-first, like the original
        self.ln_1 = TemporalLayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, width * 4)), ("gelu", activation_module(activation)),
                 ("c_proj", nn.Linear(width * 4, width))]
            )
        )
        self.ln_2 = TemporalLayerNorm(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        # x: (L, B, D) ; attn_mask: (B·heads, L, L) additive
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class TemporalTransformer(nn.Module):
    """Stack of ``ResidualBlock`` over a (B, L, D) token sequence with a (B, L) key mask.

    Args:
        width: token width.
        layers: number of blocks.
        heads: attention heads.
        activation: MLP activation (``quick_gelu`` | ``gelu``).
    """

    def __init__(self, width: int, layers: int, heads: int, activation: str = "quick_gelu"):
        super().__init__()
        self.heads = heads
        self.resblocks = nn.ModuleList([ResidualBlock(width, heads, activation) for _ in range(layers)])

    def head_mask(self, key_mask: torch.Tensor, layout: str, dtype: torch.dtype) -> torch.Tensor:
        """(B, L) 0/1 key mask → (B·heads, L, L) additive mask in the requested layout."""
        b, length = key_mask.shape
        add = (1.0 - key_mask.to(dtype)) * NEG  # (B, L)
        add = add.unsqueeze(1).expand(b, length, length)  # (B, L_query, L_key)
        if layout == "original":
            # Quirk of the original (kept on purpose): tiling instead of interleaving means head h of
            # video b masks with video (b·heads + h) mod B's frames. Changes numbers; see module docstring.
            return add.repeat(self.heads, 1, 1)
        if layout == "per_video":
            return add.repeat_interleave(self.heads, dim=0)
        raise ValueError(f"mask_layout must be one of {MASK_LAYOUTS}, got {layout!r}")

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, layout: str) -> torch.Tensor:
        # x: (B, L, D), key_mask: (B, L) → (B, L, D)
        mask = self.head_mask(key_mask, layout, x.dtype)
        x = x.transpose(0, 1)  # (L, B, D)
        for block in self.resblocks:
            x = block(x, mask)
        return x.transpose(0, 1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of (B, N, D) where mask (B, N) is 1; the count is clamped to ≥ 1 as the original."""
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, N, 1)
    total = (x * m).sum(dim=1)
    count = m.sum(dim=1).clamp(min=1.0)
    return total / count


def l2n(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise along the last dim (no epsilon, like the original: a zero vector is a bug upstream)."""
    return x / x.norm(dim=-1, keepdim=True)


def interleave(frames: torch.Tensor, diffs: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) frames and (B, T−1, ...) differences → (B, 2T−1, ...) as f0, d1, f1, ..., d_{T−1}, f_{T−1}."""
    b, t = frames.shape[:2]
    out = frames.new_empty((b, 2 * t - 1, *frames.shape[2:]))
    out[:, 0::2] = frames
    out[:, 1::2] = diffs
    return out


def difference_tokens(
    frames: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    types: torch.Tensor,
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TDB: difference tokens between adjacent frames, interleaved with the frame tokens.

    A function of the tables and the difference encoder it is given rather than a module: the parameters it
    uses stay the model's own attributes (``frame_position_embeddings``, ``type_position_embeddings``,
    ``frame2t_attention`` / ``frame2t_projection``, ``trans_layernorm``), so ``state_dict()`` keeps the
    original's flat names, which is the release format, with no name map; and the position table is shared
    with the temporal transformer's plain (no-TDB) path, so a TDB module could not own it anyway. The same
    function serves the global branch (12 frames) and the TAB branch (the 6 even frames).

    Args:
        frames: (B, T, D) frame features.
        mask: (B, T) frame mask.
        positions: (≥ T, D) frame position table.
        types: (2, D) type table; row 1 marks frame tokens, row 0 difference tokens.
        encode: raw differences d_i = f_i − f_{i−1} (B, T−1, D) and their key mask (B, T−1) (that of frame i)
            → encoded differences (B, T−1, D).

    Returns:
        x: (B, 2T−1, D) tokens + positions + types, ready for a temporal transformer.
        token_mask: (B, 2T−1) key mask.
        raw: (B, 2T−1, D) tokens before positions/types (TDB-All pools over them as residuals).
    """
    t = frames.shape[1]
    diffs = encode(frames[:, 1:] - frames[:, :-1], mask[:, 1:])  # (B, T-1, D)
    raw = interleave(frames, diffs)  # (B, 2T-1, D)
    # Difference d_i sits between f_{i-1} and f_i and takes position P[i-1] and mask m_{i-1} (not m_i):
    # so the difference after a video's last real frame is attended to, and through it CLIP's embedding
    # of the all-zero padding frame leaks into the result. Kept: the released weights expect it.
    pos = interleave(positions[None, :t], positions[None, : t - 1])  # (1, 2T-1, D)
    typ = interleave(types[None, 1:2].expand(1, t, -1), types[None, 0:1].expand(1, t - 1, -1))  # (1, 2T-1, D)
    token_mask = interleave(mask, mask[:, :-1])  # (B, 2T-1)
    x = raw + pos + typ
    return x, token_mask, raw
