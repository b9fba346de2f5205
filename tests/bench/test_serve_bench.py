"""`dspark bench serve`: closed-loop streaming requests against the served app are counted
exactly, with TTFT and time per output token measured; rounds rotate the systems' order,
and cells report the median and spread over rounds, with ratios taken of medians."""

from __future__ import annotations

import asyncio
import time

import pytest

from dspark.bench.paired import paired_ratios
from dspark.bench.replica_engine import engine_numbers, replica_totals
from dspark.bench.serve_bench import (
    PAIRED,
    ServeBenchConfig,
    closed_loop,
    median_cells,
    ratios,
    router_ratios,
    turn_order,
)
from dspark.bench.serve_report import markdown


def test_closed_loop_counts_tokens_and_latencies(served_app):
    url = f"http://{served_app.host}:{served_app.port}"
    before = replica_totals(url)
    cell = asyncio.run(closed_loop(
        url, served_app.model_name, ["Say hi.", "Count to three."], concurrency=2,
        num_requests=3, make_body=lambda i: {"max_tokens": 8, "ignore_eos": True,
                                             "temperature": 0}))
    assert cell["requests"] == 3 and cell["output_tokens"] == 24
    assert 0 < cell["ttft_p50"] <= cell["ttft_p90"] and cell["tpot_p50"] > 0
    assert cell["aggregate_tps"] > 0 and cell["per_user_tps"] > 0
    # NOTE: the replica's engine counts a step after its last chunk may have left
    deadline = time.monotonic() + 30
    while (after := replica_totals(url))["num_output_tokens"] < before["num_output_tokens"] + 24:
        assert time.monotonic() < deadline, "the replica never counted the cell's 24 tokens"
        time.sleep(0.1)
    engine = engine_numbers(before, after, cell["wall_s"])
    steps = after["num_steps"] - before["num_steps"]
    # NOTE: 3 requests of 8 tokens, 2 at a time: at least 8 steps, at most one per token
    # and prompt chunk
    assert 8 <= steps <= 24 + 3
    assert engine["engine_tokens_per_step"] == pytest.approx(24 / steps)
    assert 0 < engine["engine_busy"] <= 1.0 and engine["engine_step_ms"] > 0
    assert 0 <= engine["engine_drafted"] <= 1 and 0 <= engine["engine_draft_share"] < 1
    cells = [{"system": s, "concurrency": 2, **cell, **engine} for s in ("no-spec", "mtp-1")]
    result = {"cells": cells, "routers": [], "ratios": ratios(cells)}
    assert result["ratios"][1]["aggregate_vs_no-spec"] == 1.0
    report = markdown(result)
    assert "| mtp-1 | 2 |" in report and "| busy | step ms |" in report
    assert engine_numbers(before, None, 1.0) == {} and engine_numbers(before, before, 1.0) == {}


def measured(rnd: int, key: str, label: str, conc: int, agg: float, ttft: float,
             **more) -> dict:
    """A raw cell as ``summarize`` makes it (per-user tok/s a tenth of the aggregate)."""
    return {"round": rnd, "turn": 0, key: label, "concurrency": conc, "requests": 8,
            "output_tokens": 512, "aggregate_tps": agg, "per_user_tps": agg / 10,
            "ttft_p50": ttft, "ttft_p90": 2 * ttft, "ttft_p99": 3 * ttft, "tpot_p50": 0.01,
            "tpot_p90": 0.02, "wall_s": 512 / agg, **more}


def test_each_system_goes_first_in_turn():
    systems = ["no-spec", "mtp-1", "dspark-local", "dspark-cluster"]
    orders = [turn_order(systems, r) for r in range(4)]
    assert orders[0] == systems and orders[1] == ["mtp-1", "dspark-local", "dspark-cluster",
                                                  "no-spec"]
    assert {o[0] for o in orders} == set(systems)  # over n rounds, each first once
    assert all(sorted(o) == sorted(systems) for o in orders)  # and every one runs each round
    assert turn_order(["board", "pow2"], 3) == ["pow2", "board"]
    assert turn_order([], 2) == []


