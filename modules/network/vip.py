"""CLIP-ViP video proxies (Xue et al., arXiv 2209.06430) on CLIP's own image tower.

One ViT pass per video over ``[P proxy tokens, frame-1 patches, ..., frame-T patches]``:

* proxy 0 is CLIP's class embedding; proxies 1..P−1 are new (``added_cls``);
* proxies take CLIP's position row 0, every frame's patches the spatial rows 1..N; a temporal embedding
  (one row per frame, zero-initialised, linearly interpolated when the frame count differs) is added to patch
  tokens only;
* proxy-guided attention in every block: patches of frame t attend to the proxies and to frame t's patches;
  proxies attend to everything (patches of masked frames excluded, so padding cannot influence the result);
* the video vector is proxy 0 after ``ln_post`` and the visual projection.

The attention is computed blocked rather than with a dense (P+T·N)² mask: the proxies' queries attend over
all keys (P × (P+T·N) scores), and each frame's patch queries attend over [proxies, own patches]
(T × N × (P+N) scores), a factor ~T fewer scores than the dense mask, with no mask tensor at all for the
patches. ``bench_vip.py`` measures both.

Initialisation of ``added_cls``: CLIP's class embedding plus N(0, 0.02) noise. Starting from the class
embedding makes every proxy begin as a CLS-like summary, so with zero temporal embedding the proxy mode starts
as CLIP's own image encoder (what fine-tuning from CLIP needs); the noise breaks the symmetry so the proxies
can specialise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


def temporal_rows(table: torch.Tensor, frames: int) -> torch.Tensor:
    """(F, W) temporal table → (frames, W), linearly interpolated when the frame count differs."""
    if table.shape[0] == frames:
        return table
    x = table.t().unsqueeze(0)  # (1, W, F)
    return F.interpolate(x, size=frames, mode="linear", align_corners=True)[0].t()


class VideoProxyEncoder(nn.Module):
    """Proxy-guided ViT over a video, run with the weights of an open_clip ``VisionTransformer``.

    It owns only what CLIP-ViP adds (``added_cls``, ``temporal_embedding``); the image tower is an argument of
    each call. So the tower's parameters stay under ``clip.visual.*`` (the keys of the release format), with
    no name map and no reference from this module to the tower.

    Args:
        width: the image tower's width.
        num_proxies: P (4 in CLIP-ViP).
        num_frames: length of the temporal embedding table.
    """

    def __init__(self, width: int, num_proxies: int = 4, num_frames: int = 12):
        super().__init__()
        self.added_cls = nn.Parameter(torch.zeros(max(num_proxies - 1, 0), width))
        self.temporal_embedding = nn.Parameter(torch.zeros(num_frames, width))
        self.num_proxies = num_proxies

    @torch.no_grad()
    def reset_parameters(self, class_embedding: torch.Tensor) -> None:
        """Proxies ← CLIP's class embedding + N(0, 0.02) noise; temporal embedding ← 0 (module docstring)."""
        cls = class_embedding.to(self.added_cls)
        self.added_cls.copy_(cls.expand_as(self.added_cls) + 0.02 * torch.randn_like(self.added_cls))
        self.temporal_embedding.zero_()

    def embed(self, visual: nn.Module, frames: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(B, T, 3, H, W) → tokens (B, P + T·N, W) before ln_pre, and N (patches per frame)."""
        vis = visual
        b, t = frames.shape[:2]
        x = vis.conv1(frames.flatten(0, 1))  # (B·T, W, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B·T, N, W)
        n, w = x.shape[1], x.shape[2]
        pos = vis.positional_embedding.to(x.dtype)
        x = x + pos[1:]  # spatial rows for every frame
        x = x.view(b, t, n, w) + temporal_rows(self.temporal_embedding, t).to(x.dtype)[None, :, None]
        proxies = torch.cat([vis.class_embedding[None], self.added_cls], dim=0).to(x.dtype) + pos[0]  # (P, W)
        tokens = torch.cat([proxies.expand(b, -1, -1), x.reshape(b, t * n, w)], dim=1)
        return tokens, n

    def attention(self, attn: nn.MultiheadAttention, x: torch.Tensor, t: int, n: int,
                  key_mask: torch.Tensor) -> torch.Tensor:
        """Proxy-guided attention. x: (B, P + T·N, W); key_mask: (B, P + T·N) bool, True = may be attended."""
        b, length, w = x.shape
        p = self.num_proxies
        h = attn.num_heads
        d = w // h
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(b, length, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, h, L, d)
        # proxies: attend to every token (masked frames excluded)
        proxy_mask = key_mask[:, None, None, :]  # (B, 1, 1, L)
        out_p = F.scaled_dot_product_attention(q[:, :, :p], k, v, attn_mask=proxy_mask)  # (B, h, P, d)
        # patches of frame t: attend to [proxies, frame t's patches]
        def per_frame(z: torch.Tensor) -> torch.Tensor:  # (B, h, T·N, d) → (B·T, h, N, d)
            return z.view(b, h, t, n, d).transpose(1, 2).reshape(b * t, h, n, d)

        kp = k[:, :, :p].unsqueeze(1).expand(b, t, h, p, d).reshape(b * t, h, p, d)
        vp = v[:, :, :p].unsqueeze(1).expand(b, t, h, p, d).reshape(b * t, h, p, d)
        kf = torch.cat([kp, per_frame(k[:, :, p:])], dim=2)  # (B·T, h, P+N, d)
        vf = torch.cat([vp, per_frame(v[:, :, p:])], dim=2)
        out_f = F.scaled_dot_product_attention(per_frame(q[:, :, p:]), kf, vf)  # (B·T, h, N, d)
        out_f = out_f.view(b, t, h, n, d).transpose(1, 2).reshape(b, h, t * n, d)
        out = torch.cat([out_p, out_f], dim=2).transpose(1, 2).reshape(b, length, w)
        return attn.out_proj(out)

    def _block(self, block: nn.Module, x: torch.Tensor, t: int, n: int, key_mask: torch.Tensor) -> torch.Tensor:
        """One pre-LN residual block of the image tower with proxy-guided attention."""
        x = x + self.attention(block.attn, block.ln_1(x), t, n, key_mask)
        return x + block.mlp(block.ln_2(x))

    def forward(self, visual: nn.Module, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """CLIP image tower, (B, T, 3, H, W) frames + (B, T) mask → (B, D) projected proxy-0 feature (not
        normalised)."""
        vis = visual
        b, t = mask.shape
        x, n = self.embed(vis, frames)
        x = vis.ln_pre(x)
        p = self.num_proxies
        key_mask = torch.cat([torch.ones(b, p, dtype=torch.bool, device=mask.device),
                              mask.bool().repeat_interleave(n, dim=1)], dim=1)  # (B, P + T·N)
        ckpt = getattr(vis.transformer, "grad_checkpointing", False) and torch.is_grad_enabled()
        for block in vis.transformer.resblocks:
            if ckpt:
                x = torch.utils.checkpoint.checkpoint(self._block, block, x, t, n, key_mask, use_reentrant=False)
            else:
                x = self._block(block, x, t, n, key_mask)
        pooled = vis.ln_post(x[:, 0])
        return pooled @ vis.proj
