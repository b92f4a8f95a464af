"""Evaluation: encode every caption once and every video once, score with chunked matrix products.

The original re-ran the temporal heads for every (caption batch, video batch) pair and decoded each video
once per caption. Because a CLIP2Video score is one dot product of two vectors (DESIGN §1), we:

1. encode the captions (batches of ``batch_size_val``) → one vector per caption;
2. decode each video once and run the image tower once per real frame → raw frame features (N, T, D);
3. run the temporal heads once per video → one vector per video. With the ``original`` mask layout a video's
   vector depends on the videos that share its head batch, so the heads then run on exactly the groups of the
   original's evaluation batches (``RetrievalSet.video_batches``); with ``per_video`` any grouping gives the
   same vectors;
4. score in row chunks, accumulating T2V ranks and the V2T group maxima (``RankAccumulator``), so memory stays
   bounded at MSR-VTT-full scale; the full matrix is written only when asked for (memory-mapped ``.npy``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .metrics import RankAccumulator, dual_softmax, retrieval_metrics
from .model import CLIP2Video, TextEmbedding, VideoEmbedding
from .precision import autocast
from .tokenizer import ClipTokenizer

logger = logging.getLogger(__name__)

@dataclass
class EvalResult:
    """What an evaluation produced; ``sim`` is set only when the full matrix was requested."""

    metrics: dict[str, dict[str, float]]
    text: TextEmbedding
    video: VideoEmbedding
    sim: np.ndarray | None = None
    dsl_metrics: dict[str, dict[str, float]] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Caption indices in batches of equal real length (at most ``batch_size`` each), shortest first.

    ``encode_text`` cuts a batch to its longest caption, so a batch of equal lengths runs no padding at all;
    each caption's vector does not depend on its batch, so the order is restored afterwards.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and lengths[batches[-1][0]] == lengths[i]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def encode_captions(
    model: CLIP2Video,
    captions: Sequence[str],
    tokenizer: ClipTokenizer,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: bool = False,
) -> TextEmbedding:
    """Normalised caption vectors (on CPU, float32, in the order of ``captions``), each caption encoded once,
    in batches of equal token length (:func:`length_batches`)."""
    device = torch.device(device)
    ids, mask = tokenizer.batch(captions)
    n = ids.shape[0]
    globals_ = aligned = None
    for rows in tqdm(length_batches(mask.sum(dim=1).tolist(), batch_size), desc="captions", disable=not progress):
        index = torch.tensor(rows)
        with autocast(device, precision):
            t = model.encode_text(ids[index].to(device), mask[index].to(device))
        if globals_ is None:
            globals_ = torch.zeros(n, t.global_.shape[-1])
            aligned = torch.zeros(n, t.aligned.shape[-1]) if t.aligned is not None else None
        globals_[index] = t.global_.float().cpu()
        if aligned is not None:
            aligned[index] = t.aligned.float().cpu()
    if globals_ is None:  # no captions: an empty embedding of the model's width
        dim = model.config.clip.embed_dim
        return TextEmbedding(torch.zeros(0, dim), torch.zeros(0, dim) if model.config.use_tab else None)
    return TextEmbedding(globals_, aligned)


def _per_video(
    batches: Iterable[dict], n_videos: int, encode, device: torch.device, precision: str, progress: bool
) -> list[torch.Tensor]:
    """Run ``encode(frames, mask) -> tuple of (B, ...) tensors`` over video batches ``{"frames", "mask",
    "index"}`` and place each output row at its video's index (arrival order does not matter). Every video
    must arrive exactly once: a loader that drops one is an error, not a zero vector."""
    outs: list[torch.Tensor] | None = None
    seen = torch.zeros(n_videos, dtype=torch.bool)
    for b in tqdm(batches, desc="videos", disable=not progress):
        frames, mask, index = b["frames"].to(device), b["mask"].to(device), b["index"]
        with autocast(device, precision):
            parts = [p.cpu() for p in encode(frames, mask)]
        if outs is None:
            outs = [torch.zeros(n_videos, *p.shape[1:], dtype=p.dtype) for p in parts]
        for out, p in zip(outs, parts, strict=True):
            out[index] = p
        seen[index] = True
    if outs is None or not bool(seen.all()):
        raise RuntimeError(f"{int((~seen).sum())} of {n_videos} videos were not encoded (data loader dropped them)")
    return outs


@torch.no_grad()
def encode_frame_features(
    model: CLIP2Video,
    batches: Iterable[dict],
    n_videos: int,
    *,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw frame features (N, T, D) and masks (N, T): each video decoded and through the image tower once."""

    def encode(frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return model.encode_frames(frames, mask).float(), mask.long()

    feats, masks = _per_video(batches, n_videos, encode, torch.device(device), precision, progress)
    return feats, masks


@torch.no_grad()
def encode_videos_direct(
    model: CLIP2Video,
    batches: Iterable[dict],
    n_videos: int,
    *,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: bool = False,
) -> VideoEmbedding:
    """Video vectors straight from frames, for encoders whose vector depends on the video alone (CLIP-ViP)."""

    def encode(frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (model.encode_video(frames, mask).global_.float(),)

    (vectors,) = _per_video(batches, n_videos, encode, torch.device(device), precision, progress)
    return VideoEmbedding(vectors)


@torch.no_grad()
def encode_video_heads(
    model: CLIP2Video,
    feats: torch.Tensor,
    masks: torch.Tensor,
    groups: Sequence[Sequence[int]] | None = None,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> VideoEmbedding:
    """Temporal heads once per video. ``groups`` (lists of column indices) fix which videos share a head
    batch; needed for the ``original`` mask layout, optional otherwise."""
    device = torch.device(device)
    n = feats.shape[0]
    if groups is None:
        groups = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    vg = torch.zeros(n, feats.shape[-1])
    va = torch.zeros(n, feats.shape[-1]) if model.config.use_tab else None
    done = torch.zeros(n, dtype=torch.bool)
    for g in groups:
        g = list(g)
        with autocast(device, precision):
            v = model.encode_video_features(feats[g].to(device), masks[g].to(device))
        vg[g] = v.global_.float().cpu()
        if va is not None:
            va[g] = v.aligned.float().cpu()
        done[g] = True
    if not bool(done.all()):
        raise ValueError(f"video groups cover {int(done.sum())} of {n} videos")
    return VideoEmbedding(vg, va)


def score(
    model: CLIP2Video,
    text: TextEmbedding,
    video: VideoEmbedding,
    caption_video: np.ndarray,
    multi_caption: bool,
    *,
    chunk: int = 4096,
    save_sim: str | os.PathLike | None = None,
    keep_sim: bool = False,
) -> tuple[dict, np.ndarray | None]:
    """Chunked caption × video scoring → metrics (and the matrix when kept or saved).

    ``save_sim`` writes the float32 matrix (rows = captions in annotation order, columns = videos) through a
    memory map under a temporary name, renamed when complete.
    """
    tv = model.text_vector(text).float()  # (Nt, D')
    vv = model.video_vector(video).float()  # (Nv, D')
    scale = float(model.logit_scale.detach().exp())
    n_text, n_video = tv.shape[0], vv.shape[0]
    acc = RankAccumulator(caption_video, n_video)
    out = None
    tmp = None
    if save_sim is not None:
        save_sim = Path(save_sim)
        save_sim.parent.mkdir(parents=True, exist_ok=True)
        tmp = save_sim.with_name(f".{save_sim.stem}.tmp-{os.getpid()}.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_text, n_video))
    kept = np.empty((n_text, n_video), dtype=np.float32) if keep_sim else None
    vv_t = vv.t().contiguous()
    for start in range(0, n_text, chunk):
        rows = (scale * (tv[start : start + chunk] @ vv_t)).numpy()
        acc.add(start, rows)
        if out is not None:
            out[start : start + len(rows)] = rows
        if kept is not None:
            kept[start : start + len(rows)] = rows
    if out is not None:
        out.flush()
        del out
        os.replace(tmp, save_sim)
    return acc.metrics(multi_caption), kept


def evaluate(
    model: CLIP2Video,
    rset,
    batches: Iterable[dict],
    *,
    tokenizer: ClipTokenizer,
    batch_size_val: int = 16,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    save_sim: str | os.PathLike | None = None,
    keep_sim: bool = False,
    dsl: bool = False,
    progress: bool = False,
) -> EvalResult:
    """Full protocol on one ``RetrievalSet``.

    Args:
        model: the model, in eval mode, on ``device``.
        rset: the protocol's ``RetrievalSet`` (captions, videos, caption → video, grouping).
        batches: video batches ``{"frames", "mask", "index"}`` (a DataLoader over a ``VideoDataset``).
        batch_size_val: the original's ``--batch_size_val``; with the ``original`` mask layout it decides
            which videos share a head batch, exactly as the original's evaluation batches did.
        save_sim: path of a ``.npy`` for the caption × video matrix.
        dsl: also report dual-softmax re-ranked metrics (needs the full matrix in memory).
    """
    model.eval()
    t0 = time.perf_counter()
    text = encode_captions(
        model, rset.captions, tokenizer, batch_size=max(batch_size_val, 1) * 8, device=device,
        precision=precision, progress=progress,
    )
    t1 = time.perf_counter()
    if model.config.video_encoder == "vip":
        video = encode_videos_direct(
            model, batches, len(rset.video_ids), device=device, precision=precision, progress=progress
        )
        t2 = time.perf_counter()
    else:
        feats, masks = encode_frame_features(
            model, batches, len(rset.video_ids), device=device, precision=precision, progress=progress
        )
        t2 = time.perf_counter()
        groups = rset.video_batches(batch_size_val) if model.config.mask_layout == "original" else None
        logger.info(
            "mask layout %s: temporal heads run on %s",
            model.config.mask_layout,
            f"the original's evaluation batches ({batch_size_val} per batch)" if groups else "each video alone",
        )
        video = encode_video_heads(model, feats, masks, groups, device=device, precision=precision)
    t3 = time.perf_counter()
    metrics, sim = score(
        model, text, video, rset.caption_video, rset.multi_caption, save_sim=save_sim, keep_sim=keep_sim or dsl
    )
    t4 = time.perf_counter()
    dsl_metrics = retrieval_metrics(dual_softmax(sim), rset.caption_video, rset.multi_caption) if dsl else None
    timings = {"text_s": t1 - t0, "frames_s": t2 - t1, "heads_s": t3 - t2, "score_s": t4 - t3}
    return EvalResult(metrics, text, video, sim if keep_sim else None, dsl_metrics, timings)
