"""``attention`` is ``F.scaled_dot_product_attention(..., enable_gqa=True)`` under a boolean
mask, on the matrix-product path (several requests, a few queries each) and on the flash
path it leaves to torch; a query that sees nothing gets the mean of the values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dspark.kernels import attention as attn


def _case(num_req, queries, keys, heads=4, kv_heads=2, head_dim=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(num_req, queries, heads, head_dim, generator=gen).transpose(1, 2)
    k = torch.randn(num_req, kv_heads, keys, head_dim, generator=gen)
    v = torch.randn(num_req, kv_heads, keys, head_dim, generator=gen)
    lens = torch.randint(1, keys + 1, (num_req,), generator=gen)
    visible = torch.arange(keys)[None, None, :] < lens[:, None, None]  # [R, 1, S]
    mask = visible[:, :, None, :].expand(-1, -1, queries, -1).clone()  # [R, 1, Q, S]
    mask[:, :, torch.arange(queries), keys - queries + torch.arange(queries)] = True
    return q, k, v, mask


@pytest.mark.parametrize("num_req,queries,keys,heads,kv_heads", [
    (32, 7, 207, 4, 2), (24, 2, 30, 4, 2), (8, 8, 65, 8, 2), (5, 32, 40, 4, 4), (16, 3, 9, 6, 3),
])
def test_the_matrix_path_is_sdpa(num_req, queries, keys, heads, kv_heads):
    q, k, v, mask = _case(num_req, queries, keys, heads, kv_heads)
    assert num_req * queries >= attn.MIN_ROWS and 2 <= queries <= attn.MAX_QUERIES  # the path taken
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = attn.attention(q, k, v, mask)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_req,queries", [(1, 7), (64, 1), (4, 33), (6, 7)])
def test_other_shapes_go_to_sdpa_unchanged(num_req, queries):
    q, k, v, mask = _case(num_req, queries, 50)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.equal(attn.attention(q, k, v, mask), want)


def test_a_mask_shared_by_all_requests_broadcasts():
    q, k, v, mask = _case(12, 5, 20)
    shared = mask[:1]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=shared, enable_gqa=True)
    torch.testing.assert_close(attn.attention(q, k, v, shared), want, rtol=1e-5, atol=1e-5)


def test_a_query_that_sees_nothing_reads_the_mean_of_the_values():
    q, k, v, mask = _case(16, 3, 10)
    mask[2, :, 1] = False  # request 2's second query sees no key
    out = attn.attention(q, k, v, mask)
    assert torch.isfinite(out).all()
    mean = v[2].mean(1).repeat_interleave(2, 0)  # [H, hd]: heads 2j, 2j+1 read kv head j
    torch.testing.assert_close(out[2, :, 1], mean, rtol=1e-5, atol=1e-5)
