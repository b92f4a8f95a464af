"""Frame folders → sampled, preprocessed frame tensors, exactly as the original CLIP2Video read them.

A video is a folder of image files (``FRAMES/<video_id>/00000001.jpg ...`` as written by ``sample_frame.py``).
Three steps, each reproducing a measured behaviour of the original ``RawFrameExtractor`` (docs/original-behaviours.md,
"Frames"):

1. :func:`list_frame_files`: every file of the folder, sorted by name, no extension filter.
2. :func:`sample_positions`: ``feature_framerate`` is a *decimation factor* on that list, then at most
   ``max_frames`` evenly spaced positions; :func:`jitter_positions` adds the training-time jitter.
3. :func:`preprocess_image`: PIL RGB → bicubic resize of the short side → centre crop → [0, 1] → CLIP
   normalisation. The released checkpoints saw PIL's antialiased bicubic pixels, and OpenCV/torch resizing
   moves the similarities beyond the parity bound, so the default ``mode="exact"`` keeps PIL's pixels bit for
   bit and only removes work around them:

   * colour JPEGs are decoded by torchvision's libjpeg-turbo call when it returns Pillow's pixels (probed
     once per process; else Pillow), straight into a planar buffer (:func:`_decode_rgb`);
   * the resize + crop is :func:`~dataloaders.resample.resize_crop_array`: Pillow's fixed-point bicubic
     arithmetic reimplemented as two vectorised kernels that compute only the pixels the centre crop keeps
     (bit-identical, checked against torchvision's ``Resize`` + ``CenterCrop`` in the tests; Pillow itself
     when numba is missing; speed in benchmarks/README.md);
   * ``ToTensor`` + ``Normalize`` become a (3, 256) look-up table computed once with their own float32
     operations (so the values are identical), applied by the resize kernel as it writes each pixel
     straight into the video buffer;
   * the folder is listed once per video (not once per frame).

   ``mode="fast"`` trades exactness for speed: libjpeg decodes large JPEGs at 1/2, 1/4 or 1/8 scale (PIL
   ``draft``, DCT-domain scaling) whenever the reduced image keeps a short side ≥ ``image_size``; the resize
   is the same as ``exact``'s, so frames with a short side < 2·S give identical tensors in both modes.
   Differences from ``exact`` are measured in ``benchmarks/bench_dataloader.py`` and bounded in the tests
   (:data:`FAST_MODE_MEAN_LEVELS`).

Padded slots are all-zero tensors with mask 0, as in the original (which then encoded them through CLIP).

A video file can stand in for its folder: :func:`load_video_file` reads it as if it had been extracted.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from fractions import Fraction
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from clip2video.modules.network.backbone import OPENAI_MEAN, OPENAI_STD

from .resample import resize_crop, resize_crop_array, resize_geometry
from .video_io import DEFAULT_VIDEO_FPS, VideoReadError, decode_outputs, probe

logger = logging.getLogger(__name__)

# The normalisation every frame reader delivers: OpenAI CLIP's, defined once with the backbone (a model whose
# weights were trained with another one converts inside the model, ``to_backbone_normalisation``).
CLIP_MEAN = OPENAI_MEAN
CLIP_STD = OPENAI_STD
MODES = ("exact", "fast")

#: Documented bound of ``fast`` vs ``exact``: mean absolute difference in uint8 levels before normalisation
#: (1 level ≈ 0.015 after it) when libjpeg's DCT scaling applies (short side ≥ 2·S; below that the two modes
#: are identical). Measured mean ≈ 0.3–1.0 level, max up to ~50 levels on sharp synthetic edges; checked in
#: tests/test_frames.py.
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


@lru_cache(maxsize=8)
def _normalise_lut(mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> np.ndarray:
    """(3, 256) float32: every uint8 level of every channel through ``ToTensor`` + ``Normalize``'s own ops."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)  # as Normalize builds them
    s = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    levels = torch.arange(256, dtype=torch.uint8).expand(3, 1, 256)
    return levels.float().div(255).sub(m).div(s).reshape(3, 256).numpy()


