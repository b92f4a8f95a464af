"""Retrieval metrics with the original's exact conventions (R@K in %, 1-based median and mean rank).

The original computed three flavours and we reproduce each one's arithmetic, so that metrics match exactly:

* single caption per video (MSR-VTT 1k-A), both directions, and multi-caption V2T: ``compute_metrics`` in
  numpy: R@K in float64, ``np.median`` (mean of the two middle ranks for an even count);
* multi-caption T2V: a torch version: R@K as ``int64 * 100 / n`` (float32 true division), ``torch.median``
  (the LOWER middle rank), mean rank from numpy.

Ranks are 1 + the number of candidates that score strictly higher than the ground truth.
"""

from __future__ import annotations

import numpy as np
import torch

KS = (1, 5, 10)


def _numpy_metrics(ranks: np.ndarray) -> dict[str, float]:
    ind = ranks - 1  # 0-based, as the original
    out = {f"R{k}": float(np.sum(ind < k)) * 100 / len(ind) for k in KS}
    out["MdR"] = float(np.median(ind) + 1)
    out["MnR"] = float(np.mean(ind) + 1)
    return out


def _torch_metrics(ranks: np.ndarray) -> dict[str, float]:
    ind = torch.from_numpy(ranks - 1)
    out = {f"R{k}": float(torch.sum(ind < k) * 100 / len(ind)) for k in KS}
    out["MdR"] = float(torch.median(ind + 1))
    out["MnR"] = float(np.mean(ind.numpy() + 1))
    return out


def t2v_metrics(ranks: np.ndarray, multi_caption: bool) -> dict[str, float]:
    """Text-to-video metrics of 1-based ranks with the original's arithmetic for the protocol (see above)."""
    ranks = np.asarray(ranks, dtype=np.int64)
    return _torch_metrics(ranks) if multi_caption else _numpy_metrics(ranks)


def ranks_of(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N, M) scores and (N,) target column per row → (N,) 1-based ranks."""
    gt = scores[np.arange(len(scores)), target][:, None]
    return 1 + (scores > gt).sum(axis=1)


class RankAccumulator:
    """Builds T2V ranks and the V2T group-max matrix from row chunks of the caption × video matrix, so the
    full matrix (59,800 × 2,990 for MSR-VTT full) never has to be held at once.

    Args:
        caption_video: (N_captions,) column of each caption's video.
        n_videos: number of columns.
    """

    def __init__(self, caption_video: np.ndarray, n_videos: int):
        self.caption_video = np.asarray(caption_video, dtype=np.int64)
        self.n_videos = n_videos
        self.t2v_ranks = np.zeros(len(self.caption_video), dtype=np.int64)
        # v2t[i, j]: best score any caption of video j gives video i
        self.v2t = np.full((n_videos, n_videos), -np.inf, dtype=np.float32)

    def add(self, start: int, sim_rows: np.ndarray) -> None:
        """Rows ``start : start + len(sim_rows)`` of the caption × video matrix."""
        cols = self.caption_video[start : start + len(sim_rows)]
        self.t2v_ranks[start : start + len(sim_rows)] = ranks_of(sim_rows, cols)
        for group in np.unique(cols):
            best = sim_rows[cols == group].max(axis=0)  # (n_videos,)
            np.maximum(self.v2t[:, group], best, out=self.v2t[:, group])

    def metrics(self, multi_caption: bool) -> dict[str, dict[str, float]]:
        if not multi_caption and len(self.t2v_ranks) != self.n_videos:
            raise ValueError("single-caption metrics need exactly one caption per video")
        t2v = t2v_metrics(self.t2v_ranks, multi_caption)
        v2t = _numpy_metrics(ranks_of(self.v2t, np.arange(self.n_videos)))
        return {"t2v": t2v, "v2t": v2t}


def retrieval_metrics(
    sim: np.ndarray, caption_video: np.ndarray, multi_caption: bool
) -> dict[str, dict[str, float]]:
    """Metrics of a full caption × video matrix (rows in annotation order, columns = videos)."""
    acc = RankAccumulator(caption_video, sim.shape[1])
    acc.add(0, np.asarray(sim, dtype=np.float32))
    return acc.metrics(multi_caption)


def video_to_text_matrix(sim: np.ndarray, caption_video: np.ndarray) -> np.ndarray:
    """[video i, caption group j] = best score any caption of video j gives video i (the original's V2T)."""
    acc = RankAccumulator(caption_video, sim.shape[1])
    acc.add(0, np.asarray(sim, dtype=np.float32))
    return acc.v2t


def dual_softmax(sim: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Dual-softmax re-ranking (CAMoE, arXiv 2109.04290): each score times the softmax over the *queries* of
    its column, which penalises videos that match every caption. ``sim`` is on the logit scale (×100), so
    temperature 1 is the usual softmax(100·cos). Not part of CLIP2Video; always reported apart."""
    s = torch.from_numpy(np.asarray(sim, dtype=np.float32))
    return (s * torch.softmax(s * temperature, dim=0)).numpy()


def format_table(metrics: dict[str, dict[str, float]], title: str = "") -> str:
    """Human-readable T2V / V2T table."""
    head = f"{'':6s}{'R@1':>8s}{'R@5':>8s}{'R@10':>8s}{'MdR':>8s}{'MnR':>8s}"
    lines = [title] if title else []
    lines.append(head)
    for d in ("t2v", "v2t"):
        m = metrics[d]
        lines.append(f"{d.upper():6s}{m['R1']:8.1f}{m['R5']:8.1f}{m['R10']:8.1f}{m['MdR']:8.1f}{m['MnR']:8.1f}")
    return "\n".join(lines)


def format_comparison(rows: list[tuple[str, dict[str, float]]], title: str = "") -> str:
    """Labelled rows of one direction side by side (e.g. T2V plain and T2V with QB-Norm)."""
    width = max(6, *(len(name) + 2 for name, _ in rows))
    lines = [title] if title else []
    lines.append(f"{'':{width}s}{'R@1':>8s}{'R@5':>8s}{'R@10':>8s}{'MdR':>8s}{'MnR':>8s}")
    for name, m in rows:
        lines.append(f"{name:{width}s}{m['R1']:8.1f}{m['R5']:8.1f}{m['R10']:8.1f}{m['MdR']:8.1f}{m['MnR']:8.1f}")
    return "\n".join(lines)


def markdown_row(name: str, metrics: dict[str, dict[str, float]]) -> str:
    """A row for the README's results table: | name | T2V R@1 R@5 R@10 MdR MnR | V2T ... |."""
    cells = [name]
    for d in ("t2v", "v2t"):
        m = metrics[d]
        cells += [f"{m['R1']:.1f}", f"{m['R5']:.1f}", f"{m['R10']:.1f}", f"{m['MdR']:.1f}", f"{m['MnR']:.1f}"]
    return "| " + " | ".join(cells) + " |"
