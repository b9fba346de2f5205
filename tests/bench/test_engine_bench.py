"""`dspark bench engine` machinery on the demo checkpoints, at a tiny size: every system runs,
ratios are taken against the right baseline, and the report files are written."""

from __future__ import annotations

import json

import torch

from dspark.bench.closed_loop import step_order
from dspark.bench.engine_bench import SYSTEMS, BenchConfig, run_benchmark, write_results


def test_tiny_benchmark_writes_a_consistent_report(demo_target_dir, tmp_path):
    from dspark.models.generation import load_for_generation

    target, tok = load_for_generation(demo_target_dir)
    prompts = [tok.chat_prompt(t) for t in ("What is 2 + 3?", "Write hello world in Python.")]
    systems = [s for s in SYSTEMS if s.label in ("no-spec", "mtp-1", "dspark-alg1")]
    cfg = BenchConfig(concurrencies=(1, 2), temperatures=(0.0,), max_tokens=6, min_requests=2,
                      rounds=2)
    result = run_benchmark(target, demo_target_dir.parent / "drafters", prompts, tok.stop_ids,
                           cfg, systems, log=lambda _: None)
    cells = {(c["system"], c["concurrency"]): c for c in result["cells"]}
    assert len(cells) == 6 and all(c["output_tokens"] > 0 for c in cells.values())
    for row in result["ratios"]:
        mine = cells[(row["system"], row["concurrency"])]
        base = cells[("no-spec", row["concurrency"])]
        assert abs(row["aggregate_vs_no-spec"] - mine["aggregate_tps"] / base["aggregate_tps"]) < 1e-9
    assert cells[("mtp-1", 1)]["mean_budget_per_request"] == 1.0  # MTP-1 proposes one token
    # paired ratios: each round's aggregate over no-spec's in the same round and cell
    by_round = {(c["system"], c["concurrency"], c["round"]): c for c in result["rounds"]}
    paired = {(p["system"], p["concurrency"]): p for p in result["paired"]}
    assert set(paired) == {k for k in cells if k[0] != "no-spec"}
    for (system, conc), row in paired.items():
        per_round = [by_round[(system, conc, r)]["aggregate_tps"]
                     / by_round[("no-spec", conc, r)]["aggregate_tps"] for r in (0, 1)]
        assert row["rounds"] == 2 and row["temperature"] == 0.0
        assert abs(row["aggregate_tps"] - sum(per_round) / 2) < 1e-9
        assert (row["aggregate_tps_min"], row["aggregate_tps_max"]) == (min(per_round),
                                                                        max(per_round))
    paths = write_results(result, tmp_path, "dspark bench engine --test")
    assert {p.name for p in paths} >= {"engine.json", "engine.md", "engine-pareto.png",
                                       "engine-budget.png"}
    assert json.loads((tmp_path / "engine.json").read_text())["command"].endswith("--test")
    report = (tmp_path / "engine.md").read_text()
    assert "| dspark-alg1 | 2 |" in report
    machine = json.loads((tmp_path / "engine.json").read_text())["machine"]
    assert report.splitlines()[2] == f"Machine: {machine['cpu']}, {machine['cpus']} CPUs; " \
        f"torch {torch.__version__}; {torch.get_num_threads()} torch threads."
    row = paired[("dspark-alg1", 2)]
    assert (f"| dspark-alg1 | 0 | 2 | 2 | {row['aggregate_tps']:.3f} "
            f"[{row['aggregate_tps_min']:.3f}–{row['aggregate_tps_max']:.3f}] |") in report


def test_the_cli_default_lists_every_system():
    from dspark.cluster.cli.bench import ENGINE_SYSTEMS

    assert ENGINE_SYSTEMS == tuple(s.label for s in SYSTEMS)


def test_over_two_rounds_every_system_steps_after_both_others():
    # NOTE: the systems step in a cycle (bench/closed_loop.py ``interleave``): the one
    # before a system is its left neighbour in the order, wrapping around
    systems = ["no-spec", "mtp-1", "dspark"]

    def before(order):
        return {s: order[i - 1] for i, s in enumerate(order)}

    seen = {s: set() for s in systems}
    for rnd in range(2):
        order = step_order(systems, rnd)
        assert sorted(order) == sorted(systems)
        for s, prev in before(order).items():
            seen[s].add(prev)
    assert all(seen[s] == set(systems) - {s} for s in systems)
