"""Temporal transformers and the Temporal Difference Block (TDB) of CLIP2Video.

The blocks are CLIP residual attention blocks (pre-LN, MLP ×4 with the backbone's activation: QuickGELU for
OpenAI weights) with parameter names identical to
the original's ``transformerClip`` / ``frame2t_attention`` / ``actionClip`` modules, so a released state dict
loads without renaming.

Attention-mask layout (a property of the model, see ``MASK_LAYOUTS``): the original repeated the (B, L, L)
key mask ``heads`` times along dim 0 (``mask.repeat(heads, 1, 1)``), but ``nn.MultiheadAttention`` reads a
(B·heads, L, L) mask batch-major. Head h of video b therefore used the key mask of video (b·heads + h) mod B.
The released checkpoints were trained and evaluated that way, so ``original`` reproduces it; ``per_video``
gives every video its own mask (what one means, and the only layout under which a video's vector depends on
that video alone).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .backbone import activation_module

MASK_LAYOUTS = ("original", "per_video")
NEG = -1000000.0  # the original's additive mask value; kept because it changes fp32 rounding of scores


class ResidualBlock(nn.Module):
    """Pre-LN transformer block; names (attn, ln_1, mlp.c_fc, mlp.c_proj, ln_2) follow OpenAI CLIP."""

    def __init__(self, width: int, heads: int, activation: str = "quick_gelu"):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)  # sequence-first, like the original
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, width * 4)), ("gelu", activation_module(activation)),
                 ("c_proj", nn.Linear(width * 4, width))]
            )
        )
        self.ln_2 = nn.LayerNorm(width)

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


class DifferenceBlock(nn.Module):
    """TDB: difference tokens between adjacent frames, interleaved with the frame tokens.

    This module holds no parameters of its own; it borrows the model's tables (``frame_position_embeddings``,
    ``type_position_embeddings``) and difference encoders (``frame2t_attention`` or ``frame2t_projection``,
    ``trans_layernorm``) so that the state dict keeps the original's flat names. The same block serves the
    global branch (12 frames) and the TAB branch (the 6 even frames).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self._model = [model]  # list: do not register the parent as a submodule

    def differences(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, D) frame features → (B, T−1, D) encoded differences d_i = f_i − f_{i−1}."""
        m = self._model[0]
        cfg = m.config
        t = frames.shape[1]
        d = frames[:, 1:] - frames[:, :-1]  # (B, T-1, D)
        if cfg.temporal_proj == "sigmoid_mlp":
            d = 2 * torch.sigmoid(m.trans_layernorm(d @ m.frame2t_projection)) - 1
        elif cfg.temporal_proj == "sigmoid_selfA":
            pos = m.frame_position_embeddings.weight[1:t]  # d_i takes P[i] inside the difference attention
            d = m.frame2t_attention(d + pos, mask[:, 1:], cfg.mask_layout)  # key mask m_i of frame i
            d = 2 * torch.sigmoid(m.trans_layernorm(d)) - 1
        return d

    def forward(
        self, frames: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Interleaved tokens with position + type embeddings added, their mask, and the raw tokens.

        Returns:
            x: (B, 2T−1, D) tokens + positions + types, ready for a temporal transformer.
            token_mask: (B, 2T−1) key mask.
            raw: (B, 2T−1, D) tokens before positions/types (TDB-All pools over them as residuals).
        """
        m = self._model[0]
        t = frames.shape[1]
        diffs = self.differences(frames, mask)
        raw = interleave(frames, diffs)  # (B, 2T-1, D)
        table = m.frame_position_embeddings.weight
        # Difference d_i sits between f_{i-1} and f_i and takes position P[i-1] and mask m_{i-1} (not m_i):
        # so the difference after a video's last real frame is attended to, and through it CLIP's embedding
        # of the all-zero padding frame leaks into the result. Kept: the released weights expect it.
        pos = interleave(table[None, :t], table[None, : t - 1])  # (1, 2T-1, D)
        types = m.type_position_embeddings.weight  # row 1: frame token, row 0: difference token
        typ = interleave(types[None, 1:2].expand(1, t, -1), types[None, 0:1].expand(1, t - 1, -1))  # (1, 2T-1, D)
        token_mask = interleave(mask, mask[:, :-1])  # (B, 2T-1)
        x = raw + pos + typ
        return x, token_mask, raw
