"""Contrastive loss over the GLOBAL batch: gather embeddings from every rank with gradients.

Why the backward sums. Every rank computes the same loss L on the gathered (N·b)-sample similarity matrices.
Rank r's autograd graph only reaches its own b samples, and for them the local backward already yields the
exact ∂L/∂e_r (the rows and columns of e_r are all in the local matrix). The parameter gradient of one
process with the N·b batch is Σ_r ∂L/∂e_r · ∂e_r/∂θ, i.e. the SUM over ranks, but DDP AVERAGES gradients,
giving 1/N of it. This is the common CLIP4Clip ``AllGather`` (backward = own slice of the incoming gradient),
which therefore trains with an N-times smaller effective learning rate on the contrastive term.

``GatherWithGrad``'s backward all-reduces (sums) the gradient of the gathered tensor before taking this rank's
slice: every rank holds the same ∂L/∂e_r, so the slice becomes N·∂L/∂e_r and DDP's average turns it back into
exactly the single-process gradient. (The same idea as DRL's all-reduce in backward and torch's
``torch.distributed.nn.all_gather``; open_clip gets it by running the loss with ``gather_with_grad`` and
local-loss options. Ideas only, no code copied.)

``gather_grad="local"`` keeps that common gather on purpose (``GatherLocalGrad``: backward = this rank's slice
of the incoming gradient, no sum), to reproduce CLIP4Clip's training step; ``"exact"`` (the default) is the
one above.

Sample order: the gathered batch is rank 0's samples, then rank 1's, ... so the matrix equals the one of a
single process whose batch is the concatenation; with a contiguous sharding of each global batch
(``modules.training.GlobalBatchSampler``) that is the same batch in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from clip2video.modules.network.model import TextEmbedding, VideoEmbedding


class GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gradient over ranks and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D401 - autograd signature
        world = dist.get_world_size()
        ctx.rank = dist.get_rank()
        ctx.batch = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # (world·b, ...) rank-major

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.batch
        return grad[start : start + ctx.batch]


class GatherLocalGrad(GatherWithGrad):
    """all_gather along dim 0 whose backward returns this rank's slice of the incoming gradient as it is
    (CLIP4Clip's ``AllGather``): each rank's features get the gradient of their rows of its own copy of the
    loss, and DDP's average then leaves 1/N of the single-process gradient for the encoders."""

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        start = ctx.rank * ctx.batch
        return grad[start : start + ctx.batch].contiguous()


#: How the loss's gather passes gradients back: ``exact`` (the single-process gradient of the global batch)
#: or ``local`` (CLIP4Clip's own-slice backward).
GATHER_GRADS = ("exact", "local")


def gather_with_grad(x: torch.Tensor, mode: str = "exact") -> torch.Tensor:
    """Concatenate ``x`` (b, ...) of all ranks in rank order; the identity without a process group.

    Every rank must pass the same ``b`` (``GlobalBatchSampler`` drops the last incomplete global batch).
    ``mode`` is one of :data:`GATHER_GRADS`.
    """
    if mode not in GATHER_GRADS:
        raise ValueError(f"gather_grad must be one of {', '.join(GATHER_GRADS)}, got {mode!r}")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return (GatherWithGrad if mode == "exact" else GatherLocalGrad).apply(x)


def gather_text(text: TextEmbedding, mode: str = "exact") -> TextEmbedding:
    return TextEmbedding(gather_with_grad(text.global_, mode),
                         None if text.aligned is None else gather_with_grad(text.aligned, mode))


def gather_video(video: VideoEmbedding, mode: str = "exact") -> VideoEmbedding:
    return VideoEmbedding(gather_with_grad(video.global_, mode),
                          None if video.aligned is None else gather_with_grad(video.aligned, mode))


def global_batch_loss(
    model: torch.nn.Module, text: TextEmbedding, video: VideoEmbedding, logit_scale: torch.Tensor,
    gather_grad: str = "exact",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CLIP2Video's loss (``model.loss``: w·symCE(S_g) + (1−w)·symCE(S_a)) on the embeddings of all ranks.

    Args:
        model: the unwrapped CLIP2Video (its ``loss`` and ``config.center_weight``).
        text, video: this rank's embeddings of its b samples.
        logit_scale: exp(logit_scale) from the forward pass (the same on every rank: parameters are in sync).
        gather_grad: ``exact`` or ``local`` (:data:`GATHER_GRADS`, module docstring).

    Returns:
        the loss, identical on every rank, and its detached terms.
    """
    # The loss runs in float32 even under autocast: the softmax over the global batch is where fp16/bf16
    # rounding would hurt, and the matrices are small.
    with torch.autocast(device_type=logit_scale.device.type, enabled=False):
        t = gather_text(text, gather_grad)
        v = gather_video(video, gather_grad)
        t = TextEmbedding(t.global_.float(), None if t.aligned is None else t.aligned.float())
        v = VideoEmbedding(v.global_.float(), None if v.aligned is None else v.aligned.float())
        return model.loss(t, v, logit_scale.float())
