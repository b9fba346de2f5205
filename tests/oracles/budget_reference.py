"""Reference versions of the verification-budget policies, plain Python over lists: the
oracle the engine's tensor policies (dspark.workers.budget, dspark.kernels.prefix_select)
are checked against, and the readable statement of the rules."""

from __future__ import annotations

from collections.abc import Sequence

from dspark.workers.budget import StepCostTable


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
    surv: Sequence[Sequence[float]], cost: StepCostTable, other_tokens: int = 0,
    other_requests: int = 0,
) -> list[int]:
    """Paper Algorithm 1. ``other_tokens``: tokens this step verifies besides the decoding
    requests' anchors and drafts (prefill chunks, or the rest of an expert-parallel group);
    ``other_requests``: requests the step serves besides the drafted ones (each gets its
    token, or its prefill progress, one step time later)."""
    num_req = len(surv)
    lengths = [0] * num_req
    batch = num_req + other_tokens
    expected = float(num_req + other_requests)
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


class GroupCost:
    """A step's cost per rank of an expert-parallel group (``sps`` as a ``StepCostTable``
    has it): the private part at the most loaded member's tokens, the shared part at the
    group's tokens per member."""

    def __init__(self, table: StepCostTable, others: Sequence[int], shared: float) -> None:
        self.table, self.others, self.shared = table, list(others), shared

    def sps(self, batch: int) -> float:
        private = 1.0 / self.table.sps(max([batch, *self.others]))
        common = 1.0 / self.table.sps((batch + sum(self.others)) / (len(self.others) + 1))
        return 1.0 / ((1.0 - self.shared) * private + self.shared * common)
