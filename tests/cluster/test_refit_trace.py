"""A replica's opt-in calibration refit sets its budget's temperatures and, with tracing on,
is recorded as a ``dspark.calibration.refit`` span (the replica's own handler, on a real
engine and a real OpenTelemetry SDK; the replica's Serve machinery is not needed for it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dspark.cluster.shard import TargetShard
from dspark.workers.budget import StepCostTable
from dspark.workers.calibration_monitor import CalibrationMonitor, MonitorConfig
from dspark.workers.engine import Engine, EngineConfig
from dspark.workers.stats import RoundRecord


def overconfident_rounds(num: int, k_max: int, seed: int = 3):
    """Drafts accepted with probability sigmoid(z / 3): a head at temperature 1 claims
    too much."""
    rng = np.random.default_rng(seed)
    for _ in range(num):
        z = rng.normal(1.0, 2.5, k_max)
        ok = rng.random(k_max) < 1.0 / (1.0 + np.exp(-z / 3.0))
        accepted = k_max if ok.all() else int(np.argmin(ok))
        yield RoundRecord(k_max, accepted, accepted + 1, z.tolist())


@pytest.fixture
def shard_parts(make_model, make_drafter):
    target = make_model(seed=0)
    drafter = make_drafter(target, "dspark")
    engine = Engine(target, drafter, EngineConfig(block_size=4, num_blocks=64, budget="fixed"),
                    StepCostTable((1, 8), (100.0, 90.0)), StepCostTable((1, 8), (400.0, 300.0)))
    return engine, drafter


def test_a_refit_sets_the_budget_and_is_recorded_as_a_span(shard_parts):
    engine, drafter = shard_parts
    k_max = drafter.config.block_size
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    shard = object.__new__(TargetShard.func_or_class)
    shard.replica_id, shard.ep_group = "replica-a", "group-a"
    shard.tracer = provider.get_tracer("test")
    shard.monitor = CalibrationMonitor((1.0,) * k_max, MonitorConfig(
        window=2000, threshold=0.05, min_samples=4000, check_every=50,
        min_position_samples=100, refit=True))
    shard.monitor.on_refit = lambda temps: shard._refitted(engine, temps)
    for record in overconfident_rounds(1500, k_max):
        shard.monitor.observe(record)
    event = shard.monitor.refits[0]
    torch.testing.assert_close(engine.budget.sts,
                               torch.tensor(event.new_temperatures, dtype=torch.float32))
    spans = [s for s in exporter.get_finished_spans() if s.name == "dspark.calibration.refit"]
    assert len(spans) == len(shard.monitor.refits) >= 1
    attrs = spans[0].attributes
    assert attrs["dspark.replica"] == "replica-a"
    assert list(attrs["dspark.calibration.old_temperatures"]) == [1.0] * k_max
    assert list(attrs["dspark.calibration.new_temperatures"]) == list(event.new_temperatures)
    assert attrs["dspark.calibration.ece_before"] > 0.05 > attrs["dspark.calibration.ece_after"]


def test_without_tracing_a_refit_still_sets_the_budget(shard_parts):
    engine, drafter = shard_parts
    shard = object.__new__(TargetShard.func_or_class)
    shard.monitor = CalibrationMonitor((1.0,) * drafter.config.block_size)
    shard._refitted(engine, (0.5,) * drafter.config.block_size)
    assert engine.budget.sts.tolist() == [0.5] * drafter.config.block_size