@lru_cache(maxsize=1)
def _torch_jpeg_op():
    """torchvision's libjpeg-turbo decoder as a torch operator ``(data, mode, exif) → (C, H, W)``, or None.

    Importing ``torchvision`` itself costs a couple of seconds per process (it imports ``torch._dynamo``), for
    one function; so the operator library that holds the decoder (``image_stable``, ``image`` in older
    releases) is loaded straight from torchvision's folder, which registers ``torch.ops.image.decode_jpeg``
    without running torchvision's package code. Where that library is not found, ``torchvision.io`` is
    imported after all; where neither works, None (Pillow decodes everything).
    """
    import importlib.machinery
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        for name in ("image_stable", "image"):
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                lib = os.path.join(folder, name + suffix)
                if not os.path.isfile(lib):
                    continue
                try:
                    torch.ops.load_library(lib)
                    return torch.ops.image.decode_jpeg
                except (OSError, RuntimeError, AttributeError):
                    continue
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # pragma: no cover - torchvision is a requirement
        return None

    def decode(data: torch.Tensor, mode: int, exif: bool) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # raised by every call in torchvision 0.29
            return decode_jpeg(data, mode=ImageReadMode(mode), apply_exif_orientation=exif)

    return decode


@lru_cache(maxsize=1)
def _torch_jpeg_matches_pillow() -> bool:
    """Whether torchvision's JPEG decoder returns Pillow's pixels in this environment (checked once).

    Both wrap libjpeg-turbo with the same defaults (integer IDCT, fancy upsampling), and they agreed on every
    JPEG we tried (random sizes, 4:4:4 / 4:2:2 / 4:2:0 chroma, qualities 75–95); but they are separate builds,
    so a small probe is decoded by both first and any difference sends every frame to Pillow. torchvision
    0.29 deprecates its image decoders in favour of TorchCodec; once they are gone, the decoder is not found
    and Pillow decodes everything, with the same results.
    """
    if _torch_jpeg_op() is None:  # pragma: no cover - torchvision is a requirement
        return False
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:48, 0:64]
    probe = np.stack([x * 4, y * 5, (x + y) * 2], -1) + rng.normal(0, 20, (48, 64, 3))
    probe = np.clip(probe, 0, 255).astype(np.uint8)
    for subsampling in (0, 1, 2):  # 4:4:4, 4:2:2, 4:2:0
        buf = io.BytesIO()
        Image.fromarray(probe).save(buf, "JPEG", quality=90, subsampling=subsampling)
        ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        got = _decode_with_torch(buf.getvalue())
        if got is None or not np.array_equal(got, ref):
            logger.warning("torchvision's JPEG decoder gives other pixels than Pillow's here: frames are decoded "
                           "with Pillow (slower, same results)")
            return False
    return True


def _decode_with_torch(data: bytes) -> np.ndarray | None:
    """A colour JPEG's (H, W, 3) pixels from torchvision's decoder (a strided view of its (3, H, W) output), or
    None where it cannot decode the data or the JPEG is not three-channel (grey, CMYK: Pillow handles those)."""
    decode = _torch_jpeg_op()
    try:
        chw = decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, False)  # 0: channels as stored
    except RuntimeError:
        return None  # corrupt or unusual: Pillow decodes it or says what is wrong
    return chw.permute(1, 2, 0).numpy() if chw.shape[0] == 3 else None  # the kernels read the view as is


def _decode_rgb(path: str, image_size: int, mode: str) -> np.ndarray:
    """(H, W, 3) uint8: the frame file as Pillow decodes it and converts it to RGB (:func:`_decode_rgb_bytes`)."""
    with open(path, "rb") as f:
        data = f.read()
    return _decode_rgb_bytes(data, image_size, mode)


