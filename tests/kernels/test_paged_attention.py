"""Paged variable-length attention equals dense causal attention per request."""

from __future__ import annotations

from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

from dspark.kernels.paged_attention import (
    SplitLayout,
    paged_attention_torch,
    paged_layout,
    query_groups,
    slot_table,
    split_layout,
)


def assert_dense_causal(out, q, k_cache, v_cache, slots, lens, new):
    """Each request's rows of ``out`` equal dense causal attention of its ``new`` trailing
    queries over its ``lens`` keys (at ``slots``)."""
    cu = [0, *torch.tensor(new).cumsum(0).tolist()]
    for r, (n, m) in enumerate(zip(lens, new)):
        keys = k_cache[slots[r, :n]].transpose(0, 1)[None]  # [1, kv, n, hd]
        values = v_cache[slots[r, :n]].transpose(0, 1)[None]
        mask = torch.arange(n)[None, :] <= torch.arange(n - m, n)[:, None]
        ref = F.scaled_dot_product_attention(
            q[cu[r]:cu[r + 1]].transpose(0, 1)[None], keys, values, attn_mask=mask,
            enable_gqa=True,
        )[0].transpose(0, 1)
        torch.testing.assert_close(out[cu[r]:cu[r + 1]], ref)


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
    assert_dense_causal(out, q, k_cache, v_cache, slots, lens, new)


def test_query_groups_are_the_cheapest_split_of_sorted_lengths():
    gen = torch.Generator().manual_seed(2)

    def cost(groups, lens, group_rows):
        return sum(len(g) * max(lens[r] for r in g) for g in groups) + group_rows * (
            len(groups) - 1)

    for _ in range(200):
        lens = torch.randint(1, 12, (int(torch.randint(1, 9, (1,), generator=gen)),),
                             generator=gen).tolist()
        group_rows = int(torch.randint(0, 20, (1,), generator=gen))
        most = int(torch.randint(1, 4, (1,), generator=gen))
        got = query_groups(lens, group_rows, most)
        assert sorted(r for g in got for r in g) == list(range(len(lens))) and len(got) <= most
        # every split of the sorted distinct lengths into at most ``most`` runs
        distinct = sorted(set(lens))
        best = min(
            cost([[r for r in range(len(lens)) if lo <= lens[r] < hi]
                  for lo, hi in zip((0, *cuts), (*cuts, 99))], lens, group_rows)
            for k in range(min(most, len(distinct)))
            for cuts in combinations(distinct[1:], k))
        assert cost(got, lens, group_rows) == best


def test_query_groups_split_a_long_run_from_many_short_ones_and_cover_every_request():
    assert query_groups([3, 3, 3]) == [[0, 1, 2]]
    assert query_groups([8, 3, 3, 2]) == [[0, 1, 2, 3]]  # little padding: one call
    assert query_groups([1] * 5 + [8] + [1] * 3) == [[0, 1, 2, 3, 4, 6, 7, 8], [5]]
    lens = [1] * 20 + [64] + [5, 6, 7, 8] + [1] * 10
    groups = query_groups(lens)
    assert len(groups) == 3 and sorted(r for g in groups for r in g) == list(range(len(lens)))
    assert [sorted({lens[r] for r in g}) for g in groups] == [[1], [5, 6, 7, 8], [64]]
    assert query_groups(lens, most=2) == [[r for r in range(len(lens)) if lens[r] < 64],
                                          [20]]
    assert len(query_groups(lens, group_rows=10_000)) == 1


@pytest.mark.parametrize("new", [[1, 1, 6, 1, 1, 1, 1, 1, 1], [1, 5, 1, 12, 2, 1, 1, 1, 1]])
def test_grouped_layout_equals_dense_causal_attention(new):
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, hd, block = 4, 2, 8, 4
    lens = [12 + 3 * r + n for r, n in enumerate(new)]  # keys per request, new ones last
    blocks = -(-max(lens) // block)
    tables = torch.randperm(len(new) * blocks, generator=gen).view(len(new), blocks)
    k_cache = torch.randn(len(new) * blocks * block, kv_heads, hd, generator=gen)
    v_cache = torch.randn(len(new) * blocks * block, kv_heads, hd, generator=gen)
    q = torch.randn(sum(new), heads, hd, generator=gen)
    q_pos = torch.cat([torch.arange(n - m, n) for n, m in zip(lens, new)])
    layout = split_layout(tables, block, torch.tensor(lens), q_pos, new, lens)
    assert isinstance(layout, SplitLayout) and len(layout.parts) >= 2
    out = paged_attention_torch(q, k_cache, v_cache, layout)
    assert_dense_causal(out, q, k_cache, v_cache, slot_table(tables, max(lens), block), lens,
                        new)
