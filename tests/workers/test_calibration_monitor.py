"""The calibration monitor's online ECE is ``dspark eval``'s offline ECE of its window; it
stays quiet on a calibrated stream, warns once on a miscalibrated one, and its opt-in
refit (the STS fit of training) recovers the true temperatures."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest

from dspark.models.calibration import calibration_report
from dspark.workers.calibration_monitor import CalibrationMonitor, MonitorConfig
from dspark.workers.offline import Rounds
from dspark.workers.stats import RoundRecord

LOGGER = "dspark.workers.calibration_monitor"


def stream(seed: int, num: int, true_temps, full: bool = True, none_every: int = 0):
    """Rounds whose drafts are accepted with probability sigmoid(z_k / true_T_k) each, in
    order until the first rejection (so the prefix survival is the product)."""
    rng = np.random.default_rng(seed)
    k_max, out = len(true_temps), []
    for i in range(num):
        proposed = k_max if full else int(rng.integers(0, k_max + 1))
        z = rng.normal(1.0, 2.5, proposed)  # [proposed]
        ok = rng.random(proposed) < 1.0 / (1.0 + np.exp(-z / np.asarray(true_temps[:proposed])))
        accepted = proposed if ok.all() else int(np.argmin(ok))
        logits = None if none_every and i % none_every == 0 else z.tolist()
        out.append(RoundRecord(proposed, accepted, accepted + 1, logits))
    return out


def offline(records, k_max: int, temps) -> dict:
    """``dspark eval``'s calibration report of the same rounds."""
    logits, proposed, accepted = Rounds(records=list(records)).confidence_arrays(k_max)
    return calibration_report(logits, proposed, accepted, temperatures=temps)


def test_calibrated_stream_has_small_ece_and_no_drift(caplog):
    temps = (1.0, 0.8, 1.3, 0.6)
    monitor = CalibrationMonitor(temps, MonitorConfig(window=4000, check_every=50))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for r in stream(0, 4000, temps):
            monitor.observe(r)
    snap = monitor.snapshot()
    assert snap.num_samples == (4000,) * 4
    assert snap.ece < 0.03
    assert not snap.drifted and snap.num_refits == 0
    assert abs(snap.overall_predicted - snap.overall_observed) < 0.02
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_miscalibrated_stream_warns_once_and_refit_recovers_the_temperatures(caplog):
    true_temps, start = (3.0, 2.0, 3.0, 2.5), (1.0,) * 4
    records = stream(1, 3000, true_temps)
    cfg = dict(window=2000, threshold=0.05, min_samples=4000, check_every=50)
    quiet = CalibrationMonitor(start, MonitorConfig(**cfg))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for r in records:
            quiet.observe(r)
    drift = [r for r in caplog.records if r.name == LOGGER and "drifted" in r.getMessage()]
    assert len(drift) == 1  # once on entering drift, not at every later check
    snap = quiet.snapshot()
    assert snap.drifted and snap.ece > 0.05 and snap.temperatures == start

    adopted = []
    monitor = CalibrationMonitor(start, MonitorConfig(**cfg, refit=True), adopted.append)
    for r in records:
        monitor.observe(r)
    snap = monitor.snapshot()
    assert snap.num_refits == 1 and adopted == [snap.temperatures] == [monitor.temperatures]
    event = snap.refits[0]
    assert event.old_temperatures == start and event.new_temperatures == snap.temperatures
    assert event.ece_before > 0.05 > event.ece_after
    assert not snap.drifted and snap.ece < 0.05
    for fitted, true in zip(snap.temperatures, true_temps):  # each moved toward the truth
        assert abs(np.log(fitted / true)) < abs(np.log(1.0 / true))
    assert abs(np.log(snap.temperatures[0] / true_temps[0])) < 0.35  # no prefix to confound
    assert json.loads(json.dumps(snap.to_dict()))["refits"][0]["ece_after"] == event.ece_after


def test_online_ece_is_the_offline_ece_of_the_window():
    temps = (1.2, 0.7, 0.9, 0.5, 1.4)
    records = stream(2, 600, (2.0, 1.0, 0.5, 1.0, 2.0), full=False, none_every=7)
    monitor = CalibrationMonitor(temps, MonitorConfig(window=10_000))
    for r in records:
        monitor.on_round("req", r)
    snap, report = monitor.snapshot(), offline(records, 5, temps)
    assert snap.ece == pytest.approx(report["summary"]["ece"], rel=1e-12)
    assert snap.num_rounds == sum(r.conf_logits is not None for r in records)
    rows = {p["position"]: p for p in report["positions"]}
    for k in range(1, 6):
        assert snap.num_samples[k - 1] == rows[k]["count"]
        assert snap.ece_per_position[k - 1] == pytest.approx(rows[k]["ece"], rel=1e-12)
        assert snap.mean_predicted[k - 1] == pytest.approx(rows[k]["mean_pred"], rel=1e-12)
        assert snap.mean_observed[k - 1] == pytest.approx(rows[k]["mean_label"], rel=1e-12)


