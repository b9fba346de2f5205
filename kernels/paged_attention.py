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
(``paged_layout``, or ``split_layout`` for requests grouped by query length) and shared by
every layer.

*Query groups*: the torch twin pads every request's queries to the longest run of its
layout, so one request with 8 rows (7 drafts, or a prefill chunk) among 31 decoding ones
made the attention compute 32 x 8 query rows; a verify forward of those 39 tokens cost
1.3 x one of 32 one-row requests (``python -m dspark.bench.query_groups``, docs/engine.md,
"Session 25"). ``query_groups`` splits the requests by query length
where the padding saved outweighs another attention call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch

from dspark.kernels.attention import attention
from dspark.kernels.transfer import device_tensor


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
    num_q: int | None = None,  # N, where known on the host (no read-back on a GPU)
) -> PagedLayout:
    num_req, width = slots.shape
    device = slots.device
    q_lens = cu_q[1:] - cu_q[:-1]  # [R]
    req_of = torch.repeat_interleave(torch.arange(num_req, device=device), q_lens,
                                     output_size=num_q)  # [N]
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


GROUP_ROWS = 16
"""What one more query group is taken to cost, in padded query rows: its own gathers, mask
and attention call in every layer. A guess, not a fit: in ``python -m
dspark.bench.query_groups`` (docs/engine.md, "Session 25") the splits it makes gained
where a long run stood among many short ones (0.54-0.91 x one group) and did not where
the padding saved was small (7 decoding requests and one with 8 rows: 1.05, within that
run's noise of about 5 %)."""

MAX_GROUPS = 3


def query_groups(q_lens: Sequence[int], group_rows: int | None = None,
                 most: int | None = None) -> list[list[int]]:
    """The requests (indices, ascending in each group) split into at most ``most`` groups
    of neighbouring query lengths, so that the padded query rows (each group's requests
    times its longest run) plus ``group_rows`` per group beyond the first are fewest
    (defaults: ``GROUP_ROWS``, ``MAX_GROUPS``); of equal costs, the fewest groups."""
    group_rows = GROUP_ROWS if group_rows is None else group_rows
    most = MAX_GROUPS if most is None else most
    lengths = sorted(set(q_lens))
    if len(lengths) == 1:
        return [list(range(len(q_lens)))]
    counts = [0] * len(lengths)
    where = {n: i for i, n in enumerate(lengths)}
    for n in q_lens:
        counts[where[n]] += 1
    before = [0, *accumulate(counts)]  # requests shorter than lengths[i]

    def cost(a: int, b: int) -> int:  # one group of lengths[a:b]
        return (before[b] - before[a]) * lengths[b - 1]

    # best[g][b]: (cost, cuts) of lengths[:b] in g + 1 groups
    best = [{b: (cost(0, b), ()) for b in range(1, len(lengths) + 1)}]
    for groups in range(2, min(most, len(lengths)) + 1):
        best.append({b: min((best[-1][a][0] + cost(a, b) + group_rows, best[-1][a][1] + (a,))
                            for a in range(groups - 1, b))
                     for b in range(groups, len(lengths) + 1)})
    ends = [level[len(lengths)] for level in best if len(lengths) in level]
    _, cuts = min(ends, key=lambda end: (end[0], len(end[1])))
    bounds = [lengths[c] for c in cuts]  # the shortest length of each group after the first
    groups: list[list[int]] = [[] for _ in range(len(cuts) + 1)]
    for r, n in enumerate(q_lens):
        groups[sum(n >= edge for edge in bounds)].append(r)
    return groups


@dataclass
class SplitLayout:
    """Requests grouped by query length (``query_groups``): each group's query rows of the
    flattened batch ([N_g], ascending) and its own layout."""

    parts: list[tuple[torch.Tensor, PagedLayout]]


def split_layout(
    block_tables: torch.Tensor,  # [R, max_blocks]
    block_size: int,
    seq_lens: torch.Tensor,  # [R]
    positions: torch.Tensor,  # [N] absolute position of each query
    q_lens: Sequence[int],  # [R] queries of each request (host)
    key_lens: Sequence[int],  # [R] keys of each request (host)
) -> PagedLayout | SplitLayout:
    """The layout of a flattened batch: one ``PagedLayout`` when one group pays, else one
    per group of query lengths."""
    device = positions.device
    groups = query_groups(q_lens)
    if len(groups) == 1:
        slots = slot_table(block_tables, max(key_lens), block_size)
        cu = device_tensor([0, *accumulate(q_lens)], device)
        return paged_layout(slots, seq_lens, cu, positions, max(q_lens), sum(q_lens))
    starts = [0, *accumulate(q_lens)]
    parts = []
    for reqs in groups:
        lens = [q_lens[r] for r in reqs]
        rows = device_tensor([i for r in reqs for i in range(starts[r], starts[r + 1])],
                             device, torch.long)
        index = device_tensor(reqs, device, torch.long)
        slots = slot_table(block_tables.index_select(0, index),
                           max(key_lens[r] for r in reqs), block_size)
        cu = device_tensor([0, *accumulate(lens)], device)
        parts.append((rows, paged_layout(slots, seq_lens.index_select(0, index), cu,
                                         positions.index_select(0, rows), max(lens),
                                         sum(lens))))
    return SplitLayout(parts)


def paged_attention_torch(
    q: torch.Tensor,  # [N, H, head_dim] queries (normed and rotated)
    k_cache: torch.Tensor,  # [num_slots, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_slots, kv_heads, head_dim]
    layout: PagedLayout | SplitLayout,
) -> torch.Tensor:  # [N, H, head_dim]
    if isinstance(layout, SplitLayout):
        out = q.new_empty(q.shape)
        for rows, part in layout.parts:
            out.index_copy_(0, rows, paged_attention_torch(
                q.index_select(0, rows), k_cache, v_cache, part))
        return out
    num_req = layout.slots.shape[0]
    if layout.uniform:
        padded_q = q.view(num_req, layout.max_q, *q.shape[1:])  # [R, Q, H, hd]
    else:
        padded_q = q.new_zeros(num_req, layout.max_q, *q.shape[1:])
        padded_q[layout.req_of, layout.col] = q
    out = attention(
        padded_q.transpose(1, 2),  # [R, H, Q, hd]
        gather_kv(k_cache, layout.slots),
        gather_kv(v_cache, layout.slots),
        layout.visible,
    )  # [R, H, Q, hd]
    if layout.uniform:
        return out.transpose(1, 2).reshape(q.shape)
    return out.transpose(1, 2)[layout.req_of, layout.col]


def paged_attention(*args, **kwargs) -> torch.Tensor:
    """The one entry point the runners call (the torch twin on every device: no Triton kernel yet)."""
    return paged_attention_torch(*args, **kwargs)
