"""CLIP2Video: CLIP towers + temporal heads, every row of the paper's Table 1 as a named configuration.

Data flow::

    ids (B,L) ─text tower→ tokens (B,L,D) ─┬─ end token ─────────────→ t_g
                                            └─ TAB(tokens, mask)──────→ t_a
    frames (B,T,3,H,W) ─image tower→ (B,T,D) ─┬─ TDB + temporal transformer → v_g
                                              └─ TAB(frames + TDB'd even frames) → v_a
    score = w·⟨t_g, v_g⟩ + (1−w)·⟨t_a, v_a⟩ = ⟨[w·t_g, (1−w)·t_a], [v_g, v_a]⟩

Parameter names are the original's (``clip.*``, ``frame_position_embeddings``, ``transformerClip``, ...), so
``model.state_dict()`` *is* the release format ``pytorch_model.bin.N``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .alignment import align_tokens
from .backbone import ClipConfig, build_clip, frame_features, text_tokens, to_backbone_normalisation
from .temporal import MASK_LAYOUTS, TemporalTransformer, difference_tokens, l2n, masked_mean
from .tokenizer import real_length

# The paper's Table 1 rows → the original's flags. TDB-All and TAB-Base are described in the paper but not in
# the released code; their meaning here is documented on CLIP2VideoConfig.
VARIANTS: dict[str, dict[str, Any]] = {
    "meanP": dict(sim_type="meanP", temporal_type="", temporal_proj="", center_type="", center_proj=""),
    "seqTransf": dict(sim_type="seqTransf", temporal_type="", temporal_proj="", center_type="", center_proj=""),
    "tdb_sub": dict(sim_type="seqTransf", temporal_type="TDB", temporal_proj="", center_type="", center_proj=""),
    "tdb_mlp": dict(
        sim_type="seqTransf", temporal_type="TDB", temporal_proj="sigmoid_mlp", center_type="", center_proj=""
    ),
    "tdb": dict(
        sim_type="seqTransf", temporal_type="TDB", temporal_proj="sigmoid_selfA", center_type="", center_proj=""
    ),
    "tdb_all": dict(
        sim_type="seqTransf",
        temporal_type="TDB",
        temporal_proj="sigmoid_selfA",
        center_type="",
        center_proj="",
        pool_differences=True,
    ),
    "tab_base": dict(
        sim_type="seqTransf", temporal_type="TDB", temporal_proj="sigmoid_selfA", center_type="TAB", center_proj=""
    ),
    "tab_transformer": dict(
        sim_type="seqTransf", temporal_type="TDB", temporal_proj="sigmoid_selfA", center_type="TAB", center_proj="TAB"
    ),
    "tab_tdb": dict(
        sim_type="seqTransf",
        temporal_type="TDB",
        temporal_proj="sigmoid_selfA",
        center_type="TAB",
        center_proj="TAB_TDB",
    ),
    # CLIP-ViP (arXiv 2209.06430): video proxies inside the ViT instead of temporal heads after it
    "vip": dict(
        sim_type="meanP", temporal_type="", temporal_proj="", center_type="", center_proj="", video_encoder="vip"
    ),
}
FLAG_CHOICES = {
    "sim_type": ("meanP", "seqTransf"),
    "temporal_type": ("", "TDB"),
    "temporal_proj": ("", "sigmoid_mlp", "sigmoid_selfA"),
    "center_type": ("", "TAB"),
    "center_proj": ("", "TAB", "TAB_TDB"),
}


@dataclass
class CLIP2VideoConfig:
    """Resolved model configuration; saved in every checkpoint.

    Attributes:
        variant: Table-1 name (``VARIANTS``) or ``custom`` when built from raw flags that match none.
        sim_type / temporal_type / temporal_proj / center_type / center_proj: the original's flags.
        pool_differences: TDB-All: pool the temporal transformer's outputs at difference tokens too (each with
            its input token as residual), not only at frame tokens.
        center_k: number of TAB centres (5; 7 for VATEX).
        center_weight: w of the global term in score and loss.
        cross_layers: depth of the temporal transformer (``cross_num_hidden_layers``).
        mask_layout: ``original`` (released checkpoints) or ``per_video`` (models trained here).
        video_encoder: ``heads`` (image tower per frame + the temporal heads above) or ``vip`` (CLIP-ViP
            video proxies, one ViT pass per video; modules/network/vip.py).
        vip_proxies / vip_frames: number of proxy tokens and length of the temporal embedding table.
        clip: CLIP architecture.
    """

    variant: str = "tab_tdb"
    sim_type: str = "seqTransf"
    temporal_type: str = "TDB"
    temporal_proj: str = "sigmoid_selfA"
    center_type: str = "TAB"
    center_proj: str = "TAB_TDB"
    pool_differences: bool = False
    center_k: int = 5
    center_weight: float = 0.5
    cross_layers: int = 4
    mask_layout: str = "per_video"
    video_encoder: str = "heads"
    vip_proxies: int = 4
    vip_frames: int = 12
    clip: ClipConfig = field(default_factory=ClipConfig)

    def __post_init__(self) -> None:
        if isinstance(self.clip, dict):
            self.clip = ClipConfig.from_dict(self.clip)
        for name, choices in FLAG_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.mask_layout not in MASK_LAYOUTS:
            raise ValueError(f"--mask_layout must be one of {MASK_LAYOUTS}, got {self.mask_layout!r}")
        if self.temporal_type == "TDB" and self.sim_type != "seqTransf":
            raise ValueError("--temporal_type TDB needs --sim_type seqTransf (the TDB feeds the temporal transformer)")
        if self.center_proj and self.center_type != "TAB":
            raise ValueError(f"--center_proj {self.center_proj} needs --center_type TAB")
        if self.center_type == "TAB" and self.sim_type != "seqTransf" and self.center_proj:
            raise ValueError("--center_proj TAB/TAB_TDB needs --sim_type seqTransf (frame position table)")
        if self.center_proj == "TAB_TDB" and self.temporal_type != "TDB":
            raise ValueError("--center_proj TAB_TDB needs --temporal_type TDB")
        if not 0.0 <= self.center_weight <= 1.0:
            raise ValueError(f"--center_weight must be in [0, 1], got {self.center_weight}")
        if self.video_encoder not in ("heads", "vip"):
            raise ValueError(f"--video_encoder must be heads or vip, got {self.video_encoder!r}")
        if self.video_encoder == "vip" and (self.sim_type != "meanP" or self.temporal_type or self.center_type):
            raise ValueError("--video_encoder vip replaces the temporal heads: use it without TDB/TAB flags")
        if self.video_encoder == "vip" and self.vip_proxies < 1:
            raise ValueError(f"vip_proxies must be >= 1, got {self.vip_proxies}")
        if self.center_k < 1:
            raise ValueError(f"--centerK must be >= 1, got {self.center_k}")

    @property
    def use_tab(self) -> bool:
        return self.center_type == "TAB"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CLIP2VideoConfig:
        d = dict(d)
        d["clip"] = ClipConfig.from_dict(d.get("clip", {}))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def variant_of_flags(**flags: Any) -> str:
    """Name of the Table-1 row whose flags equal ``flags`` (original flag names), else ``custom``."""
    keys = ("sim_type", "temporal_type", "temporal_proj", "center_type", "center_proj")
    want = {k: flags.get(k, "") or "" for k in keys}
    for name, spec in VARIANTS.items():
        special = spec.get("pool_differences", False) or spec.get("video_encoder", "heads") != "heads"
        if all(spec.get(k, "") == want[k] for k in keys) and not special:
            return name
    return "custom"


def make_config(variant: str = "tab_tdb", clip: ClipConfig | None = None, **overrides: Any) -> CLIP2VideoConfig:
    """Config of a named variant; ``overrides`` set any field (e.g. center_k=7, mask_layout="original")."""
    if variant not in VARIANTS and variant != "custom":
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    fields = dict(VARIANTS.get(variant, {}))
    fields.update(overrides)
    return CLIP2VideoConfig(variant=variant, clip=clip or ClipConfig(), **fields)


@dataclass
class TextEmbedding:
    """Normalised caption vectors: global (end token) and TAB-aligned (None without TAB)."""

    global_: torch.Tensor
    aligned: torch.Tensor | None = None


@dataclass
class VideoEmbedding:
    """Normalised video vectors: global (temporal head) and TAB-aligned (None without TAB)."""

    global_: torch.Tensor
    aligned: torch.Tensor | None = None


class ModelOutput(NamedTuple):
    text: TextEmbedding
    video: VideoEmbedding
    logit_scale: torch.Tensor  # exp(logit_scale), the multiplier of the similarities


def symmetric_ce(logits: torch.Tensor) -> torch.Tensor:
    """Mean of the text→video and video→text cross-entropies with the diagonal as targets."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


