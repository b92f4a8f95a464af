"""Frame folders → sampled, preprocessed frame tensors, exactly as the original CLIP2Video read them.

A video is a folder of image files (``FRAMES/<video_id>/00000001.jpg ...`` as written by ``sample_frame.py``).
Three steps, each reproducing a measured behaviour of the original ``RawFrameExtractor`` (DESIGN §2 "Frames"):

1. :func:`list_frame_files`: every file of the folder, sorted by name, no extension filter.
2. :func:`sample_positions`: ``feature_framerate`` is a *decimation factor* on that list, then at most
   ``max_frames`` evenly spaced positions; :func:`jitter_positions` adds the training-time jitter.
3. :func:`preprocess_image`: PIL RGB → bicubic resize of the short side → centre crop → [0, 1] → CLIP
   normalisation. The released checkpoints saw PIL's antialiased bicubic pixels, and OpenCV/torch resizing
   moves the similarities by 4e-3..1e-2 (fixture README), so the default ``mode="exact"`` keeps PIL's pixels
   bit for bit and only removes work around them:

   * the two separable resize passes are run as two calls with the crop in between, so the vertical pass
     never computes the columns that the centre crop throws away (:func:`resize_crop`; bit-identical by
     construction and checked against torchvision's ``Resize`` + ``CenterCrop`` in the tests);
   * ``ToTensor`` + ``Normalize`` become one transposing copy into the video buffer and three in-place
     float32 operations, the same ones in the same order, so the values are identical;
   * the folder is listed once per video (not once per frame).

   ``mode="fast"`` trades exactness for speed: libjpeg decodes large JPEGs at 1/2, 1/4 or 1/8 scale (PIL
   ``draft``, DCT-domain scaling) whenever the reduced image keeps a short side ≥ ``image_size``, and the
   resize is torch's vectorised uint8 antialiased bicubic (:func:`resize_crop_fast`, Pillow's algorithm with
   16-bit weights). Differences from ``exact`` are measured in ``benchmarks/bench_dataloader.py`` and
   bounded in the tests (:data:`FAST_MODE_MAX_LEVELS_NO_DRAFT`, :data:`FAST_MODE_MEAN_LEVELS`).

Padded slots are all-zero tensors with mask 0, as in the original (which then encoded them through CLIP).
"""

from __future__ import annotations

import logging
import os
import warnings
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
MODES = ("exact", "fast")

#: Documented bounds of ``fast`` vs ``exact``, in uint8 levels before normalisation (1 level ≈ 0.015 after
#: it). Without DCT scaling (short side < 2·S) only the resize's fixed-point weights differ: at most 1 level
#: (bound kept at 2), < 1 % of pixels. With DCT scaling (short side ≥ 2·S) the decoder itself differs:
#: mean ≈ 0.4–1.0 level, max up to ~50 levels on sharp synthetic edges. Measured in the benchmark, checked in
#: tests/test_frames.py.
FAST_MODE_MAX_LEVELS_NO_DRAFT = 2
FAST_MODE_MEAN_LEVELS = 2.0


class FrameError(ValueError):
    """A frame folder or frame file that cannot give a valid video (one line naming it and the problem)."""


# --------------------------------------------------------------------------------------------- listing/sampling


def list_frame_files(folder: str | os.PathLike) -> list[str]:
    """File names of a frame folder sorted by name.

    No extension filter, as the original (``sorted(os.listdir(...))``): a stray non-image file is an error
    at decode time rather than a silently shifted sampling grid.

    Raises:
        FrameError: the folder is missing, is not a folder, or cannot be listed.
    """
    folder = os.fspath(folder)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        raise FrameError(f"{folder}: frame folder does not exist") from None
    except NotADirectoryError:
        raise FrameError(f"{folder}: not a folder (expected a folder of frame images)") from None
    except OSError as e:
        raise FrameError(f"{folder}: cannot list frame folder ({e.strerror or e})") from None
    return sorted(names)


