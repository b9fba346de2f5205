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

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from dspark.models.drafter_checkpoint import Drafter
from dspark.models.generation import SamplingParams
from dspark.models.target import TargetModel
from dspark.workers.block_manager import BlockManager
from dspark.workers.budget import CostModel, GroupLoad, StepCostTable, make_budget
from dspark.workers.draft_profile import profile_drafting
from dspark.workers.drafting import DraftWorker
from dspark.workers.engine_config import EngineConfig
from dspark.workers.expert_parallel import forward_empty
from dspark.workers.gate import CostGate, GateCandidate, make_gate
from dspark.workers.model_runner import ModelRunner, profile_step_costs
from dspark.workers.sampling import sample_step, score_prompts
from dspark.workers.scheduler import Request, RequestResult, Scheduler, SchedulerConfig
from dspark.workers.stats import RequestStep, RoundRecord, StepStats, request_steps, step_stats
from dspark.workers.step import (
    DraftProposal,
    RequestOutput,
    RequestState,
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
        group_load: Callable[[], GroupLoad] | None = None,
        lockstep: bool = False,
        on_round: Callable[[str, RoundRecord], None] | None = None,
    ) -> None:
        """``group_load``: cluster budget: what the other ranks of this replica's
        expert-parallel group did last step (None: priced alone). ``lockstep``: this
        engine is one rank of an expert-parallel group: every step runs exactly one target
        forward (an empty one when nothing is scheduled). ``on_round``: called with every
        drafted request's round (proposed, accepted, committed, confidences)."""
        cfg = config or EngineConfig()
        cfg.check_drafter(drafter, target)
        self.config, self.target, self.drafter = cfg, target, drafter
        self.lockstep, self.on_round = lockstep, on_round
        self.gamma = cfg.gamma(drafter)
        self.blocks = BlockManager(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
            num_lookahead=self.gamma, max_model_len=target.config.max_position_embeddings,
        ), self.blocks)
        layers = drafter.config.feature_layers if drafter is not None else ()
        from_hidden = drafter is not None and drafter.config.method == "mtp"
        self.runner = ModelRunner(target, cfg.num_blocks, cfg.block_size, layers, from_hidden)
        self.draft_worker = None
        if drafter is not None:
            self.draft_worker = DraftWorker(drafter, cfg.num_blocks, cfg.block_size,
                                            lazy=True, vocab=cfg.draft_vocab)
        self.device = target.lm_head.weight.device
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
        self.gate = make_gate(self.gamma, self.costs, gated, cfg)
        self.states: dict[str, RequestState] = {}
        self.on_request_step: Callable[[list[RequestStep]], None] | None = None
        """Observer of every request's part in every step (tracing); None: not built."""
        self.gate_notes: dict[str, tuple[str, int]] = {}
        """This step's gate decision per decoding request: (reason, cap); kept only with
        ``on_request_step``."""
        self.step_count = self.num_errors = 0
        self._ids, self._seeds = itertools.count(), itertools.count()

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
        if self.draft_worker is not None:
            self.draft_worker.forget(req_id)

    # ------------------------------------------------------------------ the step
    def step(self) -> StepResult:
        clock = [time.perf_counter()]
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            if self.lockstep:
                forward_empty(self.target)  # NOTE: the group's MoE exchanges need every rank
            return StepResult([], None)
        seqs = [StepSeq.create(row, item, self.scheduler.requests[item.req_id],
                               self.states[item.req_id])
                for row, item in enumerate(sched.scheduled)]
        if self.draft_worker is not None:
            self.draft_worker.admit(sched.preempted, sched.admitted, self.blocks)
        forwards = self.runner.num_forwards
        try:
            return self._run(sched, seqs, clock)
        except Exception as exc:  # NOTE: fail the step's requests, keep the engine alive
            if self.lockstep and self.runner.num_forwards == forwards:
                forward_empty(self.target)
            return self._fail(seqs, exc)

    def _run(self, sched, seqs: list[StepSeq], clock: list[float]) -> StepResult:
        """Schedule (done), decide drafting, draft, budget, verify, sample, commit, record;
        ``clock`` gets each stage's end."""
        tables = block_tables(self.blocks, seqs, self.device)
        clock.append(time.perf_counter())
        # NOTE: prefilling requests are part of the step's cost: a longer step delays their
        # first token as much as it delays a decoding request's next one
        prefilling = self.config.prefill_weight * sum(s.prefill for s in seqs)
        load, self.costs.group = sum(len(s.known) for s in seqs if s.prefill), self.budget.group()
        decoding = [s for s in seqs if not s.prefill]
        proposal, tables = self._propose(sched, seqs, decoding, load, prefilling, tables)
        clock.append(time.perf_counter())
        plan = None
        if proposal is not None:
            undrafted = len(decoding) - len(proposal.seqs)
            plan = self.budget.plan(proposal.conf_logits, proposal.caps, load + undrafted,
                                    prefilling + undrafted)
        clock.append(time.perf_counter())
        result, rows, num_rows = self.runner.verify(seqs, proposal, plan, tables)
        clock.append(time.perf_counter())
        score_prompts(rows, result.logits)
        verified = Verified(*sample_step(rows, proposal, result.logits), num_rows)
        clock.append(time.perf_counter())
        if self.draft_worker is not None:
            self.draft_worker.extend_step(rows, verified.new_tokens, result.features,
                                          result.slots, tables)
        outputs = self._commit(sched, seqs, proposal, plan, verified.new_tokens)
        clock.append(time.perf_counter())
        self._learn(decoding, proposal, plan, verified, clock)
        stats = step_stats(self, sched, seqs, proposal, plan, verified, outputs, clock)
        if self.on_request_step is not None:
            self._observe_requests(seqs, proposal, plan, verified, stats)
        self.step_count += 1
        return StepResult(outputs, stats)

    def _propose(self, sched, seqs, decoding: list[StepSeq], load: int, prefilling: float,
                 tables) -> tuple[DraftProposal | None, torch.Tensor]:
        """The gate picks which decoding requests draft, the scheduler grants them
        lookahead slots, and the drafter drafts for them; returns the proposal and the
        step's block tables (grown by the grants)."""
        if self.draft_worker is None or not decoding:
            return None, tables
        declined = self.gate.declines(len(decoding), load, prefilling)
        if declined and self.on_request_step is None:
            return None, tables  # NOTE: no pass over the requests
        caps = self.draft_worker.caps(decoding, [self.scheduler.lookahead_room(s.request)
                                                 for s in decoding])
        able = [(s, c) for s, c in zip(decoding, caps) if c > 0]
        picks = [False] * len(able) if declined else self.gate.choose(
            gate_candidates(able, self.draft_worker.owed), len(decoding), load, prefilling)
        chosen = [sc for sc, pick in zip(able, picks) if pick]
        if self.on_request_step is not None:
            self._note_gate(decoding, caps, able, picks)
        granted = self.scheduler.grant_lookahead(
            sched, [(s.request.req_id, c) for s, c in chosen]) if chosen else []
        chosen = [(s, n) for (s, _), n in zip(chosen, granted) if n > 0]
        if not chosen:
            return None, tables
        tables = block_tables(self.blocks, seqs, self.device)  # NOTE: grants add blocks
        return self.draft_worker.propose_step([s for s, _ in chosen], [n for _, n in chosen],
                                              tables), tables

    def _note_gate(self, decoding, caps, able, picks) -> None:
        probes = self.gate.probes if isinstance(self.gate, CostGate) else None
        notes = {s.request.req_id: ("no_room", c) for s, c in zip(decoding, caps)}
        for i, ((s, cap), pick) in enumerate(zip(able, picks)):
            reason = ("always" if probes is None else "probe" if i in probes
                      else "arm" if self.gate.by_arm else "cost")
            notes[s.request.req_id] = (reason if pick else "gated_off", cap)
        self.gate_notes = notes

    def _observe_requests(self, seqs, proposal, plan, verified: Verified, stats) -> None:
        """Every request's part in this step, to ``on_request_step`` (which never fails the
        step)."""
        try:
            rows = request_steps(self, seqs, proposal, plan, verified, stats)
            self.gate_notes = {}
            self.on_request_step(rows)
        except Exception:
            logger.exception("on_request_step observer failed")

    def _learn(self, decoding, proposal, plan, verified: Verified, clock: list[float]) -> None:
        """Refine the cost model (verify forward; drafting = proposing) and the gate's
        per-request records."""
        if self.draft_worker is not None:
            drafted = proposal.seqs if proposal is not None else []
            ids = {s.request.req_id for s in drafted}
            self.gate.observe(
                [s.state.drafting for s in drafted], plan.lengths if plan is not None else [],
                [verified.num_accepted[s.request.req_id] for s in drafted],
                [s.state.drafting for s in decoding if s.request.req_id not in ids],
                clock[-1] - clock[0])
        # NOTE: drafting is charged its proposal; the deferred drafter-cache rows the
        # proposal wrote first (``DraftWorker.flush``) are priced per row apart
        verify, draft = clock[4] - clock[3], clock[2] - clock[1]
        written = 0.0
        if proposal is not None:
            rows, written = self.draft_worker.last_flush
            self.costs.observe_write(rows, written)
        self.costs.observe(verified.num_tokens, verify, len(proposal.seqs) if proposal else 0,
                           draft - written, clock[-1] - clock[0] - verify - draft)

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


def record_rounds(proposal: DraftProposal, plan, new_tokens: dict[str, list[int]],
                  before: dict[str, int], on_round) -> None:
    """Each drafted request's round into its stats, and to ``on_round`` (which never fails
    the step) with what it proposed, accepted and committed and its confidences."""
    conf = proposal.conf_logits.tolist() if proposal.conf_logits is not None else None
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


def gate_candidates(able: list[tuple[StepSeq, int]], owed: Callable[[str, int], int]
                    ) -> list[GateCandidate]:
    """The gate's view of each decoding request that could draft (with its cap)."""
    return [GateCandidate(s.state.drafting, cap, owed(s.request.req_id, s.start),
                          s.request.max_tokens - len(s.request.output_ids)) for s, cap in able]
