"""CLIP weight files from OpenAI or open_clip → an OpenAI-layout state dict and the :class:`ClipConfig` to
build it with.

Formats read (``--clip_path``):

* OpenAI's TorchScript releases (``ViT-B-32.pt``, ``ViT-B-16.pt``, ``ViT-L-14.pt``, ``ViT-L-14-336px.pt``)
  and plain state dicts of them (they keep OpenAI's integer buffers ``input_resolution``, ...);
* open_clip's published files (``open_clip_pytorch_model.bin`` or ``open_clip_model.safetensors``, usually
  with ``open_clip_config.json`` beside them) and open_clip training checkpoints (``{"state_dict": ...}``,
  keys under ``module.`` when trained with DDP);
* names instead of files: OpenAI's (``ViT-B/32``, ...) and ``--clip_model NAME:TAG`` are fetched into a cache
  first (``hub.py``).

For ViT CLIPs open_clip stores OpenAI's parameter names, so the only mapping needed is removing wrapper
prefixes (``module.``, ``_orig_mod.``) and, for a model built with open_clip's custom-text class around a
CLIP-style text tower, lifting ``text.*`` to the top level.

The tensors fix every shape but not the MLP activation: a model trained with QuickGELU and run with GELU
(or the reverse) still loads and gives subtly wrong features. No stored reference output exists for
third-party weights, so the activation is decided by these rules, and sources that disagree are an error:

1. an OpenAI release (TorchScript archive, or OpenAI's integer buffers present) → QuickGELU;
2. ``open_clip_config.json`` beside the weights (as open_clip publishes them) → its ``quick_gelu``, and its
   ``preprocess_cfg`` mean/std;
3. ``--clip_model NAME[:TAG]`` → open_clip's config for NAME (``ViT-B-16`` is GELU, ``ViT-B-16-quickgelu``
   QuickGELU); the pretrained TAG (``ViT-L-14:laion2b_s32b_b82k``) adds its activation and normalisation;
4. none of them → an error asking for ``--clip_model`` (and naming the architectures the shapes match).

Only CLIP-style towers are supported: a ViT image tower with a class token, a causal text transformer read
at its end token, OpenAI's BPE vocabulary. Anything else (SigLIP, multilingual text towers, ConvNeXt/ResNet
or other timm image towers, CoCa, layer scale, ...) is one error naming what is unsupported.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import torch

from clip2video.modules.network.backbone import OPENAI_EXTRA_KEYS, OPENAI_MEAN, OPENAI_STD, SHAPE_FIELDS, ClipConfig
from clip2video.modules.network.tokenizer import VOCAB_SIZE as BPE_VOCAB  # OpenAI CLIP's BPE vocabulary

from .checkpoint import CheckpointError, read_weights
from .hub import resolve_clip_weights

logger = logging.getLogger(__name__)

OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's published model + preprocessing config
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile

# Key fragments of towers that are not CLIP-style → what to call them in the error.
_UNSUPPORTED_KEYS = (
    ("visual.trunk.", "a timm image tower (ConvNeXt, EVA, SigLIP, ViTamin, ...)"),
    ("visual.layer1.", "a ResNet image tower"),
    ("visual.attnpool.", "a ResNet image tower"),
    ("visual.attn_pool", "an attention-pooled image tower (CoCa)"),
    ("text_decoder.", "CoCa's captioning decoder"),
    ("text.transformer.encoder.", "a Hugging Face text tower (XLM-RoBERTa, RoBERTa, mT5: multilingual models)"),
    ("text.transformer.embeddings.", "a Hugging Face text tower (XLM-RoBERTa, RoBERTa, mT5: multilingual models)"),
    ("text.transformer.shared.", "a Hugging Face text tower (mT5)"),
    ("logit_bias", "SigLIP's sigmoid loss (logit_bias)"),
    (".ls_1.gamma", "layer scale (ls_init_value)"),
    ("cls_emb", "a text tower pooled at a learned class token"),
    ("text_projection.weight", "a linear text projection with bias (SigLIP-style text pooling)"),
)
# open_clip config entries we build; any other entry set to a non-default value is unsupported.
_VISION_KEYS = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text"}


# ----------------------------------------------------------------------------------------------- reading
def read_clip_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict with wrapper prefixes removed, format name) of a CLIP weight file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"{path}: no such weight file")
        from safetensors.torch import load_file

        try:
            sd, fmt = load_file(str(path)), "open_clip safetensors"
        except Exception as e:  # noqa: BLE001 - any reader failure becomes one clear line
            raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0]})") from e
        if not sd:
            raise CheckpointError(f"{path}: not a state dict (no tensors)")
    else:
        sd, container = read_weights(path)
        fmt = {"torchscript": "OpenAI TorchScript", "checkpoint": "open_clip training checkpoint"}.get(
            container, "state dict")
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
            fmt = "open_clip training checkpoint" if fmt == "state dict" else fmt
    if fmt == "state dict" and any(k in sd for k in OPENAI_EXTRA_KEYS):
        fmt = "OpenAI state dict"
    return sd, fmt


def _unsupported_keys(sd: dict[str, torch.Tensor]) -> str | None:
    for fragment, what in _UNSUPPORTED_KEYS:
        if any(fragment in k for k in sd):
            return what
    return None


def _lift_text_tower(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """open_clip's custom-text model keeps a CLIP-style text tower under ``text.``: lift it to OpenAI's names."""
    if not any(k.startswith("text.") for k in sd):
        return sd
    out = {k: v for k, v in sd.items() if not k.startswith("text.")}
    for k, v in sd.items():
        if k.startswith("text."):
            name = k[len("text."):]
            if not name.startswith(("transformer.", "token_embedding.", "positional_embedding", "ln_final.",
                                    "text_projection")):
                raise CheckpointError(f"{path}: unsupported text tower (key {k}): only CLIP-style text "
                                      "transformers are supported")
            out[name] = v
    return out


# ----------------------------------------------------------------------------------------------- open_clip
def open_clip_config(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model config, pretrained config) of ``--clip_model NAME[:TAG]`` from open_clip's own tables."""
    if name.startswith(("hf-hub:", "local-dir:")):
        raise CheckpointError(f"--clip_model {name}: give an open_clip architecture name (e.g. ViT-B-16); "
                              f"for a downloaded model, pass its weights with {OPEN_CLIP_CONFIG} beside them")
    from open_clip.factory import get_model_config, list_models
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    arch, _, tag = name.partition(":")
    cfg = get_model_config(arch)
    if cfg is None:
        near = [m for m in list_models() if m.lower().startswith(arch.lower()[:5])][:6]
        raise CheckpointError(f"--clip_model {name}: open_clip has no architecture {arch!r}"
                              + (f" (similar: {', '.join(near)})" if near else " (see open_clip.list_models())"))
    pcfg: dict[str, Any] = {}
    if tag:
        pcfg = dict(get_pretrained_cfg(arch, tag))
        if not pcfg:
            tags = list_pretrained_tags_by_model(arch)
            raise CheckpointError(f"--clip_model {name}: open_clip has no pretrained tag {tag!r} for {arch}"
                                  f" (tags: {', '.join(tags) or 'none'})")
    return cfg, pcfg


