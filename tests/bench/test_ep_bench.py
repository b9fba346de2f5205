"""`dspark bench ep`'s summary: the group's aggregate is both ranks' tokens over the slower
rank's wall time; per-rank figures are medians over rounds."""

from __future__ import annotations

import pytest

from dspark.bench.ep_bench import EpBenchConfig, markdown, summarize


def row(rnd, budget, rank, tokens, wall, ell):
    return {"round": rnd, "budget": budget, "rank": rank, "tokens": tokens, "wall": wall,
            "per_user_tps": tokens / wall / 2, "finished": 2, "mean_ell": ell, "step_ms": 10.0, "shared": 0.4,
            "drafted": 0.25 * rank}


def test_summary_uses_the_slower_rank_and_medians():
    rows = []
    for rnd, (w_local, w_cluster) in enumerate([(2.0, 1.0), (4.0, 2.0), (2.0, 1.6)]):
        rows += [row(rnd, "local", 0, 300, w_local, 2.0), row(rnd, "local", 1, 100, 1.0, 3.0),
                 row(rnd, "cluster", 0, 300, w_cluster, 2.5),
                 row(rnd, "cluster", 1, 100, 1.0, 5.0)]
    local, cluster = summarize(rows)
    assert local["aggregate_tps"] == 200.0  # 400 tokens over 2.0 s (median of 2, 4, 2)
    assert local["aggregate_spread"] == [100.0, 200.0]
    assert cluster["aggregate_tps"] == 400 / 1.6
    assert cluster["rank1_mean_ell"] == 5.0 and local["rank0_mean_ell"] == 2.0
    table = markdown([local, cluster], EpBenchConfig())
    assert "| cluster | 250.0 [200–400] | 1.25 |" in table
    assert "| 0% / 25% | 10.0 |" in table
    assert "share of a step in the experts (rank 0): 0.40." in table


def test_config_names_the_bad_field():
    with pytest.raises(ValueError, match="light must be >= 1"):
        EpBenchConfig(light=0)
