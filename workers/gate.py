"""Per-request draft gating: which decoding requests draft this step.

Drafting costs drafter time for every request drafted for, and verification costs target
time for every draft kept; a request whose drafts are rarely accepted makes the step slower
than it makes that request faster. The gate decides per request, before anything of this
step is drafted, from two things only:

- each request's own recent record (``DraftRecord``: EWMAs of its accepted drafts per
  drafted step and of its verified ℓ_r, and how long ago it last drafted), and
- the cost model (``CostModel``: SPS(B) of the verify forward, drafting calls per second
  against the number of requests drafted for, both profiled, then refined online, and the
  rest of a step as an observed share of its verify forward).

It drafts for the set that maximises expected committed tokens per second of the step::

    (N + sum_{r in S} gain_r) / (t_draft(|S|) + (1 + o) t_verify(B_0 + sum_{r in S} ell_r))

over the prefixes S of the candidates sorted by gain (N requests served by the step:
decoding and prefilling, since a longer step delays a first token as much as a next one;
B_0 the tokens verified without drafts; o the overhead share), with a 5% margin in favour
of not drafting. The gate checks its own cost predictions: step times are scaled by the
step time it saw over the one it predicted, separately for steps with and without drafting
(``step_realism``). A request not drafted for ``probe_every`` decoding steps is stale; stale
requests are probed (two at a time up to the arms' loads, all worth probing above), riding
along in steps whose drafter runs anyway, or, when nobody drafts, in a probe step after an
idle gap that backs off while probes find nothing worth drafting (``CostGate._by_records``).

Before all that, in a step without a prefill chunk, the gate reads what it measured at this
load (``LoadArms``, ``EngineConfig.draft_arms``): at up to 7 decoding requests, while steps
in which everyone drafted have committed more tokens per second than steps in which nobody
did, everyone drafts; above, while steps in which the per-request choice drafted have
committed fewer than steps in which nobody did, nobody drafts (tried again after a gap).
A priced choice of nobody stands for a few steps unpriced (``CostGate.hold``).

NOTE (losslessness): the choice reads only earlier steps' records and the cost model, never
this step's drafts; a request that does not draft takes a plain decoding step (its anchor
verified, one token sampled from the target). Either way the committed tokens follow the
target's distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dspark.workers.budget import CostModel
from dspark.workers.engine_config import EngineConfig
from dspark.workers.load_arms import LoadArms, ewma

MARGIN = 1.05
"""Drafting must promise this much more throughput than not drafting (not a break-even)."""


@dataclass
class DraftRecord:
    """One request's recent drafting record (past steps only)."""

    gain: float | None = None
    """EWMA of the drafts accepted per drafted step (None: never drafted). Counted, not
    the confidence head's estimate: the head is calibrated on T=1 rounds and greedy
    requests accept more than it says."""
    ell: float | None = None
    """EWMA of the drafts verified per drafted step (ℓ_r)."""
    idle: int = 0
    """Decoding steps since it last drafted."""
    count: int = 0
    """Drafted steps observed."""


@dataclass(frozen=True)
class GateCandidate:
    """A decoding request that could draft this step."""

    record: DraftRecord
    cap: int
    """Drafts it may propose (its lookahead, its remaining max_tokens)."""
    owed: int = 0
    """Deferred drafter rows its proposal would write first (``DraftWorker.owed``)."""
    remaining: int = 0
    """Tokens it may still generate (its max_tokens less its output; 0: one step)."""


