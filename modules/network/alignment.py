"""Temporal Alignment Block (TAB): soft assignment of tokens to K shared centres.

For tokens ρ_i (B, N, D) with mask m_i, centres c_j (``weight_center``) and ĉ_j (``emb_center``), K × D:

    a_ij = softmax_j(ρ_i · c_j)
    r_j  = Σ_i m_i · a_ij · (ρ_i − ĉ_j)
    out  = l2n(mean_j l2n(r_j))

The same function aligns caption tokens and video tokens; sharing the centres is what aligns the two
modalities (the paper's "shared semantic centres", a NetVLAD-style residual aggregation).
"""

from __future__ import annotations

import torch

from .temporal import l2n


def align_tokens(
    tokens: torch.Tensor, mask: torch.Tensor, weight_center: torch.Tensor, emb_center: torch.Tensor
) -> torch.Tensor:
    """(B, N, D) tokens + (B, N) mask → (B, D) L2-normalised aligned vector."""
    assign = torch.softmax(tokens @ weight_center.t(), dim=-1)  # (B, N, K)
    assign = assign * mask.to(assign.dtype).unsqueeze(-1)  # masked tokens take no part
    # Σ_i a_ij (ρ_i − ĉ_j) = Σ_i a_ij ρ_i − (Σ_i a_ij) ĉ_j: two small matmuls instead of the (B, N, K, D)
    # residual tensor the original materialised (same value up to float rounding, ~1e-7).
    per_center = assign.transpose(1, 2) @ tokens - assign.sum(dim=1).unsqueeze(-1) * emb_center  # (B, K, D)
    return l2n(l2n(per_center).mean(dim=1))
