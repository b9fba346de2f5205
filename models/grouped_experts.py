"""Routed experts as two grouped matrix products, with no host sync and no loop over experts.

``SparseMoeBlock.sparse_experts`` runs each active expert on its rows: per layer, one host
sync (the rows per expert, to split the batch) and a chain of small kernels per active
expert. On a GPU that makes a decode step cost its kernel launches, not its weight reads: a
16-layer, 64-expert target of 5.1 B parameters took 37 ms per forward for one token and
100 ms from 32 tokens on an H200 (docs/results/gpu-s29), where reading its weights once
takes about 2 ms.

Here the token slots are sorted by expert as there, and the experts' gate and up projections
(stacked [E, 2h, d]) and their down projections (stacked [E, d, h]) are applied by
``torch._grouped_mm`` over the sorted rows, whose group ends are the cumulative counts per
expert, computed on the device; each token's weighted experts are then summed in slot order
(no atomic adds: the same sum every run). The kernel count per layer does not depend on the batch or
the experts it touches, so a forward can be captured in a CUDA graph. Equal to the sparse
path up to rounding (the same products, other kernels).

The stacked weights are a copy of the experts' (built on first use, rebuilt when a weight
changes), like ``dense_experts``' stack: twice the experts' memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dspark.models.dense_experts import weights_key

if TYPE_CHECKING:
    from dspark.models.target import Routing, SparseMoeBlock


def grouped_mm_available() -> bool:
    """Whether this torch has the grouped matrix product (torch 2.8 on)."""
    return hasattr(torch, "_grouped_mm")


def grouped_experts(block: SparseMoeBlock, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """``block.combine_experts(x, routing)`` by grouped products over the sorted slots."""
    gate_up, down = grouped_weights(block)  # [E, 2h, d], [E, d, h]
    flat_ids = routing.expert_ids.reshape(-1)  # [N * k]
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // block.top_k  # [N * k] source token of each sorted slot
    # NOTE: not bincount, which on CUDA reads the largest id back to the host
    counts = torch.zeros(block.num_experts, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
    ends = torch.cumsum(counts, 0, dtype=torch.int32)  # group e: rows ends[e-1] .. ends[e]
    sorted_x = x.index_select(0, token_of)
    act = torch._grouped_mm(sorted_x, gate_up.transpose(1, 2), offs=ends)  # [N * k, 2h]
    gate, up = act.chunk(2, dim=-1)
    hidden = F.silu(gate) * up
    expert_out = torch._grouped_mm(hidden, down.transpose(1, 2), offs=ends)  # [N * k, d]
    # NOTE: each token's k slots back in token order, summed in a fixed order: no atomic
    # adds (index_add_ on a GPU), so the sum does not change from run to run
    slots = expert_out.index_select(0, torch.argsort(order))  # [N * k, d], token-major
    weighted = slots.view(x.shape[0], block.top_k, -1) * routing.weights[:, :, None]
    return weighted.sum(1)


def grouped_weights(block: SparseMoeBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' gate and up projections stacked as [E, 2h, d] (gate rows, then up) and
    their down projections as [E, d, h], cached on the block until a weight changes."""
    key = weights_key(block)
    cached = block.__dict__.get("_grouped")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight])
                                   for e in block.experts])
            down = torch.stack([e.down_proj.weight for e in block.experts])
        cached = (key, gate_up, down)
        block.__dict__["_grouped"] = cached
    return cached[1], cached[2]
