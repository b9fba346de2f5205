"""The autoscaling benchmark's report: medians over rounds, and rounds where a policy never
scaled back down are counted, not averaged in."""

from __future__ import annotations

from dspark.bench.autoscale_bench import markdown, summary


def ramp(up, down, served=60):
    return {"time_to_scale_up_s": up, "max_replicas_seen": 3, "requests": served,
            "past_slo_share": 0.5, "replica_seconds": 150.0, "time_to_scale_down_s": down}


def test_summary_takes_medians_and_counts_the_rounds_that_never_happened():
    rounds = [{"requests": ramp(11.0, None, 60), "board": ramp(18.0, 8.0, 70)},
              {"board": ramp(12.0, 9.0, 66), "requests": ramp(14.0, None, 62)},
              {"requests": ramp(13.0, 5.0, 64), "board": ramp(15.0, 10.0, 68)}]
    stats = summary(rounds)
    assert stats["board"]["time_to_scale_up_s"] == (15.0, 12.0, 18.0, 0)
    assert stats["board"]["requests"] == (68, 66, 70, 0)
    assert stats["requests"]["time_to_scale_down_s"] == (5.0, 5.0, 5.0, 2)
    config = {"idle_s": 15, "burst_s": 45, "clients": 12, "min_replicas": 1,
              "max_replicas": 3, "slo_s": 2}
    text = markdown({"rounds": rounds, "config": config}, "cmd")
    assert "| requests | 13.0 s [11.0–14.0] |" in text
    assert "5.0 s [5.0–5.0], never in 2 |" in text
    assert text.count("| board |") == 4  # the summary row and one per round