class DraftGate:
    """Drafts for every candidate; keeps every request's record and the engine-wide
    acceptance (EWMAs of accepted drafts and of ℓ_r per drafted request) that load reports
    read."""

    alpha = 0.1
    """Per drafted step of a request, its own record's EWMA weight (a memory of about 19
    drafted steps: a request's accepted drafts per step scatter from 0 to γ, and a record
    that one unlucky step sinks below the cost stops drafting until a probe; 0.3 until
    session 13)."""
    engine_alpha = 0.03
    """Per drafted request-step, the engine-wide EWMAs' weight (a memory of about 65
    drafted request-steps, whatever the concurrency)."""

    def __init__(self, gamma: int) -> None:
        self.gain: float | None = None
        self.ell = float(gamma)
        self.probes: set[int] = set()
        """Indices of the last ``choose``'s candidates picked as probes, not for cost."""

    def choose(self, candidates: Sequence[GateCandidate], num_decoding: int,
               other_tokens: int, other_requests: int = 0) -> list[bool]:
        """Which candidates draft this step (one flag per candidate, in order).
        ``num_decoding``: decoding requests this step (drafting or not); ``other_tokens``:
        tokens verified besides the decoding requests' (prefill chunks, the rest of an
        expert-parallel group); ``other_requests``: prefilling requests in the step."""
        return [True] * len(candidates)

    def declines(self, num_decoding: int, other_tokens: int, other_requests: int = 0) -> bool:
        """Whether nobody drafts this step, decided without pricing any candidate (then
        ``choose`` is not called; arguments as ``choose``'s)."""
        return False

    def observe(self, records: Sequence[DraftRecord], lengths: Sequence[int],
                accepted: Sequence[int], idle: Sequence[DraftRecord] = (),
                seconds: float | None = None, others: int = 0, written: float = 0.0
                ) -> None:
        """After a step: ``records`` drafted, with the ℓ_r verified and the drafts
        accepted of each; ``idle`` decoded without drafting with this gate's drafter;
        ``seconds`` the whole step; ``others``: drafts accepted in it that another
        drafter of the engine proposed (its light drafter's); ``written``: seconds of it
        spent writing deferred drafter rows (``DraftWorker.flush``)."""
        for rec in idle:
            rec.idle += 1
        for rec, ell, gain in zip(records, lengths, accepted):
            rec.gain = float(gain) if rec.gain is None else ewma(rec.gain, gain, self.alpha)
            rec.ell = float(ell) if rec.ell is None else ewma(rec.ell, ell, self.alpha)
            rec.idle, rec.count = 0, rec.count + 1
        if records:
            # NOTE: weighted by the drafted requests, not the steps: one step at C=1 is one
            # noisy count (0 to γ accepted), one step at C=64 the mean of 64
            step_gain = sum(accepted) / len(records)
            alpha = 1.0 - (1.0 - self.engine_alpha) ** len(records)
            self.gain = step_gain if self.gain is None else ewma(self.gain, step_gain, alpha)
            self.ell = ewma(self.ell, sum(lengths) / len(records), alpha)

    @property
    def mean_survival(self) -> float:
        """Share of verified drafts accepted, recently (0 before any drafting)."""
        return self.gain / self.ell if self.gain is not None and self.ell else 0.0


