"""Verification budget: how many draft tokens ℓ_r of each request the target verifies.

Vocabulary:
- *survival* ``a_{r,j} = prod_{i<=j} c_{r,i}``: calibrated probability that drafts 1..j of
  request r are all accepted (c from the confidence head after STS);
- *SPS(B)*: target steps per second when a step verifies B tokens in total (profiled);
- *expected throughput* of a choice: ``(R + sum of admitted a_{r,j}) * SPS(B)``, accepted
  tokens per second, where each of the R requests always gets its recovered/bonus token.

Policies: ``fixed`` (γ per request), ``threshold`` (cut at the first per-position
confidence below θ), ``algorithm1`` (the paper's Algorithm 1: causal greedy admission in
descending survival with early stop), ``topk`` (§5.2: a capacity K computed from
confidences of an earlier step, then the K most confident candidates, no early stop).

NOTE (losslessness): whether draft j of request r is verified may depend on c_{r,1..j}
and on other requests, never on x_{r,j} itself. Sorting candidates by survival keeps that
true because ``a_{r,j+1} <= a_{r,j}`` (ties broken by j); a search that looks at later
candidates before deciding earlier ones does not (paper Appendix A).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StepCostTable:
    """Profiled target steps per second against verified tokens per step (bucketed)."""

    batch_sizes: tuple[int, ...]
    """Increasing verify batch sizes B (tokens per step) that were measured."""
    steps_per_second: tuple[float, ...]
    """SPS at each measured B."""

    def __post_init__(self) -> None:
        if len(self.batch_sizes) != len(self.steps_per_second) or not self.batch_sizes:
            raise ValueError("batch_sizes and steps_per_second must be non-empty, equal length")
        if any(b <= a for a, b in zip(self.batch_sizes, self.batch_sizes[1:])):
            raise ValueError("batch_sizes must be strictly increasing")
        if any(s <= 0 for s in self.steps_per_second):
            raise ValueError("steps_per_second must be positive")

    def sps(self, batch: int) -> float:
        """Piecewise-linear between measured sizes, constant outside them."""
        sizes, rates = self.batch_sizes, self.steps_per_second
        if batch <= sizes[0]:
            return rates[0]
        if batch >= sizes[-1]:
            return rates[-1]
        i = bisect.bisect_right(sizes, batch)
        lo, hi = sizes[i - 1], sizes[i]
        w = (batch - lo) / (hi - lo)
        return rates[i - 1] * (1 - w) + rates[i] * w


def survival(conf: Sequence[Sequence[float]]) -> list[list[float]]:
    """Per-position acceptance probabilities -> cumulative prefix survival."""
    out = []
    for row in conf:
        acc, surv = 1.0, []
        for c in row:
            acc *= c
            surv.append(acc)
        out.append(surv)
    return out


def fixed_budget(proposed: Sequence[int], gamma: int) -> list[int]:
    return [min(gamma, n) for n in proposed]


def threshold_budget(conf: Sequence[Sequence[float]], theta: float) -> list[int]:
    """Verify up to (not including) the first position whose confidence is below θ."""
    out = []
    for row in conf:
        length = 0
        while length < len(row) and row[length] >= theta:
            length += 1
        out.append(length)
    return out


def _candidates(surv: Sequence[Sequence[float]]) -> list[tuple[float, int, int]]:
    # descending survival; ties: earlier position first, then request order
    cands = [(a, j, r) for r, row in enumerate(surv) for j, a in enumerate(row)]
    cands.sort(key=lambda c: (-c[0], c[1], c[2]))
    return cands


def algorithm1(
    surv: Sequence[Sequence[float]], cost: StepCostTable, other_tokens: int = 0
) -> list[int]:
    """Paper Algorithm 1. ``other_tokens``: tokens this step verifies besides the decoding
    requests' anchors and drafts (prefill chunks, or the rest of an expert-parallel group)."""
    num_req = len(surv)
    lengths = [0] * num_req
    batch = num_req + other_tokens
    expected = float(num_req)
    best = expected * cost.sps(batch)
    for a, j, r in _candidates(surv):
        if j != lengths[r]:  # a later position of r before an earlier one: only on ties
            continue
        throughput = (expected + a) * cost.sps(batch + 1)
        if throughput <= best:
            break  # NOTE: the early stop is what keeps the admission causal
        lengths[r], batch, expected, best = j + 1, batch + 1, expected + a, throughput
    return lengths


def topk_budget(surv: Sequence[Sequence[float]], capacity: int) -> list[int]:
    """The ``capacity`` most likely-to-survive drafts of the step, prefixes per request."""
    lengths = [0] * len(surv)
    taken = 0
    for _, j, r in _candidates(surv):
        if taken >= capacity:
            break
        if j == lengths[r]:
            lengths[r] = j + 1
            taken += 1
    return lengths


def capacity_from_stale(
    stale_surv: Sequence[Sequence[float]], cost: StepCostTable, other_tokens: int = 0
) -> int:
    """§5.2: the capacity K for this step, from survival estimates of an earlier step."""
    return sum(algorithm1(stale_surv, cost, other_tokens))


class OnlineCostTable:
    """A profiled ``StepCostTable`` kept up to date with the step times the engine sees.

    Each observation (B, seconds) moves the EWMA of the bucket nearest to B (log scale);
    the table is rebuilt with step time non-decreasing in B. Profiling at start-up alone
    misjudges the running engine (a tight profiling loop keeps caches and threads warm).
    """

    def __init__(self, table: StepCostTable, alpha: float = 0.1) -> None:
        self.sizes = list(table.batch_sizes)
        self.times = [1.0 / s for s in table.steps_per_second]
        self.alpha = alpha
        self.table = table

    def observe(self, batch: int, seconds: float) -> None:
        nearest = min(range(len(self.sizes)), key=lambda i: abs(math.log(self.sizes[i] / batch)))
        self.times[nearest] += self.alpha * (seconds - self.times[nearest])
        monotone, worst = [], 0.0
        for t in self.times:
            worst = max(worst, t)
            monotone.append(worst)
        self.table = StepCostTable(tuple(self.sizes), tuple(1.0 / t for t in monotone))
