"""Verification budget: how many draft tokens ℓ_r of each request the target verifies.

Vocabulary:
- *survival* ``a_{r,j} = prod_{i<=j} c_{r,i}``: calibrated probability that drafts 1..j of
  request r are all accepted (c from the confidence head after STS);
- *SPS(B)*: target steps per second when a step verifies B tokens in total (profiled);
- *expected throughput* of a choice: ``(R + sum of admitted a_{r,j}) * SPS(B)``, accepted
  tokens per second, where each of the R requests always gets its recovered/bonus token.

Policies, one class per ``BudgetMode`` (``make_budget``): ``fixed`` (γ per request),
``threshold`` (cut at the first per-position confidence below θ), ``algorithm1`` (the
paper's Algorithm 1: causal greedy admission in descending survival with early stop),
``topk`` (§5.2: a capacity K computed from confidences of an earlier step, then the K most
confident candidates, no early stop), ``cluster`` (Algorithm 1 over the expert-parallel
group: per-rank step costs, the group's progress in the throughput). The per-request draft gate
(``dspark.workers.gate``) decides before drafting which requests draft; both read the
``CostModel``.

NOTE (losslessness): whether draft j of request r is verified may depend on c_{r,1..j}
and on other requests, never on x_{r,j} itself. Sorting candidates by survival keeps that
true because ``a_{r,j+1} <= a_{r,j}`` (ties broken by j); a search that looks at later
candidates before deciding earlier ones does not (paper Appendix A).
"""

from __future__ import annotations

import bisect
import copy
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dspark.kernels.prefix_select import select_prefixes, select_prefixes_host
from dspark.kernels.transfer import device_tensor
from dspark.workers.modes import BudgetMode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepCostTable:
    """Profiled target steps per second against verified tokens per step (bucketed)."""

    batch_sizes: tuple[int, ...]
    """Increasing verify batch sizes B (tokens per step) that were measured."""
    steps_per_second: tuple[float, ...]
    """SPS at each measured B."""
    shared: tuple[float, ...] = ()
    """Share of each measured step spent in the expert-parallel MoE layers' experts on the
    rows the group sent them, the work that follows the whole group's tokens; empty
    without expert parallelism."""

    def __post_init__(self) -> None:
        if len(self.batch_sizes) != len(self.steps_per_second) or not self.batch_sizes:
            raise ValueError("batch_sizes and steps_per_second must be non-empty, equal length")
        if self.shared and (len(self.shared) != len(self.batch_sizes)
                            or not all(0.0 <= f <= 1.0 for f in self.shared)):
            raise ValueError("shared must hold one share in [0, 1] per batch size")
        if any(b <= a for a, b in zip(self.batch_sizes, self.batch_sizes[1:])):
            raise ValueError("batch_sizes must be strictly increasing")
        if any(s <= 0 for s in self.steps_per_second):
            raise ValueError("steps_per_second must be positive")

    def sps(self, batch: int) -> float:
        """Piecewise-linear between measured sizes; constant below the smallest; beyond
        the largest, step time grows in proportion to B (a step past the profile is never
        free: Algorithm 1 and the gate would otherwise admit without limit there)."""
        sizes, rates = self.batch_sizes, self.steps_per_second
        if batch <= sizes[0]:
            return rates[0]
        if batch >= sizes[-1]:
            return rates[-1] * sizes[-1] / batch
        i = bisect.bisect_right(sizes, batch)
        lo, hi = sizes[i - 1], sizes[i]
        w = (batch - lo) / (hi - lo)
        return rates[i - 1] * (1 - w) + rates[i] * w


