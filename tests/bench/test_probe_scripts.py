"""The measuring scripts that docs cite run and print what they say (tiny sizes)."""

from __future__ import annotations

import re


def test_machine_noise_prints_its_windows(capsys):
    from dspark.bench.machine_noise import main

    assert main(["--seconds", "1", "--threads", "1"]) == 0
    assert re.search(r"\d+ windows of 0.5 s: iterations/s min [\d.]+ median", capsys.readouterr().out)


def test_otel_event_cost_prints_both_parts(capsys):
    from dspark.bench.otel_event_cost import main

    assert main(["--spans", "3", "--events", "4", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    for way in ("SDK event + SDK encoder", "packed event"):
        assert re.search(re.escape(way) + r".*: adding [\d.]+ µs per event, encoding [\d.]+ µs", out)
    assert "12 events per round" in out


def test_gate_audit_compares_predictions_with_outcomes(capsys, monkeypatch, demo_target_dir):
    from dspark.bench.gate_audit import main

    monkeypatch.chdir(demo_target_dir.parent.parent)
    assert main(["--concurrency", "1", "--threads", "1", "--max-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "gate: tok_s" in out and "drafter: call" in out and "backbone" in out
