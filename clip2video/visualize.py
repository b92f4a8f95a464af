"""Top-k retrieval grids (the paper's Figure 4 for any checkpoint), drawn with PIL only."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clip2video.fileio import atomic_path

THUMB = 96  # px, square thumbnails
FRAMES_PER_CELL = 3
TEXT_W = 260
PAD = 6


def _frames_of(folder: Path, n: int) -> list[Image.Image | None]:
    """``n`` evenly spaced frames of a frame folder, or of the video file ``<folder>.<ext>`` when there is no
    folder (read directly); None for what cannot be read."""
    if not folder.is_dir():
        from clip2video.dataloaders.video_io import VIDEO_EXTS, VideoReadError, decode_outputs, probe

        video = next((folder.with_name(folder.name + e) for e in VIDEO_EXTS
                      if folder.with_name(folder.name + e).is_file()), None)
        if video is None:
            return [None] * n
        try:
            count = probe(video).n_output(5)
            picks = np.linspace(0, count - 1, n).astype(int).tolist()
            return [Image.fromarray(a) for a in decode_outputs(video, picks, 5)]
        except VideoReadError:
            return [None] * n
    files = sorted(os.listdir(folder))
    if not files:
        return [None] * n
    out: list[Image.Image | None] = []
    for i in np.linspace(0, len(files) - 1, n).astype(int):
        try:
            out.append(Image.open(folder / files[i]).convert("RGB"))
        except OSError:
            out.append(None)
    return out


def _thumbs(folder: Path, n: int) -> list[Image.Image]:
    out = []
    for im in _frames_of(folder, n):
        if im is None:
            out.append(Image.new("RGB", (THUMB, THUMB), (40, 40, 40)))
            continue
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((THUMB, THUMB))
        out.append(im)
    return out


def retrieval_grid(
    sim: np.ndarray,
    queries: Sequence[int],
    captions: Sequence[str],
    caption_video: np.ndarray,
    video_ids: Sequence[str],
    features_path: str | os.PathLike,
    out_png: str | os.PathLike,
    top_k: int = 5,
) -> Path:
    """One row per query: its caption, then the top-k videos (a few frames each), ground truth framed green.

    Args:
        sim: caption × video scores.
        queries: row indices to show.
        features_path: folder of frame folders (``<features_path>/<video_id>/``) or video files.
    """
    features_path = Path(features_path)
    cell_w = FRAMES_PER_CELL * THUMB + 2 * PAD
    row_h = THUMB + 2 * PAD + 18
    width = TEXT_W + top_k * (cell_w + PAD) + PAD
    height = len(queries) * row_h + PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, q in enumerate(queries):
        y = PAD + r * row_h
        order = np.argsort(-sim[q])[:top_k]
        gt = int(caption_video[q])
        rank = 1 + int((sim[q] > sim[q, gt]).sum())
        lines = textwrap.wrap(f"Q{q}: {captions[q]}", width=38)[:5] + [f"ground truth rank: {rank}"]
        draw.multiline_text((PAD, y + 4), "\n".join(lines), fill=(0, 0, 0), font=font)
        for c, v in enumerate(order):
            x = TEXT_W + c * (cell_w + PAD)
            hit = int(v) == gt
            color = (20, 170, 60) if hit else (180, 180, 180)
            draw.rectangle([x, y, x + cell_w - 1, y + THUMB + 2 * PAD - 1], outline=color, width=4 if hit else 1)
            for k, im in enumerate(_thumbs(features_path / video_ids[v], FRAMES_PER_CELL)):
                canvas.paste(im, (x + PAD + k * THUMB, y + PAD))
            label = f"#{c + 1} {video_ids[v][:22]} {sim[q, v]:.2f}" + ("  GT" if hit else "")
            draw.text((x + PAD, y + THUMB + 2 * PAD), label, fill=color if hit else (60, 60, 60), font=font)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        canvas.save(tmp)
    return out_png