def test_cells_report_the_median_and_spread_over_rounds():
    raw = [measured(r, "system", "no-spec", 4, agg, ttft)
           for r, (agg, ttft) in enumerate([(200.0, 0.05), (100.0, 0.07), (150.0, 0.04)])]
    raw.append(measured(0, "system", "no-spec", 1, 90.0, 0.03))
    cells = median_cells(raw, ("system", "concurrency"))
    assert [(c["system"], c["concurrency"]) for c in cells] == [("no-spec", 4), ("no-spec", 1)]
    c4 = cells[0]
    assert c4["aggregate_tps"] == 150.0 and c4["aggregate_tps_min"] == 100.0
    assert c4["aggregate_tps_max"] == 200.0 and c4["per_user_tps"] == 15.0
    assert c4["ttft_p50"] == 0.05 and (c4["ttft_p50_min"], c4["ttft_p50_max"]) == (0.04, 0.07)
    assert c4["ttft_p90"] == 0.1 and c4["ttft_p99"] == pytest.approx(0.15)
    assert c4["requests"] == 24 and c4["output_tokens"] == 3 * 512 and c4["rounds"] == 3
    assert "round" not in c4 and "turn" not in c4 and "ttft_p99_min" not in c4
    # an even number of rounds: the mean of the middle two
    two = median_cells(raw[:2], ("system", "concurrency"))[0]
    assert two["aggregate_tps"] == 150.0 and two["rounds"] == 2


def test_ratios_are_of_medians_and_include_ttft_against_no_spec():
    raw = []
    for r, (base, spec) in enumerate([(100.0, 130.0), (120.0, 110.0), (80.0, 125.0)]):
        raw.append(measured(r, "system", "no-spec", 1, base, 0.040))
        raw.append(measured(r, "system", "dspark-local", 1, spec, 0.044 + 0.01 * r))
    cells = median_cells(raw, ("system", "concurrency"))
    rows = {r["system"]: r for r in ratios(cells)}
    # medians 100 and 125: 1.25, though no single round shows it
    assert rows["dspark-local"]["aggregate_vs_no-spec"] == pytest.approx(1.25)
    assert rows["dspark-local"]["per_user_vs_no-spec"] == pytest.approx(1.25)
    assert rows["dspark-local"]["ttft_p50_vs_no-spec"] == pytest.approx(0.054 / 0.040)
    assert rows["dspark-local"]["ttft_p90_vs_no-spec"] == pytest.approx(0.054 / 0.040)
    assert "aggregate_vs_mtp-1" not in rows["dspark-local"]  # no MTP-1 in this run
    assert rows["no-spec"]["ttft_p90_vs_no-spec"] == 1.0


def test_router_ratios_compare_each_router_with_power_of_two():
    raw = [measured(0, "router", "board", 8, 300.0, 0.10),
           measured(0, "router", "pow2", 8, 250.0, 0.125)]
    rows = router_ratios(median_cells(raw, ("router", "concurrency")))
    board = next(r for r in rows if r["router"] == "board")
    assert board["aggregate_tps_vs_pow2"] == pytest.approx(1.2)
    assert board["ttft_p50_vs_pow2"] == pytest.approx(0.8)
    assert board["ttft_p90_vs_pow2"] == pytest.approx(0.8)
    assert router_ratios(median_cells(raw[:1], ("router", "concurrency"))) == []


