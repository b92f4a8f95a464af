"""Pillow's bicubic resize + centre crop, bit for bit, without computing the pixels the crop throws away.

The released CLIP2Video checkpoints saw frames resized by PIL (``Resize(S, BICUBIC)`` + ``CenterCrop(S)`` on
PIL images), so the ``exact`` loader must return Pillow's uint8 pixels. Pillow's resampler is scalar C;
this module reimplements its *arithmetic* (not its code) as two small vectorisable kernels compiled with
numba, and only for the output pixels that survive the crop, with identical pixels (``tests/test_frames.py``
compares them on many sizes, including upscaling and portrait frames; ``benchmarks/bench_dataloader.py``
measures the speed against Pillow).

What has to match, from Pillow's documented algorithm (``libImaging/Resample.c``: separable passes,
horizontal first, each rounding to uint8):

* Coefficients, per output index ``i`` of an axis resized from ``n`` to ``m``: ``scale = n / m``,
  ``fs = max(scale, 1)``, ``support = 2 · fs``, ``center = (i + 0.5) · scale``, taps from
  ``xmin = max(int(center − support + 0.5), 0)`` to ``min(int(center + support + 0.5), n)``, weights
  ``cubic((x + xmin − center + 0.5) / fs)`` (Keys' kernel, a = −0.5) normalised by their sum, then
  fixed-point: ``trunc(w · 2²² ± 0.5)``. Computed here in float64 with the same operations in the same order
  (:func:`bicubic_coeffs`), so the integers are the same.
* Pixels: ``acc = 2²¹ + Σ u8 · k`` in int32 (never overflows: Σ|k| < 1.2 · 2²²), output
  ``clamp(acc >> 22, 0, 255)``.
* Order: horizontal pass, then vertical, as in every Pillow up to 12 (the one the original ran). Pillow 13
  runs the vertical pass first when the height is scaled down markedly more than the width (Pillow pull
  request 9549; the exact threshold is Pillow's internal choice); in the ``Resize(S)`` geometry
  that happens for some portrait frames only (measured: 0 of 73 landscape, 23 of 77 portrait geometries),
  where the current Pillow's one-call ``resize`` then gives other pixels (226×1000 noise: up to 19 levels).
  We keep the original's order: the released checkpoints saw it, and it does not depend on the installed
  Pillow.

Kernel layout: the inner loop runs over many independent pixels that share one weight (an ``axpy``), so
LLVM vectorises it. For the vertical pass those are the pixels of a row (contiguous already). For the
horizontal pass a block of rows is first transposed into a small scratch buffer (columns × (rows · 3)),
which then plays the same role. The horizontal pass computes only the kept columns and only the input rows
that the kept output rows read; the vertical pass only the kept rows.

Without numba (it is in ``requirements.txt`` but optional) :func:`resize_crop_array` falls back to Pillow
itself: same pixels, slower.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

try:  # optional accelerator
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

PRECISION_BITS = 22
_ROW_BLOCK = 128  # rows transposed together in the horizontal pass (scratch: columns × 384 bytes)


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = −0.5 (the one PIL's BICUBIC uses), support 2."""
    a = -0.5
    x = np.abs(x)
    out = np.zeros_like(x)
    near, far = x < 1.0, (x >= 1.0) & (x < 2.0)
    xn, xf = x[near], x[far]
    out[near] = ((a + 2.0) * xn - (a + 3.0)) * xn * xn + 1
    out[far] = (((xf - 5) * xf + 8) * xf - 4) * a
    return out


