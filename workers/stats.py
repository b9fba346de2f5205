"""Step and request statistics: plain data the engine emits; exporters only read them.

Vocabulary:
- *verify budget* of a step: ``sum_r ℓ_r``, the draft tokens the target verifies;
- *ℓ histogram*: how many decoding requests got ℓ = 0, 1, ..., γ this step;
- *accepted per position*: how many requests had draft k accepted (k = 1..γ).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass
class StepStats:
    step: int
    num_running: int
    """Requests holding KV after the step."""
    num_waiting: int
    num_scheduled_requests: int
    num_prefill_tokens: int
    num_decode_requests: int
    num_drafts: int
    """Decoding requests the drafter proposed for."""
    num_draft_tokens: int
    """Draft tokens proposed (before the budget)."""
    verify_budget: int
    """Draft tokens kept for verification, sum of ℓ_r."""
    num_accepted_tokens: int
    num_output_tokens: int
    """Tokens committed this step (accepted + recovered/bonus + first tokens)."""
    num_verify_tokens: int
    """Rows of the target forward (prefill chunks + anchors + kept drafts)."""
    num_scheduled_tokens: int
    """Known tokens the scheduler scheduled (prefill chunks + anchors; the drafters'
    lookahead slots are granted after the gate and counted in ``num_verify_tokens``)."""
    ell_histogram: list[int]
    accepted_per_position: list[int]
    num_preempted: int
    num_finished: int
    num_errors: int
    free_blocks: int
    total_blocks: int
    num_admitted_tokens: int
    """Known tokens of the requests admitted this step (prompts; all tokens of a
    readmission after preemption)."""
    num_cached_tokens: int
    """Of those, the tokens found in the prefix cache."""
    step_time: float
    """Seconds, whole step."""
    time_schedule: float
    time_draft: float
    time_budget: float
    time_verify: float
    time_sample: float
    time_update: float
    """Seconds in each phase (schedule, draft, budget, target forward, rejection sampling,
    drafter extension + commit)."""

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens committed per drafted request this step (vLLM's definition: 1 + accepted
        drafts per drafting step); 1.0 when nothing was drafted."""
        if self.num_drafts == 0:
            return 1.0
        return (self.num_accepted_tokens + self.num_drafts) / self.num_drafts


@dataclass
class SpecStats:
    """One request's speculative-decoding counts (the vLLM per-request metrics shape)."""

    num_spec_tokens: int
    num_spec_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0
    acceptance_histogram: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.acceptance_histogram:
            self.acceptance_histogram = [0] * (self.num_spec_tokens + 1)

    def record(self, num_draft: int, num_accepted: int) -> None:
        self.num_spec_steps += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_draft_tokens += num_accepted
        self.acceptance_histogram[num_accepted] += 1

    def to_dict(self) -> dict:
        steps = self.num_spec_steps
        return {
            "num_spec_tokens": self.num_spec_tokens,
            "num_spec_steps": steps,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_draft_tokens": self.num_accepted_draft_tokens,
            "acceptance_histogram": list(self.acceptance_histogram),
            # vLLM: 1 + accepted / drafting steps; a request that never drafted committed
            # one token per step, so its acceptance length is 1, never below
            "mean_acceptance_length": (
                1.0 + self.num_accepted_draft_tokens / steps if steps else 1.0
            ),
            "draft_acceptance_rate": (
                self.num_accepted_draft_tokens / self.num_draft_tokens
                if self.num_draft_tokens
                else 0.0
            ),
        }


@dataclass(frozen=True)
class RoundRecord:
    """One drafted request in one step (the unit of τ and of calibration)."""

    proposed: int
    """Drafts verified (ℓ_r)."""
    accepted: int
    committed: int
    """Tokens delivered: accepted + 1, fewer when a stop token, max_tokens or the context
    end cut the round."""
    conf_logits: list[float] | None
    """Raw confidence logits of the verified positions (DSpark), else None."""


