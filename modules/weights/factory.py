"""Building models: from a variant name (``create_model``) or from a weight file (``load_model``).

This module sits above both ``model`` (the network) and ``checkpoint`` / ``release`` (weight files), so
neither of those imports the other.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

import torch

from clip2video.modules.network.backbone import ClipConfig
from clip2video.modules.network.model import CLIP2Video, CLIP2VideoConfig, make_config

from .checkpoint import CheckpointError, load_into, released_path
from .init_skip import skip_random_init
from .release import read_checkpoint

logger = logging.getLogger(__name__)


def create_model(
    variant: str | CLIP2VideoConfig = "tab_tdb",
    *,
    clip_state_dict: dict[str, torch.Tensor] | None = None,
    clip_config: ClipConfig | None = None,
    **overrides: Any,
) -> CLIP2Video:
    """Build a CLIP2Video model by variant name (or from a config).

    Args:
        variant: a ``VARIANTS`` name or a full ``CLIP2VideoConfig``.
        clip_state_dict: OpenAI-layout CLIP weights; the architecture is read from them, the towers are loaded
            from them and the heads are initialised from them as the original did.
        clip_config: architecture of a randomly initialised CLIP (tests, the synthetic demo); heads are then
            initialised from that random CLIP the same way.
        **overrides: config fields (center_k, center_weight, cross_layers, mask_layout, ...).
    """
    if isinstance(variant, CLIP2VideoConfig):
        config = replace(variant, **overrides) if overrides else variant
    else:
        if clip_state_dict is not None:
            clip_config = ClipConfig.from_state_dict(clip_state_dict)
        config = make_config(variant, clip_config, **overrides)
    model = CLIP2Video(config)
    if clip_state_dict is not None:
        load_into(model.clip, clip_state_dict, what="CLIP weights")
    model.init_from_clip()
    return model


def load_model(
    path: str | os.PathLike,
    config: Any | None = None,
    *,
    model_num: int | str | None = None,
    mask_layout: str | None = None,
    prefer_stored: bool = True,
) -> CLIP2Video:
    """Build a CLIP2Video model from a weight file and load it strictly.

    The configuration comes from the file when it carries one (our training checkpoints; the
    ``.config.json`` sidecar of an export), else from ``config`` (built from the original's flags). A
    released ``pytorch_model.bin.N`` carries none: it needs ``config`` and gets the ``original`` mask
    layout, which is what its weights were trained with. The CLIP architecture is always read from the
    weights.

    Args:
        path: a weight file or, with ``model_num``, the folder holding ``pytorch_model.bin.N``.
        config: a ``CLIP2VideoConfig`` from flags.
        mask_layout: force a layout (``original`` | ``per_video``).
        prefer_stored: use the file's own config over ``config`` when both exist.
    """
    file = released_path(path, model_num)
    sd, stored = read_checkpoint(file)
    if not any(k.startswith("clip.") for k in sd):
        raise CheckpointError(f"{file}: no 'clip.*' keys: not a CLIP2Video checkpoint (a plain CLIP file?)")
    clip_cfg = ClipConfig.from_checkpoint(sd, (stored or {}).get("clip"))  # activation etc. as recorded
    if stored is not None and (config is None or prefer_stored):
        cfg = CLIP2VideoConfig.from_dict({**stored, "clip": clip_cfg.to_dict()})
    elif config is not None:
        # the layout the weights were trained with: stored, else the released checkpoints' original layout
        layout = stored.get("mask_layout", "original") if stored else "original"
        cfg = replace(config, clip=clip_cfg, mask_layout=layout)
    else:
        raise CheckpointError(
            f"{file}: a released checkpoint carries no configuration; give the model flags (--sim_type, "
            "--temporal_type, --temporal_proj, --center_type, --center_proj, --centerK)"
        )
    if mask_layout:
        cfg = replace(cfg, mask_layout=mask_layout)
    with skip_random_init():  # every parameter is loaded strictly below: no random draws to throw away
        model = CLIP2Video(cfg)
    try:
        load_into(model, sd, what=f"{file.name}")
    except CheckpointError as e:
        raise CheckpointError(f"{file}: {e} (is this checkpoint for another variant or --centerK?)") from None
    logger.info("loaded %s (variant %s, mask layout %s)", file, cfg.variant, cfg.mask_layout)
    return model
