"""Reading and writing weights: OpenAI CLIP files (TorchScript or plain), state dicts, strict loading.

The formats with more than a state dict (release sidecar, CLIP-ViP) are in ``release.py``; building a model
from a file is ``factory.load_model``.

Loading is strict everywhere: a missing key, an unexpected key or a shape mismatch raises
``CheckpointError`` with one line that lists them. (The original silently fell back to CLIP or random heads
when a key did not match, which hid wrong ``--center_proj``/``--centerK`` flags behind bad numbers.)
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clip2video.fileio import atomic_path
from clip2video.modules.network.backbone import OPENAI_EXTRA_KEYS


class CheckpointError(ValueError):
    """A weight file that does not fit the model (one line, names the file and the keys)."""


def short_keys(keys: list[str], limit: int = 12) -> str:
    """Keys grouped by their top-level module (``actionClip.* (16)``) so one line stays readable."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        top = k.split(".")[0] if not k.startswith("clip.") else ".".join(k.split(".")[:2])
        groups.setdefault(top, []).append(k)
    items = [g[0] if len(g) == 1 else f"{top}.* ({len(g)})" for top, g in groups.items()]
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def is_torchscript(path: Path) -> bool:
    """TorchScript archives carry a ``constants.pkl``/``code/`` entry; ``torch.save`` zips do not."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, container) of a weight file: a TorchScript archive (OpenAI's ``ViT-B-32.pt``) or a
    ``torch.save`` dict, unwrapped from a ``{"model": ...}`` / ``{"state_dict": ...}`` checkpoint.

    ``container`` is ``"torchscript"``, ``"state dict"`` or, when a wrapper was removed, ``"checkpoint"``:
    the CLIP-file reader names formats by it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weight file")
    container = "torchscript" if is_torchscript(path) else "state dict"
    try:
        if container == "torchscript":
            with warnings.catch_warnings():
                # OpenAI ships CLIP as TorchScript; the user can do nothing about torch deprecating the reader
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
                sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure becomes one clear line
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    for wrapper in ("model", "state_dict"):  # our training checkpoint; open_clip's and others'
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd, container = sd[wrapper], "checkpoint"
            break
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) for k in sd):
        raise CheckpointError(f"{path}: not a state dict (got {type(sd).__name__})")
    return dict(sd), container


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weight file (see :func:`read_weights`)."""
    return read_weights(path)[0]


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
        problems.append(f"missing keys: {short_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {short_keys(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch (file vs model): {short_keys(shapes)}")
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


def load_mapped(file: Path) -> Any:
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


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`clip2video.fileio.atomic_path`: never a half-written file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
