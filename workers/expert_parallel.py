"""Expert parallelism: routed experts split across the ranks of a group; tokens travel to
the rank owning their expert and back with all-to-all over torch.distributed (gloo on CPU,
NCCL on GPU). Attention, dense layers, the router and the shared expert are on every rank.

Vocabulary:
- *group*: ``world`` ranks serving together; rank r owns experts
  ``[r * E / world, (r + 1) * E / world)``. Each rank schedules its own requests (data-
  parallel attention); only the MoE layers communicate.
- *lock-step*: every rank calls every MoE layer's all-to-all the same number of times, so a
  rank without work joins each step with an empty batch (``forward_empty``).

NOTE: a token's expert slots are sent in ascending expert order (the owner is monotone in
the expert id) and come back in the same order; they are put back in top-k order and each
token's k weighted slots summed in that order, as the unsharded grouped path
(``models/grouped_experts.py``) sums them. A rank runs its experts on the rows it received
by the same grouped products (``expert_rows``).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from dspark.models.grouped_experts import expert_rows, grouped_mm_available
from dspark.models.target import SparseMoeBlock, TargetModel


class ExpertParallelMoE(nn.Module):
    def __init__(self, block: SparseMoeBlock, group, rank: int, world: int) -> None:
        super().__init__()
        if block.num_experts % world:
            raise ValueError(
                f"num_experts={block.num_experts} is not divisible by ep_size={world}"
            )
        self.block, self.group, self.rank, self.world = block, group, rank, world
        self.per_rank = block.num_experts // world
        self.first = rank * self.per_rank
        local = list(block.experts)[self.first : self.first + self.per_rank]
        # NOTE: only the local experts stay in memory
        block.experts = nn.ModuleList(local)
        self.timing = False
        """Accumulate the wall time of this layer's experts on the tokens they received in
        ``seconds`` (step-cost profiling only: on a GPU it synchronises). That is the part
        of a step that follows the group's tokens per member, not this rank's own."""
        self.seconds = 0.0

    def _exchange(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]):
        recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
        dist.all_to_all_single(recv, send.contiguous(), recv_counts, send_counts,
                               group=self.group)
        return recv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, d]
        block = self.block
        routing = block.route(flat)
        flat_ids = routing.expert_ids.reshape(-1)  # [N * k]
        order = torch.argsort(flat_ids, stable=True)
        token_of = order // block.top_k
        sorted_ids = flat_ids[order]
        owner = sorted_ids // self.per_rank
        send_counts_t = torch.bincount(owner, minlength=self.world)  # [world]
        recv_counts_t = torch.empty_like(send_counts_t)
        dist.all_to_all_single(recv_counts_t, send_counts_t, group=self.group)
        send_counts, recv_counts = send_counts_t.tolist(), recv_counts_t.tolist()
        recv_x = self._exchange(flat.index_select(0, token_of), send_counts, recv_counts)
        recv_ids = self._exchange(sorted_ids, send_counts, recv_counts) - self.first
        out_rows = self._experts(recv_x, recv_ids)
        back = self._exchange(out_rows, recv_counts, send_counts)  # [N * k, d], sorted order
        # NOTE: each token's k slots summed in a fixed order, as the unsharded grouped path
        # does (no atomic adds on a GPU)
        slots = back.index_select(0, torch.argsort(order))  # [N * k, d], token-major
        out = (slots.view(*routing.expert_ids.shape, flat.shape[-1])
               * routing.weights[:, :, None]).sum(1)
        if block.shared_expert is not None:
            out = out + torch.sigmoid(block.shared_expert_gate(flat)) * block.shared_expert(flat)
        return out.reshape(shape)


    def _experts(self, recv_x: torch.Tensor, recv_ids: torch.Tensor) -> torch.Tensor:
        """This rank's experts on the rows the group sent them (local expert ids)."""
        sync = torch.cuda.synchronize if recv_x.is_cuda and self.timing else (lambda: None)
        sync()
        start = time.perf_counter()
        if grouped_mm_available():
            out_rows = expert_rows(self.block, recv_x, recv_ids)
        else:
            out_rows = torch.zeros_like(recv_x)
            for e, expert in enumerate(self.block.experts):
                rows = (recv_ids == e).nonzero(as_tuple=True)[0]
                if rows.numel():
                    out_rows[rows] = expert(recv_x[rows])
        if self.timing:
            sync()
            self.seconds += time.perf_counter() - start
        return out_rows


def shard_experts(target: TargetModel, group, rank: int, world: int) -> int:
    """Replace every sparse MoE layer of ``target`` by its expert-parallel shard; returns the
    number of MoE layers (each step runs one all-to-all round per MoE layer)."""
    count = 0
    for layer in target.model.layers:
        if isinstance(layer.mlp, SparseMoeBlock):
            layer.mlp = ExpertParallelMoE(layer.mlp, group, rank, world)
            count += 1
    return count


def timed_layers(target: nn.Module, on: bool) -> list[ExpertParallelMoE]:
    """Switch the wall-time accounting of ``target``'s expert-parallel layers on or off;
    returns them (none without expert parallelism)."""
    layers = [m for m in target.modules() if isinstance(m, ExpertParallelMoE)]
    for layer in layers:
        layer.timing = on
    return layers


class _NoTokens:
    """The attention backend of an empty batch: no keys to store, nothing to attend."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        return q  # [1, H, 0, head_dim]


@torch.no_grad()
def forward_empty(target: TargetModel) -> None:
    """Join one step with no tokens: the target's one forward on an empty batch, so every
    MoE layer runs its exchanges."""
    device = target.lm_head.weight.device
    empty = torch.zeros(1, 0, dtype=torch.long, device=device)  # [1, 0]
    target(empty, positions=empty, compute_logits=False, attention=_NoTokens())


def any_rank_busy(busy: bool, group) -> bool:
    """One all-reduce: does any rank of the group have work this step?"""
    flag = torch.tensor([1 if busy else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())
