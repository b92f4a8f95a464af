"""CLIP's towers and the two calls CLIP2Video makes of them.

The towers (:class:`Clip`) are CLIP's ViT in OpenAI's weight layout; parameter names are OpenAI's
(``visual.conv1.weight``, ``transformer.resblocks.0.attn.in_proj_weight``, ...), which is what the released
CLIP2Video checkpoints store under ``clip.``, and what open_clip's models hold. What this module adds:

* :class:`Clip`: the towers themselves (image tower ``visual``, text tower parts at the top level);
* ``ClipConfig``: the architecture, read from a state dict (width, layers, patch, resolution, MLP width),
  plus what the tensors cannot tell (activation, head width, the image normalisation the weights were trained
  with, the open_clip architecture name), so tiny test models and ViT-B/32, B/16, L/14, L/14@336 from OpenAI
  or open_clip go through the same code (reading weight files: ``modules/weights/clip_weights.py``);
* ``text_tokens``: token features for *every* position of a ``max_words``-long sequence, with the causal
  mask cut to that length (the original never ran 77 tokens), LayerNorm and projection on every token;
* ``frame_features``: the image tower's projected class token, per frame;
* :class:`QuickGELU`: the same activation as OpenAI's, with a lighter backward (below).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .tokenizer import VOCAB_SIZE

# Integer buffers that OpenAI's ViT-B-32.pt carries next to the weights; they are not parameters.
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
# Image normalisation of OpenAI CLIP, which most open_clip weights were trained with too.
OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = ("quick_gelu", "gelu")  # OpenAI's x·σ(1.702x), torch's exact GELU (most open_clip weights)
# Fields a state dict determines; the others are recorded beside the weights (checkpoint config).
SHAPE_FIELDS = ("embed_dim", "image_size", "patch_size", "vision_width", "vision_layers", "context_length",
                "vocab_size", "text_width", "text_layers", "vision_mlp_width", "text_mlp_width")


@dataclass
class ClipConfig:
    """CLIP architecture (OpenAI ViT layout) and what the weights were trained with.

    Attributes:
        vision_mlp_width / text_mlp_width: hidden width of the MLPs; 0 means 4 × width (every OpenAI model).
        vision_head_width / text_head_width: width of one attention head (64 in OpenAI's and open_clip's
            ViT CLIPs); a tower narrower than that has one head.
        activation: ``quick_gelu`` (OpenAI weights; the temporal heads use it too) or ``gelu``.
        image_mean / image_std: per-channel normalisation the weights were trained with (frames arrive in
            OpenAI's and are converted by :func:`to_backbone_normalisation`).
        model_name: open_clip architecture name when known (``ViT-B-16``, ...), else empty.
    """

    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    context_length: int = 77
    vocab_size: int = VOCAB_SIZE
    text_width: int = 512
    text_layers: int = 12
    vision_mlp_width: int = 0
    text_mlp_width: int = 0
    vision_head_width: int = 64
    text_head_width: int = 64
    activation: str = "quick_gelu"
    image_mean: tuple[float, float, float] = OPENAI_MEAN
    image_std: tuple[float, float, float] = OPENAI_STD
    model_name: str = ""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"CLIP activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        self.image_mean = tuple(float(x) for x in self.image_mean)  # JSON gives lists
        self.image_std = tuple(float(x) for x in self.image_std)
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"CLIP image mean/std must be 3 values (std > 0), got {self.image_mean}/{self.image_std}")

    @property
    def text_heads(self) -> int:
        return max(1, self.text_width // self.text_head_width)

    @property
    def vision_heads(self) -> int:
        return max(1, self.vision_width // self.vision_head_width)

    @property
    def quick_gelu(self) -> bool:
        return self.activation == "quick_gelu"

    def describe(self) -> str:
        """One line for logs: ``ViT-B-16 (GELU, 224 px, embedding 512)``."""
        act = "QuickGELU" if self.quick_gelu else "GELU"
        name = self.model_name or f"custom ViT/{self.patch_size}"
        return f"{name} ({act}, {self.image_size} px, embedding {self.embed_dim})"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ClipConfig:
        """Missing fields take their defaults: configs written before a field existed describe OpenAI CLIPs."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @classmethod
    def from_checkpoint(cls, sd: dict[str, torch.Tensor], recorded: dict | None, prefix: str = "clip.") -> ClipConfig:
        """A CLIP2Video checkpoint's CLIP: shapes from its tensors, the rest (activation, normalisation, name)
        from the config recorded with it. Released checkpoints record none: they are OpenAI CLIPs."""
        shapes = cls.from_state_dict(sd, prefix=prefix)
        if not isinstance(recorded, dict):
            return shapes
        return cls.from_dict({**recorded, **{f: getattr(shapes, f) for f in SHAPE_FIELDS}})

    @classmethod
    def vit_b_32(cls) -> ClipConfig:
        return cls()

    @classmethod
    def tiny(cls, image_size: int = 32, patch_size: int = 16, vocab_size: int = VOCAB_SIZE) -> ClipConfig:
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
        vision_width, text_width = conv.shape[0], get("ln_final.weight").shape[0]

        def mlp(tower: str, width: int) -> int:  # 0 = the usual 4 × width
            hidden = get(f"{tower}resblocks.0.mlp.c_fc.weight").shape[0]
            return 0 if hidden == 4 * width else hidden

        return cls(
            embed_dim=get("text_projection").shape[1],
            image_size=conv.shape[-1] * grid,
            patch_size=conv.shape[-1],
            vision_width=vision_width,
            vision_layers=vision_layers,
            context_length=get("positional_embedding").shape[0],
            vocab_size=get("token_embedding.weight").shape[0],
            text_width=text_width,
            text_layers=text_layers,
            vision_mlp_width=mlp("visual.transformer.", vision_width),
            text_mlp_width=mlp("transformer.", text_width),
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


def activation_module(name: str) -> nn.Module:
    """The MLP activation called ``name`` (:data:`ACTIVATIONS`): the temporal heads use the backbone's, so
    blocks initialised from CLIP's text blocks compute what those blocks were trained to compute."""
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm whose output keeps the input's dtype (CLIP's: under autocast the residual stream
    stays in its own dtype instead of being promoted by a float32 LayerNorm output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).to(x.dtype)


class ClipBlock(nn.Module):
    """CLIP's pre-LN residual attention block, batch-first, with OpenAI's parameter names
    (``ln_1``, ``attn``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``)."""

    def __init__(self, width: int, heads: int, mlp_width: int, activation: str):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, mlp_width)),
                                              ("gelu", activation_module(activation)),
                                              ("c_proj", nn.Linear(mlp_width, width))]))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.self_attention(h, attn_mask.to(h.dtype) if attn_mask is not None else None)
        return x + self.mlp(self.ln_2(x))

    def self_attention(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """``self.attn(x, x, x)`` computed batch-first: the same projections and attention kernel (the result is
        bit-identical, tested), without ``nn.MultiheadAttention``'s round trip through the sequence-first
        layout, whose transposes copy every activation twice per block."""
        a = self.attn
        b, length, width = x.shape
        qkv = nn.functional.linear(x, a.in_proj_weight, a.in_proj_bias)
        q, k, v = qkv.view(b, length, 3, a.num_heads, width // a.num_heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, L, d)
        return a.out_proj(out.transpose(1, 2).reshape(b, length, width))


class ClipTransformer(nn.Module):
    """A stack of :class:`ClipBlock` over (B, L, W), optionally recomputed in backward (``grad_checkpointing``)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, activation: str):
        super().__init__()
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([ClipBlock(width, heads, mlp_width, activation) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask)
        return x


class VisionTower(nn.Module):
    """CLIP's ViT image tower: patches → class token + positions → ``ln_pre`` → blocks → ``ln_post`` on the
    class token → ``proj``. (N, 3, H, W) normalised images → (N, D)."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        width, grid = cfg.vision_width, cfg.image_size // cfg.patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = ClipTransformer(width, cfg.vision_layers, cfg.vision_heads,
                                           cfg.vision_mlp_width or 4 * width, cfg.activation)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, cfg.embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (N, grid², W)
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class Clip(nn.Module):
    """CLIP in OpenAI's layout: ``visual`` (:class:`VisionTower`) and the text tower's parts at the top level
    (``token_embedding``, ``positional_embedding``, ``transformer``, ``ln_final``, ``text_projection``), plus
    ``logit_scale`` and the causal mask (a buffer that is not saved).

    Our own module rather than open_clip's ``CLIP`` for one reason, start-up: importing open_clip pulls in
    torchvision, ``torch._dynamo`` and timm (seconds per process) for a few dozen lines of model code. State
    dicts are the same, module for module, and so are outputs (tests compare both bit for bit, including the
    random initialisation, which follows open_clip's order and scales, so a model built under a seed starts
    from the same weights as before); reading open_clip's *files* still goes through open_clip
    (``clip_weights.py``).
    """

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.visual = VisionTower(cfg)
        width = cfg.text_width
        self.context_length, self.vocab_size = cfg.context_length, cfg.vocab_size
        # built in OpenAI's order (it fixes the random draws), registered in open_clip's (it fixes the key order)
        token_embedding = nn.Embedding(cfg.vocab_size, width)
        positional_embedding = nn.Parameter(torch.empty(cfg.context_length, width))
        self.transformer = ClipTransformer(width, cfg.text_layers, cfg.text_heads, cfg.text_mlp_width or 4 * width,
                                           cfg.activation)
        self.token_embedding, self.positional_embedding = token_embedding, positional_embedding
        self.ln_final = LayerNorm(width)
        causal = torch.full((cfg.context_length, cfg.context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", causal, persistent=False)
        self.text_projection = nn.Parameter(torch.empty(width, cfg.embed_dim))
        self._init_text(cfg)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    def _init_text(self, cfg: ClipConfig) -> None:
        """OpenAI's text-tower initialisation (the image tower keeps torch's defaults and the randn scales)."""
        width, layers = cfg.text_width, cfg.text_layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std, attn_std, fc_std = width**-0.5 * (2 * layers) ** -0.5, width**-0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable
        self.transformer.grad_checkpointing = enable


def build_clip(cfg: ClipConfig) -> Clip:
    """An fp32 CLIP of architecture ``cfg``, randomly initialised as OpenAI/open_clip initialise one."""
    return Clip(cfg)


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
    x = clip.transformer(x, attn_mask=mask)
    x = clip.ln_final(x)
    return x @ clip.text_projection  # (B, L, D)


def to_backbone_normalisation(images: torch.Tensor, cfg: ClipConfig) -> torch.Tensor:
    """Frames normalised with OpenAI CLIP's mean/std → normalised with the backbone's (per-channel affine).

    Every frame source of this codebase (frame folders, video files, the search index) delivers OpenAI's
    normalisation, the original's and that of nearly all open_clip weights; a backbone trained with another
    (``image_mean`` / ``image_std``) converts here, once, where frames enter the image tower, so no reader can
    be left behind. ``(x·σ_o + μ_o − μ_b) / σ_b``; the identity (and skipped) for OpenAI's constants.
    """
    if cfg.image_mean == OPENAI_MEAN and cfg.image_std == OPENAI_STD:
        return images
    so, mo = torch.tensor(OPENAI_STD), torch.tensor(OPENAI_MEAN)
    sb, mb = torch.tensor(cfg.image_std), torch.tensor(cfg.image_mean)
    scale = (so / sb).to(images).view(3, 1, 1)
    shift = ((mo - mb) / sb).to(images).view(3, 1, 1)
    return images * scale + shift


def frame_features(clip: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) normalised images → (N, D) projected class-token features (ln_post then proj)."""
    return clip.visual(images)
