"""Paged variable-length attention equals dense causal attention per request."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dspark.kernels.paged_attention import paged_attention_torch, paged_layout, slot_table


def test_paged_attention_equals_dense_causal_attention():
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, hd, block = 4, 2, 8, 4
    lens, new = [9, 3, 14], [2, 3, 1]  # total keys and trailing queries per request
    tables = torch.tensor([[5, 1, 7, 0], [2, 0, 0, 0], [3, 4, 6, 8]])
    k_cache = torch.randn(9 * block, kv_heads, hd, generator=gen)
    v_cache = torch.randn(9 * block, kv_heads, hd, generator=gen)
    q = torch.randn(sum(new), heads, hd, generator=gen)
    q_pos = torch.cat([torch.arange(n - m, n) for n, m in zip(lens, new)])
    cu = torch.tensor([0, 2, 5, 6])
    slots = slot_table(tables, max(lens), block)
    layout = paged_layout(slots, torch.tensor(lens), cu, q_pos, 3)
    out = paged_attention_torch(q, k_cache, v_cache, layout)
    for r, (n, m) in enumerate(zip(lens, new)):
        keys = k_cache[slots[r, :n]].transpose(0, 1)[None]  # [1, kv, n, hd]
        values = v_cache[slots[r, :n]].transpose(0, 1)[None]
        mask = torch.arange(n)[None, :] <= torch.arange(n - m, n)[:, None]
        ref = F.scaled_dot_product_attention(
            q[cu[r]:cu[r + 1]].transpose(0, 1)[None], keys, values, attn_mask=mask,
            enable_gqa=True,
        )[0].transpose(0, 1)
        torch.testing.assert_close(out[cu[r]:cu[r + 1]], ref)
