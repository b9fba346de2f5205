"""The speculative engine of one replica: continuous batching over paged KV, batched
drafting, a per-step verification budget, lossless verification.

One ``step()`` (each stage's output is a typed value made once by its owner):
scheduler -> ``SchedulerOutput``; the draft gate and the drafter -> ``DraftProposal``;
the budget policy -> ``VerificationPlan`` (ℓ_r per drafted request); the model runner ->
``VerifyBatch`` and the target's logits; sampling -> ``RejectionOutput`` (accepted counts,
new tokens); the scheduler commits them; the step ends with ``RequestOutput``s and a
``StepStats``. Randomness has one owner: ``dspark.workers.sampling``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from dspark.kernels.transfer import device_tensor
from dspark.models.drafter_checkpoint import Drafter
from dspark.models.generation import SamplingParams, token_logprobs
from dspark.models.target import TargetModel
from dspark.workers.block_manager import BlockManager
from dspark.workers.budget import (
    CostModel,
    FixedBudget,
    GroupLoad,
    StepCostTable,
    make_budget,
)
from dspark.workers.draft_profile import profile_drafting
from dspark.workers.drafting import DraftWorker
from dspark.workers.engine_config import EngineConfig
from dspark.workers.expert_parallel import forward_empty
from dspark.workers.gate import DraftGate, make_gate
from dspark.workers.lanes import (
    DraftLane,
    lane_order,
    light_lane,
    observe_lanes,
    propose_lane,
)
from dspark.workers.model_runner import ModelRunner, profile_step_costs
from dspark.workers.phase_clock import PhaseClock
from dspark.workers.sampling import sample_step
from dspark.workers.scheduler import Request, RequestResult, Scheduler, SchedulerConfig
from dspark.workers.stats import RequestStep, RoundRecord, StepStats, request_steps, step_stats
from dspark.workers.step import (
    DraftProposal,
    RequestOutput,
    RequestState,
    SeqRows,
    StepSeq,
    Verified,
    block_tables,
)

logger = logging.getLogger(__name__)

__all__ = ["Engine", "EngineConfig", "EngineLoad", "RequestOutput", "StepResult"]


@dataclass(frozen=True)
class EngineLoad:
    num_running: int
    num_waiting: int
    pending_tokens: int
    """Upper bound of the work still owed: remaining max_tokens of every live request."""
    free_blocks: int
    total_blocks: int
    mean_survival: float
    """Calibrated survival of a verified draft (EWMA; 0 before any drafting)."""


@dataclass
class StepResult:
    outputs: list[RequestOutput]
    stats: StepStats | None


class Engine:
    def __init__(
        self,
        target: TargetModel,
        drafter: Drafter | None = None,
        config: EngineConfig | None = None,
        cost_table: StepCostTable | None = None,
        draft_cost_table: StepCostTable | None = None,
        *,
        light_drafter: Drafter | None = None,
        light_cost_table: StepCostTable | None = None,
        group_load: Callable[[], GroupLoad] | None = None,
        lockstep: bool = False,
        on_round: Callable[[str, RoundRecord], None] | None = None,
    ) -> None:
        """``light_drafter``: MTP-1 beside ``drafter`` for the steps whose gate drafts for
        nobody (``dspark.workers.lanes``), with its drafting costs ``light_cost_table``.
        ``group_load``: cluster budget: what the other ranks of this replica's
        expert-parallel group did last step (None: priced alone). ``lockstep``: this
        engine is one rank of an expert-parallel group: every step runs exactly one target
        forward (an empty one when nothing is scheduled). ``on_round``: called with every
        drafted request's round (proposed, accepted, committed, confidences)."""
        cfg = config or EngineConfig()
        cfg.check_drafter(drafter, target)
        cfg.check_light_drafter(light_drafter, drafter, target)
        self.config, self.target, self.drafter = cfg, target, drafter
        self.lockstep, self.on_round = lockstep, on_round
        self.gamma = cfg.gamma(drafter)
        self.blocks = BlockManager(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
            num_lookahead=self.gamma, max_model_len=target.config.max_position_embeddings,
        ), self.blocks)
        layers = drafter.config.feature_layers if drafter is not None else ()
        self.runner = ModelRunner(target, cfg.num_blocks, cfg.block_size, layers)
        self.draft_worker = None
        if drafter is not None:
            self.draft_worker = DraftWorker(drafter, cfg.num_blocks, cfg.block_size,
                                            lazy=True, vocab=cfg.draft_vocab)
        self.device = target.lm_head.weight.device
        if cfg.cuda_graphs:
            if lockstep:
                raise ValueError("cuda_graphs is not supported with expert parallelism "
                                 "(ep_size > 1): its exchanges run between the layers")
            enable_graphs(self, capture=True)
        self._price(drafter, cost_table, draft_cost_table, light_drafter, light_cost_table,
                    group_load)
        self.lane: DraftLane | None = None
        """The lane that drafted this step (None: nobody drafted)."""
        self.states: dict[str, RequestState] = {}
        self.on_request_step: Callable[[list[RequestStep]], None] | None = None
        """Observer of every request's part in every step (tracing); None: not built."""
        self.gate_notes: dict[str, tuple[str, int]] = {}
        """This step's gate decision per decoding request: (reason, cap); kept only with
        ``on_request_step``."""
        self.intake: Callable[[], None] | None = None
        """Queues what arrived since the step was scheduled (``add_request`` only), called
        on the engine's thread once a step has drafted (``admit_late``)."""
        self.step_count = self.num_errors = 0
        self._ids, self._seeds = itertools.count(), itertools.count()

    def _price(self, drafter, cost_table, draft_cost_table, light_drafter, light_cost_table,
               group_load) -> None:
        """The cost model (profiled here unless given), the budget, the gates and the
        drafters' lanes (``__init__``'s arguments of the same names)."""
        cfg = self.config
        self.profiled_cost_table = cost_table or profile_step_costs(
            self.runner, cfg.verify_profile_sizes(), cfg.max_num_seqs, cfg.profile_context,
            cfg.num_blocks)
        gated = self.draft_worker is not None and cfg.gates_drafting
        write_row = 0.0
        if gated:
            draft_cost_table, write_row = profile_drafting(
                self.draft_worker, cfg, self.gamma, draft_cost_table)
        self.profiled_draft_cost_table = draft_cost_table
        self.costs = CostModel(self.profiled_cost_table, draft_cost_table, self.device,
                               cfg.online_costs == "ratio", write_row)
        temps = drafter.config.sts_temperatures if drafter is not None else None
        sts = torch.tensor(temps or [1.0] * max(self.gamma, 1), device=self.device)
        self.budget = make_budget(cfg.budget, self.costs, sts, cfg.threshold, group_load)
        self._gate = make_gate(self.gamma, self.costs, gated, cfg)
        # NOTE: the lanes are asked in order each step; the first that drafts drafts it
        self.lanes = [DraftLane(self.draft_worker, self._gate, self.costs, False,
                                cfg.draft_fit)] if self.draft_worker is not None else []
        if light_drafter is not None:
            self.lanes.append(light_lane(light_drafter, cfg, self.costs, light_cost_table))
        self.light_budget = FixedBudget(self.costs, sts)

    @property
    def gate(self) -> DraftGate:
        """The main drafter's gate (a test may replace it)."""
        return self._gate

    @gate.setter
    def gate(self, gate: DraftGate) -> None:
        self._gate = gate  # NOTE: the main lane's too (an engine without a drafter has none)
        self.lanes[:1] = [dataclasses.replace(lane, gate=gate) for lane in self.lanes[:1]]

    def set_confidence_temperatures(self, temperatures) -> None:
        """The budget's per-position STS temperatures (a calibration refit); call it on the
        engine's thread."""
        self.budget.sts = torch.tensor([float(t) for t in temperatures], device=self.device)

    @property
    def cost_table(self) -> StepCostTable:
        """SPS(B) as the engine currently believes it (profiled, then refined online)."""
        return self.costs.verify.table

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams,
                    stop_ids: Iterable[int] = (), req_id: str | None = None) -> str:
        """Queue a request; bad input raises ValueError naming the field and its range and
        leaves the engine untouched. A request that could never fit in the KV cache is
        refused here."""
        self.check_request(prompt_ids, params)
        req_id = req_id if req_id is not None else f"req-{next(self._ids)}"
        stops = () if params.ignore_eos else tuple(stop_ids)
        self.scheduler.add(Request(req_id, list(prompt_ids), params.max_tokens, stops,
                                   scores_prompt=params.prompt_logprobs is not None))
        self.states[req_id] = RequestState.create(
            params, self.config.seed + next(self._seeds), self.gamma)
        return req_id

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Every check ``add_request`` makes, with nothing queued (the engine-side
        validation; reads configuration only, so any thread may call it)."""
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a SamplingParams")
        vocab = self.target.config.vocab_size
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} outside [0, {vocab})")
        self.scheduler.check(prompt_ids, params.max_tokens)

    def abort(self, req_id: str) -> None:
        """Cancel a request wherever it is; its KV and every trace of it go at once."""
        self.scheduler.cancel(req_id)
        self._forget(req_id)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def load(self) -> EngineLoad:
        """A snapshot of this engine's load (any thread may call it: it only reads)."""
        sched = self.scheduler
        live = [*sched.running, *sched.waiting]
        return EngineLoad(
            num_running=len(sched.running), num_waiting=len(sched.waiting),
            pending_tokens=sum(r.max_tokens - len(r.output_ids) for r in live),
            free_blocks=self.blocks.num_free_blocks, total_blocks=self.blocks.num_blocks,
            mean_survival=self.gate.mean_survival,
        )

    def _forget(self, req_id: str) -> None:
        self.states.pop(req_id, None)
        for lane in self.lanes:
            lane.worker.forget(req_id)

    # ------------------------------------------------------------------ the step
    def step(self) -> StepResult:
        clock = PhaseClock(self.device, self.config.phase_sync)
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            if self.lockstep:
                forward_empty(self.target)  # NOTE: the group's MoE exchanges need every rank
            return StepResult([], None)
        seqs = [StepSeq.create(row, item, self.scheduler.requests[item.req_id],
                               self.states[item.req_id])
                for row, item in enumerate(sched.scheduled)]
        for lane in self.lanes:
            lane.worker.admit(sched.preempted, sched.admitted, self.blocks)
        forwards = self.runner.num_forwards
        try:
            return self._run(sched, seqs, clock)
        except Exception as exc:  # NOTE: fail the step's requests, keep the engine alive
            if self.lockstep and self.runner.num_forwards == forwards:
                forward_empty(self.target)
            return self._fail(seqs, exc)

    def _run(self, sched, seqs: list[StepSeq], clock: PhaseClock) -> StepResult:
        """Schedule (done), decide drafting, draft, budget, verify, sample, commit, record;
        ``clock`` gets each stage's end."""
        tables = block_tables(self.blocks, seqs, self.device)
        clock.mark()
        load, prefilling = prefill_load(seqs, self.config.prefill_weight)
        self.costs.group = self.budget.group()
        decoding = [s for s in seqs if not s.prefill]
        proposal, tables = self._propose(sched, seqs, decoding, load, prefilling, tables)
        if proposal is not None and self.intake is not None and admit_late(
                self, sched, seqs, proposal):
            tables = block_tables(self.blocks, seqs, self.device)
            load, prefilling = prefill_load(seqs, self.config.prefill_weight)
        clock.mark()
        plan = None
        if proposal is not None:
            undrafted = len(decoding) - len(proposal.seqs)
            budget = self.light_budget if proposal.light else self.budget
            plan = budget.plan(proposal.conf_logits, proposal.caps, load + undrafted,
                               prefilling + undrafted)
        clock.mark()
        result, rows, num_rows = self.runner.verify(seqs, proposal, plan, tables)
        clock.mark()
        score_prompts(rows, result.logits)
        verified = Verified(*sample_step(rows, proposal, result.logits), num_rows)
        clock.mark()
        for lane in self.lanes:
            lane.worker.extend_step(rows, verified.new_tokens,
                                    lane.worker.features_of(result.features, result.hidden),
                                    result.slots, tables)
        outputs = self._commit(sched, seqs, proposal, plan, verified.new_tokens)
        clock.mark()
        self._learn(decoding, proposal, plan, verified, clock)
        stats = step_stats(self, sched, seqs, proposal, plan, verified, outputs, clock)
        if self.on_request_step is not None:
            observe_requests(self, seqs, proposal, plan, verified, stats)
        self.step_count += 1
        return StepResult(outputs, stats)

    def _propose(self, sched, seqs, decoding: list[StepSeq], load: int, prefilling: float,
                 tables) -> tuple[DraftProposal | None, torch.Tensor]:
        """Each lane in turn (``lanes``, ``propose_lane``) until one drafts for someone;
        returns its proposal and the step's block tables (grown by its grants)."""
        self.lane = None
        for lane in lane_order(self.lanes, len(decoding), load, prefilling) if decoding else ():
            proposal, tables = propose_lane(self, lane, sched, seqs, decoding, load,
                                            prefilling, tables)
            if proposal is not None:
                self.lane = lane
                return proposal, tables
        return None, tables

    def _learn(self, decoding, proposal, plan, verified: Verified, clock: PhaseClock) -> None:
        """Refine the cost model (verify forward; drafting = proposing) and every lane's
        gate and per-request records (a lane that did not draft saw its requests decode
        without drafting)."""
        drafted = proposal.seqs if proposal is not None else []
        written = self.lane.worker.last_flush[1] if self.lane is not None else 0.0
        observe_lanes(self.lanes, self.lane, decoding, drafted, plan, verified.num_accepted,
                      clock[-1] - clock[0], written)
        # NOTE: drafting is charged its proposal; the deferred drafter-cache rows the
        # proposal wrote first (``DraftWorker.flush``) are priced per row apart
        verify, draft = clock.span(3, 4), clock.span(1, 2)  # NOTE: device times on a GPU
        own, main = max(draft - written, 0.0), self.lane is not None and not self.lane.light
        if self.lane is not None:
            self.lane.costs.observe_write(self.lane.worker.last_flush[0], written)
        self.costs.observe(verified.num_tokens, verify, len(drafted) if main else 0, own,
                           max(clock[-1] - clock[0] - verify - draft, 0.0))
        for lane in self.lanes[1:]:
            if lane is self.lane:
                lane.costs.observe_draft(len(drafted), own)
            lane.costs.follow(self.costs)

    def _commit(self, sched, seqs: list[StepSeq], proposal: DraftProposal | None, plan,
                new_tokens: dict[str, list[int]]) -> list[RequestOutput]:
        """The scheduler commits every request's new tokens (stop tokens, max_tokens and
        the context end cut them there); finished requests leave the engine."""
        before = {s.request.req_id: len(s.request.output_ids) for s in seqs}
        finished = self.scheduler.update(sched, [
            RequestResult(s.request.req_id, new_tokens.get(s.request.req_id, []))
            for s in seqs])
        done = {r.req_id for r in finished}
        if proposal is not None:
            record_rounds(proposal, plan, new_tokens, before, self.on_round)
        outputs = []
        for s in seqs:
            req_id = s.request.req_id
            new = s.request.output_ids[before[req_id]:]
            if new or req_id in done:
                outputs.append(s.state.output(s.request, new, req_id in done,
                                              self.draft_worker is not None))
            s.state.new_logprobs = []
            if req_id in done:
                self._forget(req_id)
        return outputs

    def _fail(self, seqs: list[StepSeq], exc: Exception) -> StepResult:
        self.num_errors += 1
        logger.exception("engine step %d failed; failing its %d requests",
                         self.step_count, len(seqs))
        reason = f"error: {type(exc).__name__}: {exc}"
        for s in seqs:
            self.abort(s.request.req_id)
        return StepResult([RequestOutput(s.request.req_id, [], True, reason,
                                         error=type(exc).__name__) for s in seqs], None)

    # ------------------------------------------------------------------ convenience
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams],
                 stop_ids: Iterable[int] = ()) -> list[list[int]]:
        """Run prompts to completion together; returns each prompt's new token ids."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        stop_ids = tuple(stop_ids)
        ids = [self.add_request(p, sp, stop_ids) for p, sp in zip(prompts, params)]
        outputs: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_unfinished():
            for out in self.step().outputs:
                outputs[out.req_id] += out.new_token_ids
        return [outputs[i] for i in ids]


def enable_graphs(engine: Engine, capture: bool) -> None:
    """The engine's target forwards (decode and verify) and its drafter's calls padded to
    buckets: replayed from CUDA graphs (``capture``; ``EngineConfig.cuda_graphs``) or
    eagerly (the CPU tests of the padding)."""
    engine.runner.enable_graphs(engine.config.max_num_seqs, capture)
    if engine.draft_worker is not None:
        engine.draft_worker.enable_graphs(engine.config.max_num_seqs, capture)


def record_rounds(proposal: DraftProposal, plan, new_tokens: dict[str, list[int]],
                  before: dict[str, int], on_round) -> None:
    """Each drafted request's round into its stats, and to ``on_round`` (which never fails
    the step) with what it proposed, accepted and committed and its confidences."""
    conf = (proposal.conf_logits.tolist()  # NOTE: a read-back only for an observer
            if proposal.conf_logits is not None and on_round is not None else None)
    for i, (s, n) in enumerate(zip(proposal.seqs, plan.lengths)):
        accepted = len(new_tokens[s.request.req_id]) - 1
        s.state.spec.record(n, accepted)
        if on_round is not None:
            committed = len(s.request.output_ids) - before[s.request.req_id]
            try:
                on_round(s.request.req_id, RoundRecord(
                    n, accepted, committed, conf[i][:n] if conf is not None else None))
            except Exception:  # NOTE: an observer never fails committed requests
                logger.exception("on_round observer failed")


def observe_requests(engine: Engine, seqs, proposal, plan, verified: Verified, stats
                     ) -> None:
    """Every request's part in this step, to ``on_request_step`` (which never fails the
    step)."""
    try:
        rows = request_steps(engine, seqs, proposal, plan, verified, stats)
        engine.gate_notes = {}
        engine.on_request_step(rows)
    except Exception:
        logger.exception("on_request_step observer failed")


def prefill_load(seqs: Sequence[StepSeq], weight: float) -> tuple[int, float]:
    """A step's prefill tokens, and its prefilling requests at ``prefill_weight``: they
    are part of the step's cost (a longer step delays their first token as much as it
    delays a decoding request's next one)."""
    return sum(len(s.known) for s in seqs if s.prefill), weight * sum(s.prefill for s in seqs)