def sample_positions(n_files: int, framerate: int, max_frames: int) -> np.ndarray:
    """Indices into the sorted file list of the frames the original samples.

    ``framerate`` r decimates the folder: keep ``linspace(0, n−1, n // r)`` truncated to int; if more than
    ``max_frames`` remain, keep ``linspace(0, k−1, max_frames)`` of those (truncated). E.g. 58 files, r=2 →
    1-based files 1,5,11,15,...,51,58.

    Raises:
        FrameError: no frame would be sampled (``n_files < framerate``); the original produced NaN here.
        ValueError: framerate or max_frames below 1.
    """
    if framerate < 1:
        raise ValueError(f"feature_framerate must be an integer >= 1 (a decimation factor), got {framerate}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    kept = n_files // framerate
    if kept < 1:
        raise FrameError(f"{n_files} frame file(s) with feature_framerate {framerate} leave no frame to sample")
    # dtype=int truncates exactly like the original's np.linspace(..., dtype=int)
    idx = np.linspace(0, n_files - 1, num=kept, dtype=int)
    if len(idx) > max_frames:
        idx = idx[np.linspace(0, len(idx) - 1, num=max_frames, dtype=int)]
    return idx.astype(np.int64)


def jitter_positions(positions: np.ndarray, n_files: int, rng: np.random.Generator) -> np.ndarray:
    """Training-time temporal jitter of sampled positions (the original's ``train`` branch).

    Inner positions move by a random integer offset in ``[−s, s)``, ``s`` = half the smallest gap between
    neighbouring positions, only when ``s > 2``; the first and last positions stay. With ``s`` at most half
    of every gap, neighbours can never cross, so the result stays strictly increasing and inside
    ``[0, n_files)``.

    Differences from the original, on purpose: it measured the step on the decimated list (so offsets were
    multiples of ``feature_framerate`` files) from the first gap only and drew from NumPy's global state; here
    offsets are in files, bounded by the smallest gap, and drawn from ``rng`` so that a sample is a function
    of (seed, epoch, index) only.
    """
    pos = np.asarray(positions, dtype=np.int64).copy()
    if len(pos) < 3:
        return pos
    s = int(np.diff(pos).min()) // 2
    if s <= 2:
        return pos
    pos[1:-1] += rng.integers(-s, s, size=len(pos) - 2)
    return np.clip(pos, 0, n_files - 1)


# ------------------------------------------------------------------------------------------------ preprocessing


def resize_geometry(width: int, height: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Full resized size (w, h) and crop offset (left, top) of torchvision ``Resize(size)`` + ``CenterCrop``.

    Same rounding as torchvision on PIL images: long side ``int(size * long / short)``, crop offset
    ``int(round((dim − size) / 2.0))`` (Python's round, ties to even).
    """
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    return (new_w, new_h), (int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0)))


def resize_crop(img: Image.Image, image_size: int) -> Image.Image:
    """Short side → ``image_size`` (PIL bicubic) + centre crop; the same uint8 pixels as torchvision's pair.

    Pillow resizes in two separable passes, horizontal then vertical, each rounding to uint8. For a landscape
    frame the crop removes columns, so we run the horizontal pass alone (``resize((W', H))`` has no vertical
    pass), crop the columns (an integer copy), then run the vertical pass alone on the 224 kept columns
    instead of all W'. Both passes use exactly the coefficients of the one-call resize (same source extent,
    same output size along each axis), so every pixel is identical while (W' − S) / W' of the vertical work
    disappears. A fractional ``box=`` would save more but is *not* exact: Pillow takes the box as C floats and
    derives slightly different fixed-point weights (1–2 levels apart on ~0.2 % of pixels, measured), so it is
    not used. Portrait frames (crop removes rows) take the plain one-call path.
    """
    w, h = img.size
    (fw, fh), (left, top) = resize_geometry(w, h, image_size)
    if fw > image_size:  # landscape: crop columns between the two passes
        tmp = img.resize((fw, h), Image.Resampling.BICUBIC) if fw != w else img
        tmp = tmp.crop((left, 0, left + image_size, h))
        return tmp.resize((image_size, image_size), Image.Resampling.BICUBIC) if h != image_size else tmp
    full = img.resize((fw, fh), Image.Resampling.BICUBIC) if (fw, fh) != (w, h) else img
    return full.crop((left, top, left + image_size, top + image_size))


def resize_crop_fast(rgb: np.ndarray, image_size: int) -> np.ndarray:
    """``fast`` mode resize: (H, W, 3) uint8 → (S, S, 3) uint8 view, ≤ 1 level from Pillow's pixels.

    torch's antialiased bicubic resize on uint8 (``F.interpolate(..., antialias=True)``) implements Pillow's
    algorithm (same a = −0.5 kernel, same support scaling) with AVX2 and 16-bit fixed-point weights instead
    of Pillow's 22-bit ones, so a few pixels round the other way (measured: ≤ 1 level on ~0.4 % of pixels of
    random images) while the resize is 3–7× faster than Pillow's. Same geometry as ``exact`` (full resize to
    torchvision's size, then the centre crop). Honours torch's thread setting (one thread in DataLoader
    workers).
    """
    h, w = rgb.shape[:2]
    (fw, fh), (left, top) = resize_geometry(w, h, image_size)
    if (fw, fh) == (w, h):
        return rgb[top:top + image_size, left:left + image_size]
    t = _from_pil_array(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0)  # channels-last memory
    out = torch.nn.functional.interpolate(t, size=(fh, fw), mode="bicubic", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()[top:top + image_size, left:left + image_size]


@lru_cache(maxsize=8)
def _mean_std(mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> tuple[torch.Tensor, ...]:
    """float32 (3, 1, 1) mean and std tensors, as ``Normalize`` builds them."""
    return (torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1),
            torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1))


def _from_pil_array(rgb: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor view of a (possibly read-only) uint8 array; the callers only read it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(rgb)


def to_normalised_tensor(rgb: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
    """(H, W, 3) uint8 → (3, H, W) float32, normalised with the CLIP mean/std, bit-identical to torchvision.

    The same float32 operations as ``ToTensor`` + ``Normalize`` (uint8 → float32, ``/ 255``, ``− mean``,
    ``/ std``), element-wise and in the same order, so the values are identical; but the HWC → CHW transpose
    and the uint8 → float32 conversion are one copy into ``out`` and the three operations run in place
    (0.14 ms per 224² frame here, vs 0.45 ms for a per-channel look-up table and ~1 ms for the transforms).

    ``out`` (a contiguous float32 (3, H, W) tensor, e.g. one slot of a video buffer) is filled in place,
    saving an allocation and a copy per frame.
    """
    mean, std = _mean_std()
    if out is None:
        out = torch.empty((3, rgb.shape[0], rgb.shape[1]), dtype=torch.float32)
    out.copy_(_from_pil_array(rgb).permute(2, 0, 1))
    return out.div_(255).sub_(mean).div_(std)


def _open_rgb(path: str, image_size: int, mode: str) -> Image.Image:
    img = Image.open(path)
    if mode == "fast" and img.format == "JPEG":
        # libjpeg DCT scaling: picks the largest 1/2^k reduction that keeps both sides >= image_size
        img.draft("RGB", (image_size, image_size))
    return img if img.mode == "RGB" else img.convert("RGB")  # convert("RGB") of RGB is a plain copy


def preprocess_image(path: str | os.PathLike, image_size: int = 224, mode: str = "exact",
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """One frame file → (3, S, S) float32, normalised as CLIP expects.

    Args:
        path: image file.
        image_size: S, the CLIP input resolution.
        mode: ``"exact"`` reproduces the original's pixels bit for bit; ``"fast"`` decodes large JPEGs at a
            reduced DCT scale first (slightly different pixels, see module doc).
        out: optional contiguous (3, S, S) float32 tensor to write into (returned).

    Raises:
        FrameError: the file is missing or not a readable image.
    """
    if mode not in MODES:
        raise ValueError(f"image mode must be one of {MODES}, got {mode!r}")
    path = os.fspath(path)
    try:
        img = _open_rgb(path, image_size, mode)
        if mode == "exact":
            rgb = np.asarray(resize_crop(img, image_size), dtype=np.uint8)
        else:
            rgb = resize_crop_fast(np.asarray(img, dtype=np.uint8), image_size)
    except FileNotFoundError:
        raise FrameError(f"{path}: frame file does not exist") from None
    except UnidentifiedImageError:
        raise FrameError(f"{path}: not a readable image") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated/corrupt data surfaces as OSError in PIL
        raise FrameError(f"{path}: cannot decode image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    return to_normalised_tensor(rgb, out)


def load_video(
    folder: str | os.PathLike,
    *,
    max_frames: int = 12,
    framerate: int = 1,
    image_size: int = 224,
    mode: str = "exact",
    rng: np.random.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A frame folder → (frames (T, 3, S, S) float32, mask (T,) int64, sampled file names).

    ``T = max_frames``. Slots after the sampled frames are all-zero tensors with mask 0 (the original's
    padding, which its model still encoded). With ``rng`` the positions are jittered (training).

    Raises:
        FrameError: missing or empty folder, too few files for ``framerate``, unreadable image; the message
            names the folder or file.
    """
    folder = os.fspath(folder)
    files = list_frame_files(folder)
    if not files:
        raise FrameError(f"{folder}: frame folder is empty")
    try:
        pos = sample_positions(len(files), framerate, max_frames)
    except FrameError as e:
        raise FrameError(f"{folder}: {e}") from None
    if rng is not None:
        pos = jitter_positions(pos, len(files), rng)
    chosen = [files[p] for p in pos]
    frames = torch.empty(max_frames, 3, image_size, image_size, dtype=torch.float32)
    frames[len(chosen):].zero_()  # padding: all-zero slots, mask 0
    mask = torch.zeros(max_frames, dtype=torch.int64)
    mask[: len(chosen)] = 1
    for slot, name in enumerate(chosen):
        preprocess_image(os.path.join(folder, name), image_size, mode, out=frames[slot])
    return frames, mask, chosen


def check_video(folder: str | os.PathLike, *, framerate: int = 1, max_frames: int = 12) -> str | None:
    """Cheap validity check of a frame folder without decoding: None if usable, else the one-line reason."""
    try:
        files = list_frame_files(folder)
        if not files:
            return f"{os.fspath(folder)}: frame folder is empty"
        sample_positions(len(files), framerate, max_frames)
    except FrameError as e:
        msg = str(e)
        return msg if msg.startswith(os.fspath(folder)) else f"{os.fspath(folder)}: {msg}"
    return None


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FAST_MODE_MAX_LEVELS_NO_DRAFT",
    "FAST_MODE_MEAN_LEVELS",
    "FrameError",
    "check_video",
    "jitter_positions",
    "list_frame_files",
    "load_video",
    "preprocess_image",
    "resize_crop",
    "resize_crop_fast",
    "resize_geometry",
    "sample_positions",
    "to_normalised_tensor",
]
