"""CLIP towers (from open_clip) and the two calls CLIP2Video makes of them.

open_clip provides the model code and the OpenAI weight layout; parameter names are identical to OpenAI's
(``visual.conv1.weight``, ``transformer.resblocks.0.attn.in_proj_weight``, ...), which is what the released
CLIP2Video checkpoints store under ``clip.``. What this module adds:

* ``ClipConfig``: the architecture, read from a state dict (width, layers, patch, resolution), so tiny test
  models and ViT-B/32, B/16, L/14 go through the same code;
* ``text_tokens``: token features for *every* position of a ``max_words``-long sequence, with the causal
  mask cut to that length (the original never ran 77 tokens), LayerNorm and projection on every token;
* ``frame_features``: the image tower's projected class token, per frame;
* :class:`QuickGELU`: the same activation as OpenAI's, with a lighter backward (below).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

# Integer buffers that OpenAI's ViT-B-32.pt carries next to the weights; they are not parameters.
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass
class ClipConfig:
    """CLIP architecture (OpenAI ViT layout). Heads are width // 64 in both towers, as in OpenAI CLIP."""

    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12

    @property
    def text_heads(self) -> int:
        return max(1, self.text_width // 64)

    @property
    def vision_heads(self) -> int:
        return max(1, self.vision_width // 64)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ClipConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @classmethod
    def vit_b_32(cls) -> ClipConfig:
        return cls()

    @classmethod
    def tiny(cls, image_size: int = 32, patch_size: int = 16, vocab_size: int = 49408) -> ClipConfig:
        """A small CLIP for tests and the CPU demo. Width 128 gives the temporal heads 2 attention heads, so
        the original mask layout (which only shows with several heads) is exercised too."""
        return cls(
            embed_dim=128,
            image_size=image_size,
            patch_size=patch_size,
            vision_width=64,
            vision_layers=2,
            context_length=77,
            vocab_size=vocab_size,
            text_width=128,
            text_layers=2,
        )

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "") -> ClipConfig:
        """Read the architecture from OpenAI-layout weights (optionally under ``prefix``, e.g. ``clip.``)."""

        def get(key: str) -> torch.Tensor:
            if prefix + key not in sd:
                raise KeyError(f"CLIP weights lack '{prefix}{key}': not an OpenAI-layout ViT CLIP state dict")
            return sd[prefix + key]

        conv = get("visual.conv1.weight")
        names = [k[len(prefix) :] for k in sd if k.startswith(prefix)]
        vision_layers = len({k.split(".")[3] for k in names if k.startswith("visual.transformer.resblocks.")})
        text_layers = len({k.split(".")[2] for k in names if k.startswith("transformer.resblocks.")})
        grid = round((get("visual.positional_embedding").shape[0] - 1) ** 0.5)
        return cls(
            embed_dim=get("text_projection").shape[1],
            image_size=conv.shape[-1] * grid,
            patch_size=conv.shape[-1],
            vision_width=conv.shape[0],
            vision_layers=vision_layers,
            context_length=get("positional_embedding").shape[0],
            vocab_size=get("token_embedding.weight").shape[0],
            text_width=get("ln_final.weight").shape[0],
            text_layers=text_layers,
        )


class _QuickGELUFn(torch.autograd.Function):
    """``x · σ(1.702 x)`` whose backward keeps only ``x``.

    The forward runs exactly OpenAI's three operations, so outputs are bit-identical to CLIP's. Autograd on
    those operations would keep two (N, 4W) tensors per MLP (``x`` and ``σ(1.702x)``) and run five kernels in
    backward; but d/dx[x σ(1.702x)] = σ(z)(1 + z(1 − σ(z))) with z = 1.702x, which is exactly SiLU's
    derivative at z, a single fused kernel (``aten.silu_backward``). So we keep ``x`` only and backward is
    one scale plus that kernel: fewer kernels in backward and one (N, 4W) tensor less per block (the effect on
    a training step is measured by ``benchmarks/bench_train_step.py``). Gradients agree with autograd's to
    1 ulp (tests/test_model.py).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        (x,) = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad, 1.702 * x)


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation ``x · σ(1.702 x)``, with :class:`_QuickGELUFn`'s backward when grads flow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuickGELUFn.apply(x)
        return x * torch.sigmoid(1.702 * x)


def use_fast_quick_gelu(model: nn.Module) -> nn.Module:
    """Swap every open_clip ``QuickGELU`` module of ``model`` for ours (no parameters, same outputs)."""
    for module in model.modules():
        for name, child in module.named_children():
            if type(child).__name__ == "QuickGELU" and not isinstance(child, QuickGELU):
                setattr(module, name, QuickGELU())
    return model


def build_clip(cfg: ClipConfig) -> nn.Module:
    """An fp32 open_clip CLIP with OpenAI's layout and QuickGELU (what OpenAI's weights were trained with).

    The activation modules are ours (:class:`QuickGELU`): same forward, cheaper backward.
    """
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(
        layers=cfg.vision_layers,
        width=cfg.vision_width,
        head_width=64 if cfg.vision_width >= 64 else cfg.vision_width,
        patch_size=cfg.patch_size,
        image_size=cfg.image_size,
    )
    text = CLIPTextCfg(
        context_length=cfg.context_length,
        vocab_size=cfg.vocab_size,
        width=cfg.text_width,
        heads=cfg.text_heads,
        layers=cfg.text_layers,
    )
    model = CLIP(cfg.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    return use_fast_quick_gelu(model.float())


def text_tokens(clip: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Token features of every position: (B, L) ids → (B, L, D) after ln_final and the text projection.

    Runs only the L given positions (first L rows of the positional table, causal mask cut to L×L), as the
    original did; position i only sees positions ≤ i, so the end-token feature equals CLIP's own.
    """
    length = ids.shape[1]
    if length > clip.positional_embedding.shape[0]:
        raise ValueError(f"text length {length} exceeds CLIP's context length {clip.positional_embedding.shape[0]}")
    x = clip.token_embedding(ids) + clip.positional_embedding[:length]  # (B, L, W)
    mask = clip.attn_mask[:length, :length].to(dtype=x.dtype, device=x.device)  # causal, -inf above diag
    x = clip.transformer(x, attn_mask=mask)  # open_clip transformers are batch-first
    x = clip.ln_final(x)
    return x @ clip.text_projection  # (B, L, D)


def frame_features(clip: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) normalised images → (N, D) projected class-token features (ln_post then proj)."""
    return clip.visual(images)