def unsupported_in_config(cfg: dict[str, Any]) -> str | None:
    """What makes an open_clip model config not CLIP-style (None when it is)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    v, t = cfg.get("vision_cfg", {}) or {}, cfg.get("text_cfg", {}) or {}
    if v.get("timm_model_name"):
        return f"the timm image tower {v['timm_model_name']} (ConvNeXt, EVA, SigLIP, ViTamin, ... image towers)"
    if isinstance(v.get("layers"), list | tuple):
        return "a ResNet image tower"
    if t.get("hf_model_name"):
        return f"the Hugging Face text tower {t['hf_model_name']} (multilingual / RoBERTa / mT5 text towers)"
    if t.get("hf_tokenizer_name") or t.get("tokenizer_mode") or t.get("vocab_size", BPE_VOCAB) != BPE_VOCAB:
        return (f"the tokenizer {t.get('hf_tokenizer_name') or t.get('tokenizer_mode') or ''} "
                f"(vocabulary {t.get('vocab_size', BPE_VOCAB)}; only OpenAI CLIP's BPE tokenizer is supported)")
    if cfg.get("init_logit_bias") is not None:
        return "SigLIP's sigmoid loss (logit_bias)"
    if cfg.get("multimodal_cfg"):
        return "CoCa's captioning towers"
    extra = sorted(set(cfg) - _TOP_KEYS)
    if extra:
        return f"the model option {extra[0]}={cfg[extra[0]]!r}"
    for tower, given, allowed, default in (("image", v, _VISION_KEYS, CLIPVisionCfg()),
                                           ("text", t, _TEXT_KEYS, CLIPTextCfg())):
        names = {f.name for f in dataclass_fields(default)}
        for key in sorted(set(given) - allowed):
            if key not in names or given[key] != getattr(default, key):
                return f"the {tower}-tower option {key}={given[key]!r}"
    return None


def _config_shapes(cfg: dict[str, Any]) -> dict[str, int]:
    """The :data:`SHAPE_FIELDS` (and head widths) an open_clip model config builds."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    v = CLIPVisionCfg(**{k: x for k, x in (cfg.get("vision_cfg") or {}).items() if k in _VISION_KEYS})
    t = CLIPTextCfg(**{k: x for k, x in (cfg.get("text_cfg") or {}).items() if k in _TEXT_KEYS})
    image = v.image_size if isinstance(v.image_size, int) else v.image_size[0]
    vm, tm = int(v.width * v.mlp_ratio), int(t.width * t.mlp_ratio)
    return dict(embed_dim=cfg["embed_dim"], image_size=image, patch_size=v.patch_size, vision_width=v.width,
                vision_layers=v.layers, context_length=t.context_length, vocab_size=t.vocab_size,
                text_width=t.width, text_layers=t.layers, vision_mlp_width=0 if vm == 4 * v.width else vm,
                text_mlp_width=0 if tm == 4 * t.width else tm, vision_head_width=v.head_width,
                text_head_width=t.width // t.heads)


def _catalogue() -> list[tuple[str, bool, tuple]]:
    """(name, quick_gelu, shapes) of every CLIP-style architecture open_clip knows, including those registered
    with ``open_clip.add_model_config`` (its public ``list_models`` / ``get_model_config``)."""
    from open_clip import get_model_config, list_models

    out = []
    for name in list_models():
        cfg = get_model_config(name)
        if cfg and not unsupported_in_config(cfg):
            shapes = _config_shapes(cfg)
            out.append((name, bool(cfg.get("quick_gelu", False)), tuple(shapes[f] for f in SHAPE_FIELDS)))
    return out


def matching_architectures(shapes: ClipConfig) -> list[tuple[str, bool]]:
    """open_clip architectures (name, quick_gelu) whose tensors have exactly these shapes."""
    want = tuple(getattr(shapes, f) for f in SHAPE_FIELDS)
    return [(name, quick) for name, quick, got in _catalogue() if got == want]


# ----------------------------------------------------------------------------------------------- loading
def load_clip_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str, ClipConfig]:
    """(float32 OpenAI-layout state dict, format name, shapes) of a CLIP weight file, with unsupported towers
    and tokenizers rejected. The shapes lack what tensors cannot tell (activation, normalisation): use
    :func:`load_clip`, or a config recorded when the model was built (an index rebuilding its model)."""
    path = Path(path)
    sd, fmt = read_clip_file(path)
    what = _unsupported_keys(sd)
    if what:
        raise CheckpointError(f"{path}: unsupported CLIP: {what}; only CLIP-style ViT towers with OpenAI's BPE "
                              "tokenizer are supported")
    sd = _lift_text_tower(sd, path)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()
          if k not in OPENAI_EXTRA_KEYS and not k.endswith("attn_mask")}  # the causal mask is rebuilt
    try:
        shapes = ClipConfig.from_state_dict(sd)
    except KeyError as e:
        raise CheckpointError(f"{path}: {e.args[0]}") from None
    if shapes.vocab_size != BPE_VOCAB:
        raise CheckpointError(f"{path}: unsupported tokenizer: a {shapes.vocab_size}-token vocabulary is not OpenAI "
                              f"CLIP's BPE ({BPE_VOCAB}); multilingual and SigLIP text towers are not supported")
    return sd, fmt, shapes


