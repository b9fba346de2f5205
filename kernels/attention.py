"""Grouped-query attention of a few queries per request over a masked context.

``F.scaled_dot_product_attention`` on the CPU runs its flash kernel, which for two or more
queries per request over many requests is slower than the same arithmetic as two batched
matrix products: alone, 32 requests x 4 queries x 203 keys 0.85 against 0.44 ms (torch
2.13, 2 threads; ``docs/results/session32-attention/alone.py``). In a whole forward (its
weights and caches passing through the CPU's caches between two layers) the gain is smaller
and starts later: from 8 query rows on, a verify forward of 64 requests x 2 tokens 0.95 x and
32 x 3 0.985 x, but 4 x 4 1.02 x and 8 x 4 1.015 x; a 2-layer DSpark drafting call 0.93-0.94 x
at 32-64 requests but 1.02 x at 4 (``ab_forward.py --min-rows 8`` there; docs/engine.md,
session 32). One query per request ties. So ``attention`` takes the matrix products from
``MIN_ROWS`` queries in all on, and the flash kernel below.

A query that sees no key at all gets the mean of the values (not NaN): the masked scores
are the float minimum, not minus infinity. Such rows are padding wherever they occur.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_ROWS = 48
"""Fewer queries than this in all (requests x queries each): the flash kernel."""
MAX_QUERIES = 32
"""More queries per request than this (a prefill chunk): the flash kernel, whose scores
are never materialised."""


def attention(
    q: torch.Tensor,  # [R, H, Q, hd]
    k: torch.Tensor,  # [R, kv, S, hd]; query head h reads kv head h // (H / kv)
    v: torch.Tensor,  # [R, kv, S, hd]
    mask: torch.Tensor,  # [R or 1, 1, Q, S] bool, True = visible
) -> torch.Tensor:  # [R, H, Q, hd]
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)``."""
    num_req, heads, queries, head_dim = q.shape
    if (q.device.type != "cpu" or not 2 <= queries <= MAX_QUERIES
            or num_req * queries < MIN_ROWS
            or mask.dtype != torch.bool):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    kv_heads, keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    # NOTE: the queries of the heads sharing a kv head are one matrix: [R, kv, g * Q, hd]
    scores = torch.matmul(q.reshape(num_req, kv_heads, group * queries, head_dim),
                          k.transpose(-1, -2)).view(num_req, kv_heads, group, queries, keys)
    scores.mul_(head_dim ** -0.5)
    scores = torch.where(mask[:, :, None], scores, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, -1).view(num_req, kv_heads, group * queries, keys)
    return torch.matmul(probs, v).view(num_req, heads, queries, head_dim)
