"""Evaluation: encode every caption once and every video once, score with chunked matrix products.

The original re-ran the temporal heads for every (caption batch, video batch) pair and decoded each video
once per caption. Because a CLIP2Video score is one dot product of two vectors (see ``model.py``), we:

1. encode the captions (batches of ``batch_size_val``) → one vector per caption;
2. decode each video once and run the image tower once per real frame → raw frame features (N, T, D);
3. run the temporal heads once per video → one vector per video. With the ``original`` mask layout a video's
   vector depends on the videos that share its head batch, so the heads then run on exactly the groups of the
   original's evaluation batches (``RetrievalSet.video_batches``); with ``per_video`` any grouping gives the
   same vectors;
4. score in row chunks, accumulating T2V ranks and the V2T group maxima (``RankAccumulator``), so memory stays
   bounded at MSR-VTT-full scale; the full matrix is written only when asked for (memory-mapped ``.npy``).

With a query bank (QB-Norm, ``modules/evaluation/qbnorm.py``) the bank captions are encoded with the same model
and scored against the same video vectors in chunks, only the bank's per-video statistics are kept, and the
test rows are normalised chunk by chunk in the same scoring pass.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from clip2video.fileio import atomic_path
from clip2video.modules.network.model import CLIP2Video, TextEmbedding, VideoEmbedding
from clip2video.modules.network.tokenizer import ClipTokenizer
from clip2video.modules.runtime.distributed import DistInfo
from clip2video.modules.runtime.precision import autocast
from clip2video.modules.runtime.sharding import gather_rows, shard

from .metrics import RankAccumulator, dual_softmax, ranks_of, retrieval_metrics, t2v_metrics
from .qbnorm import BankStatistics, QBNormStats

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
    qb: QBResult | None = None


@dataclass
class QBResult:
    """QB-Norm's outcome: T2V metrics of the normalised scores, how many queries were normalised, the bank's
    statistics (reusable for single queries)."""

    metrics: dict[str, dict[str, float]]
    normalised: int
    stats: QBNormStats


def length_batches(lengths: Sequence[int], batch_size: int, min_batch: int = 32) -> list[list[int]]:
    """Caption indices in batches of at most ``batch_size``, by increasing real length, each of one length
    unless it would hold fewer than ``min_batch`` captions.

    ``encode_text`` cuts a batch to its longest caption, so a batch of equal lengths runs no padding at all;
    the rare long lengths are pooled into batches of ``min_batch`` instead of many tiny ones (a little
    padding against many small matrix products). A caption's vector does not depend on its batch, so the
    order is restored afterwards.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        last = batches[-1] if batches else None
        if last is not None and len(last) < batch_size and (
            lengths[last[-1]] == lengths[i] or len(last) < min(min_batch, batch_size)
        ):
            last.append(i)
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


EVAL_LOADER_BATCH = 16


