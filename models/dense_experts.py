"""Routed experts on a small batch, every expert on every token.

A step that verifies a few tokens (a single request's drafts, a handful of decoding
requests) runs the MoE layer's active experts one after another: three linear layers and
an activation each, so its cost on a CPU grows with the number of experts the tokens
touch, not with their arithmetic. Here the experts' gate and up projections are one linear
layer over the stacked weights; each token's top-k gate weights, scattered into a row of E
(exact zeros for the experts it was not routed to), weight the experts' hidden rows; and one
linear layer over the experts' down projections side by side sums the weighted experts.
The result equals the sparse path's up to rounding: the products have other shapes and the
sum over experts happens inside the last one.

The stacked weights are a copy of the routed experts' (built on first use, rebuilt when a
weight changes): twice those weights' memory, which is why ``SparseMoeBlock`` takes this
path only for small batches on the CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dspark.models.linear import linear
from dspark.models.stacked import cached_layout

if TYPE_CHECKING:
    from dspark.models.target import Routing, SparseMoeBlock


def dense_experts(block: SparseMoeBlock, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """``block.combine_experts(x, routing)`` with every expert on every row; x: [N, d]."""
    gate_up, down = stacked_weights(block)  # [E * 2h, d], [d, E * h]
    num, experts = x.shape[0], len(block.experts)
    act = linear(x, gate_up).view(num, experts, 2, -1)  # [N, E, 2, h]
    weights = torch.zeros(num, experts, 1, dtype=x.dtype, device=x.device)
    weights.scatter_(1, routing.expert_ids[:, :, None], routing.weights[:, :, None])
    # NOTE: weighting an expert's hidden row weights its output (the down projection is
    # linear); 0 where the token was not routed
    hidden = F.silu(act[:, :, 0]) * act[:, :, 1] * weights  # [N, E, h]
    return linear(hidden.reshape(num, -1), down)  # the sum over experts in one product


def stacked_weights(block: SparseMoeBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' gate and up projections as one [E * 2h, d] weight (expert e's rows
    at e * 2h: gate, then up) and their down projections side by side as [d, E * h],
    cached on the block until any of the weights is replaced or changed in place."""
    def build():
        gate_up = torch.cat([torch.cat([e.gate_proj.weight, e.up_proj.weight])
                             for e in block.experts])
        return gate_up, torch.cat([e.down_proj.weight for e in block.experts], 1)

    return cached_layout(block, "experts_dense", expert_weights(block), build)


def expert_weights(block: SparseMoeBlock) -> list[torch.Tensor]:
    """Every routed expert's gate, up and down projection weights."""
    return [p for e in block.experts for p in (e.gate_proj.weight, e.up_proj.weight,
                                               e.down_proj.weight)]