class CLIP2Video(nn.Module):
    """The CLIP2Video dual encoder. Build with ``factory.create_model`` (or ``factory.load_model``).

    Args:
        config: resolved configuration.
    """

    def __init__(self, config: CLIP2VideoConfig):
        super().__init__()
        self.config = config
        c = config
        dim = c.clip.embed_dim  # every head is as wide as the embedding: 512 for ViT-B, 768 for ViT-L/14
        # heads as CLIP's text blocks have them when those initialise the temporal blocks (same width)
        heads = c.clip.text_heads if c.clip.text_width == dim else max(1, dim // 64)
        act = c.clip.activation
        self.clip = build_clip(c.clip)
        if c.sim_type == "seqTransf":
            self.frame_position_embeddings = nn.Embedding(c.clip.context_length, dim)
            self.transformerClip = TemporalTransformer(dim, c.cross_layers, heads, act)
        if c.temporal_proj == "sigmoid_mlp":
            self.frame2t_projection = nn.Parameter(torch.empty(dim, dim))
        elif c.temporal_proj == "sigmoid_selfA":
            self.frame2t_attention = TemporalTransformer(dim, 1, heads, act)
        if c.temporal_type == "TDB":
            self.type_position_embeddings = nn.Embedding(2, dim)
        if c.temporal_proj in ("sigmoid_mlp", "sigmoid_selfA"):
            self.trans_layernorm = nn.LayerNorm(dim)
        if c.use_tab:
            self.weight_center = nn.Parameter(torch.empty(c.center_k, dim))
            self.emb_center = nn.Parameter(torch.empty(c.center_k, dim))
            if c.center_proj in ("TAB", "TAB_TDB"):
                self.actionClip = TemporalTransformer(dim, 1, heads, act)
        if c.video_encoder == "vip":
            from .vip import VideoProxyEncoder

            self.vip = VideoProxyEncoder(self.clip.visual.class_embedding.shape[0], c.vip_proxies, c.vip_frames)
            self.vip.reset_parameters(self.clip.visual.class_embedding)
        self._zero_frame_cache: tuple[int, torch.Tensor] | None = None
        self.reset_heads()

    # ------------------------------------------------------------------ initialisation
    def reset_heads(self) -> None:
        """Initialise the new (non-CLIP) parameters: N(0, 0.02) / LayerNorm (1, 0) / centres N(0, 64^-½).

        ``init_from_clip`` then copies CLIP weights into the heads that the original initialised from CLIP.
        """
        for name, module in self.named_modules():
            if name.startswith(("clip", "vip")):
                continue
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.MultiheadAttention):
                nn.init.normal_(module.in_proj_weight, std=0.02)
                nn.init.zeros_(module.in_proj_bias)
        for name in ("weight_center", "emb_center", "frame2t_projection"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name), std=64**-0.5)
        if hasattr(self, "vip"):
            self.vip.reset_parameters(self.clip.visual.class_embedding)

    @torch.no_grad()
    def init_from_clip(self) -> None:
        """Copy CLIP weights into the heads as the original did when training started from CLIP.

        This is one of the original's behaviours listed in ``docs/original-behaviours.md``.

        Temporal transformer ← the first ``cross_layers`` text blocks; difference attention and the TAB
        transformer ← text block 0; frame positions ← CLIP's positional table; types ← its first 2 rows; the
        MLP variant's W ← rows 0..D−1 of the visual projection. Skipped where shapes differ (e.g. a CLIP whose
        text width is not the embedding width).
        """
        clip = self.clip
        dim = self.config.clip.embed_dim
        text_blocks = clip.transformer.resblocks
        same_width = self.config.clip.text_width == dim

        def copy_block(dst: nn.Module, src: nn.Module) -> None:
            dst.load_state_dict(src.state_dict())

        if hasattr(self, "frame_position_embeddings") and same_width:
            self.frame_position_embeddings.weight.copy_(clip.positional_embedding)
        if hasattr(self, "type_position_embeddings") and same_width:
            self.type_position_embeddings.weight.copy_(clip.positional_embedding[:2])
        if same_width and not self.config.clip.text_mlp_width:  # blocks copy only with the usual 4× MLP
            if hasattr(self, "transformerClip"):
                for i, block in enumerate(self.transformerClip.resblocks):
                    if i < len(text_blocks):
                        copy_block(block, text_blocks[i])
            for name in ("frame2t_attention", "actionClip"):
                if hasattr(self, name):
                    copy_block(getattr(self, name).resblocks[0], text_blocks[0])
        if hasattr(self, "frame2t_projection") and clip.visual.proj.shape[0] >= dim:
            self.frame2t_projection.copy_(clip.visual.proj[:dim])
        if hasattr(self, "vip"):
            # proxies start from the (now loaded) class embedding
            self.vip.reset_parameters(self.clip.visual.class_embedding)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the CLIP towers' activations in backward (the heads are small)."""
        self.clip.set_grad_checkpointing(enable)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    # ------------------------------------------------------------------ text
    def text_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids → (B, L, D) token features (all positions)."""
        return text_tokens(self.clip, ids)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEmbedding:
        """(B, L) ids and mask → normalised global (end token) and TAB vectors.

        The tower runs on the batch's real positions only (``real_length``): with the causal mask the padding
        after the longest caption changes no feature before it, so every caller (evaluation, training, search
        queries) gets the same vectors for a fraction of the compute at typical caption lengths.
        """
        keep = real_length(ids, mask)
        if 0 < keep < ids.shape[1]:
            ids, mask = ids[:, :keep], mask[:, :keep]
        tokens = self.text_tokens(ids)  # (B, L', D)
        eot = tokens[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]  # largest id = end
        aligned = None
        if self.config.use_tab:
            tab_mask = mask.clone()
            tab_mask[:, 0] = 0  # the start token does not take part in alignment; the end token does
            aligned = align_tokens(tokens, tab_mask, self.weight_center, self.emb_center)
        return TextEmbedding(l2n(eot), aligned)

    # ------------------------------------------------------------------ video
    def zero_frame_feature(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """CLIP's feature of the all-zero (post-normalisation) frame that fills padded slots, (D,).

        The original ran padded slots through CLIP; their feature is a constant that reaches the scores via the
        TDB (see temporal.difference_tokens). It is computed once per weight version instead of per slot.
        """
        size = self.config.clip.image_size
        if torch.is_grad_enabled() and self.training:
            zero = torch.zeros(1, 3, size, size, device=device, dtype=dtype)
            return frame_features(self.clip, zero)[0]
        version = sum(p._version for p in self.clip.visual.parameters())
        key = (version, str(device), dtype)
        if self._zero_frame_cache is None or self._zero_frame_cache[0] != key:
            zero = torch.zeros(1, 3, size, size, device=device, dtype=dtype)
            self._zero_frame_cache = (key, frame_features(self.clip, zero)[0].detach())
        return self._zero_frame_cache[1]

    def encode_frames(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) frames + (B, T) mask → (B, T, D) raw frame features.

        Only real frames go through the image tower; masked slots get the zero-frame feature, whatever
        pixels they hold, exactly as the original's zero-filled padding.
        """
        if self.config.video_encoder == "vip":
            raise ValueError("the vip video encoder has no per-frame features: call encode_video")
        b, t = mask.shape
        keep = mask.reshape(-1).bool()
        flat = frames.reshape(b * t, *frames.shape[2:])  # (B·T, 3, H, W)
        every = bool(keep.all())  # no padding: the frames go in as they are, without a gathered copy
        real = frame_features(self.clip, to_backbone_normalisation(flat if every else flat[keep], self.config.clip))
        if every:
            return real.view(b, t, -1)
        pad = self.zero_frame_feature(frames.device, flat.dtype).to(real.dtype)
        out = pad.expand(b * t, -1).clone()
        out = out.index_put((keep.nonzero(as_tuple=True)[0],), real) if real.shape[0] else out
        return out.view(b, t, -1)

    def encode_differences(self, d: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """TDB's difference encoder: (B, T−1, D) raw differences + their (B, T−1) key mask → (B, T−1, D)."""
        c = self.config
        if c.temporal_proj == "sigmoid_mlp":
            return 2 * torch.sigmoid(self.trans_layernorm(d @ self.frame2t_projection)) - 1
        if c.temporal_proj == "sigmoid_selfA":
            pos = self.frame_position_embeddings.weight[1 : d.shape[1] + 1]  # d_i takes P[i] in this attention
            d = self.frame2t_attention(d + pos, mask, c.mask_layout)
            return 2 * torch.sigmoid(self.trans_layernorm(d)) - 1
        return d  # TDB-sub: the plain subtraction

    def tdb(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The TDB on (B, T, D) frames with this model's tables and difference encoder."""
        return difference_tokens(frames, mask, self.frame_position_embeddings.weight,
                                 self.type_position_embeddings.weight, self.encode_differences)

    def video_global(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, D) raw frame features → (B, D) normalised global video vector."""
        c = self.config
        if c.sim_type == "meanP":
            return l2n(masked_mean(l2n(feats), mask))
        if c.temporal_type == "TDB":
            x, token_mask, raw = self.tdb(feats, mask)  # (B, 2T-1, D)
            y = self.transformerClip(x, token_mask, c.mask_layout)
            if c.pool_differences:
                return l2n(masked_mean(l2n(y + raw), token_mask))
            y = y[:, 0::2] + feats  # frame positions + residual of the input frame features
            return l2n(masked_mean(l2n(y), mask))
        t = feats.shape[1]
        x = feats + self.frame_position_embeddings.weight[:t]
        y = self.transformerClip(x, mask, c.mask_layout) + feats
        return l2n(masked_mean(l2n(y), mask))

    def video_tab_tokens(self, feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TAB's visual tokens: the T frames, plus (TAB / TAB_TDB) T/2 temporally encoded even frames."""
        c = self.config
        if c.center_proj not in ("TAB", "TAB_TDB"):
            return feats, mask
        even = feats[:, 0::2]  # (B, T/2, D) slots 0, 2, 4, ...
        even_mask = mask[:, 0::2]
        if c.center_proj == "TAB_TDB":
            x, token_mask, _ = self.tdb(even, even_mask)  # shared TDB on the even frames
            y = self.actionClip(x, token_mask, c.mask_layout)[:, 0::2]
        else:
            x = even + self.frame_position_embeddings.weight[: even.shape[1]]
            y = self.actionClip(x, even_mask, c.mask_layout)
        tokens = torch.cat([feats, y + even], dim=1)  # (B, T + T/2, D)
        return tokens, torch.cat([mask, even_mask], dim=1)

    def encode_video_features(self, feats: torch.Tensor, mask: torch.Tensor) -> VideoEmbedding:
        """Temporal heads on raw frame features (B, T, D) + mask (B, T) → normalised video vectors.

        With ``mask_layout == "original"`` the result depends on which videos share the batch (see
        temporal.py); evaluation then groups videos as the original's evaluation batches did.
        """
        mask = mask.to(feats.dtype)
        aligned = None
        if self.config.use_tab:
            tokens, token_mask = self.video_tab_tokens(feats, mask)
            aligned = align_tokens(tokens, token_mask, self.weight_center, self.emb_center)
        return VideoEmbedding(self.video_global(feats, mask), aligned)

    def encode_video(self, frames: torch.Tensor, mask: torch.Tensor) -> VideoEmbedding:
        """(B, T, 3, H, W) frames + (B, T) mask → normalised video vectors."""
        if self.config.video_encoder == "vip":
            frames = to_backbone_normalisation(frames, self.config.clip)
            return VideoEmbedding(l2n(self.vip(self.clip.visual, frames, mask)))
        return self.encode_video_features(self.encode_frames(frames, mask), mask)

    # ------------------------------------------------------------------ retrieval and loss
    def text_vector(self, text: TextEmbedding) -> torch.Tensor:
        """One vector per caption: [w·t_g, (1−w)·t_a] (or t_g without TAB)."""
        if text.aligned is None:
            return text.global_
        w = self.config.center_weight
        return torch.cat([w * text.global_, (1 - w) * text.aligned], dim=-1)

    def video_vector(self, video: VideoEmbedding) -> torch.Tensor:
        """One vector per video: [v_g, v_a] (or v_g without TAB); ⟨text_vector, video_vector⟩ is the score."""
        if video.aligned is None:
            return video.global_
        return torch.cat([video.global_, video.aligned], dim=-1)

    def similarity(self, text: TextEmbedding, video: VideoEmbedding) -> torch.Tensor:
        """(Nt, Nv) similarity on the logit scale (×100 for released checkpoints)."""
        return self.logit_scale.exp() * (self.text_vector(text) @ self.video_vector(video).t())

    def loss(
        self, text: TextEmbedding, video: VideoEmbedding, logit_scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """w·symCE(S_g) + (1−w)·symCE(S_a) over the given batch (gather across ranks before calling).

        Returns:
            total loss and its terms (``loss_global``, and ``loss_tab`` with TAB).
        """
        scale = self.logit_scale.exp() if logit_scale is None else logit_scale
        loss_global = symmetric_ce(scale * text.global_ @ video.global_.t())
        if text.aligned is None or video.aligned is None:
            return loss_global, {"loss_global": loss_global.detach()}
        loss_tab = symmetric_ce(scale * text.aligned @ video.aligned.t())
        w = self.config.center_weight
        total = w * loss_global + (1 - w) * loss_tab
        return total, {"loss_global": loss_global.detach(), "loss_tab": loss_tab.detach()}

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor
    ) -> ModelOutput:
        """Both towers in one call (what DDP wraps during training)."""
        text = self.encode_text(input_ids, attention_mask)
        video = self.encode_video(frames, frame_mask)
        return ModelOutput(text, video, self.logit_scale.exp())