@lru_cache(maxsize=64)
def bicubic_coeffs(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PIL's fixed-point bicubic coefficients of one axis: (first tap, tap count, int32 weights (m, taps)).

    Float64 operations in PIL's order (sum of weights accumulated tap by tap, left to right), so that the
    rounding to 22-bit integers gives the same numbers. Unused taps are 0.
    """
    scale = in_size / out_size
    fs = max(scale, 1.0)
    support = 2.0 * fs
    ksize = int(np.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # int() truncates, like C's (int)
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    used = taps[None, :] < count[:, None]
    w = np.where(used, _cubic((taps[None, :] + xmin[:, None] - center[:, None] + 0.5) * (1.0 / fs)), 0.0)
    total = np.zeros(out_size)
    for t in range(ksize):  # sequential, as the C loop
        total = total + w[:, t]
    w = w / np.where(total == 0.0, 1.0, total)[:, None]
    fixed = np.trunc(np.where(w < 0, -0.5 + w * (1 << PRECISION_BITS), 0.5 + w * (1 << PRECISION_BITS)))
    fixed = np.where(used, fixed, 0).astype(np.int32)
    return xmin.astype(np.int32), count.astype(np.int32), fixed


if numba is not None:
    def _jit(fn):
        """Compiled once and cached on disk (``__pycache__``, else numba's user cache); without any writable
        cache location, compiled once per process instead."""
        try:
            return numba.njit(cache=True, nogil=True)(fn)
        except RuntimeError:  # numba: "cannot cache function ...: no locator available"
            return numba.njit(nogil=True)(fn)

    @_jit
    def _clip8(acc):
        # Pillow's clip8 as branch-free arithmetic (vectorises): arithmetic shift, then clamp to [0, 255]
        return min(max(acc >> PRECISION_BITS, 0), 255)

    @_jit
    def _weighted_rows(src, offset, row, first, count, weights, acc):
        """acc[:] = 2²¹ + Σ_t src[first[row] + t − offset, :] · weights[row, t]: one output index, all lanes."""
        m = src.shape[1]
        for q in range(m):
            acc[q] = 1 << (PRECISION_BITS - 1)
        base = first[row] - offset
        for t in range(count[row]):
            k = weights[row, t]
            for q in range(m):
                acc[q] += np.int32(src[base + t, q]) * k
        return acc

    @_jit
    def _horizontal(src, planar, r0, r1, j0, first, count, weights, out, block):
        """out[r − r0, j] = horizontal pass of input row r at output column j0 + j (all three channels).

        ``src`` is (H, W, 3), or (3, H, W) when ``planar`` (a decoder's channels-first output, read as is).
        """
        n = out.shape[1]
        c0 = first[j0]
        c1 = 0
        for j in range(j0, j0 + n):
            c1 = max(c1, first[j] + count[j])
        ncol = c1 - c0
        scratch = np.empty((ncol, block * 3), np.uint8)
        acc = np.empty(block * 3, np.int32)
        for rb in range(r0, r1, block):
            nr = min(block, r1 - rb)
            for r in range(nr):  # scratch[x, 3r + c] = pixel (rb + r, c0 + x, c)
                if planar:  # three row streams, the same write pattern as below
                    red, green, blue = src[0, rb + r], src[1, rb + r], src[2, rb + r]
                    for x in range(ncol):
                        scratch[x, 3 * r] = red[c0 + x]
                        scratch[x, 3 * r + 1] = green[c0 + x]
                        scratch[x, 3 * r + 2] = blue[c0 + x]
                else:
                    row = src[rb + r]
                    for x in range(ncol):
                        scratch[x, 3 * r] = row[c0 + x, 0]
                        scratch[x, 3 * r + 1] = row[c0 + x, 1]
                        scratch[x, 3 * r + 2] = row[c0 + x, 2]
            for j in range(n):  # the rows of the block are the lanes: the same axpy as the vertical pass
                _weighted_rows(scratch, c0, j0 + j, first, count, weights, acc)
                for r in range(nr):
                    for c in range(3):
                        out[rb - r0 + r, j, c] = _clip8(acc[3 * r + c])
        return out

    @_jit
    def _vertical(src, offset, i0, first, count, weights, out):
        """out[i] = vertical pass at output row i0 + i; ``src`` (rows, M) starts at input row ``offset``."""
        acc = np.empty(src.shape[1], np.int32)
        for i in range(out.shape[0]):
            _weighted_rows(src, offset, i0 + i, first, count, weights, acc)
            for q in range(src.shape[1]):
                out[i, q] = _clip8(acc[q])
        return out

    @_jit
    def _vertical_lut(src, offset, i0, first, count, weights, lut, out):
        """As :func:`_vertical` for (S, S·3) pixels, but writes ``lut[c, pixel]`` into ``out`` (3, S, S)."""
        acc = np.empty(src.shape[1], np.int32)
        for i in range(out.shape[1]):
            _weighted_rows(src, offset, i0 + i, first, count, weights, acc)
            for x in range(out.shape[2]):
                for c in range(3):
                    out[c, i, x] = lut[c, _clip8(acc[3 * x + c])]
        return out


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
    """Short side → ``image_size`` (PIL bicubic) + centre crop with Pillow itself (reference and fallback).

    The pixels of torchvision's ``Resize`` + ``CenterCrop`` under the Pillow the original ran (≤ 12), with
    less work. Each call here resizes one axis only, so the order of the passes is explicit: horizontal
    first, as Pillow always did until 13 (Pillow ≥ 13 runs the vertical pass first for some tall images,
    which changes pixels in ~30 % of portrait geometries; landscape frames are unaffected).
    For a landscape frame the columns the crop removes are dropped between the two passes, so the vertical
    pass never computes them; both passes use the coefficients of the one-call resize, so every pixel is
    identical. (A fractional ``box=`` would save more but is not exact: Pillow takes the box as C floats
    and derives slightly different weights.)
    """
    w, h = img.size
    (fw, fh), (left, top) = resize_geometry(w, h, image_size)
    if fw != w:  # horizontal pass alone
        img = img.resize((fw, h), Image.Resampling.BICUBIC)
    if fw != image_size:
        img = img.crop((left, 0, left + image_size, h))
    if fh != h:  # vertical pass alone
        img = img.resize((image_size, fh), Image.Resampling.BICUBIC)
    return img.crop((0, top, image_size, top + image_size)) if fh != image_size else img


def resize_crop_array(rgb: np.ndarray, size: int, lut: np.ndarray | None = None,
                      out: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8 → (S, S, 3) uint8: PIL bicubic resize of the short side to S + centre crop, bit-exact.

    The same pixels as :func:`resize_crop` (torchvision's ``CenterCrop(S)(Resize(S, BICUBIC)(img))``).
    ``rgb`` may be a view of a channels-first (3, H, W) buffer (``chw.transpose(1, 2, 0)``): it is read in place.
    With ``lut`` (3, 256) float32 and ``out`` (3, S, S) float32, the result is instead written to ``out`` as
    ``out[c, y, x] = lut[c, pixel[y, x, c]]`` (a per-channel normalisation computed once) and ``out`` is
    returned: one pass instead of a uint8 image, a transpose and three float operations.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {rgb.dtype} {tuple(rgb.shape)}")
    h, w = rgb.shape[:2]
    (fw, fh), (left, top) = resize_geometry(w, h, size)
    if numba is None:
        pixels = np.asarray(resize_crop(Image.fromarray(rgb), size))
    elif fh == h:  # no vertical pass
        pixels = _horizontal_rows(rgb, top, top + size, left, fw, size)
    else:
        yfirst, ycount, yweights = bicubic_coeffs(h, fh)
        r0 = int(yfirst[top])  # input rows that the kept output rows read
        r1 = int((yfirst[top:top + size] + ycount[top:top + size]).max())
        mid = np.ascontiguousarray(_horizontal_rows(rgb, r0, r1, left, fw, size)).reshape(r1 - r0, size * 3)
        if lut is not None:  # the look-up fused into the vertical pass
            return _vertical_lut(mid, r0, top, yfirst, ycount, yweights, lut, out)
        pixels = _vertical(mid, r0, top, yfirst, ycount, yweights, np.empty((size, size * 3), np.uint8))
        pixels = pixels.reshape(size, size, 3)
    if lut is None:
        return pixels
    for c in range(3):
        out[c] = lut[c][pixels[:, :, c]]
    return out


def _horizontal_rows(rgb: np.ndarray, r0: int, r1: int, left: int, fw: int, size: int) -> np.ndarray:
    """Input rows [r0, r1) after the horizontal pass, kept columns only: (r1 − r0, S, 3) uint8 (a plain crop
    view when the width is not resized)."""
    w = rgb.shape[1]
    if fw == w:
        return rgb[r0:r1, left:left + size]
    xfirst, xcount, xweights = bicubic_coeffs(w, fw)
    return _horizontal(*_source(rgb), r0, r1, left, xfirst, xcount, xweights,
                       np.empty((r1 - r0, size, 3), np.uint8), _ROW_BLOCK)


def _source(rgb: np.ndarray) -> tuple[np.ndarray, bool]:
    """The horizontal kernel's input: a (3, H, W) array when ``rgb`` is a channels-first view, else (H, W, 3)."""
    chw = rgb.transpose(2, 0, 1)
    if chw.flags.c_contiguous:
        return chw, True
    return np.ascontiguousarray(rgb), False


def accelerated() -> bool:
    """True when the compiled kernels are in use (numba importable)."""
    return numba is not None


__all__ = ["accelerated", "bicubic_coeffs", "resize_crop", "resize_crop_array", "resize_geometry"]