def test_markdown_shows_medians_spreads_and_every_router_round():
    raw = [measured(r, "system", s, 4, agg, 0.05) for r, agg in enumerate([200.0, 100.0, 150.0])
           for s in ("no-spec", "dspark-cluster")]
    routers = [measured(r, "router", name, 8, agg, 0.1) for r in range(2)
               for name, agg in (("board", 300.0 + r), ("pow2", 280.0))]
    cells = median_cells(raw, ("system", "concurrency"))
    router_cells = median_cells(routers, ("router", "concurrency"))
    result = {"cells": cells, "ratios": ratios(cells), "routers": router_cells,
              "router_ratios": router_ratios(router_cells), "router_rounds": routers}
    text = markdown(result)
    assert ("| dspark-cluster | 4 | 15.0 [10.0–20.0] | 150.0 [100.0–200.0] | 1.00 / 1.00 |"
            in text)
    assert "| 50 [50–50] | 100 [100–100] | 1.00 / 1.00 |" in text  # TTFT and its ratio
    assert "| board | 8 | 30.1 [30.0–30.1] | 300.5 [300.0–301.0] |" in text
    assert "| 1.07 / 1.00 / 1.00 |" in text  # board against pow2
    assert "| 2 | board | 301.0 | 100 / 200 / 300 |" in text  # each round listed
    only_routers = markdown({**result, "cells": [], "ratios": []})
    assert "| system |" not in only_routers and "| router |" in only_routers


def test_config_names_the_bad_field():
    assert ServeBenchConfig().router_rounds == 3
    assert ServeBenchConfig(rounds=2, skew_rounds=5).router_rounds == 5
    assert ServeBenchConfig(skew_concurrency=8).router_requests == 32
    assert ServeBenchConfig(skew_requests=96).router_requests == 96
    for bad, field in (({"max_tokens": 3}, "max_tokens"), ({"concurrencies": ()}, "concurrencies"),
                       ({"rounds": 0}, "rounds"), ({"skew_rounds": -1}, "skew_rounds"),
                       ({"skew_requests": -1}, "skew_requests")):
        with pytest.raises(ValueError, match=field):
            ServeBenchConfig(**bad)


def test_paired_ratios_cancel_a_drift_between_rounds():
    # the machine is twice as fast in round 1; B is 4 % slower than A in every round
    raw = [measured(r, "system", s, 4, agg * (2 if r else 1), ttft)
           for r in (0, 1, 2) for s, agg, ttft in (("A", 100.0, 0.10), ("B", 96.0, 0.11))]
    rows = paired_ratios(raw, "system", "A", PAIRED)
    assert len(rows) == 1 and rows[0]["system"] == "B" and rows[0]["rounds"] == 3
    assert rows[0]["aggregate_tps"] == pytest.approx(0.96)
    assert rows[0]["aggregate_tps_min"] == pytest.approx(0.96)
    assert rows[0]["aggregate_tps_max"] == pytest.approx(0.96)
    assert rows[0]["ttft_p90"] == pytest.approx(1.1)
    # the medians of the cells spread with the drift; the paired ratio does not
    cells = median_cells(raw, ("system", "concurrency"))
    assert cells[0]["aggregate_tps_max"] == 2 * cells[0]["aggregate_tps_min"]
    text = markdown({"cells": cells, "ratios": ratios(cells), "routers": [], "paired": rows})
    assert "| B | 4 | 3 | 0.960 [0.960–0.960] |" in text


def test_an_apps_cpu_time_is_read_from_its_processes(tmp_path):
    from dspark.bench.proc_cpu import app_pids, cpu_seconds

    def process(pid: int, title: str, utime: int, stime: int) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(title.encode() + b"\0")
        rest = " ".join(["S", *["0"] * 10, str(utime), str(stime), *["0"] * 5])
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (ray::Serve Replica) {rest}\n")

    process(11, "ray::ServeReplica:a:TargetShard", 100, 50)
    process(12, "ray::ServeReplica:a:OpenAIIngress", 10, 5)
    process(13, "ray::ServeReplica:ab:TargetShard", 1000, 0)
    process(14, "ray::ProxyActor", 1000, 0)
    (tmp_path / "self").mkdir()
    assert sorted(app_pids("a", tmp_path)) == [11, 12]
    import os

    assert cpu_seconds([11, 12, 99], tmp_path) == 165 / os.sysconf("SC_CLK_TCK")