class OnlineCostTable:
    """A profiled ``StepCostTable`` kept up to date with the step times the engine sees.

    Profiling at start-up alone misjudges the running engine: a tight profiling loop keeps
    caches and threads warm. The profile keeps the table's shape (how a step's time grows
    with B) and the engine's steps set its level: each observation (B, seconds) moves an
    EWMA of observed over profiled time at the bucket nearest to B (log scale), and a
    bucket never observed takes the ratio of the nearest one observed. The table is kept
    with step time non-decreasing in B.

    Until 2026-12-02 the buckets held observed times themselves. The engine observes only
    the sizes it runs, so a run of slow single-token steps lifted every larger bucket it
    never observed to their time through the non-decreasing rule: the table went flat,
    and on a flat table every verified token looks free.
    """

    def __init__(self, table: StepCostTable, alpha: float = 0.1, keep_shape: bool = True
                 ) -> None:
        """``keep_shape`` False: each bucket holds the EWMA of the times observed there,
        as until 2026-12-02 (kept to compare: ``EngineConfig.online_costs``). Held as a
        ratio to each bucket's profiled time, so equal to the old table up to rounding (a
        near-tie can go the other way)."""
        self.profile, self.keep_shape = table, keep_shape
        self.sizes = list(table.batch_sizes)
        num = len(self.sizes)
        # NOTE: without the shape kept, every bucket starts at its profiled time (ratio 1)
        # and reads only its own
        self.ratios: list[float | None] = [None] * num if keep_shape else [1.0] * num
        """Observed over profiled step time per bucket (None: never observed)."""
        self.alpha = alpha
        self.table = table
        self._near: list[int] = [] if keep_shape else list(range(num))
        """The observed bucket whose ratio each bucket takes."""

    def observe(self, batch: int, seconds: float) -> None:
        nearest = min(range(len(self.sizes)), key=lambda i: abs(math.log(self.sizes[i] / batch)))
        # NOTE: without the shape kept, the ratio is to the bucket's own profiled time
        ratio = seconds * (self.profile.sps(batch) if self.keep_shape
                           else self.profile.steps_per_second[nearest])
        old = first = self.ratios[nearest]
        if first is None:
            # NOTE: a bucket's first observation moves it by alpha from the ratio it took
            # (its nearest observed bucket's; the profile's before any), as any later one
            # does. Until session 15 it set the bucket outright: one slow step at B=2 (a
            # cold one, a burst beside it) priced every draft at twice a plain step, the
            # budget then verified none, and the bucket was never observed again (the
            # freeze of one request over HTTP, docs/serving.md)
            old = self.ratios[self._near[nearest]] if self._near else 1.0
        self.ratios[nearest] = old + self.alpha * (ratio - old)
        if first is None:  # NOTE: a bucket observed for the first time: who reads which
            seen = [i for i, r in enumerate(self.ratios) if r is not None]
            self._near = [min(seen, key=lambda j: (abs(math.log(self.sizes[j] / size)), j))
                          for size in self.sizes]
        monotone, worst = [], 0.0
        for near, rate in zip(self._near, self.profile.steps_per_second):
            worst = max(worst, self.ratios[near] / rate)
            monotone.append(worst)
        self.table = StepCostTable(tuple(self.sizes), tuple(1.0 / t for t in monotone))


@dataclass(frozen=True)
class GroupLoad:
    """What the rest of this replica's expert-parallel group did in its last step."""

    tokens: tuple[int, ...] = ()
    """Verify tokens of each other member."""
    committed: float = 0.0
    """Tokens the other members committed for their requests: their users' progress, which
    a longer group step delays."""


