"""Autoscaling ``TargetShard`` from what the replicas know, in whole expert-parallel groups.

Each replica reports two numbers through Serve's ``record_autoscaling_stats``
(``replica_stats``):

- ``demand_tps``: the tokens it owes (the unfinished max_tokens of its live and queued
  requests) over ``horizon_s``, the time in which they should be done;
- ``capacity_tps``: what it can deliver at its best batch, from its measured step-cost
  table SPS(B) and its recent acceptance length (tokens per drafting round); while it is
  saturated (requests wait, or its batch is full), what it actually delivered over the last
  seconds, when that is less (a profile taken alone is optimistic on a shared machine).

``BoardAutoscaler`` (a Serve class-callable policy, ``AutoscalingPolicy(policy_function=
BoardAutoscaler, policy_kwargs=...)``) sums the demand of every replica and divides it by
the replicas' mean capacity at ``target_utilization``; the result is rounded up to a
multiple of ``group_size`` (``ep_size``: a group only serves whole) and clamped to Serve's
min and max. Serve applies it once it has held for ``upscale_delay_s`` (up) or
``downscale_delay_s`` (down): a brief burst or lull does not move replicas.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping

DEMAND = "demand_tps"
CAPACITY = "capacity_tps"


def replica_stats(load: Mapping, batch_sizes, steps_per_second, max_num_seqs: int,
                  horizon_s: float, delivered_tps: float | None = None) -> dict[str, float]:
    """The two numbers one replica reports (``load``: ``AsyncEngine.load()``;
    ``delivered_tps``: tokens it committed per second lately)."""
    best = 0.0
    tau = max(1.0, float(load.get("acceptance_length", 1.0)))
    for b, sps in zip(batch_sizes, steps_per_second):
        requests = min(b, max_num_seqs)
        best = max(best, requests * tau * sps)
    saturated = load.get("queued", 0) > 0 or load.get("running", 0) >= max_num_seqs
    if saturated and delivered_tps:
        best = min(best, delivered_tps)
    owed = float(load.get("pending_tokens", 0))
    return {DEMAND: owed / horizon_s, CAPACITY: best}


class Delivered:
    """Tokens a replica committed over the last ``window_s`` seconds (a step listener)."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self.steps: deque[tuple[float, int]] = deque()

    def on_step(self, stats) -> None:
        now = time.monotonic()
        self.steps.append((now, stats.num_output_tokens))
        while self.steps and now - self.steps[0][0] > self.window_s:
            self.steps.popleft()

    def rate(self) -> float | None:
        """Tokens per second over the window (None before any step)."""
        steps = list(self.steps)
        if not steps:
            return None
        return sum(n for _, n in steps) / self.window_s


def _values(metric) -> list[float]:
    """A replica's aggregated metric: a number, or a time series of (timestamp, value)."""
    if metric is None:
        return []
    if isinstance(metric, int | float):
        return [float(metric)]
    out = []
    for point in metric:
        value = getattr(point, "value", point)
        out.append(float(value[-1] if isinstance(value, tuple | list) else value))
    return out


class BoardAutoscaler:
    """Target replicas from the replicas' demand and capacity (module docstring).

    NOTE: Serve applies ``upscale_delay_s`` and ``downscale_delay_s`` to a custom policy's
    decisions itself (the decision must hold that long; its counters live in the policy
    state as ``__decision_*``), so this policy answers what the load needs now."""

    def __init__(self, group_size: int = 1, target_utilization: float = 0.7) -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if not 0.0 < target_utilization <= 1.0:
            raise ValueError(f"target_utilization must be in (0, 1], got {target_utilization}")
        self.group_size, self.target_utilization = group_size, target_utilization

    def desired(self, ctx) -> int | None:
        """Replicas the demand needs (None without reports yet)."""
        metrics = ctx.aggregated_metrics or {}
        demand = [v for m in (metrics.get(DEMAND) or {}).values() for v in _values(m)[-1:]]
        capacity = [v for m in (metrics.get(CAPACITY) or {}).values() for v in _values(m)[-1:]]
        capacity = [c for c in capacity if c > 0]
        if not demand or not capacity:
            return None
        per_replica = self.target_utilization * sum(capacity) / len(capacity)
        need = max(1, math.ceil(sum(demand) / per_replica))
        return math.ceil(need / self.group_size) * self.group_size

    def __call__(self, ctx) -> tuple[int, dict]:
        # NOTE: without reports, the standing decision (not the replicas running now: while
        # an added replica starts, answering the running count would take it back)
        desired = self.desired(ctx)
        if desired is None:
            desired = ctx.target_num_replicas
        lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        return max(lo, min(hi, desired)), dict(ctx.policy_state or {})
