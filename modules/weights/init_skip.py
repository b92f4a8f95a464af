"""Build a model without drawing the random weights that a checkpoint is about to overwrite.

Constructing CLIP2Video fills every parameter from the random number generator (normal and uniform draws of
tens of millions of values), and a strict checkpoint load then replaces every one of them: for evaluation and
search that is start-up time spent on nothing. :func:`skip_random_init` makes those draws no-ops while the
model is built; the tensors are allocated (uninitialised) and everything that is not random (causal masks,
constant buffers) is computed as usual. Use it only where a strict load of *every* parameter follows
(``load_model``), so no uninitialised value can survive.

It is a ``TorchFunctionMode``, so it is local to the calling thread (a server thread loading a model does
not change another thread's initialisation). Same idea as ``torch.nn.utils.skip_init`` and the meta-device
construction of large-model loaders, without their need for module classes that accept a ``device``
argument or for rebuilding non-persistent buffers afterwards.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

# In-place random fills that nn.init and module constructors end in; anything else runs normally.
_RANDOM_FILLS = {
    torch.Tensor.normal_,
    torch.Tensor.uniform_,
    torch.nn.init.normal_,
    torch.nn.init.uniform_,
    torch.nn.init.trunc_normal_,
    torch.nn.init.xavier_uniform_,
    torch.nn.init.xavier_normal_,
    torch.nn.init.kaiming_uniform_,
    torch.nn.init.kaiming_normal_,
}


# Random factories (e.g. ``scale * torch.randn(width)`` for class and positional embeddings) become ``empty``.
_RANDOM_FACTORIES = {torch.randn, torch.rand}


class skip_random_init(TorchFunctionMode):  # noqa: N801 - used like a function: ``with skip_random_init():``
    """Context in which random initialisation draws nothing: in-place fills return their tensor unchanged,
    random factories return uninitialised tensors (see module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RANDOM_FILLS:
            return args[0] if args else kwargs["tensor"]
        if func in _RANDOM_FACTORIES:
            kwargs.pop("generator", None)
            return torch.empty(*args, **kwargs)
        return func(*args, **kwargs)