def test_the_window_slides_per_position():
    temps = (1.0, 1.0, 1.0)
    records = stream(3, 300, temps)
    monitor = CalibrationMonitor(temps, MonitorConfig(window=50))
    for r in records:
        monitor.observe(r)
    snap = monitor.snapshot()
    assert snap.num_samples == (50, 50, 50) and snap.num_rounds == 300
    assert snap.ece == pytest.approx(offline(records[-50:], 3, temps)["summary"]["ece"])


def test_snapshots_taken_while_observing_see_whole_rounds():
    temps = (1.0, 1.0, 1.0)
    records = stream(4, 3000, temps)
    monitor = CalibrationMonitor(temps, MonitorConfig(window=10_000, check_every=100))
    worker = threading.Thread(target=lambda: [monitor.observe(r) for r in records])
    worker.start()
    seen = []
    while worker.is_alive() or not seen:
        seen.append(monitor.snapshot().num_samples)
    worker.join()
    assert all(a == b == c for a, b, c in seen)  # a round's positions land together
    assert [n[0] for n in seen] == sorted(n[0] for n in seen)
    assert monitor.snapshot().num_samples == (3000,) * 3


def test_engine_rounds_feed_the_monitor(demo_target_dir):
    from dspark.models.drafter_checkpoint import load_drafter
    from dspark.models.generation import SamplingParams, load_for_generation
    from dspark.workers.engine import Engine, EngineConfig
    from dspark.workers.offline import UNIT_COST

    target, tokenizer = load_for_generation(demo_target_dir)
    drafter = load_drafter(demo_target_dir.parent / "drafters" / "dspark", target)
    monitor = CalibrationMonitor.for_drafter(drafter.config, MonitorConfig(window=10_000))
    seen: list[RoundRecord] = []

    def on_round(req_id: str, record: RoundRecord) -> None:
        seen.append(record)
        monitor.on_round(req_id, record)

    engine = Engine(target, drafter, EngineConfig(num_blocks=128, max_num_seqs=6),
                    UNIT_COST, on_round=on_round)
    texts = ["What is 12 times 7?", "Write a Python function that reverses a list.",
             "Tell me about the weather today."]
    prompts = [tokenizer.chat_prompt(t) for t in texts] * 2
    params = [SamplingParams(temperature=t, max_tokens=32, seed=None if t == 0 else i)
              for i, t in enumerate([0.0] * 3 + [1.0] * 3)]
    engine.generate(prompts, params, tokenizer.stop_ids)

    k_max = drafter.config.block_size
    snap = monitor.snapshot()
    assert seen and snap.num_rounds == len(seen)
    assert snap.temperatures == drafter.config.sts_temperatures
    assert snap.num_samples == tuple(sum(r.proposed >= k for r in seen)
                                     for k in range(1, k_max + 1))
    assert sum(n > 0 for n in snap.num_samples) >= 3
    report = offline(seen, k_max, snap.temperatures)
    assert snap.ece == pytest.approx(report["summary"]["ece"], rel=1e-12)
    assert snap.overall_observed == pytest.approx(
        sum(min(r.accepted, r.proposed) for r in seen) / sum(snap.num_samples))
    assert json.loads(json.dumps(snap.to_dict()))["num_samples"] == list(snap.num_samples)


@pytest.mark.parametrize("build,field", [
    (lambda: CalibrationMonitor([]), "temperatures"),
    (lambda: CalibrationMonitor([1.0, 0.0]), "temperatures"),
    (lambda: CalibrationMonitor([1.0], {"window": 5}), "config"),
    (lambda: CalibrationMonitor([1.0], on_refit=3), "on_refit"),
    (lambda: MonitorConfig(window=0), "window must be an integer >= 1"),
    (lambda: MonitorConfig(threshold=1.0), r"threshold must be in \(0, 1\)"),
    (lambda: MonitorConfig(min_samples=0), "min_samples must be an integer >= 1"),
    (lambda: MonitorConfig(check_every=1.5), "check_every must be an integer >= 1"),
    (lambda: MonitorConfig(num_bins=0), "num_bins must be an integer >= 1"),
    (lambda: MonitorConfig(min_position_samples=-1), "min_position_samples"),
    (lambda: MonitorConfig(refit="yes"), "refit must be a bool"),
])
def test_bad_arguments_name_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


@pytest.mark.parametrize("record,field", [
    (RoundRecord(3, 0, 1, [0.0, 0.0, 0.0]), r"proposed must be in \[0, 2\]"),
    (RoundRecord(1, 2, 3, [0.0]), r"accepted must be in \[0, proposed=1\]"),
    (RoundRecord(2, 0, 1, [0.0]), "conf_logits must hold proposed=2"),
    (RoundRecord(1, 0, 1, [float("nan")]), "conf_logits must be finite"),
])
def test_bad_rounds_are_rejected_and_leave_the_window_unchanged(record, field):
    monitor = CalibrationMonitor([1.0, 1.0])
    with pytest.raises(ValueError, match=field):
        monitor.observe(record)
    assert monitor.snapshot().num_samples == (0, 0) and monitor.snapshot().num_rounds == 0
