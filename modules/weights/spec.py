"""What model a run uses, as one typed value (``ModelSpec``), and the one function that loads it.

An evaluation, an index build, a query and the server all need "the model these settings describe" and must
get the same model from the same settings. The command line turns its flags into a ``ModelSpec``
(``clip2video.cli.common.model_spec``); everything below it (the search index included) takes the spec, never
an argparse namespace, so the library can be driven without building argparse-shaped objects.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from clip2video.modules.network.model import VARIANTS, CLIP2Video, CLIP2VideoConfig, make_config, variant_of_flags

logger = logging.getLogger(__name__)

RAW_FLAGS = ("sim_type", "temporal_type", "temporal_proj", "center_type", "center_proj")


class ModelSpecError(ValueError):
    """A spec that names no model to load (one line, in the flags' words)."""


@dataclass(frozen=True)
class ModelSpec:
    """Where the weights come from and, where the file does not say, what the network is.

    Attributes:
        checkpoint: our checkpoint or export file, or the folder of a released ``pytorch_model.bin.N``.
        model_num: the N of ``pytorch_model.bin.N`` when ``checkpoint`` is a folder.
        zero_shot: no checkpoint: CLIP weights from ``clip_path``, heads initialised from CLIP.
        clip_path / clip_model: the CLIP weight file and its open_clip architecture name (zero-shot only; a
            checkpoint carries its own backbone).
        variant: a ``VARIANTS`` name, or ``custom`` for raw flags that match no Table-1 row.
        sim_type ... center_proj, center_k, center_weight, cross_layers: the network's config fields.
        mask_layout: force ``original`` / ``per_video``; None keeps what the weights were trained with.
        prefer_stored: a checkpoint's stored config wins over the fields above (False when the user described
            the model explicitly).
        max_words: query length in tokens (start + words + end).
        seed: the RNG seed for heads that CLIP does not determine (zero-shot TAB centres).
    """

    checkpoint: str | None = None
    model_num: str | None = None
    zero_shot: bool = False
    clip_path: str | None = None
    clip_model: str | None = None
    variant: str = "meanP"
    sim_type: str = "meanP"
    temporal_type: str = ""
    temporal_proj: str = ""
    center_type: str = ""
    center_proj: str = ""
    center_k: int = 5
    center_weight: float = 0.5
    cross_layers: int = 4
    mask_layout: str | None = None
    prefer_stored: bool = True
    max_words: int = 32
    seed: int | None = None

    @classmethod
    def of_variant(cls, variant: str, **kw: Any) -> ModelSpec:
        """A spec for a Table-1 row by name (its raw flags filled in from ``VARIANTS``)."""
        if variant not in VARIANTS:
            raise ModelSpecError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        raw = {k: v for k, v in VARIANTS[variant].items() if k in RAW_FLAGS}
        return cls(variant=variant, **{**raw, **kw})

    @classmethod
    def of_flags(cls, **kw: Any) -> ModelSpec:
        """A spec from the original's raw flags; the variant is the Table-1 row they name, else ``custom``."""
        raw = {k: kw.get(k, cls.__dataclass_fields__[k].default) for k in RAW_FLAGS}
        return cls(variant=variant_of_flags(**raw), **kw)

    def fields(self) -> dict[str, Any]:
        """The config fields the spec sets (``make_config`` adds what the variant implies beyond them)."""
        out = {k: getattr(self, k) for k in RAW_FLAGS}
        out.update(center_k=self.center_k, center_weight=self.center_weight, cross_layers=self.cross_layers)
        return out

    def config(self, clip=None) -> CLIP2VideoConfig:
        """The network config the fields describe (``clip``: its backbone; default CLIP ViT-B/32)."""
        extra = {"mask_layout": self.mask_layout} if self.mask_layout else {}
        return make_config(self.variant, clip, **self.fields(), **extra)

    def check(self) -> None:
        """ModelSpecError when the spec names no weights to load."""
        if self.checkpoint is None:
            if not self.zero_shot:
                raise ModelSpecError("--checkpoint is required (or --zero_shot to evaluate CLIP-initialised heads)")
            if not self.clip_path:
                raise ModelSpecError("--zero_shot needs --clip_path")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def load_model(spec: ModelSpec) -> CLIP2Video:
    """The model ``spec`` describes, loaded strictly (never a silent fallback to untrained heads).

    Our checkpoints and exports carry their config (used while ``spec.prefer_stored``); a released
    ``pytorch_model.bin.N`` is described by the spec's fields and gets the original mask layout. Zero-shot
    heads that CLIP does not determine are drawn after seeding the RNG with ``spec.seed`` (when given), so
    the same spec gives the same model in every process.
    """
    from .clip_weights import load_clip
    from .factory import create_model
    from .factory import load_model as load_file

    spec.check()
    if spec.checkpoint is None:
        import torch

        sd, clip_cfg = load_clip(spec.clip_path, spec.clip_model)
        if spec.seed is not None:
            torch.manual_seed(int(spec.seed))
        return create_model(spec.config(clip_cfg), clip_state_dict=sd)
    if spec.clip_model:
        logger.info("--clip_model ignored: a checkpoint's backbone is read from the checkpoint")
    return load_file(spec.checkpoint, make_config(spec.variant, **spec.fields()), model_num=spec.model_num,
                     mask_layout=spec.mask_layout, prefer_stored=spec.prefer_stored)