def eval_loader(dataset: torch.utils.data.Dataset, num_workers: int,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The loader of an evaluation's videos (``{"frames", "mask", "index"}`` batches in dataset order).

    Its batch size is deliberately not ``--batch_size_val``: which videos share a temporal-head batch is fixed
    by the evaluation from the video ids alone (:func:`video_share`), and every frame goes
    through the image tower on its own. So the loader's batch only decides how many videos a worker decodes
    before the tower gets any frames, and how many frames one tower call takes: with 16 videos the tower starts
    after a fraction of a second of decoding instead of seconds at 64 (``benchmarks/README.md``).
    """
    return torch.utils.data.DataLoader(dataset, batch_size=EVAL_LOADER_BATCH, shuffle=False,
                                       num_workers=num_workers, pin_memory=pin_memory)


def _per_video(
    batches: Iterable[dict], n_videos: int, encode, device: torch.device, precision: str, progress: bool,
    videos: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Run ``encode(frames, mask) -> tuple of (B, ...) tensors`` over video batches ``{"frames", "mask",
    "index"}`` and place each output row at its video's index (arrival order does not matter). With
    ``videos`` (column indices: one rank's share) the rows follow that list instead of ``range(n_videos)``.
    Every video must arrive exactly once: a loader that drops one is an error, not a zero vector."""
    videos = range(n_videos) if videos is None else videos
    row_of = {int(v): r for r, v in enumerate(videos)}
    n = len(row_of)
    outs: list[torch.Tensor] | None = None
    seen = torch.zeros(n, dtype=torch.bool)
    for b in tqdm(batches, desc="videos", disable=not progress):
        frames, mask = b["frames"].to(device), b["mask"].to(device)
        try:
            index = torch.tensor([row_of[int(i)] for i in b["index"]], dtype=torch.long)
        except KeyError as e:
            raise RuntimeError(f"the data loader gave video {e.args[0]}, which is not in this share") from None
        with autocast(device, precision):
            parts = [p.cpu() for p in encode(frames, mask)]
        if outs is None:
            outs = [torch.zeros(n, *p.shape[1:], dtype=p.dtype) for p in parts]
        for out, p in zip(outs, parts, strict=True):
            out[index] = p
        seen[index] = True
    if n and (outs is None or not bool(seen.all())):
        raise RuntimeError(f"{int((~seen).sum())} of {n} videos were not encoded (data loader dropped them)")
    return outs if outs is not None else []


@torch.no_grad()
def encode_frame_features(
    model: CLIP2Video,
    batches: Iterable[dict],
    n_videos: int,
    *,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: bool = False,
    videos: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw frame features (N, T, D) and masks (N, T): each video decoded and through the image tower once.
    With ``videos``, the batches hold those columns only and the rows follow that list."""

    def encode(frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return model.encode_frames(frames, mask).float(), mask.long()

    outs = _per_video(batches, n_videos, encode, torch.device(device), precision, progress, videos)
    if not outs:  # an empty share
        return torch.zeros(0, 1, model.config.clip.embed_dim), torch.zeros(0, 1, dtype=torch.long)
    feats, masks = outs
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
    videos: Sequence[int] | None = None,
) -> VideoEmbedding:
    """Video vectors straight from frames, for encoders whose vector depends on the video alone (CLIP-ViP).
    With ``videos``, the batches hold those columns only and the rows follow that list."""

    def encode(frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (model.encode_video(frames, mask).global_.float(),)

    outs = _per_video(batches, n_videos, encode, torch.device(device), precision, progress, videos)
    return VideoEmbedding(outs[0] if outs else torch.zeros(0, model.config.clip.embed_dim))


def merge_uniform_groups(groups: Sequence[Sequence[int]], masks: torch.Tensor, batch_size: int) -> list[list[int]]:
    """Head groups with the same vectors in fewer, larger batches.

    Under the ``original`` layout head h of video b takes the key mask of another video of its batch; when
    every video of a batch has the same frame mask, that is its own mask, so each video's vectors are those
    it has alone and any batch of videos sharing that mask gives them too. Such groups (the common case:
    videos with at least ``max_frames`` frames) are pooled by mask pattern into batches of up to
    ``batch_size``; groups with mixed masks stay exactly as they are.
    """
    kept: list[list[int]] = []
    pools: dict[tuple[int, ...], list[int]] = {}
    for g in groups:
        g = list(g)
        rows = masks[g]
        if len(g) and bool((rows == rows[:1]).all()):
            pools.setdefault(tuple(rows[0].tolist()), []).extend(g)
        else:
            kept.append(g)
    for pool in pools.values():
        kept.extend(pool[s : s + batch_size] for s in range(0, len(pool), batch_size))
    return kept


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
    batch; needed for the ``original`` mask layout, optional otherwise (:func:`merge_uniform_groups` then
    runs groups whose videos all have the same frame mask together)."""
    device = torch.device(device)
    n = feats.shape[0]
    if groups is None:
        groups = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    else:
        groups = merge_uniform_groups(groups, masks, batch_size)
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


def video_share(rset, model: CLIP2Video, batch_size_val: int, info: DistInfo | None) -> tuple[list[int],
                                                                                           list[list[int]] | None]:
    """This rank's videos (column indices, in encoding order) and, with the ``original`` mask layout, its
    head groups (column indices).

    A video's vector under the original layout depends on its head batch-mates, so there the list of the
    original's evaluation batches is sharded (a group is never split across ranks); otherwise single videos
    are. One process gets every video.
    """
    if model.config.video_encoder != "vip" and model.config.mask_layout == "original":
        groups = [list(g) for g in shard(rset.video_batches(batch_size_val), info)]
        return [i for g in groups for i in g], groups
    return list(shard(range(len(rset.video_ids)), info)), None


def _gather_text(text: TextEmbedding, info: DistInfo | None) -> TextEmbedding:
    """Every rank's caption vectors (contiguous shares) concatenated in caption order."""
    aligned = gather_rows(text.aligned, info) if text.aligned is not None else None
    return TextEmbedding(gather_rows(text.global_, info), aligned)


def _gather_video(video: VideoEmbedding, videos: Sequence[int], n: int, info: DistInfo | None) -> VideoEmbedding:
    """Every rank's video vectors placed at their columns; each column must come from exactly one rank."""
    order = torch.from_numpy(gather_rows(np.asarray(videos, dtype=np.int64).reshape(-1), info))
    if order.numel() != n or not torch.equal(torch.sort(order).values, torch.arange(n)):
        raise RuntimeError(f"the ranks' shares cover {order.unique().numel()} of {n} videos")

    def place(rows: torch.Tensor) -> torch.Tensor:
        gathered = gather_rows(rows, info)
        out = torch.zeros(n, *gathered.shape[1:], dtype=gathered.dtype)
        out[order] = gathered
        return out

    return VideoEmbedding(place(video.global_), place(video.aligned) if video.aligned is not None else None)


@torch.no_grad()
def qbnorm_statistics(
    model: CLIP2Video,
    bank: Sequence[str],
    video: VideoEmbedding,
    tokenizer: ClipTokenizer,
    *,
    beta: float,
    k: int = 1,
    batch_size: int = 256,
    chunk: int = 8192,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: bool = False,
    info: DistInfo | None = None,
) -> QBNormStats:
    """QB-Norm statistics of a caption bank against the evaluation's videos.

    The bank is encoded exactly as the test captions are (:func:`encode_captions`, same tokenizer and
    precision) and scored on the same scale (``logit_scale · text_vector @ video_vectorᵀ``, float32), ``chunk``
    captions at a time, so the bank's vectors and scores are never held whole. Under several processes each
    rank takes a share of the bank and the partial statistics are merged on every rank.
    """
    vv_t = model.video_vector(video).float().t().contiguous()
    scale = float(model.logit_scale.detach().exp())
    acc = BankStatistics(vv_t.shape[1], beta, k)
    share = shard(bank, info)
    for s in tqdm(range(0, len(share), chunk), desc="query bank", disable=not progress):
        t = encode_captions(model, share[s : s + chunk], tokenizer, batch_size=batch_size, device=device,
                            precision=precision)
        acc.add((scale * (model.text_vector(t).float() @ vv_t)).numpy())
    if acc.n_bank:
        local = acc.result()
    else:  # more ranks than bank captions: an empty share
        local = QBNormStats(np.full(vv_t.shape[1], -np.inf), np.zeros(vv_t.shape[1], dtype=bool), acc.beta, acc.k, 0)
    if info is None or not info.is_distributed:
        return local
    packed = np.stack([local.log_norm, local.retrieved.astype(np.float64), np.full(local.n_videos, local.n_bank)])
    parts = gather_rows(packed[None], info)  # (world, 3, M)
    stats = [QBNormStats(p[0], p[1] > 0, local.beta, local.k, int(p[2][0]) if local.n_videos else 0) for p in parts]
    return stats[0].merge(stats[1:])


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
    qb: QBNormStats | None = None,
    save_sim_qb: str | os.PathLike | None = None,
) -> tuple[dict, np.ndarray | None, QBResult | None]:
    """Chunked caption × video scoring → metrics, the matrix when kept (else None), and QB-Norm's result when
    ``qb`` statistics are given (else None).

    ``save_sim`` writes the float32 matrix (rows = captions in annotation order, columns = videos) through a
    memory map under a temporary name, renamed when complete; ``save_sim_qb`` does the same for the QB-Norm
    matrix (normalised rows hold exp(β·s)/Σ, the others their plain scores). QB-Norm's ranks are taken on the
    float64 normalised values, before any rounding to float32.
    """
    if save_sim_qb is not None and qb is None:
        raise ValueError("save_sim_qb needs QB-Norm statistics (a query bank)")
    tv = model.text_vector(text).float()  # (Nt, D')
    vv = model.video_vector(video).float()  # (Nv, D')
    scale = float(model.logit_scale.detach().exp())
    n_text, n_video = tv.shape[0], vv.shape[0]
    acc = RankAccumulator(caption_video, n_video)
    qb_ranks = np.zeros(n_text, dtype=np.int64) if qb is not None else None
    normalised = 0
    kept = np.empty((n_text, n_video), dtype=np.float32) if keep_sim else None
    vv_t = vv.t().contiguous()
    with contextlib.ExitStack() as stack:
        outs = {}
        for key, path in (("plain", save_sim), ("qb", save_sim_qb)):
            if path is not None:
                tmp = stack.enter_context(atomic_path(path))
                outs[key] = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_text, n_video))
        for start in range(0, n_text, chunk):
            rows = (scale * (tv[start : start + chunk] @ vv_t)).numpy()
            acc.add(start, rows)
            if "plain" in outs:
                outs["plain"][start : start + len(rows)] = rows
            if kept is not None:
                kept[start : start + len(rows)] = rows
            if qb is not None:
                qrows, norm = qb.apply(rows)
                qb_ranks[start : start + len(rows)] = ranks_of(qrows, acc.caption_video[start : start + len(rows)])
                normalised += int(norm.sum())
                if "qb" in outs:
                    outs["qb"][start : start + len(rows)] = qrows
        for out in outs.values():
            out.flush()
        outs.clear()
    qb_result = None
    if qb is not None:
        qb_result = QBResult({"t2v": t2v_metrics(qb_ranks, multi_caption)}, normalised, qb)
    return acc.metrics(multi_caption), kept, qb_result


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
    info: DistInfo | None = None,
    qb_bank: Sequence[str] | None = None,
    qb_beta: float | None = None,
    qb_k: int = 1,
    save_sim_qb: str | os.PathLike | None = None,
) -> EvalResult:
    """Full protocol on one ``RetrievalSet``.

    Args:
        model: the model, in eval mode, on ``device``.
        rset: the protocol's ``RetrievalSet`` (captions, videos, caption → video, grouping).
        batches: video batches ``{"frames", "mask", "index"}`` (a DataLoader over a ``VideoDataset``); under
            several processes, over this rank's videos only (:func:`video_share`).
        batch_size_val: the original's ``--batch_size_val``; with the ``original`` mask layout it decides
            which videos share a head batch, exactly as the original's evaluation batches did.
        save_sim: path of a ``.npy`` for the caption × video matrix.
        dsl: also report dual-softmax re-ranked metrics (needs the full matrix in memory).
        info: the torchrun job (``modules.distributed``): each rank encodes its share of the captions and of
            the videos (``modules.sharding``), the vectors are gathered on every rank, and rank 0 alone scores
            and writes; the other ranks return empty metrics.
        qb_bank: captions of a query bank: also report QB-Norm's T2V metrics (``modules/evaluation/qbnorm.py``)
            with ``qb_beta`` (default: CLIP2Video's 1/1.99) and ``qb_k``; ``save_sim_qb`` writes its matrix.
    """
    model.eval()
    n_videos = len(rset.video_ids)
    videos, groups = video_share(rset, model, batch_size_val, info)
    t0 = time.perf_counter()
    text = encode_captions(
        model, shard(rset.captions, info), tokenizer, batch_size=max(batch_size_val, 1) * 8, device=device,
        precision=precision, progress=progress,
    )
    text = _gather_text(text, info)
    t1 = time.perf_counter()
    if model.config.video_encoder == "vip":
        video = encode_videos_direct(
            model, batches, n_videos, device=device, precision=precision, progress=progress, videos=videos
        )
        t2 = time.perf_counter()
    else:
        feats, masks = encode_frame_features(
            model, batches, n_videos, device=device, precision=precision, progress=progress, videos=videos
        )
        t2 = time.perf_counter()
        logger.info(
            "mask layout %s: temporal heads run on %s",
            model.config.mask_layout,
            f"the original's evaluation batches ({batch_size_val} per batch)" if groups else "each video alone",
        )
        row_of = {v: r for r, v in enumerate(videos)}
        local_groups = [[row_of[i] for i in g] for g in groups] if groups is not None else None
        dim = model.config.clip.embed_dim
        if videos:
            video = encode_video_heads(model, feats, masks, local_groups, device=device, precision=precision)
        else:  # more ranks than videos or groups: this one has none
            video = VideoEmbedding(torch.zeros(0, dim), torch.zeros(0, dim) if model.config.use_tab else None)
    video = _gather_video(video, videos, n_videos, info)
    t3 = time.perf_counter()
    timings = {"text_s": t1 - t0, "frames_s": t2 - t1, "heads_s": t3 - t2}
    qb_stats = None
    if qb_bank is not None:
        from .qbnorm import CLIP2VIDEO_BETA

        qb_stats = qbnorm_statistics(model, qb_bank, video, tokenizer, beta=qb_beta or CLIP2VIDEO_BETA, k=qb_k,
                                     batch_size=max(batch_size_val, 1) * 8, device=device, precision=precision,
                                     progress=progress, info=info)
        timings["qb_bank_s"] = time.perf_counter() - t3
    if info is not None and not info.is_main:
        return EvalResult({}, text, video, None, None, timings)
    t4 = time.perf_counter()
    metrics, sim, qb = score(
        model, text, video, rset.caption_video, rset.multi_caption, save_sim=save_sim, keep_sim=keep_sim or dsl,
        qb=qb_stats, save_sim_qb=save_sim_qb,
    )
    timings["score_s"] = time.perf_counter() - t4
    dsl_metrics = retrieval_metrics(dual_softmax(sim), rset.caption_video, rset.multi_caption) if dsl else None
    return EvalResult(metrics, text, video, sim if keep_sim else None, dsl_metrics, timings, qb)