def admit_late(engine: Engine, sched, seqs: list[StepSeq], proposal: DraftProposal) -> bool:
    """Requests that arrived while this step drafted (``Engine.intake``) join its verify
    forward, as prefill, where the step's token budget (less the lookahead it granted),
    the free blocks and ``max_num_seqs`` leave room: their first token then comes from
    this step instead of the next. Drafting makes a step longer, and an arrival would
    otherwise wait for all of it and then for a step of its own. Appends to ``sched`` and
    ``seqs``; returns whether anyone joined."""
    scheduler = engine.scheduler
    waiting = len(scheduler.waiting)
    engine.intake()
    if len(scheduler.waiting) == waiting:
        return False  # NOTE: nobody new; those already waiting did not fit at schedule
    late = scheduler.admit(sched, reserved=sum(proposal.caps))
    seqs += [StepSeq.create(len(seqs) + i, item, scheduler.requests[item.req_id],
                            engine.states[item.req_id]) for i, item in enumerate(late)]
    for lane in engine.lanes:
        lane.worker.admit((), [item.req_id for item in late], engine.blocks)
    return bool(late)


def score_prompts(rows: list[SeqRows], logits: torch.Tensor) -> None:
    """Record the target's log-probability of every prompt token a chunk's rows
    predict."""
    for lay in rows:
        s = lay.seq
        if not s.scores:
            continue
        state, prompt = s.state, s.request.prompt_ids
        wanted = [k for k in range(len(lay.fed))
                  if s.start + k + 1 < len(prompt) and s.start + k not in state.prompt_scores]
        if not wanted:
            continue
        index = device_tensor([lay.logit_start + k for k in wanted], logits.device)
        scores = token_logprobs(logits.index_select(0, index),
                                [prompt[s.start + k + 1] for k in wanted],
                                state.params.prompt_logprobs)
        for k, score in zip(wanted, scores):
            state.prompt_scores[s.start + k] = score