def _decode_rgb_bytes(data: bytes, image_size: int, mode: str) -> np.ndarray:
    """(H, W, 3) uint8: the encoded image as Pillow decodes it and converts it to RGB.

    Colour JPEGs are decoded by torchvision's libjpeg-turbo call when it gives Pillow's pixels
    (:func:`_torch_jpeg_matches_pillow`): it writes planar pixels directly, where Pillow decodes to 4-byte
    pixels and then copies them out, so it does less work per frame. Anything else, or anything torchvision
    cannot decode, goes through Pillow, whose errors name the problem. In ``fast`` mode, JPEGs with a short
    side ≥ 2·S use libjpeg's DCT scaling through Pillow's ``draft``.
    """
    if mode == "exact" and data[:3] == b"\xff\xd8\xff" and _torch_jpeg_matches_pillow():  # JPEG start marker
        rgb = _decode_with_torch(data)
        if rgb is not None:
            return rgb
    with Image.open(io.BytesIO(data)) as img:  # reads the header only
        if mode == "fast" and img.format == "JPEG":
            if min(img.size) >= 2 * image_size:
                # libjpeg DCT scaling: the largest 1/2^k reduction that keeps both sides >= image_size
                img.draft("RGB", (image_size, image_size))
            elif img.mode == "RGB" and _torch_jpeg_matches_pillow():
                rgb = _decode_with_torch(data)
                if rgb is not None:
                    return rgb
        rgb = img if img.mode == "RGB" else img.convert("RGB")  # convert("RGB") of RGB is a plain copy
        return np.asarray(rgb, dtype=np.uint8)


def read_frame_rgb(path: str | os.PathLike, image_size: int = 224, mode: str = "exact") -> np.ndarray:
    """One frame file → (H, W, 3) uint8 RGB, the pixels :func:`preprocess_image` resizes (for thumbnails and
    shot detection of the same decode).

    Raises:
        FrameError: the file is missing or not a readable image.
    """
    path = os.fspath(path)
    return _guarded(lambda: _decode_rgb(path, image_size, mode), path)


