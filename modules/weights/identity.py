"""Which model made a set of vectors: a fingerprint, a typed record of the model, and rebuilding from it.

An index or an embedding export stores vectors that only make sense with the model that made them. Each
records a ``ModelRecord`` (``describe_model``): the fingerprint of the architecture and weights, the numbers
a query needs (logit scale, vector sizes, the TAB weight) and enough to load the model again
(``load_recorded``: the weight file and the resolved config), checked against the fingerprint when loaded.
The record is stored as a plain JSON object (``to_dict``; the manifest's ``model`` entry), and read back with
``from_dict``, which keeps any other keys a writer added (an export's data settings) in ``extra``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and the network are imported where used: reading a record needs neither
    import torch

    from clip2video.modules.network.model import CLIP2Video

    from .spec import ModelSpec


class ModelMismatchError(ValueError):
    """Weights that are not the ones a set of vectors was made with (different fingerprint)."""

    def __init__(self, message: str, *, expected: str = "", got: str = ""):
        super().__init__(message)
        self.expected = expected
        self.got = got


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the architecture and every weight. The mask layout is left out: it is a way of running the
    heads, not part of the model, and an index fixes it to ``per_video`` anyway."""
    import torch

    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in ("mask_layout", "variant")}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        raw = t.view(torch.uint8) if t.dtype in (torch.bfloat16, torch.float16) else t
        h.update(memoryview(raw.numpy()).cast("B"))
    return h.hexdigest()


@dataclass(frozen=True)
class ModelRecord:
    """What an index or an export records about its model (every field optional for vectors made elsewhere).

    Attributes:
        fingerprint: ``model_fingerprint`` ("" when unknown).
        logit_scale: exp of the model's logit scale: scores are ``logit_scale`` × inner product.
        dim / global_dim: size of a vector and of its global part (the rest is the TAB part).
        center_weight: w of the global term (a video vector used as a query is weighted as a caption's).
        variant / mask_layout: as the model ran when the vectors were made.
        checkpoint: the resolved weight file; clip_path: the CLIP file of a zero-shot model.
        zero_shot: heads initialised from CLIP (and, where CLIP does not determine them, from ``seed``).
        config: the resolved ``CLIP2VideoConfig`` as a dict (backbone included).
        max_words: query length in tokens.
        extra: other keys of the stored object, kept as they were.
    """

    fingerprint: str = ""
    logit_scale: float = 1.0
    variant: str | None = None
    mask_layout: str | None = None
    center_weight: float = 0.5
    global_dim: int = 0
    dim: int = 0
    checkpoint: str | None = None
    clip_path: str | None = None
    zero_shot: bool = False
    config: dict[str, Any] | None = None
    max_words: int = 32
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelRecord:
        """The record of a stored object; missing keys take their defaults, ``null`` ones too."""
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names and v is not None}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})

    @property
    def loadable(self) -> bool:
        """Whether the record names the weights to rebuild its model from."""
        return bool(self.config) and bool(self.checkpoint or (self.zero_shot and self.clip_path))


def describe_model(model: CLIP2Video, spec: ModelSpec | None = None) -> ModelRecord:
    """The record of ``model``, loaded as ``spec`` says (None: a model from no file, which cannot be rebuilt)."""
    import torch

    from clip2video.modules.network.tokenizer import END_ID, START_ID

    ckpt_file = None
    if spec is not None and spec.checkpoint:
        from .checkpoint import released_path

        ckpt_file = str(released_path(spec.checkpoint, spec.model_num).resolve())
    clip_path = spec.clip_path if spec is not None else None
    dev = next(model.parameters()).device
    with torch.no_grad():
        ids = torch.tensor([[START_ID, END_ID]], device=dev)
        tv = model.text_vector(model.encode_text(ids, torch.ones_like(ids)))
    dim = int(tv.shape[1])
    return ModelRecord(
        fingerprint=model_fingerprint(model),
        logit_scale=float(model.logit_scale.detach().exp()),
        variant=model.config.variant,
        mask_layout=model.config.mask_layout,
        center_weight=float(model.config.center_weight),
        global_dim=int(model.config.clip.embed_dim) if model.config.use_tab else dim,
        dim=dim,
        checkpoint=ckpt_file,
        clip_path=str(Path(clip_path).resolve()) if clip_path and not ckpt_file else None,
        zero_shot=bool(spec is not None and spec.zero_shot) and not ckpt_file,
        config=model.config.to_dict(),
        max_words=int(spec.max_words or 32) if spec is not None else 32,
        seed=spec.seed if spec is not None else None,
    )


def check_same_model(model: CLIP2Video, fingerprint: str, source: str) -> None:
    """ModelMismatchError unless ``model`` has ``fingerprint`` (``source`` names the weights in the message)."""
    got = model_fingerprint(model)
    if got != fingerprint:
        raise ModelMismatchError(f"{source}: these weights are not the ones the index was built with (fingerprint "
                                 "differs); rebuild the index", expected=fingerprint, got=got)


def load_recorded(record: ModelRecord, device: str | torch.device | None = None) -> CLIP2Video:
    """Rebuild the model a record describes, in the ``per_video`` layout, and check it is still the same model.

    ValueError when the record names no weights (vectors imported without a model); ModelMismatchError when
    the file now holds other weights.
    """
    import torch

    from clip2video.modules.network.model import CLIP2VideoConfig

    from .clip_weights import load_clip_tensors
    from .factory import create_model, load_model

    if not record.loadable:
        raise ValueError("the index records no model file (built from vectors without one): text queries need "
                         "the model; rebuild with --checkpoint or use --like")
    cfg = CLIP2VideoConfig.from_dict(record.config)
    if record.checkpoint:
        model = load_model(record.checkpoint, cfg, prefer_stored=False, mask_layout="per_video")
    else:
        # the recorded config carries the backbone (activation, normalisation); the file gives the tensors
        sd = load_clip_tensors(record.clip_path)[0]
        if record.seed is not None:
            torch.manual_seed(int(record.seed))  # as the build did before creating the model
        model = create_model(cfg, clip_state_dict=sd, mask_layout="per_video")
    check_same_model(model, record.fingerprint, record.checkpoint or record.clip_path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(dev).eval()