class CostGate(DraftGate):
    """Drafts for the requests whose expected accepted drafts pay for their drafting and
    verification at this step's load (module docstring), and probes stale records at a
    bounded cost (``choose``)."""

    probes_per_step = 2
    """Stale requests probed in a step, stalest first (above the arms' loads all worth
    probing but in a refresh: two cost 1.7-1.8 plain steps at C = 32, 64; docs/engine.md)."""
    max_backoff = 8
    """The drafter's longest idle gap between probe steps, in units of ``probe_every``."""
    max_refresh_backoff = 8
    """Refresh probes (past the longest gap) that find nobody worth drafting double their
    gap, up to this many times ``max_backoff * probe_every`` steps (each costs a call)."""
    step_realism_alpha = 0.1
    hold = 3
    """Decode-only steps that a priced choice of nobody (no draft, no probe) stands for
    afterwards, unpriced, at the same number of decoding requests, above the loads where
    everyone drafts in the arms (``declines``): pricing costs a pass over every request
    per step, which at high load is the whole cost of a step in which nobody drafts. Each
    such choice right after the last one's hold, at the same number of requests, holds
    twice as long, up to ``max_hold``; a choice that drafts resets it. A request that
    joins meanwhile is priced that many steps late at most, and so is a probe."""
    max_hold = 24

    def __init__(self, gamma: int, cost: CostModel, probe_every: int,
                 margin: float = MARGIN, prior: float = 0.0, arms: bool = False,
                 with_prefill: bool = True, max_load: int = LoadArms.max_load,
                 per_plain: bool = False) -> None:
        """``prior``: ``EngineConfig.draft_prior`` (0 here: each record as it stands);
        ``arms``: ``EngineConfig.draft_arms``; ``with_prefill``:
        ``EngineConfig.draft_with_prefill``; ``max_load``: the highest load
        (``LoadArms.load``) at which the arms' ``all`` is everyone drafting (above, it is
        the per-request choice); ``per_plain``: the light drafter's arms (``observe``,
        ``LoadArms``'s ``recheck``; everyone or nobody, ``declines``)."""
        super().__init__(gamma)
        self.with_prefill, self.max_load, self.per_plain = with_prefill, max_load, per_plain
        self.verdict = False
        """A ``per_plain`` gate: this step's arms said everyone (``declines``)."""
        recheck = LoadArms.recheck_every * probe_every if per_plain else 0
        self.arms = LoadArms(probe_every, recheck=recheck) if (
            arms and margin != float("inf")) else None
        self.arm: tuple[int, str] | None = None
        """This step's load and arm, when it is one of ``arms``'s (everyone or nobody
        drafted in a step without a prefill chunk)."""
        self.by_arm = False
        """The last ``choose`` drafted for everyone because the arms said so."""
        self.cost, self.probe_every, self.margin, self.prior = cost, probe_every, margin, prior
        self.quiet = 0
        """Steps since the drafter last ran."""
        self.gap = probe_every
        """Steps the drafter may stay idle before a step that runs it for probes only."""
        self.refresh_gap = self.max_backoff * probe_every
        """Steps the drafter may stay idle before a refresh probe."""
        self.step_realism = {(d, m): 1.0 for d in (False, True) for m in (False, True)}
        """Observed over predicted whole-step time, per (drafted, mixed) kind of step (EWMA
        each; mixed: a request prefills in it): the cost tables come from decode-like
        profiles and miss what a step also carries (a long prefill chunk's attention over
        every request's padded queries, the rows the budget admits). Apart since session
        13: a step with a prefill chunk costs far more than the profile says, drafted or
        not."""
        self.prediction: tuple[tuple[bool, bool], float] | None = None
        self.gain_realism = 1.0
        """Accepted over promised drafts of the requests drafted for cost (not probes): the
        gate drafts for the best records, and the best are in part the luckiest, so they
        promise more than they then accept (``python -m dspark.bench.gate_audit``,
        docs/engine.md). Every gain the gate prices is scaled by it. The ratio of two
        EWMAs per request-step (``_realism_sums``), not an EWMA of each step's ratio (until
        session 14): at C=1 a step's ratio is one count (0 to γ) over one promise, and
        clipping it to [0.25, 2] skewed the mean of such ratios."""
        self._realism_sums: tuple[float, float] | None = None
        """EWMAs of accepted and of promised drafts per request drafted for cost."""
        self.promised: dict[int, float] = {}
        """This step's promised gain per record drafted for cost (by ``id``)."""
        self.held: tuple[int, int] | None = None
        """(decoding requests, steps left) of the last priced choice of nobody
        (``hold``)."""
        self.last_hold = (0, self.hold)
        """(decoding requests, steps) of the last hold given."""

    def declines(self, num_decoding, other_tokens, other_requests=0):
        """Nobody drafts, unpriced: in a step with a prefill chunk (unless
        ``with_prefill``); in the ``hold`` decode-only steps after a priced choice of
        nobody at this number of decoding requests; and at a load above the arms' where
        the steps in which the gate drafted have measured fewer tokens per second than
        those in which nobody did (``LoadArms``: the gate's own choice is the ``all`` arm
        there, tried again after a gap). The engine asks this first, and calls ``choose``
        only where it says no."""
        if other_tokens and not self.with_prefill:
            self._decline((False, True), num_decoding + other_tokens, None)
            return True
        load = self._arm_load(num_decoding, other_tokens, other_requests)
        held, self.held = self.held, None
        if (held is not None and held[0] == num_decoding and held[1] > 0
                and not other_tokens and not other_requests):
            self.held = (num_decoding, held[1] - 1)
            self._decline((False, False), num_decoding, load)
            return True
        if load is not None and self.gain is not None and (load > self.max_load
                                                           or self.per_plain):
            # NOTE: a ``per_plain`` gate asks its arms at every load: no request is priced
            self.verdict = self.arms.everyone(load)
            if not self.verdict:
                self._decline((False, False), num_decoding, load)
                return True
        return False

    def _arm_load(self, num_decoding, other_tokens, other_requests) -> int | None:
        """The load whose arms this step counts toward (None: no arms, or a prefill in
        the step)."""
        if self.arms is None or other_tokens or other_requests:
            return None
        return LoadArms.load(num_decoding)

    def _decline(self, kind: tuple[bool, bool], base: int, load: int | None) -> None:
        self.probes, self.promised, self.by_arm = set(), {}, False
        self.arm = (load, "none") if load is not None else None
        self.prediction = (kind, self.cost.step_seconds(base))

    def choose(self, candidates, num_decoding, other_tokens, other_requests=0):
        """Everyone, where the load's measured arms say so (``LoadArms``, up to its
        ``max_load``); else by cost (``_by_records``). Call it where ``declines`` did
        not."""
        load = self._arm_load(num_decoding, other_tokens, other_requests)
        low = load is not None and load <= self.max_load
        if low and candidates and self.gain is not None and (
                self.verdict if self.per_plain else self.arms.everyone(
                    load, candidates[0].record if num_decoding == 1 else None)):
            self.probes, self.promised, self.arm, self.by_arm = set(), {}, (load, "all"), True
            self._predict((True, False), candidates, range(len(candidates)),
                          [self._ell(c) for c in candidates], num_decoding)
            return [True] * len(candidates)
        picks = self._by_records(candidates, num_decoding, other_tokens, other_requests)
        self.arm, self.by_arm = None, False
        if load is not None and not any(picks):
            self.arm = (load, "none")
        elif load is not None and (not low or all(picks) and not self.probes):
            self.arm = (load, "all")
        if not low and not any(picks) and not (other_tokens or other_requests):
            count, steps = self.last_hold
            steps = min(2 * steps, self.max_hold) if count == num_decoding else self.hold
            self.held = self.last_hold = (num_decoding, steps)
        elif any(picks):
            self.last_hold = (0, self.hold)
        return picks

    def _by_records(self, candidates, num_decoding, other_tokens, other_requests=0):
        """Drafters chosen by cost, plus probes: a request undrafted for ``probe_every``
        steps is stale. Stale requests ride along (``probes_per_step``) in a step whose
        drafter runs anyway, which costs their rows only; when nobody is chosen, the
        drafter runs for probes alone once it has been idle ``gap`` steps, and ``gap``
        doubles (up to ``max_backoff * probe_every``) until a probe finds a request worth
        drafting; a stale request that never drafted is probed after ``probe_every`` idle
        steps of the drafter whatever the gap. Only stale requests that would be drafted
        with a fresh record of every draft accepted are probed (``_worth_probing``; the
        prior prices a fresh record at the engine's gain), except once the drafter has
        been idle for the longest gap (``refresh_gap``): then the costs that say drafting
        never pays are stale too, and a probe refreshes them. Nearly every step is plain
        where nobody is worth drafting."""
        if not candidates:
            return []
        # NOTE: a request with no record yet takes the engine-wide one; before any drafting
        # at all, everyone drafts (that first step is the probe)
        if self.gain is None:
            self.probes = set(range(len(candidates)))
            return [True] * len(candidates)
        gains = [self._gain(c.record) for c in candidates]
        ells = [self._ell(c) for c in candidates]
        owed = [self._owed(c, g) for c, g in zip(candidates, gains)]
        step = (num_decoding, other_tokens, other_requests)
        chosen = set(self._by_cost(gains, ells, owed, *step))
        # NOTE: stale requests that never drafted first: a request without a record of its
        # own has only the engine-wide one, which stops moving while nobody drafts
        stale = sorted((i for i, c in enumerate(candidates)
                        if i not in chosen and c.record.idle + 1 >= self.probe_every),
                       key=lambda i: (candidates[i].record.gain is not None,
                                      -candidates[i].record.idle))
        # NOTE: past the longest gap the drafter's costs are stale too (only drafting steps
        # refine them; a spike of load may have left them too high to ever pay): probe
        refresh = self.quiet + 1 >= self.refresh_gap
        # NOTE: only when a probe is due (the drafter runs anyway, has been idle for the
        # gap, or a request never drafted): pricing the stale requests at their best costs
        # a pass over everyone
        never_drafted = bool(stale) and candidates[stale[0]].record.gain is None
        due = bool(chosen) or self.quiet + 1 >= self.gap or (
            never_drafted and self.quiet + 1 >= self.probe_every)
        if stale and not refresh and due:
            stale = self._worth_probing(stale, gains, ells, owed, *step)
        elif not (stale and refresh):
            stale = []
        unseen = bool(stale) and candidates[stale[0]].record.gain is None
        most = (len(stale) if LoadArms.load(num_decoding) > self.max_load and not refresh
                else self.probes_per_step)  # NOTE: a refresh (nobody pays) probes two
        self.probes = self._probes(bool(chosen), stale, refresh, unseen, most)
        self.promised = {id(candidates[i].record): gains[i] for i in chosen - self.probes}
        chosen |= self.probes
        self._predict((bool(chosen), other_requests > 0), candidates, chosen, ells,
                      num_decoding + other_tokens)
        return [i in chosen for i in range(len(candidates))]

    def _probes(self, chosen: bool, stale: list[int], refresh: bool, unseen: bool,
                most: int) -> set[int]:
        """The stale candidates (stalest first) probed this step, and the gaps after it:
        riding along where someone is ``chosen``; a refresh; a probe step after ``gap``
        (``unseen``: the stalest never drafted)."""
        longest = self.max_backoff * self.probe_every
        if chosen:
            self.gap, self.refresh_gap = self.probe_every, longest
        elif stale and refresh:
            self.refresh_gap = min(2 * self.refresh_gap, self.max_refresh_backoff * longest)
        elif stale and (self.quiet + 1 >= self.gap
                        or unseen and self.quiet + 1 >= self.probe_every):
            self.gap = min(2 * self.gap, longest)
        else:
            return set()
        return set(stale[:most])

    def _predict(self, kind: tuple[bool, bool], candidates, chosen, ells: list[float],
                 base: int) -> None:
        """The step time this choice should take (``prediction``, for ``step_realism``):
        ``base`` tokens verified without drafts, the chosen ones' expected ℓ and owed rows."""
        extra = sum(ells[i] for i in chosen)
        self.prediction = (kind, self.cost.step_seconds(base + round(extra), len(chosen))
                           + self.cost.write_row * sum(candidates[i].owed for i in chosen))

    def _worth_probing(self, stale: list[int], gains: list[float], ells: list[float],
                       owed: list[float], num_decoding, other_tokens, other_requests
                       ) -> list[int]:
        """The stale candidates a probe could change the decision for: those that would be
        drafted with a fresh record of every draft they verify accepted (priced as any
        record: with ``prior``, a record of no drafted steps is the engine's gain). Where
        even that does not pay (a step bound by computing every verified token, at high
        load), a probe would learn nothing that matters and costs a drafter call."""
        if not stale:
            return stale
        best = list(gains)
        for i in stale:
            best[i] = self._gain(DraftRecord(ells[i], ells[i]))
        paying = set(self._by_cost(best, ells, owed, num_decoding, other_tokens,
                                   other_requests))
        return [i for i in stale if i in paying]

    def _by_cost(self, gains: list[float], ells: list[float], owed: list[float], num_decoding,
                 other_tokens, other_requests) -> list[int]:
        """The prefix of the candidates (their expected accepted and verified drafts, the
        deferred rows they owe) sorted by net gain that maximises expected committed
        tokens per second of the whole step (drafting, writing the rows owed,
        verification and the rest); gains as realized (``_realized``). Net gain: that
        less the tokens a plain step commits while its owed rows are written."""
        base = num_decoding + other_tokens
        served = num_decoding + other_requests
        price, write = self.cost.step_pricer(), self.cost.write_row
        mixed = other_requests > 0
        plain, drafting = self.step_realism[False, mixed], self.step_realism[True, mixed]
        plain_rate = served / (plain * price(base, 0))
        real = [self._realized(g) for g in gains]
        net = [r - plain_rate * write * o for r, o in zip(real, owed)]
        # NOTE: a stable sort, ties in candidate order
        order = sorted(range(len(gains)), key=net.__getitem__, reverse=True)
        # NOTE: drafting must beat not drafting by the margin (inf: never)
        best_k, best = 0, plain_rate * self.margin
        tokens, extra, rows = float(served), 0.0, 0.0
        for k, i in enumerate(order, start=1):
            tokens += real[i]
            extra += ells[i]
            rows += owed[i]
            rate = tokens / (drafting * (price(base + round(extra), k) + write * rows))
            if rate > best:
                best_k, best = k, rate
        return order[:best_k]

    def _owed(self, candidate: GateCandidate, gain: float) -> float:
        """The rows owed this step is charged: all of them, spread over the drafted steps
        the request could still take (one write lets it draft from then on: a request's
        first proposal owes its whole prompt, which charged to one step alone would never
        pay, and the rows would keep growing)."""
        steps = candidate.remaining / (1.0 + self._realized(gain))
        return candidate.owed / max(1.0, steps)

    def _realized(self, gain: float) -> float:
        """The accepted drafts a promised ``gain`` comes to (``gain_realism``)."""
        return gain * self.gain_realism

    def _gain(self, record: DraftRecord) -> float:
        """Its expected accepted drafts: its record shrunk toward the engine's by ``prior``
        pseudo-steps (the requests chosen for the best records are, in part, the luckiest,
        and regress toward the mean)."""
        if record.gain is None:
            return self.gain
        if not self.prior:
            return record.gain
        weight = min(record.count, self.memory)
        return (weight * record.gain + self.prior * self.gain) / (weight + self.prior)

    @property
    def memory(self) -> float:
        """Steps an EWMA of ``alpha`` holds, as a sample size: (2 - alpha) / alpha."""
        return (2 - self.alpha) / self.alpha

    def _ell(self, candidate: GateCandidate) -> float:
        """Drafts it is expected to verify: its record's ℓ (the engine's without one),
        at most its cap."""
        ell = candidate.record.ell
        return min(candidate.cap, ell if ell is not None else self.ell)

    def observe(self, records, lengths, accepted, idle=(), seconds=None, others=0,
                written=0.0):
        if self.arm is not None and seconds:
            # NOTE: the arms judge a try's first step without its deferred rows' writes
            # (``spent``; ``step_realism`` below sees the whole step): it writes every row
            # since its requests last drafted, once, which later steps of drafting do not
            # pay again; judged with them, a try that pays could lose and back off long
            first_try = self.arm[1] == "all" and (self.arm[0], "all") not in self.arms.sums
            spent = max(seconds - written, 1e-9) if first_try else seconds
            tokens, requests = len(records) + sum(accepted) + len(idle) + others, 1
            if self.per_plain and (records or idle):
                # NOTE: a load above 7 spans a power of two of requests, and a step's tokens
                # per second grow with them: arms measured at 16 and at 31 requests compare
                # batch sizes. Per request over the cost model's plain step of as many, a
                # step of nobody drafting measures about 1
                requests = len(records) + len(idle)
                spent /= self.cost.step_seconds(requests)
            self.arms.observe(*self.arm, tokens / requests, spent, sum(lengths))
        self.arm = None
        self.quiet = 0 if records else self.quiet + 1
        if self.prediction is not None and seconds is not None:
            kind, predicted = self.prediction
            ratio = min(4.0, max(0.25, seconds / predicted))
            self.step_realism[kind] += self.step_realism_alpha * (
                ratio - self.step_realism[kind])
        self.prediction = None
        pairs = [(self.promised[id(r)], a) for r, a in zip(records, accepted)
                 if id(r) in self.promised]
        if pairs:
            got = sum(a for _, a in pairs) / len(pairs)
            promise = sum(p for p, _ in pairs) / len(pairs)
            # NOTE: the first pairs start both sums at their promise (a ratio of 1), so one
            # unlucky first step cannot stop drafting before any evidence
            old_acc, old_prom = self._realism_sums or (promise, promise)
            alpha = 1.0 - (1.0 - self.engine_alpha) ** len(pairs)
            self._realism_sums = (ewma(old_acc, got, alpha), ewma(old_prom, promise, alpha))
            acc, prom = self._realism_sums
            self.gain_realism = min(2.0, max(0.25, acc / max(prom, 1e-9)))
        self.promised = {}
        super().observe(records, lengths, accepted, idle)


def make_gate(gamma: int, cost: CostModel, enabled: bool, config: EngineConfig,
              max_load: int = LoadArms.max_load, per_plain: bool = False) -> DraftGate:
    """The cost gate where it is enabled and a drafting cost was profiled, else always
    (``config``: its probe_every, draft_margin, draft_prior, draft_arms and
    draft_with_prefill; ``max_load``, ``per_plain``: ``CostGate``'s)."""
    if enabled and cost.draft is not None:
        return CostGate(gamma, cost, config.probe_every, config.draft_margin,
                        config.draft_prior, config.draft_arms, config.draft_with_prefill,
                        max_load, per_plain)
    return DraftGate(gamma)
