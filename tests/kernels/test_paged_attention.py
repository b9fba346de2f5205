"""Paged variable-length attention equals dense causal attention per request."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dspark.kernels.paged_attention import paged_attention_torch, paged_layout, slot_table


# trailing queries per request: ragged (padded layout), and one length for every request
# (decode, or drafts of one length: the padded layout is a view of the queries)
@pytest.mark.parametrize("new", [[2, 3, 1], [3, 3, 3], [1, 1, 1]])
def test_paged_attention_equals_dense_causal_attention(new):
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, hd, block = 4, 2, 8, 4
    lens = [9, 3, 14]  # total keys per request
    tables = torch.tensor([[5, 1, 7, 0], [2, 0, 0, 0], [3, 4, 6, 8]])
    k_cache = torch.randn(9 * block, kv_heads, hd, generator=gen)
    v_cache = torch.randn(9 * block, kv_heads, hd, generator=gen)
    q = torch.randn(sum(new), heads, hd, generator=gen)
    q_pos = torch.cat([torch.arange(n - m, n) for n, m in zip(lens, new)])
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()])
    slots = slot_table(tables, max(lens), block)
    layout = paged_layout(slots, torch.tensor(lens), cu, q_pos, max(new))
    assert layout.uniform == (len(set(new)) == 1)
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
