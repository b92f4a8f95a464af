"""Weight files: OpenAI CLIP (TorchScript or plain), released CLIP2Video ``pytorch_model.bin.N``, our own.

Loading is strict everywhere: a missing key, an unexpected key or a shape mismatch raises
``CheckpointError`` with one line that lists them. (The original silently fell back to CLIP or random heads
when a key did not match, which hid wrong ``--center_proj``/``--centerK`` flags behind bad numbers.)
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbone import OPENAI_EXTRA_KEYS, ClipConfig
from .init_skip import skip_random_init

logger = logging.getLogger(__name__)

CONFIG_SUFFIX = ".config.json"  # sidecar written next to an exported pytorch_model.bin.N


class CheckpointError(ValueError):
    """A weight file that does not fit the model (one line, names the file and the keys)."""


def _short(keys: list[str], limit: int = 12) -> str:
    """Keys grouped by their top-level module (``actionClip.* (16)``) so one line stays readable."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        top = k.split(".")[0] if not k.startswith("clip.") else ".".join(k.split(".")[:2])
        groups.setdefault(top, []).append(k)
    items = [g[0] if len(g) == 1 else f"{top}.* ({len(g)})" for top, g in groups.items()]
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives carry a ``constants.pkl``/``code/`` entry; ``torch.save`` zips do not."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weight file: a TorchScript archive (OpenAI's ``ViT-B-32.pt``) or a ``torch.save`` dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weight file")
    try:
        if _is_torchscript(path):
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure becomes one clear line
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # our training checkpoint
    elif isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise CheckpointError(f"{path}: not a state dict (got {type(sd).__name__})")
    return dict(sd)


def load_clip_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """OpenAI-layout CLIP weights as float32 (fp16 tensors upcast, the three integer buffers dropped)."""
    sd = read_state_dict(path)
    sd = {k: v for k, v in sd.items() if k not in OPENAI_EXTRA_KEYS}
    if "visual.conv1.weight" not in sd:
        raise CheckpointError(f"{path}: no 'visual.conv1.weight': not an OpenAI-layout ViT CLIP file")
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def load_into(module: nn.Module, sd: dict[str, torch.Tensor], what: str = "weights") -> None:
    """Strictly copy ``sd`` into ``module``: missing, unexpected or mis-shaped keys → CheckpointError.

    Tensors are cast to the parameter's dtype (released checkpoints hold CLIP partly in fp16).
    """
    own = module.state_dict()
    sd = {k: v for k, v in sd.items() if k not in OPENAI_EXTRA_KEYS}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in set(sd) & set(own)
                    if tuple(sd[k].shape) != tuple(own[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch (file vs model): {_short(shapes)}")
    if problems:
        raise CheckpointError(f"{what} do not fit the model: " + "; ".join(problems))
    cast = {k: v.to(own[k].dtype) for k, v in sd.items()}
    module.load_state_dict(cast, strict=True)


def released_path(checkpoint: str | os.PathLike, model_num: int | str | None = None) -> Path:
    """The original's ``--checkpoint DIR --model_num N`` → ``DIR/pytorch_model.bin.N`` (a file path passes)."""
    p = Path(checkpoint)
    if p.is_dir():
        if model_num is None:
            raise CheckpointError(f"--checkpoint {p} is a folder: give --model_num N for pytorch_model.bin.N")
        p = p / f"pytorch_model.bin.{model_num}"
    if not p.is_file():
        raise CheckpointError(f"checkpoint file {p} does not exist (check --checkpoint / --model_num)")
    return p


def read_sidecar_config(path: Path) -> dict[str, Any] | None:
    side = Path(str(path) + CONFIG_SUFFIX)
    if side.is_file():
        return json.loads(side.read_text())
    return None


def load_model(
    path: str | os.PathLike,
    config: Any | None = None,
    *,
    model_num: int | str | None = None,
    mask_layout: str | None = None,
    prefer_stored: bool = True,
):
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
    from dataclasses import replace

    from .model import CLIP2Video, CLIP2VideoConfig

    file = released_path(path, model_num)
    sd, stored = read_checkpoint(file)
    if not any(k.startswith("clip.") for k in sd):
        raise CheckpointError(f"{file}: no 'clip.*' keys: not a CLIP2Video checkpoint (a plain CLIP file?)")
    clip_cfg = ClipConfig.from_state_dict(sd, prefix="clip.")
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


def _load_mapped(file: Path) -> Any:
    """``torch.load`` with the file memory-mapped where its format allows (the zip format of every
    ``torch.save`` since torch 1.6): tensors are read from the page cache straight into the parameters by the
    load that follows, with no intermediate copy; older formats are read the ordinary way."""
    if zipfile.is_zipfile(file):
        try:
            return torch.load(file, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
    return torch.load(file, map_location="cpu", weights_only=False)


def read_checkpoint(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, stored model config or None) of a released file, an export or a training checkpoint."""
    if _is_torchscript(file):
        return read_state_dict(file), None
    try:
        raw = _load_mapped(file)
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


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary name in the same folder, then ``os.replace``: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def export_original(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` in the release format (``pytorch_model.bin.N``: the plain state dict) plus a
    ``.config.json`` sidecar holding the resolved config, so our loader restores the mask layout; the
    original's code reads the state dict and ignores the sidecar."""
    path = Path(path)
    atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    atomic_write_text(Path(str(path) + CONFIG_SUFFIX), json.dumps(model.config.to_dict(), indent=1))
    return path


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
        raise CheckpointError(f"CLIP-ViP checkpoint: unmapped keys: {_short(left)}")
    return out