class CostModel:
    """What a step costs: SPS(B) of the verify forward and the drafter's calls per second
    against the requests drafted for, both profiled at start-up and refined online.

    In an expert-parallel group (``group`` set, the cluster budget) a step is priced per
    rank: the members run in lock-step, so the private part of a step (attention, dense
    layers, LM head, the exchanges' waits) lasts as long as the most loaded member's, and
    the shared part (the experts on the rows the group sent them, ``shared`` of the
    profiled step) follows the group's tokens per member. With ``t(B) = 1 / SPS(B)`` profiled with B tokens on every member:
    ``t_step(b) = (1 - f) t(max(b, max others)) + f t((b + sum others) / members)``.
    """

    overhead_alpha = 0.1

    def __init__(self, verify: StepCostTable, draft: StepCostTable | None, device,
                 keep_shape: bool = True, write_row: float = 0.0) -> None:
        """``keep_shape``: ``OnlineCostTable``'s (``EngineConfig.online_costs``);
        ``write_row``: the profiled ``write_row``."""
        self.verify = OnlineCostTable(verify, keep_shape=keep_shape)
        self.draft = OnlineCostTable(draft, keep_shape=keep_shape) if draft is not None else None
        self.device = device
        shares = sorted(verify.shared)
        self.shared = shares[len(shares) // 2] if shares else 0.0
        """The profiled share of a step that is the group's (median over batch sizes)."""
        self.group: GroupLoad | None = None
        """The rest of the group in its last step, set by the engine before each step
        (cluster budget only); None prices the replica alone."""
        self.overhead = 0.0
        """The rest of a step (schedule, budget, sampling, drafter-cache extension, commit)
        per second of verify forward: EWMA of the observed ratio. The profiles time the
        forwards alone; a step that verifies more rows also samples and commits more."""
        self.write_row = write_row
        """Seconds per deferred drafter row a proposal writes first (profiled, then EWMA
        of the writes observed; 0 for a drafter that defers nothing). A request's first
        proposal writes its whole prompt's rows, and one drafted after a long pause every
        row since, which the drafting table, profiled with no rows owed, does not price
        (docs/engine.md, session 13)."""

    def observe(self, verify_tokens: int, verify_seconds: float, drafted: int,
                draft_seconds: float, other_seconds: float = 0.0) -> None:
        """One step: its verify forward, its proposal, and ``other_seconds`` of the rest.
        In a group the table holds equal-load steps: a forward beside other loads refines
        it at the most loaded member's tokens, scaled by what the per-rank model says an
        equal-load step there costs against this one (a forward beside a lighter member is
        cheaper, and is not learnt as the heavier step's price)."""
        group = self._group()
        if group is not None:
            most = max(verify_tokens, group[0])
            equal = 1.0 / self.verify.table.sps(most)
            verify_seconds *= equal / self.verify_seconds(verify_tokens)
            verify_tokens = most
        self.verify.observe(verify_tokens, verify_seconds)
        self.observe_draft(drafted, draft_seconds)
        if verify_seconds > 0:
            ratio = other_seconds / verify_seconds
            self.overhead += self.overhead_alpha * (ratio - self.overhead)

    def sibling(self, draft: StepCostTable, write_row: float) -> CostModel:
        """The cost model of a second drafter of the same engine (its light drafter): its
        own drafting table and row price; the verify table, the overhead and the group are
        this model's, which the engine keeps in step (``follow``)."""
        other = copy.copy(self)  # NOTE: shallow: ``verify`` is the one shared table
        other.draft = OnlineCostTable(draft, keep_shape=self.verify.keep_shape)
        other.write_row = write_row
        return other

    def follow(self, primary: CostModel) -> None:
        """Take ``primary``'s overhead and group (a ``sibling`` after each step)."""
        self.overhead, self.group = primary.overhead, primary.group

    write_alpha = 0.2

    def observe_draft(self, drafted: int, seconds: float) -> None:
        """A proposal for ``drafted`` requests took ``seconds`` (its rows' writes apart)."""
        if drafted and self.draft is not None:
            self.draft.observe(drafted, seconds)

    def observe_write(self, rows: int, seconds: float) -> None:
        """A proposal's writes of deferred rows (batches of at least 64 rows: in smaller
        ones the call's fixed cost weighs too much per row)."""
        if rows >= 64:
            per_row = seconds / rows
            self.write_row += self.write_alpha * (per_row - self.write_row)

    def step_seconds(self, verify_tokens: int, drafted: int = 0) -> float:
        """A whole step that verifies ``verify_tokens`` and drafts for ``drafted``
        requests, as the model believes it costs."""
        return self.step_pricer()(verify_tokens, drafted)

    def step_pricer(self) -> Callable[[int, int], float]:
        """``step_seconds`` as one function for many prices in a row (the tables, the
        overhead and the group as they are now; a replica priced alone reads its verify
        table directly)."""
        scale = 1.0 + self.overhead
        verify = self.verify_seconds
        if self._group() is None:
            sps = self.verify.table.sps
            verify = lambda tokens: 1.0 / sps(tokens)  # noqa: E731
        draft = self.draft.table.sps if self.draft is not None else None

        def price(verify_tokens: int, drafted: int = 0) -> float:
            seconds = scale * verify(verify_tokens)
            return seconds + 1.0 / draft(drafted) if drafted and draft is not None else seconds
        return price

    def verify_seconds(self, verify_tokens: int) -> float:
        """The verify forward of a step with ``verify_tokens`` on this replica (per rank
        in a group: class docstring)."""
        table, group = self.verify.table, self._group()
        if group is None:
            return 1.0 / table.sps(verify_tokens)
        most, total, members, shared = group
        return ((1.0 - shared) / table.sps(max(verify_tokens, most))
                + shared / table.sps((verify_tokens + total) / members))

    @property
    def group_committed(self) -> float:
        """Tokens the rest of the group commits per step (0 alone): a longer step delays
        them as it delays this replica's requests."""
        return self.group.committed if self.group is not None else 0.0

    def _group(self) -> tuple[int, int, int, float] | None:
        """(most loaded other member's tokens, all other members' tokens, members, shared
        share), or None when the replica is priced alone."""
        if self.group is None or not self.group.tokens:
            return None
        tokens = self.group.tokens
        return max(tokens), sum(tokens), len(tokens) + 1, self.shared

    def select(self, surv: torch.Tensor, other_tokens: int, capacity: int = -1,
               other_requests: int = 0) -> torch.Tensor:
        """Algorithm 1 (or top-K under ``capacity``) over ``surv`` [R, n]: ℓ_r [R]; in a
        group, per-rank step costs and the group's committed tokens count too."""
        served = other_requests + self.group_committed
        if surv.device.type == "cpu":
            table = self.verify.table
            sps = table.sps if self._group() is None else (
                lambda tokens: 1.0 / self.verify_seconds(tokens))
            lengths = select_prefixes_host(surv, sps, other_tokens, capacity, served)
            return torch.tensor(lengths)
        return select_prefixes(surv, self.sizes, self.rates, other_tokens, capacity, served,
                               self._group())

    @property
    def sizes(self) -> torch.Tensor:
        """The verify table's batch sizes, on the device (the tensor twin's input)."""
        return device_tensor(self.verify.table.batch_sizes, self.device)

    @property
    def rates(self) -> torch.Tensor:
        """The verify table's steps per second, on the device."""
        return device_tensor(self.verify.table.steps_per_second, self.device)


@dataclass(frozen=True)
class VerificationPlan:
    """How many drafts of each drafted request the target verifies this step."""

    lengths: list[int]
    """ℓ_r, one per drafted request (proposal row order)."""
    survival: torch.Tensor | None
    """[R, n] calibrated prefix survival (-1 where nothing was proposed); None without a
    confidence head."""


def confidence(conf_logits: torch.Tensor, sts: torch.Tensor) -> torch.Tensor:
    """Raw confidence logits [R, n] -> calibrated per-position acceptance [R, n] (STS)."""
    return torch.sigmoid(conf_logits / sts[: conf_logits.shape[1]])


def survival(conf: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Per-position acceptance [R, n] -> prefix survival [R, n], -1 beyond each request's
    cap (those drafts are not candidates)."""
    proposed = torch.arange(conf.shape[1], device=caps.device)[None] < caps[:, None]
    return torch.where(proposed, conf.cumprod(1), torch.full_like(conf, -1.0))


class BudgetPolicy:
    """Base: every policy computes survival the same way and differs in ``lengths``."""

    def __init__(self, cost: CostModel, sts: torch.Tensor) -> None:
        self.cost, self.sts = cost, sts

    def plan(self, conf_logits: torch.Tensor | None, caps: list[int],
             other_tokens: int, other_requests: int = 0) -> VerificationPlan:
        """``caps``: drafts proposed per request; ``other_tokens``: tokens this step
        verifies besides the drafted requests' anchors and drafts; ``other_requests``:
        requests it serves besides them (undrafted decoding, prefilling), each of which a
        longer step delays."""
        caps_t = device_tensor(caps, self.sts.device, torch.long)
        conf = surv = None
        if conf_logits is not None:
            conf = confidence(conf_logits, self.sts)
            surv = survival(conf, caps_t)
        lengths = self.lengths(caps_t, conf, surv, other_tokens, other_requests)
        return VerificationPlan(lengths.tolist(), surv)

    def lengths(self, caps, conf, surv, other_tokens, other_requests) -> torch.Tensor:
        """ℓ_r [R] (conf: per-position acceptance [R, n], surv: prefix survival)."""
        raise NotImplementedError

    def group(self) -> GroupLoad | None:
        """What the rest of this replica's expert-parallel group did last step, as far as
        this policy counts it (only the cluster budget does)."""
        return None


class FixedBudget(BudgetPolicy):
    def lengths(self, caps, conf, surv, other_tokens, other_requests):
        return caps


class ThresholdBudget(BudgetPolicy):
    def __init__(self, cost: CostModel, sts: torch.Tensor, theta: float) -> None:
        super().__init__(cost, sts)
        self.theta = theta

    def lengths(self, caps, conf, surv, other_tokens, other_requests):
        ok = (conf >= self.theta) & (surv >= 0)
        return ok.long().cumprod(1).sum(1)


class Algorithm1Budget(BudgetPolicy):
    def lengths(self, caps, conf, surv, other_tokens, other_requests):
        return self.cost.select(surv, other_tokens, other_requests=other_requests)


class ClusterBudget(Algorithm1Budget):
    """Algorithm 1 over the whole expert-parallel group: per-rank step costs from what the
    rest of the group did last step (``group_load``, from the load board), and the group's
    committed tokens in the throughput it maximises (``CostModel``)."""

    def __init__(self, cost: CostModel, sts: torch.Tensor,
                 group_load: Callable[[], GroupLoad] | None) -> None:
        super().__init__(cost, sts)
        self.group_load = group_load

    def group(self) -> GroupLoad | None:
        if self.group_load is None:
            return None
        try:
            load = self.group_load()
            return GroupLoad(tuple(max(0, int(t)) for t in load.tokens),
                             max(0.0, float(load.committed)))
        except Exception:  # NOTE: stale load is safe: fall back to local information
            logger.debug("group load unavailable", exc_info=True)
            return None


class TopKBudget(BudgetPolicy):
    """§5.2: capacity K from the survival estimates of two steps earlier (only numbers
    known before this step's drafts were sampled); one draft per request before that."""

    def __init__(self, cost: CostModel, sts: torch.Tensor) -> None:
        super().__init__(cost, sts)
        self.history: deque[torch.Tensor] = deque(maxlen=2)

    def lengths(self, caps, conf, surv, other_tokens, other_requests):
        capacity = len(caps)
        if len(self.history) == 2:
            capacity = int(self.cost.select(self.history[0], other_tokens,
                                            other_requests=other_requests).sum())
        self.history.append(surv)
        return self.cost.select(surv, other_tokens, capacity)


def make_budget(mode: BudgetMode, cost: CostModel, sts: torch.Tensor, threshold: float,
                group_load: Callable[[], GroupLoad] | None = None) -> BudgetPolicy:
    """The policy of ``mode`` (the one place modes map to classes)."""
    if mode is BudgetMode.FIXED:
        return FixedBudget(cost, sts)
    if mode is BudgetMode.THRESHOLD:
        return ThresholdBudget(cost, sts, threshold)
    if mode is BudgetMode.ALGORITHM1:
        return Algorithm1Budget(cost, sts)
    if mode is BudgetMode.TOPK:
        return TopKBudget(cost, sts)
    return ClusterBudget(cost, sts, group_load)
