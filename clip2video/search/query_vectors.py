"""Query vectors beyond one caption: an image, a video clip, an indexed video, and weighted sums of them.

**What each part means for a CLIP2Video model.** A caption becomes ``t_g`` (end-token feature) and ``t_a`` (TAB
output), a video ``v_g`` (TDB + temporal transformer) and ``v_a`` (TAB), all unit vectors of one shared space
(``modules/network/model.py``). A video-side query is put through the video tower:

- an **image** goes through CLIP's image tower and then the video heads as a video of one frame: the frame in
  slot 0, the other ``max_frames − 1`` slots padded with zeros and masked, exactly what the index holds for a
  frame folder that contains only this image (same decoder, resize, crop and normalisation: ``dataloaders.frames``).
  With one frame the TDB has no differences to add and the TAB assigns the one frame's token to its centres,
  so an image query ranks the index as "the videos most like this still frame", not as CLIP's image–image
  similarity. The EXIF orientation of a photo is applied first (frame folders never carry one);
- a **clip** is read with the frame settings the index records (``max_frames``, ``feature_framerate``, image
  mode and size, the rate video files were read at), so its vector is the one the index would store for it;
- an **indexed video** (``like:ID``, ``--like``) is its stored vector.

**How parts are combined.** A caption's query vector is ``[w·t_g, (1−w)·t_a]`` with ``t_g``, ``t_a`` unit and
``w`` the model's ``center_weight``; its inner product with a video's ``[v_g, v_a]`` is the model's score. The
sum of weighted parts is normalised *the same way*: each half is summed on its own,
``g = Σ wᵢ·gᵢ`` and ``a = Σ wᵢ·aᵢ``, each is scaled back to unit length, and the two are weighted by ``w`` and
``1 − w``. Normalising the halves separately (rather than the whole vector) keeps the global and the TAB term in
the proportion the model was trained with, so a combined query is scored like a caption: its score against a
video is ``w·cos(g, v_g) + (1−w)·cos(a, v_a)`` on the model's logit scale. A single part is used as it is (its
halves are already unit), so ``"a dog"`` is exactly the caption query and ``like:ID`` exactly ``--like ID``.
Parts that cancel out (``a - a``) leave no direction and are refused.

Images are checked before decoding: by their first bytes (JPEG, PNG, BMP or WebP, whatever the name says),
by what Pillow reads from the header, and by their pixel count (``MAX_IMAGE_PIXELS``), so a decompression bomb
is refused without being decoded.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clip2video.search.limits import MAX_IMAGE_PIXELS
from clip2video.search.query_parse import Part

# the image formats a query accepts, by their leading bytes (WebP: "RIFF", 4 size bytes, "WEBP")
IMAGE_MAGIC = {"JPEG": (b"\xff\xd8\xff",), "PNG": (b"\x89PNG\r\n\x1a\n",), "BMP": (b"BM",)}


class QueryInputError(ValueError):
    """A query part that cannot be turned into a vector (missing file, not an image, unknown video id...);
    one line naming the part."""


# ----------------------------------------------------------------------------------------------- images
def sniff_image(data: bytes) -> str | None:
    """The image format the bytes start with (``JPEG``, ``PNG``, ``BMP``, ``WEBP``), or None."""
    head = bytes(data[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for fmt, magics in IMAGE_MAGIC.items():
        if any(head.startswith(m) for m in magics):
            return fmt
    return None


def check_image(data: bytes, name: str, *, max_bytes: int | None = None,
                max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of an image query's bytes, or QueryInputError naming ``name`` and what is wrong.

    The type is decided by the content (leading bytes, then Pillow's reading of the header must agree), not by
    the name or a declared content type; the size bound is checked before anything is decoded.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    if max_bytes is not None and len(data) > max_bytes:
        raise QueryInputError(f"{name}: image of {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise QueryInputError(f"{name}: empty file")
    fmt = sniff_image(data)
    if fmt is None:
        raise QueryInputError(f"{name}: not an image (JPEG, PNG, BMP or WebP expected, judged by its content)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own bound follows
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                size, pil_format = img.size, img.format
    except Image.DecompressionBombError:
        raise QueryInputError(f"{name}: image too large (over {max_pixels} pixels)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise QueryInputError(f"{name}: not a readable {fmt} image") from None
    if pil_format != fmt:
        raise QueryInputError(f"{name}: starts like a {fmt} image but reads as {pil_format}")
    w, h = size
    if w < 1 or h < 1:
        raise QueryInputError(f"{name}: image of {w}x{h} pixels")
    if w * h > max_pixels:
        raise QueryInputError(f"{name}: image of {w}x{h} pixels; the limit is {max_pixels} pixels")
    return w, h


def read_image_file(path: str | os.PathLike, *, max_pixels: int = MAX_IMAGE_PIXELS) -> bytes:
    """An image query's file as bytes, checked as :func:`check_image` checks an upload."""
    p = Path(path)
    if not p.is_file():
        raise QueryInputError(f"{p}: no such file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise QueryInputError(f"{p}: cannot read ({e.strerror or e})") from None
    check_image(data, str(p), max_pixels=max_pixels)
    return data


# ----------------------------------------------------------------------------------------------- combining
Halves = tuple[np.ndarray, "np.ndarray | None"]  # (global (G,), aligned (A,) or None): unit vectors


def combine(weights: Sequence[float], halves: Sequence[Halves], center_weight: float) -> np.ndarray:
    """The query vector of ``Σ wᵢ·partᵢ``, normalised as a caption's: ``[w·ĝ, (1−w)·â]`` (see the module doc).

    ``halves`` holds each part's unit (global, aligned) pair; ``aligned`` is None for models without TAB,
    whose query vector is ``ĝ`` alone. One part is used as it is, scaled by the sign of its weight.
    """
    if len(weights) != len(halves) or not halves:
        raise ValueError("combine needs one weight per part and at least one part")
    has_tab = halves[0][1] is not None
    if len(halves) == 1:
        sign = 1.0 if weights[0] > 0 else -1.0
        g = sign * np.asarray(halves[0][0], np.float32)
        a = sign * np.asarray(halves[0][1], np.float32) if has_tab else None
    else:
        scale = float(sum(abs(w) for w in weights))
        g = _unit(sum(w * np.asarray(h[0], np.float64) for w, h in zip(weights, halves, strict=True)), scale, "global")
        a = _unit(sum(w * np.asarray(h[1], np.float64) for w, h in zip(weights, halves, strict=True)), scale,
                  "TAB") if has_tab else None
    if not has_tab:
        return np.ascontiguousarray(g, dtype=np.float32)
    w = float(center_weight)
    return np.concatenate([w * g, (1 - w) * a]).astype(np.float32)


def _unit(v: np.ndarray, scale: float, half: str) -> np.ndarray:
    n = float(np.linalg.norm(v))
    if not np.isfinite(n) or n <= 1e-6 * max(scale, 1.0):
        raise QueryInputError(f"the parts of the query cancel out (their {half} vectors sum to zero); "
                              "change a weight or a sign")
    return (v / n).astype(np.float32)


# ----------------------------------------------------------------------------------------------- encoding
@dataclass(frozen=True)
class FrameSettings:
    """How the index read its videos (its manifest's ``encoding``): what an image or clip query must reuse."""

    max_frames: int
    framerate: int
    image_mode: str
    image_size: int
    video_fps: float


class QueryEncoder:
    """Turns parsed query parts into one query vector for an opened ``SearchIndex`` (and searches with it).

    Args:
        index: the index (its recorded model is loaded on first use, as for text queries).
        max_image_pixels: bound on an image query's width × height.
    """

    def __init__(self, index, *, max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.index = index
        self.max_image_pixels = max_image_pixels

    # ------------------------------------------------------------------ settings
    def frame_settings(self) -> FrameSettings:
        """The index's recorded frame settings; QueryInputError for an index made from exported vectors."""
        from clip2video.dataloaders.video_io import DEFAULT_VIDEO_FPS

        enc = dict(self.index.manifest.get("encoding") or {})
        if "max_frames" not in enc:
            raise QueryInputError(f"{self.index.folder}: built from exported vectors, which record no frame "
                                  "settings; image and clip queries need an index built from videos "
                                  "(search.py build --features_path)")
        return FrameSettings(int(enc["max_frames"]), int(enc.get("framerate", 1)),
                             str(enc.get("image_mode", "exact")), int(enc["image_size"]),
                             float(enc.get("video_fps") or DEFAULT_VIDEO_FPS))

    def _model(self):
        model, tokenizer = self.index.model_and_tokenizer()
        return model, tokenizer, next(model.parameters()).device

    # ------------------------------------------------------------------ halves per kind
    def text_halves(self, texts: Sequence[str]) -> list[Halves]:
        import torch

        from clip2video.modules.runtime.precision import autocast

        model, tokenizer, device = self._model()
        ids, mask = tokenizer.batch(list(texts))
        with torch.inference_mode(), autocast(device, self.index.precision):
            t = model.encode_text(ids.to(device), mask.to(device))
        return _split(t.global_, t.aligned)

    def _video_halves(self, frames, mask) -> list[Halves]:
        """(n, T, 3, S, S) frames and (n, T) masks through the video tower (``per_video`` layout)."""
        import torch

        from clip2video.modules.runtime.precision import autocast

        model, _, device = self._model()  # load_recorded runs it in the per_video layout, as the build did
        with torch.inference_mode(), autocast(device, self.index.precision):
            v = model.encode_video(frames.to(device), mask.to(device))
        return _split(v.global_, v.aligned)

    def image_halves(self, images: Sequence[tuple[str, bytes]]) -> list[Halves]:
        """``(name, encoded bytes)`` images as one-frame videos (see the module doc)."""
        import torch

        from clip2video.dataloaders.frames import preprocess_image_bytes

        fs = self.frame_settings()
        frames = torch.zeros(len(images), fs.max_frames, 3, fs.image_size, fs.image_size)  # padding: zeros
        mask = torch.zeros(len(images), fs.max_frames, dtype=torch.int64)
        for i, (name, data) in enumerate(images):
            check_image(data, name, max_pixels=self.max_image_pixels)
            preprocess_image_bytes(data, fs.image_size, fs.image_mode, out=frames[i, 0], name=name, upright=True)
            mask[i, 0] = 1
        return self._video_halves(frames, mask)

    def clip_halves(self, paths: Sequence[str]) -> list[Halves]:
        """Video files read as the index read its video files (``build.read_source``)."""
        import torch

        from clip2video.dataloaders.frames import load_video_file

        fs = self.frame_settings()
        frames, masks = [], []
        for p in paths:
            if not Path(p).is_file():
                raise QueryInputError(f"{p}: no such file")
            f, m, _ = load_video_file(p, fps=fs.video_fps, max_frames=fs.max_frames, framerate=fs.framerate,
                                      image_size=fs.image_size, mode=fs.image_mode)
            frames.append(f)
            masks.append(m)
        return self._video_halves(torch.stack(frames), torch.stack(masks))

    def indexed_halves(self, video_ids: Sequence[str]) -> list[Halves]:
        out = []
        g = int(self.index.model_record.global_dim or 0)
        for vid in video_ids:
            try:
                v = self.index.stored_vector(vid)
            except KeyError:
                raise QueryInputError(f"like:{vid[:200]}: no such video in the index") from None
            out.append((v[:g], v[g:]) if 0 < g < len(v) else (v, None))
        return out

    # ------------------------------------------------------------------ whole queries
    def vector(self, parts: Sequence[Part], uploads: Mapping[str, bytes] | None = None) -> np.ndarray:
        """The (D,) query vector of parsed parts.

        With ``uploads`` (the HTTP API), an image part names an uploaded image and clip parts are refused
        (no file of the server is read for a request); without, image and clip parts are file paths.
        """
        if not parts:
            raise QueryInputError("empty query")
        halves: list[Halves | None] = [None] * len(parts)
        by_kind: dict[str, list[int]] = {}
        for i, p in enumerate(parts):
            by_kind.setdefault(p.kind, []).append(i)
        for kind, rows in by_kind.items():
            values = [parts[i].value for i in rows]
            if kind == "text":
                got = self.text_halves(values)
            elif kind == "like":
                got = self.indexed_halves(values)
            elif kind == "image":
                got = self.image_halves([self._image_bytes(v, uploads) for v in values])
            elif kind == "clip":
                if uploads is not None:
                    raise QueryInputError(f"clip:{values[0][:200]}: video clips are not accepted here; index "
                                          "the clip, or query with search.py query --clip")
                got = self.clip_halves(values)
            else:
                raise QueryInputError(f"unknown part kind {kind!r}")
            for i, h in zip(rows, got, strict=True):
                halves[i] = h
        return combine([p.weight for p in parts], halves, float(self.index.model_record.center_weight))

    def _image_bytes(self, value: str, uploads: Mapping[str, bytes] | None) -> tuple[str, bytes]:
        if uploads is None:
            return value, read_image_file(value, max_pixels=self.max_image_pixels)
        if value not in uploads:
            raise QueryInputError(f"image:{value[:200]}: no uploaded image of that name"
                                  + (f" (uploaded: {', '.join(sorted(uploads))[:200]})" if uploads else ""))
        return value, uploads[value]

    def search(self, parts: Sequence[Part], k: int, uploads: Mapping[str, bytes] | None = None) -> list[Any]:
        """Top-k hits of a parsed query; the indexed videos it names (``like:``) are left out, as ``--like``
        leaves out its own video."""
        v = self.vector(parts, uploads)
        named = {p.value for p in parts if p.kind == "like"}
        # never QB-normalised: the bank holds captions, and a sum of parts (or an image, a clip) is not one
        kw = {"qb": False} if getattr(self.index, "qb", None) is not None else {}
        if not isinstance(k, int):  # a moments.SearchRequest: the named videos' rows are left out before k
            rows = tuple(r for vid in sorted(named) for r in self.index.rows_of(vid))
            return self.index.search(v[None], k.excluding(rows) if rows else k, **kw)[0]
        hits = self.index.search(v[None], k + len(named), **kw)[0]
        return [h for h in hits if h.video_id not in named][:k]


def _split(global_, aligned) -> list[Halves]:
    g = global_.float().cpu().numpy()
    a = aligned.float().cpu().numpy() if aligned is not None else None
    return [(g[i], a[i] if a is not None else None) for i in range(g.shape[0])]
