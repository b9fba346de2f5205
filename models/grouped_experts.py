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
(no atomic adds: the same sum every run). ``expert_rows`` is the same for rows that arrive
with their expert ids, as an expert-parallel rank's do. The kernel count per layer does not
depend on the batch or the experts it touches, so a forward can be captured in a CUDA graph. Equal to the sparse
path up to rounding (the same products, other kernels).

The stacked weights are a copy of the experts' (built on first use, rebuilt when a weight
changes), like ``dense_experts``' stack: twice the experts' memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dspark.models.dense_experts import expert_weights
from dspark.models.stacked import cached_layout

if TYPE_CHECKING:
    from dspark.models.target import Routing, SparseMoeBlock


def grouped_mm_available() -> bool:
    """Whether this torch has the grouped matrix product (torch 2.8 on)."""
    return hasattr(torch, "_grouped_mm")


def grouped_mm_fast(x: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs its own kernel on ``x``'s device and dtype (bf16
    on an sm90 or sm100 GPU), not the fallback that syncs with the host per call."""
    if not grouped_mm_available() or x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return False
    return torch.cuda.get_device_capability(x.device)[0] in (9, 10)


def grouped_experts(block: SparseMoeBlock, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """``block.combine_experts(x, routing)`` by grouped products over the sorted slots."""
    num, top_k = x.shape[0], block.top_k
    slot_token = torch.arange(num * top_k, device=x.device) // top_k  # token-major slots
    rows = expert_rows(block, x, routing.expert_ids.reshape(-1), slot_token)
    # NOTE: each token's k slots summed in a fixed order: no atomic adds (index_add_ on a
    # GPU), so the sum does not change from run to run
    return (rows.view(num, top_k, x.shape[1]) * routing.weights[:, :, None]).sum(1)


def expert_rows(block: SparseMoeBlock, x: torch.Tensor, ids: torch.Tensor,
                source: torch.Tensor | None = None) -> torch.Tensor:
    """Row ``source[i]`` of ``x`` (row i without ``source``) through the block's expert
    ``ids[i]`` (an index into ``block.experts``, which an expert-parallel rank holds its own
    share of), in any order; [len(ids), d]. The rows are gathered once, in expert order."""
    if ids.shape[0] == 0:
        return x.new_zeros((0, x.shape[1]))
    gate_up, down = grouped_weights(block)  # [E, 2h, d], [E, d, h]
    order = torch.argsort(ids, stable=True)
    # NOTE: not bincount, which on CUDA reads the largest id back to the host
    counts = torch.zeros(gate_up.shape[0], dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
    ends = torch.cumsum(counts, 0, dtype=torch.int32)  # group e: rows ends[e-1] .. ends[e]
    rows = x.index_select(0, order if source is None else source[order])
    act = torch._grouped_mm(rows, gate_up.transpose(1, 2), offs=ends)
    gate, up = act.chunk(2, dim=-1)  # [R, h] each
    out = torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=ends)  # [R, d]
    return out.index_select(0, torch.argsort(order))  # back in the rows' order


def grouped_weights(block: SparseMoeBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' gate and up projections stacked as [E, 2h, d] (gate rows, then up) and
    their down projections as [E, d, h], cached on the block until a weight changes."""
    def build():
        gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight])
                               for e in block.experts])
        return gate_up, torch.stack([e.down_proj.weight for e in block.experts])

    return cached_layout(block, "experts_grouped", expert_weights(block), build)