def load_clip(path: str | os.PathLike | None, model_name: str | None = None, *,
              offline: bool = False) -> tuple[dict[str, torch.Tensor], ClipConfig]:
    """(float32 OpenAI-layout state dict, ClipConfig) of a CLIP weight file; see the module doc for the rules.

    Args:
        path: an OpenAI or open_clip weight file (``--clip_path``), or a name that
            :func:`~clip2video.modules.weights.hub.resolve_clip_weights` fetches (``ViT-B/32``); None with a
            ``NAME:TAG`` model name fetches open_clip's pretrained weights of that tag.
        model_name: ``--clip_model``: open_clip architecture name, optionally ``NAME:PRETRAINED_TAG``.
        offline: never download: named weights must already be cached.

    Raises:
        CheckpointError: unreadable file, unsupported tower or tokenizer, shapes that contradict
            ``model_name``, an activation that the rules cannot decide or that two sources disagree on.
    """
    path = resolve_clip_weights(path, model_name, offline=offline)  # a name → the cached file
    sd, fmt, shapes = load_clip_tensors(path)
    openai = fmt.startswith("OpenAI")

    votes: list[tuple[bool, str]] = []  # (quick_gelu, source)
    arch_cfgs: list[tuple[dict[str, Any], str]] = []
    mean, std = OPENAI_MEAN, OPENAI_STD
    norm_from = "OpenAI CLIP's"
    if openai:
        votes.append((True, "an OpenAI release"))
    side = path.parent / OPEN_CLIP_CONFIG
    if side.is_file():
        try:
            published = json.loads(side.read_text())
            side_cfg = published.get("model_cfg") or {}
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{side}: not a valid open_clip config ({e})") from None
        if side_cfg:
            arch_cfgs.append((side_cfg, str(side)))
            votes.append((bool(side_cfg.get("quick_gelu", False)), str(side)))
        pre = published.get("preprocess_cfg") or {}
        if pre.get("mean") and pre.get("std"):
            mean, std, norm_from = tuple(pre["mean"]), tuple(pre["std"]), str(side)
    name = ""
    if model_name:
        cfg, pcfg = open_clip_config(model_name)
        arch_cfgs.append((cfg, f"--clip_model {model_name}"))
        quick = bool(cfg.get("quick_gelu", False) or pcfg.get("quick_gelu", False))
        votes.append((quick, f"--clip_model {model_name}"))
        if pcfg.get("mean") and pcfg.get("std"):
            mean, std, norm_from = tuple(pcfg["mean"]), tuple(pcfg["std"]), f"open_clip's {model_name}"
        elif ":" not in model_name:
            _warn_if_tags_differ(model_name)
        name = model_name.partition(":")[0]

    heads = {}
    for cfg, source in arch_cfgs:
        what = unsupported_in_config(cfg)
        if what:
            raise CheckpointError(f"{source}: unsupported CLIP: {what}; only CLIP-style ViT towers with OpenAI's "
                                  "BPE tokenizer are supported")
        want = _config_shapes(cfg)
        bad = [f"{f} {want[f]} vs {getattr(shapes, f)}" for f in SHAPE_FIELDS if want[f] != getattr(shapes, f)]
        if bad:
            raise CheckpointError(f"{path}: the weights do not have the shapes of {source} (config vs weights: "
                                  f"{', '.join(bad)})")
        heads = {"vision_head_width": want["vision_head_width"], "text_head_width": want["text_head_width"]}

    matches = matching_architectures(shapes)
    if not votes:
        hint = ", ".join(f"{n} ({'QuickGELU' if q else 'GELU'})" for n, q in matches[:6])
        raise CheckpointError(
            f"{path}: cannot tell whether these weights were trained with QuickGELU or GELU (a {fmt} without "
            f"OpenAI's markers or an {OPEN_CLIP_CONFIG} beside it): give --clip_model NAME"
            + (f"; architectures with these shapes: {hint}" if hint else ""))
    if len({q for q, _ in votes}) > 1:
        said = "; ".join(f"{src}: {'QuickGELU' if q else 'GELU'}" for q, src in votes)
        raise CheckpointError(f"{path}: activation mismatch ({said}); a model run with the other activation "
                              "gives wrong features. Name the matching architecture (…-quickgelu for QuickGELU)")
    quick = votes[0][0]
    if not name:
        same = [n for n, q in matches if q == quick] or [n for n, _ in matches]
        name = same[0] if same else ""
    cfg = ClipConfig(**{**shapes.to_dict(), **heads, "activation": "quick_gelu" if quick else "gelu",
                        "image_mean": mean, "image_std": std, "model_name": name})
    logger.info("CLIP %s: %s, architecture %s (%s), %s (from %s), %d px input, normalisation %s",
                path.name, fmt, name or "custom", "given" if model_name else
                ("inferred from the tensors" if name else "no open_clip name has these shapes"),
                "QuickGELU" if quick else "GELU", votes[0][1], cfg.image_size, norm_from)
    return sd, cfg


def _warn_if_tags_differ(arch: str) -> None:
    """open_clip's pretrained tags of one architecture may normalise differently (ViT-L-14 laion2b_s32b_b82k
    uses mean = std = 0.5): say so when the tag is not given."""
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    odd = [t for t in list_pretrained_tags_by_model(arch)
           if tuple(get_pretrained_cfg(arch, t).get("mean", OPENAI_MEAN)) != OPENAI_MEAN]
    if odd:
        logger.warning("open_clip's %s weights %s use another image normalisation than OpenAI's: for those, "
                       "give --clip_model %s:TAG (OpenAI's mean/std used here)", arch, ", ".join(odd), arch)
