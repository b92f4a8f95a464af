"""Checkpoint formats that carry more than a plain state dict, and the reader that tells them apart.

* The release format ``pytorch_model.bin.N`` is the model's plain state dict (what the original's code
  reads). ``export_original`` writes it with a ``.config.json`` sidecar holding the resolved config, so our
  loader restores the variant and the mask layout; the original ignores the sidecar.
* CLIP-ViP releases use Hugging Face's CLIP layout under ``clipmodel.``; ``clipvip_to_ours`` maps them to the
  ``vip`` model's keys.
* ``read_checkpoint`` returns (state dict, stored config or None) for any of these and for our training
  checkpoints; building the model from it is ``factory.load_model``'s job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clip2video.fileio import atomic_write_text

from .checkpoint import CheckpointError, atomic_save, is_torchscript, load_mapped, read_state_dict, short_keys

CONFIG_SUFFIX = ".config.json"  # sidecar written next to an exported pytorch_model.bin.N


def export_original(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` in the release format (``pytorch_model.bin.N``: the plain state dict) plus a
    ``.config.json`` sidecar holding the resolved config, so our loader restores the mask layout; the
    original's code reads the state dict and ignores the sidecar."""
    path = Path(path)
    atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    atomic_write_text(Path(str(path) + CONFIG_SUFFIX), json.dumps(model.config.to_dict(), indent=1))
    return path


def read_sidecar_config(path: Path) -> dict[str, Any] | None:
    """The resolved config stored next to an export by ``export_original``, or None without a sidecar."""
    side = Path(str(path) + CONFIG_SUFFIX)
    if side.is_file():
        return json.loads(side.read_text())
    return None


def read_checkpoint(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, stored model config or None) of a released file, an export or a training checkpoint."""
    if is_torchscript(file):
        return read_state_dict(file), None
    try:
        raw = load_mapped(file)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{file}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict) and isinstance(raw.get("config"), dict):
        conf = raw["config"]
        return raw["model"], conf.get("model", conf)
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise CheckpointError(f"{file}: not a state dict (got {type(raw).__name__})")
    if isinstance(raw.get("model"), dict) and any(k.startswith(HF_PREFIX) for k in raw["model"]):
        raw = raw["model"]  # CLIP-ViP releases wrap the state dict
    if any(k.startswith(HF_PREFIX) for k in raw):
        sd = clipvip_to_ours(raw)
        config = {"variant": "vip", "sim_type": "meanP", "temporal_type": "", "temporal_proj": "",
                  "center_type": "", "center_proj": "", "video_encoder": "vip", "mask_layout": "per_video",
                  "vip_proxies": sd["vip.added_cls"].shape[0] + 1, "vip_frames": sd["vip.temporal_embedding"].shape[0]}
        return sd, config
    return raw, read_sidecar_config(file)


# ----------------------------------------------------------------------------------------------- CLIP-ViP
HF_PREFIX = "clipmodel."
_HF_BLOCK = {  # Hugging Face CLIP encoder layer → OpenAI residual block (q/k/v are merged separately)
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_HF_FLAT = {
    "text_model.embeddings.token_embedding.weight": "clip.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "clip.positional_embedding",
    "text_model.final_layer_norm.weight": "clip.ln_final.weight",
    "text_model.final_layer_norm.bias": "clip.ln_final.bias",
    "vision_model.embeddings.class_embedding": "clip.visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "clip.visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "clip.visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "clip.visual.ln_pre.weight",  # (sic) Hugging Face's spelling
    "vision_model.pre_layrnorm.bias": "clip.visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "clip.visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "clip.visual.ln_post.bias",
    "logit_scale": "clip.logit_scale",
}


def clipvip_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A released CLIP-ViP state dict (Hugging Face CLIP layout under ``clipmodel.``, plus
    ``vision_model.embeddings.added_cls`` / ``temporal_embedding``) → this codebase's ``vip`` model keys.

    q/k/v projections are concatenated into one in-projection, fc1/fc2 become c_fc/c_proj, the two
    projections are transposed (HF stores ``Linear`` weights, OpenAI plain matrices), ``position_ids``
    buffers are dropped. Any key left unmapped is an error naming it.
    """
    src = {k[len(HF_PREFIX):]: v for k, v in sd.items() if k.startswith(HF_PREFIX)}
    if not src:
        raise CheckpointError(f"no '{HF_PREFIX}*' keys: not a CLIP-ViP checkpoint")
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return src[key]

    for hf, ours in _HF_FLAT.items():
        if hf in src:
            out[ours] = take(hf)
    out["clip.text_projection"] = take("text_projection.weight").t().contiguous()
    out["clip.visual.proj"] = take("visual_projection.weight").t().contiguous()
    for tower, dst in (("text_model", "clip.transformer"), ("vision_model", "clip.visual.transformer")):
        layers = sorted({int(k.split(".")[3]) for k in src if k.startswith(f"{tower}.encoder.layers.")})
        for i in layers:
            base = f"{tower}.encoder.layers.{i}."
            out[f"{dst}.resblocks.{i}.attn.in_proj_weight"] = torch.cat(
                [take(base + f"self_attn.{p}_proj.weight") for p in "qkv"])
            out[f"{dst}.resblocks.{i}.attn.in_proj_bias"] = torch.cat(
                [take(base + f"self_attn.{p}_proj.bias") for p in "qkv"])
            for hf, ours in _HF_BLOCK.items():
                out[f"{dst}.resblocks.{i}.{ours}"] = take(base + hf)
    width = out["clip.visual.class_embedding"].shape[0]
    out["vip.added_cls"] = take("vision_model.embeddings.added_cls").reshape(-1, width)
    temporal = take("vision_model.embeddings.temporal_embedding")
    out["vip.temporal_embedding"] = temporal.reshape(-1, temporal.shape[-1])
    left = sorted(k for k in set(src) - used if not k.endswith("position_ids"))
    if left:
        raise CheckpointError(f"CLIP-ViP checkpoint: unmapped keys: {short_keys(left)}")
    return out
