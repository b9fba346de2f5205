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
    # paired: each round's ratio to the first arm (2, 2, 1.25), then their median
    assert cluster["aggregate_paired"] == 2.0 and local["aggregate_paired"] == 1.0
    table = markdown([local, cluster], EpBenchConfig())
    assert "| cluster | 250.0 [200–400] | 1.25 | 2.000 |" in table
    assert "| 0% / 25% | 10.0 |" in table
    assert "share of a step in the experts (rank 0): 0.40." in table


def test_the_first_arm_is_the_baseline():
    rows = [row(0, "no-spec", 0, 300, 2.0, 0.0), row(0, "no-spec", 1, 100, 1.0, 0.0),
            row(0, "local+lane", 0, 330, 2.0, 1.0), row(0, "local+lane", 1, 110, 1.0, 1.0)]
    base, lane = summarize(rows)
    assert base["budget"] == "no-spec" and lane["aggregate_paired"] == 1.1
    assert "| arm | aggregate tok/s [min–max] | × no-spec | × no-spec paired |" in markdown(
        [base, lane], EpBenchConfig(arms="no-spec,local+lane"))


def test_config_names_the_bad_field():
    with pytest.raises(ValueError, match="light must be >= 1"):
        EpBenchConfig(light=0)
    for arms in ("local,fast", "", "local,local"):
        with pytest.raises(ValueError, match="arms must list distinct arms of no-spec, local"):
            EpBenchConfig(arms=arms)


def test_a_missing_drafter_is_named_before_the_ranks_start(tmp_path, capsys):
    from dspark.cluster.cli import main

    args = ["bench", "ep", "--steps", "1", "--rounds", "1", "--out", str(tmp_path)]
    assert main([*args, "--drafter", "nosuch"]) == 2
    assert "--drafter: 'nosuch' is neither a drafter under" in capsys.readouterr().err
    assert main([*args, "--arms", "local+lane", "--light-drafter", "nosuch"]) == 2
    assert "--light-drafter: 'nosuch' is neither" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # NOTE: nothing ran, nothing written
