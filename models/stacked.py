"""Weights of several linear layers side by side, for one matrix product instead of several.

A drafter's step on a CPU costs per operator far more than per multiply-add (a draft block is
a few rows), so its query/key/value projections run as one product, its SwiGLU's gate and
up projections as one, and the context keys/values of every layer as one. The parameters
stay as they are (checkpoints and Hugging Face names are unchanged); only the forward
concatenates them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def stacked_weight(owner: nn.Module, name: str, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(weights)``. Under autograd it is made afresh at every call, so gradients
    reach each weight; otherwise it is kept on ``owner`` until one of the weights changes
    (``cached_layout``)."""
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        return torch.cat(list(weights))
    return cached_layout(owner, name, weights, lambda: torch.cat(list(weights)).contiguous())


def cached_layout(owner: nn.Module, name: str, weights: Sequence[torch.Tensor], build):
    """``build()``, a copy of ``weights`` in another layout (a tensor or a tuple of them),
    made without grad and kept on ``owner`` under ``name`` until one of the weights changes:
    its storage, its version counter (an optimizer step or ``load_state_dict`` writes in
    place and bumps it), its shape or its dtype."""
    key = tuple((w.data_ptr(), w._version, w.shape, w.dtype) for w in weights)
    cache = owner.__dict__.setdefault("_stacked_weights", {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = cache[name] = (key, build())
    return hit[1]
