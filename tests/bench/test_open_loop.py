"""The open-loop benchmark sends each request at its own arrival time and times it from
there; its systems see the same arrivals; ``NAME/serial`` is the system without late
admission."""

from __future__ import annotations

import pytest

from dspark.bench.open_loop import (
    arrival_times,
    build_fronts,
    main,
    paired,
    run,
    summarize,
    write,
)
from dspark.models.generation import SamplingParams
from dspark.workers.async_engine import AsyncEngine
from dspark.workers.budget import StepCostTable
from dspark.workers.engine import Engine, EngineConfig

COST = StepCostTable((1, 8, 64), (100.0, 90.0, 40.0))


def test_arrivals_are_a_seeded_poisson_process():
    times = arrival_times(4.0, 4000, seed=7)
    assert times[0] == 0.0 and times == sorted(times)
    assert times == arrival_times(4.0, 4000, seed=7) != arrival_times(4.0, 4000, seed=8)
    gaps = [b - a for a, b in zip(times, times[1:])]
    mean = sum(gaps) / len(gaps)
    assert 0.235 < mean < 0.265  # 1 / rate, within 6 % (standard error 1.6 %)
    assert 0.30 < sum(g < 0.125 for g in gaps) / len(gaps) < 0.49  # 1 - e^-0.5 = 0.39


def test_a_cell_times_requests_from_their_sending():
    requests = [{"sent": 10.0, "first": 10.1, "end": 10.5, "tokens": 5},
                {"sent": 10.5, "first": 10.8, "end": 12.0, "tokens": 7}]
    cell = summarize(requests)
    assert cell["tokens"] == 12 and cell["aggregate_tps"] == pytest.approx(12 / 2.0)
    assert cell["ttft_p50_ms"] == pytest.approx(100.0)
    assert cell["ttft_p90_ms"] == pytest.approx(300.0)
    assert cell["tpot_p50_ms"] == pytest.approx(100.0)  # 400 ms / 4 and 1200 ms / 6: 100, 200
    assert cell["in_flight"] == pytest.approx((0.5 + 1.5) / 2.0)


def test_every_system_serves_every_request_of_every_cell(make_model, make_drafter):
    target = make_model()
    config = EngineConfig(block_size=4, num_blocks=128, max_num_seqs=8)
    fronts = {"plain": AsyncEngine(Engine(target, None, config, COST)),
              "dspark": AsyncEngine(Engine(target, make_drafter(target, "dspark"), config, COST))}
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    try:
        raw = run(fronts, prompts, (), [40.0, 200.0], rounds=2, requests=6,
                  params=SamplingParams(max_tokens=5, ignore_eos=True), log=lambda _: None)
    finally:
        for front in fronts.values():
            front.shutdown()
    assert sorted((c["round"], c["rate"], c["system"]) for c in raw) == sorted(
        (r, rate, s) for r in range(2) for rate in (40.0, 200.0) for s in fronts)
    for c in raw:
        assert c["requests"] == 6 and c["tokens"] == 30
        assert 0 < c["ttft_p50_ms"] <= c["ttft_p90_ms"] and c["in_flight"] > 0


def test_a_serial_system_has_no_late_admission(demo_target_dir):
    from dspark.models.generation import load_for_generation

    target, _ = load_for_generation(demo_target_dir)
    drafters = demo_target_dir.parent / "drafters"
    fronts = build_fronts(["no-spec", "no-spec/serial"], target, drafters, 4, 0)
    try:
        assert fronts["no-spec"].engine.intake is not None
        assert fronts["no-spec/serial"].engine.intake is None
    finally:
        for front in fronts.values():
            front.shutdown()
    with pytest.raises(ValueError, match="--systems: 'no-spec/later'"):
        build_fronts(["no-spec/later"], target, drafters, 4, 0)


def test_each_system_is_paired_with_its_serial_variant_and_a_report_reruns(tmp_path):
    def cell(system, rnd, ttft):
        return {"system": system, "rate": 4.0, "round": rnd, "aggregate_tps": 100.0,
                "ttft_p50_ms": ttft, "ttft_p90_ms": 2 * ttft, "tpot_p50_ms": 10.0,
                "in_flight": 2.0}

    raw = [cell("base", r, 40.0) for r in range(2)] + [
        cell("x", 0, 30.0), cell("x", 1, 50.0), cell("x/serial", 0, 60.0),
        cell("x/serial", 1, 50.0)]
    first, against_serial = paired(raw, ["base", "x", "x/serial"])
    assert {r["system"] for r in first} == {"x", "x/serial"}
    (row,) = against_serial
    assert row["system"] == "x" and row["baseline"] == "x/serial"
    assert (row["ttft_p50_ms_min"], row["ttft_p50_ms_max"]) == (0.5, 1.0)
    result = {"cells": raw, "systems": ["base", "x", "x/serial"], "command": "cmd",
              "machine": {"cpu": "cpu", "cpus": 2, "torch": "t", "torch_threads": 2}}
    text = write(result, str(tmp_path / "a"))
    assert "against x/serial" in text
    assert main(["--report", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "results.md").read_text() == text
