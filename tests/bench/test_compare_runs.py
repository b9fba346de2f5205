"""compare_runs reports cell-by-cell changes between two results JSONs."""

from __future__ import annotations

from dspark.bench.compare_runs import compare_acceptance, compare_engine


def cell(tau, stderr=0.05, tokens=100, proposed=7.0):
    return {"tau": tau, "tau_stderr": stderr, "tokens": tokens, "mean_proposed": proposed}


def test_acceptance_cells_are_counted_in_standard_errors():
    old = {"drafters": {"d": {"sets": {"a": cell(2.0), "b": cell(2.0)}}}}
    new = {"drafters": {"d": {"sets": {"a": cell(2.05), "b": cell(2.5, tokens=150)}}}}
    lines = compare_acceptance(old, new)
    assert "(+0.7 stderr)" in lines[0] and "tokens 100 -> 150" in lines[1]
    assert lines[-1] == "1 of 2 cells moved by more than two standard errors"


def test_engine_cells_give_speed_after_over_before_and_both_ratios():
    def run(tps, ratio):
        key = {"system": "s", "temperature": 0.0, "concurrency": 1}
        return {"cells": [{**key, "aggregate_tps": tps}],
                "ratios": [{**key, "aggregate_vs_no-spec": ratio}]}

    (line,) = compare_engine(run(100.0, 1.5), run(120.0, 1.2))
    assert "before 1.20" in line and "x no-spec 1.50 -> 1.20" in line