def step_stats(engine, sched, seqs, proposal, plan, verified, outputs, clock) -> StepStats:
    """The ``StepStats`` of a finished step (clock: the stage boundaries' perf_counter)."""
    width = max(engine.gamma, 1)
    hist, per_pos = [0] * (width + 1), [0] * width
    accepted_total = 0
    lengths = plan.lengths if plan is not None else []
    for s, n in zip(proposal.seqs if proposal is not None else [], lengths):
        hist[n] += 1
        a = verified.num_accepted[s.request.req_id]
        accepted_total += a
        for k in range(a):
            per_pos[k] += 1
    t = clock
    return StepStats(
        step=engine.step_count,
        num_running=len(engine.scheduler.running),
        num_waiting=len(engine.scheduler.waiting),
        num_scheduled_requests=len(seqs),
        num_prefill_tokens=sum(len(s.known) for s in seqs if s.prefill),
        num_decode_requests=sum(1 for s in seqs if not s.prefill),
        num_drafts=len(lengths),
        num_draft_tokens=int(proposal.tokens.shape[1]) * len(lengths) if proposal else 0,
        verify_budget=sum(lengths),
        num_accepted_tokens=accepted_total,
        num_output_tokens=sum(len(v) for v in verified.new_tokens.values()),
        num_verify_tokens=verified.num_tokens,
        num_scheduled_tokens=sched.num_scheduled_tokens,
        ell_histogram=hist,
        accepted_per_position=per_pos,
        num_preempted=len(sched.preempted),
        num_finished=sum(1 for o in outputs if o.finished),
        num_errors=engine.num_errors,
        free_blocks=engine.blocks.num_free_blocks,
        total_blocks=engine.blocks.num_blocks,
        num_admitted_tokens=sched.admitted_tokens,
        num_cached_tokens=sched.cached_tokens,
        step_time=t[6] - t[0],
        time_schedule=t[1] - t[0],
        time_draft=t[2] - t[1],
        time_budget=t[3] - t[2],
        time_verify=t[4] - t[3],
        time_sample=t[5] - t[4],
        time_update=t[6] - t[5],
    )


class RequestStep(NamedTuple):
    """One request's part in one engine step: what a trace records (built only when the
    engine has a ``on_request_step`` observer, on the engine thread: a named tuple, which
    costs a third of a frozen dataclass to make)."""

    req_id: str
    step: int
    phase: str
    """``prefill`` (a prompt chunk) or ``decode``."""
    prefill_tokens: int
    drafted: bool
    gate: str
    """Why it drafted or not: ``prefill``; ``no_room`` (no draft fits its max_tokens or the
    context); ``gated_off`` (the gate found drafting not worth its cost); ``cost`` (drafted:
    worth it); ``arm`` (drafted: everyone drafts at this load, measured faster,
    ``dspark.workers.gate.LoadArms``); ``probe`` (drafted to refresh its record); ``always``
    (no cost gate)."""
    proposed: int
    """Drafts proposed (γ, its cap this step)."""
    verified: int
    """Drafts the budget verified (ℓ_r)."""
    accepted: int
    committed: int
    """Tokens committed for it this step."""
    survival: tuple[float, ...]
    """The calibrated survival of each verified position (DSpark), else empty."""
    budget_mode: str
    step_tokens: int
    """Rows of the step's target forward."""
    external_tokens: int
    """Tokens the rest of its expert-parallel group scheduled (the cluster budget's)."""


def request_steps(engine, seqs, proposal, plan, verified, stats: StepStats) -> list[RequestStep]:
    """Every scheduled request's ``RequestStep`` of a finished step."""
    import torch  # NOTE: here, not at the top: the ingress reads this module's types

    drafted = {}
    if proposal is not None:
        conf = proposal.conf_logits
        surv = None
        if conf is not None:
            temps = engine.budget.sts[: conf.shape[1]]
            surv = torch.cumprod(torch.sigmoid(conf.float() / temps), 1).tolist()
        for i, (s, n) in enumerate(zip(proposal.seqs, plan.lengths)):
            drafted[s.request.req_id] = (n, tuple(surv[i][:n]) if surv is not None else ())
    mode = engine.config.budget.value
    group = engine.costs.group
    external = stats.num_verify_tokens and (sum(group.tokens) if group is not None else 0)
    rows = []
    for s in seqs:
        req_id = s.request.req_id
        committed = len(verified.new_tokens.get(req_id, ()))
        common = dict(req_id=req_id, step=stats.step, committed=committed, budget_mode=mode,
                      step_tokens=stats.num_verify_tokens, external_tokens=external)
        if s.prefill:
            rows.append(RequestStep(phase="prefill", prefill_tokens=len(s.known),
                                    drafted=False, gate="prefill", proposed=0, verified=0,
                                    accepted=0, survival=(), **common))
            continue
        reason, cap = engine.gate_notes.get(req_id, ("gated_off", 0))
        n, survival = drafted.get(req_id, (0, ()))
        rows.append(RequestStep(
            phase="decode", prefill_tokens=0, drafted=req_id in drafted, gate=reason,
            proposed=cap if req_id in drafted else 0, verified=n,
            accepted=verified.num_accepted.get(req_id, 0), survival=survival, **common))
    return rows
