"""Attention of a flattened, variable-length batch over paged K/V (the verify forward).

Vocabulary:
- *slot*: one position of the paged cache, ``block_id * block_size + offset``; the cache
  tensors are ``[num_slots, kv_heads, head_dim]`` per layer.
- *slot table* of request r: the slot of each of its positions 0..S-1, from its block table.
- *flattened batch*: every request's query tokens contiguous, ``cu_q[r]..cu_q[r+1]``, each
  with its absolute position; query i of request r sees r's keys at positions <= its own.

NOTE: the new keys of this forward must already be written to their slots; a query sees
them exactly like older ones, which is what makes verify causal among the drafts. The
layout (who sees what) depends on the batch only, so it is planned once per forward
(``paged_layout``) and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def slot_table(block_tables: torch.Tensor, num_positions: int, block_size: int) -> torch.Tensor:
    """block_tables [R, max_blocks] -> slots [R, num_positions] of positions 0.."""
    pos = torch.arange(num_positions, device=block_tables.device)
    return block_tables[:, pos // block_size] * block_size + pos % block_size


def gather_kv(
    cache: torch.Tensor,  # [num_slots, kv_heads, head_dim]
    slots: torch.Tensor,  # [R, S]
) -> torch.Tensor:  # [R, kv_heads, S, head_dim]
    # NOTE: one index_select over the flattened slots; advanced indexing with the 2-D
    # table (``cache[slots]``) was 3-4x slower on CPU and most of a loaded step's attention
    rows = cache.index_select(0, slots.reshape(-1))
    return rows.view(*slots.shape, *cache.shape[1:]).transpose(1, 2)


@dataclass
class PagedLayout:
    """What the queries of one flattened batch see, computed once per forward and shared by
    every layer: query i of request r sits at ``(r, col[i])`` of a padded ``[R, max_q]``
    layout and sees r's keys at positions <= its own."""

    slots: torch.Tensor  # [R, S] slot of each position of each request
    req_of: torch.Tensor  # [N] request of each query
    col: torch.Tensor  # [N] column of each query in its request's padded run
    visible: torch.Tensor  # [R, 1, Q, S] bool, True = the query sees the key
    uniform: bool
    """Every request has ``max_q`` queries (a decode step, or drafts of one length): the
    padded layout is a view of the queries."""

    @property
    def max_q(self) -> int:
        return self.visible.shape[2]


def paged_layout(
    slots: torch.Tensor,  # [R, S] slot of each position of each request
    seq_lens: torch.Tensor,  # [R] keys of request r: positions < seq_lens[r]
    cu_q: torch.Tensor,  # [R + 1] query offsets
    q_pos: torch.Tensor,  # [N] absolute position of each query
    max_q: int,  # longest query run of one request
) -> PagedLayout:
    num_req, width = slots.shape
    device = slots.device
    q_lens = cu_q[1:] - cu_q[:-1]  # [R]
    req_of = torch.repeat_interleave(torch.arange(num_req, device=device), q_lens)  # [N]
    col = torch.arange(q_pos.shape[0], device=device) - cu_q[:-1][req_of]  # [N]
    qpos = torch.full((num_req, max_q), -1, dtype=torch.long, device=device)
    qpos[req_of, col] = q_pos
    keys = torch.arange(width, device=device)
    visible = (keys[None, None, :] <= qpos[..., None]) & (
        keys[None, None, :] < seq_lens[:, None, None]
    )  # [R, Q, S]
    # NOTE: padding queries (qpos = -1) see nothing; let them see key 0 so no row is NaN
    visible[..., 0] |= qpos < 0
    return PagedLayout(slots, req_of, col, visible[:, None], q_pos.shape[0] == num_req * max_q)


def paged_attention_torch(
    q: torch.Tensor,  # [N, H, head_dim] queries (normed and rotated)
    k_cache: torch.Tensor,  # [num_slots, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_slots, kv_heads, head_dim]
    layout: PagedLayout,
) -> torch.Tensor:  # [N, H, head_dim]
    num_req = layout.slots.shape[0]
    if layout.uniform:
        padded_q = q.view(num_req, layout.max_q, *q.shape[1:])  # [R, Q, H, hd]
    else:
        padded_q = q.new_zeros(num_req, layout.max_q, *q.shape[1:])
        padded_q[layout.req_of, layout.col] = q
    out = F.scaled_dot_product_attention(
        padded_q.transpose(1, 2),  # [R, H, Q, hd]
        gather_kv(k_cache, layout.slots),
        gather_kv(v_cache, layout.slots),
        attn_mask=layout.visible,
        enable_gqa=True,
    )  # [R, H, Q, hd]
    if layout.uniform:
        return out.transpose(1, 2).reshape(q.shape)
    return out.transpose(1, 2)[layout.req_of, layout.col]


def paged_attention(*args, **kwargs) -> torch.Tensor:
    """The one entry point the runners call (the torch twin on every device: no Triton kernel yet)."""
    return paged_attention_torch(*args, **kwargs)