def _guarded(fn, name: str):
    """``fn()``, its decoding errors as one FrameError line naming ``name``."""
    try:
        return fn()
    except FileNotFoundError:
        raise FrameError(f"{name}: frame file does not exist") from None
    except UnidentifiedImageError:
        raise FrameError(f"{name}: not a readable image") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated/corrupt data surfaces as OSError in PIL
        raise FrameError(f"{name}: cannot decode image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None


def preprocess_rgb(rgb: np.ndarray, image_size: int = 224, out: torch.Tensor | None = None) -> torch.Tensor:
    """(H, W, 3) uint8 RGB → (3, S, S) float32 normalised as CLIP expects (the resize of every reader)."""
    if out is None:
        out = torch.empty((3, image_size, image_size), dtype=torch.float32)
    resize_crop_array(rgb, image_size, lut=_normalise_lut(), out=out.numpy())
    return out


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
    path = os.fspath(path)
    return _preprocess(lambda: _decode_rgb(path, image_size, mode), path, image_size, mode, out)


def preprocess_image_bytes(data: bytes, image_size: int = 224, mode: str = "exact", out: torch.Tensor | None = None,
                           *, name: str = "image", upright: bool = False) -> torch.Tensor:
    """An encoded image held in memory (an uploaded query image) → what :func:`preprocess_image` gives for a
    file holding these bytes: the same decoder, resize and normalisation, so an image query is the frame a
    frame folder would show. ``name`` is used in messages. ``upright`` first applies the EXIF orientation
    (photos from phones), which frame folders never carry; without such a tag the result is unchanged.
    """
    def decode() -> np.ndarray:
        if upright:
            with Image.open(io.BytesIO(data)) as img:
                if img.getexif().get(0x0112, 1) not in (0, 1):  # 0x0112: Orientation
                    from PIL import ImageOps

                    return np.asarray(ImageOps.exif_transpose(img).convert("RGB"), dtype=np.uint8)
        return _decode_rgb_bytes(data, image_size, mode)

    return _preprocess(decode, name, image_size, mode, out)


def _preprocess(decode, name: str, image_size: int, mode: str, out: torch.Tensor | None) -> torch.Tensor:
    """Decode (``decode()`` → RGB array), resize, crop and normalise into ``out``; FrameError naming ``name``."""
    if mode not in MODES:
        raise ValueError(f"image mode must be one of {MODES}, got {mode!r}")

    def run() -> torch.Tensor:
        return preprocess_rgb(decode(), image_size, out)

    return _guarded(run, name)


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


def load_video_file(
    path: str | os.PathLike,
    *,
    fps: float = DEFAULT_VIDEO_FPS,
    max_frames: int = 12,
    framerate: int = 1,
    image_size: int = 224,
    mode: str = "exact",
    rng: np.random.Generator | None = None,
    threads: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A video file → what :func:`load_video` gives for the folder ``sample_frame.py --fps fps`` would write.

    The sampling rule runs on the number of frames that extraction would write (``framerate``, ``max_frames``,
    jitter as for folders) and only the sampled frames are decoded (:func:`~dataloaders.video_io.decode_outputs`).
    Their RGB pixels are those a lossless (PNG) extraction stores, and they go through the same resize and
    normalisation as a folder's frames, so the tensors equal those of the PNG folder exactly (in both modes:
    ``fast`` only changes how JPEGs are decoded). The returned names are the frame files extraction would
    have written (``00000001`` ... without extension).

    Raises:
        FrameError: unreadable, truncated or frameless file, or too short for ``framerate``; names the file.
    """
    path = os.fspath(path)
    try:
        index = probe(path)
        n = index.n_output(fps)
        try:
            pos = sample_positions(n, framerate, max_frames)
        except FrameError as e:
            raise FrameError(f"{path}: {e} (the video gives {n} frames at {fps:g} fps)") from None
        if rng is not None:
            pos = jitter_positions(pos, n, rng)
        pixels = decode_outputs(path, [int(p) for p in pos], fps, threads=threads, index=index)
    except VideoReadError as e:
        raise FrameError(str(e)) from None
    frames = torch.empty(max_frames, 3, image_size, image_size, dtype=torch.float32)
    frames[len(pixels):].zero_()  # padding: all-zero slots, mask 0
    mask = torch.zeros(max_frames, dtype=torch.int64)
    mask[: len(pixels)] = 1
    for slot, rgb in enumerate(pixels):
        preprocess_rgb(rgb, image_size, out=frames[slot])
    return frames, mask, [f"{int(p) + 1:08d}" for p in pos]


# ------------------------------------------------------------------------------------------------ segments
# A segment [s, e) of a video is the short video made of the output frames k (of an extraction at ``fps``:
# file k+1 of a frame folder, output frame k of a video file) whose time k/fps lies in [s, e); it is sampled
# among those frames exactly as a whole video is (``sample_positions``). So a segment's vector is the vector a
# frame folder holding just those frames gets, whichever way the frames were read.


def segment_frames(start: float | Fraction, end: float | Fraction, fps: float | Fraction,
                   n_frames: int) -> tuple[int, int]:
    """``[first, stop)``: the output frames k with ``start <= k/fps < end`` among ``n_frames`` (exact rationals,
    so a boundary that falls on a frame's time is never rounded to its neighbour)."""
    f = _rational(fps)
    first = max(0, math.ceil(_rational(start) * f))
    stop = min(int(n_frames), math.ceil(_rational(end) * f))
    return first, max(first, stop)


def segment_positions(first: int, stop: int, framerate: int, max_frames: int) -> np.ndarray:
    """Output frames sampled for the segment holding frames ``[first, stop)``: the whole-video rule on them.

    Raises:
        FrameError: fewer frames than ``framerate`` (nothing to sample).
    """
    return int(first) + sample_positions(int(stop) - int(first), framerate, max_frames)


def _rational(x: float | Fraction) -> Fraction:
    # the same exact conversion the decoder times frames with (2.3 → 23/10, not 2.29999...)
    return x if isinstance(x, Fraction) else Fraction(x).limit_denominator(1_000_000)


def check_video_file(path: str | os.PathLike, *, fps: float = DEFAULT_VIDEO_FPS, framerate: int = 1,
                     max_frames: int = 12) -> str | None:
    """Validity check of a video file without decoding (a demux pass): None if usable, else the reason."""
    try:
        n = probe(path).n_output(fps)
        sample_positions(n, framerate, max_frames)
    except VideoReadError as e:
        return str(e)
    except FrameError as e:
        return f"{os.fspath(path)}: {e} (the video gives {n} frames at {fps:g} fps)"
    return None


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
    "FAST_MODE_MEAN_LEVELS",
    "FrameError",
    "check_video",
    "check_video_file",
    "jitter_positions",
    "list_frame_files",
    "load_video",
    "load_video_file",
    "preprocess_image",
    "preprocess_image_bytes",
    "preprocess_rgb",
    "read_frame_rgb",
    "resize_crop",
    "resize_crop_array",
    "resize_geometry",
    "sample_positions",
    "segment_frames",
    "segment_positions",
]
