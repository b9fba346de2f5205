"""The speculative engine of one replica: continuous batching over paged KV, batched
drafting, a per-step verification budget, batched rejection sampling.

One ``step()``: the scheduler picks who runs and how many tokens each; the drafter
proposes up to γ tokens per decoding request; the verification budget keeps a prefix of
ℓ_r of them (truncation happens before the target forward); the model runner runs the
target on the flattened batch; the rejection sampler accepts a prefix and draws the
recovered or bonus token; the drafter cache is extended with the committed positions and
the scheduler commits them, frees the rest, finishes requests; a ``StepStats`` is emitted.

Budget modes (``EngineConfig.budget``): ``fixed`` (γ), ``threshold`` (calibrated
per-position confidence ≥ θ), ``algorithm1`` (paper Algorithm 1 against the profiled
SPS(B)), ``topk`` (§5.2: capacity from the confidences of two steps earlier).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from dspark.kernels.prefix_select import select_prefixes
from dspark.models.drafter_checkpoint import Drafter
from dspark.models.generation import (
    SamplingParams,
    TokenLogprob,
    process_logits,
    sampling_probs,
    token_logprobs,
)
from dspark.models.target import TargetModel
from dspark.workers.block_manager import BlockManager
from dspark.workers.budget import OnlineCostTable, StepCostTable
from dspark.workers.drafting import (
    DraftOutput,
    DraftWorker,
    ExtendBatch,
    profile_draft_costs,
)
from dspark.workers.expert_parallel import forward_empty
from dspark.workers.model_runner import ModelRunner, VerifyBatch, profile_step_costs
from dspark.workers.rejection_sampler import rejection_sample_batch
from dspark.workers.scheduler import (
    Request,
    RequestResult,
    ScheduledRequest,
    Scheduler,
    SchedulerConfig,
    Status,
)
from dspark.workers.stats import SpecStats, StepStats

logger = logging.getLogger(__name__)

BUDGET_MODES = ("fixed", "threshold", "algorithm1", "topk", "cluster")
CONFIDENCE_MODES = ("threshold", "algorithm1", "topk", "cluster")


@dataclass(frozen=True)
class EngineConfig:
    budget: str = "fixed"
    """Verification budget: fixed, threshold, algorithm1, topk, or cluster (Algorithm 1 with
    SPS evaluated at this replica's tokens plus what the rest of its expert-parallel group
    schedules, from ``Engine.external_tokens``)."""
    num_speculative_tokens: int | None = None
    """γ, drafts proposed per request per step (default: the drafter's block size)."""
    threshold: float = 0.5
    """θ of the threshold budget, in (0, 1)."""
    block_size: int = 16
    """KV slots per block."""
    num_blocks: int = 1024
    """KV blocks of the target (and of the drafter's context cache)."""
    max_num_seqs: int = 32
    """Most requests running at once."""
    max_num_batched_tokens: int = 1024
    """Token budget of one step (prefill chunks + anchors + draft slots)."""
    enable_prefix_caching: bool = True
    profile_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    """Verify batch sizes B profiled for SPS(B) at start-up."""
    profile_context: int = 128
    """Context length of the dummy requests used for profiling."""
    seed: int = 0
    """Seeds unseeded requests' generators (request i gets seed + i)."""
    draft_gating: bool = True
    """algorithm1/topk only: skip drafting in a step when the profiled draft and verify
    costs and the recent acceptance say drafting cannot raise throughput."""
    probe_every: int = 8
    """While gated off, draft anyway every this many steps to refresh the acceptance
    estimate."""

    def __post_init__(self) -> None:
        if self.budget not in BUDGET_MODES:
            raise ValueError(f"budget must be one of {BUDGET_MODES}, got {self.budget!r}")
        if self.num_speculative_tokens is not None and not 1 <= self.num_speculative_tokens <= 32:
            raise ValueError(
                f"num_speculative_tokens must be in [1, 32], got {self.num_speculative_tokens}"
            )
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        for name in ("block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.probe_every < 1:
            raise ValueError(f"probe_every must be >= 1, got {self.probe_every}")
        if not self.profile_batch_sizes or min(self.profile_batch_sizes) < 1:
            raise ValueError("profile_batch_sizes must be a non-empty tuple of sizes >= 1")


@dataclass
class RequestOutput:
    """What a step produced for one request (streamed to its caller)."""

    req_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    spec_stats: dict | None = None
    """On the finishing output of a speculative request: its ``SpecStats.to_dict()``."""
    logprobs: list[TokenLogprob] | None = None
    """One per new token when the request asked for logprobs (the target's, never the
    drafter's)."""
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """On the first output of a request that scores its prompt: one per prompt token (None
    for the first, which has no context)."""


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


@dataclass
class _State:
    params: SamplingParams
    generator: torch.Generator
    spec: SpecStats
    prompt_scores: dict[int, TokenLogprob] = field(default_factory=dict)
    """Prompt position -> score of the token there (kept across preemption)."""
    prompt_delivered: bool = False
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    """This step's logprobs of the committed tokens (consumed by the commit)."""


@dataclass
class _Plan:
    """What the step does for one scheduled request (built before the forward)."""

    item: ScheduledRequest
    request: Request
    start: int  # position of the first fed token
    fed: list[int]  # tokens fed to the target (chunk, or anchor + kept drafts)
    samples: bool  # a token is drawn for this request this step
    prefill: bool  # feeds a prompt chunk (else: anchor + drafts)
    num_draft: int = 0  # ℓ_r
    draft_row: int = -1  # row in the DraftOutput, -1 if not drafted
    row: int = 0  # row of this request in the step's block tables
    logit_start: int = 0  # its first row in the forward's logits
    num_scored: int = 0  # leading logit rows that score prompt tokens (not sampled from)


class Engine:
    def __init__(
        self,
        target: TargetModel,
        drafter: Drafter | None = None,
        config: EngineConfig | None = None,
        cost_table: StepCostTable | None = None,
        draft_cost_table: StepCostTable | None = None,
        *,
        external_tokens: Callable[[], int] | None = None,
        lockstep: bool = False,
    ) -> None:
        """``external_tokens``: cluster budget: tokens the other ranks of this replica's
        expert-parallel group schedule per step (None counts as 0). ``lockstep``: this
        engine is one rank of an expert-parallel group: every step runs exactly one target
        forward (an empty one when nothing is scheduled)."""
        cfg = config or EngineConfig()
        self.config, self.target, self.drafter = cfg, target, drafter
        tcfg = target.config
        if drafter is not None:
            drafter.config.check_target(tcfg)
        self.gamma = 0
        if drafter is not None:
            self.gamma = min(cfg.num_speculative_tokens or drafter.config.block_size,
                             drafter.config.block_size)
        has_conf = drafter is not None and getattr(drafter, "confidence", None) is not None
        if drafter is not None and cfg.budget in CONFIDENCE_MODES and not has_conf:
            raise ValueError(
                f"budget {cfg.budget!r} needs a drafter with a confidence head (dspark); "
                f"{drafter.config.method} has none: use budget='fixed'"
            )
        self.blocks = BlockManager(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=cfg.max_num_seqs,
                max_num_batched_tokens=cfg.max_num_batched_tokens,
                num_lookahead=self.gamma,
                max_model_len=tcfg.max_position_embeddings,
            ),
            self.blocks,
        )
        if drafter is None:
            layers, from_hidden = (), False
        else:
            layers = drafter.config.feature_layers
            from_hidden = drafter.config.method == "mtp"
        self.runner = ModelRunner(target, cfg.num_blocks, cfg.block_size, layers, from_hidden)
        self.draft_worker = (
            DraftWorker(drafter, cfg.num_blocks, cfg.block_size) if drafter is not None else None
        )
        self.device = target.lm_head.weight.device
        temps = drafter.config.sts_temperatures if drafter is not None else None
        self.sts = torch.tensor(temps or [1.0] * max(self.gamma, 1), device=self.device)
        self.states: dict[str, _State] = {}
        self.step_count = 0
        self.num_errors = 0
        self._ids = itertools.count()
        self._seeds = itertools.count()
        self._stale_surv: deque[torch.Tensor] = deque(maxlen=2)
        if cost_table is None:
            sizes = [b for b in cfg.profile_batch_sizes if b <= cfg.max_num_batched_tokens]
            cost_table = profile_step_costs(
                self.runner, sizes or [1], cfg.max_num_seqs, cfg.profile_context,
                cfg.num_blocks,
            )
        self.costs = OnlineCostTable(cost_table)
        self.lockstep = lockstep
        self.external_tokens = external_tokens
        self.gated = (
            self.draft_worker is not None and cfg.draft_gating
            and cfg.budget in ("algorithm1", "topk", "cluster")
        )
        if self.gated and draft_cost_table is None:
            sizes = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= cfg.max_num_seqs]
            draft_cost_table = profile_draft_costs(
                self.draft_worker, sizes, cfg.profile_context, self.gamma, cfg.num_blocks
            )
        self.draft_costs = OnlineCostTable(draft_cost_table) if draft_cost_table else None
        self._gain: float | None = None  # EWMA accepted drafts per drafted request
        self._ell = float(self.gamma)  # EWMA verified drafts per drafted request
        self._since_draft = 0
        self._num_tracked = 0
        self._sizes = torch.tensor(cost_table.batch_sizes, device=self.device)
        self._rates = torch.tensor(cost_table.steps_per_second, device=self.device)
        self.profiled_cost_table = cost_table
        self.profiled_draft_cost_table = draft_cost_table

    @property
    def cost_table(self) -> StepCostTable:
        """SPS(B) as the engine currently believes it (profiled, then refined online)."""
        return self.costs.table

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        stop_ids: Iterable[int] = (),
        req_id: str | None = None,
    ) -> str:
        """Queue a request; bad input raises ValueError naming the field and its range and
        leaves the engine untouched."""
        self.check_request(prompt_ids, params)
        req_id = req_id if req_id is not None else f"req-{next(self._ids)}"
        stops = () if params.ignore_eos else tuple(stop_ids)
        self.scheduler.add(Request(req_id, list(prompt_ids), params.max_tokens, stops,
                                   scores_prompt=params.prompt_logprobs is not None))
        seed = params.seed if params.seed is not None else self.config.seed + next(self._seeds)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.states[req_id] = _State(params, gen, SpecStats(max(self.gamma, 1)))
        return req_id

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Every check ``add_request`` makes, with nothing queued (reads configuration only,
        so any thread may call it)."""
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a SamplingParams")
        vocab = self.target.config.vocab_size
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} outside [0, {vocab})")
        self.scheduler.check(prompt_ids, params.max_tokens)

    def abort(self, req_id: str) -> None:
        """Cancel a request wherever it is; its KV is freed at once."""
        self.scheduler.cancel(req_id)
        self._forget(req_id)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def load(self) -> EngineLoad:
        """A snapshot of this engine's load (any thread may call it: it only reads)."""
        sched = self.scheduler
        live = [*sched.running, *sched.waiting]
        gain, ell = self._gain, self._ell
        return EngineLoad(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            pending_tokens=sum(r.max_tokens - len(r.output_ids) for r in live),
            free_blocks=self.blocks.num_free_blocks,
            total_blocks=self.blocks.num_blocks,
            mean_survival=gain / ell if gain is not None and ell else 0.0,
        )

    def _forget(self, req_id: str) -> None:
        self.states.pop(req_id, None)
        if self.draft_worker is not None:
            self.draft_worker.forget(req_id)

    # ------------------------------------------------------------------ the step
    def step(self) -> StepResult:
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        t_sched = time.perf_counter()
        forwards = self.runner.num_forwards
        if not out.scheduled:
            if self.lockstep:
                forward_empty(self.target)  # NOTE: the group's MoE exchanges need every rank
            return StepResult([], None)
        plans = [self._plan(item) for item in out.scheduled]
        try:
            return self._run(out, plans, t0, t_sched)
        except Exception as exc:  # NOTE: fail the step's requests, keep the engine alive
            if self.lockstep and self.runner.num_forwards == forwards:
                forward_empty(self.target)
            self.num_errors += 1
            logger.exception("engine step %d failed; failing its %d requests",
                             self.step_count, len(plans))
            outputs = []
            for plan in plans:
                self.scheduler.cancel(plan.request.req_id)
                plan.request.finish_reason = f"error: {type(exc).__name__}: {exc}"
                self._forget(plan.request.req_id)
                outputs.append(RequestOutput(plan.request.req_id, [], True,
                                             plan.request.finish_reason))
            return StepResult(outputs, None)

    def _plan(self, item: ScheduledRequest) -> _Plan:
        req = self.scheduler.requests[item.req_id]
        start = req.num_computed_tokens
        if req.is_prefill:
            fed = req.all_ids[start : start + item.num_new_tokens]
            return _Plan(item, req, start, fed, start + len(fed) == req.num_tokens, True)
        return _Plan(item, req, start, [req.all_ids[-1]], True, False)

    def _run(self, out, plans: list[_Plan], t0: float, t_sched: float) -> StepResult:
        for row, p in enumerate(plans):
            p.row = row
        # NOTE: built once: the step's block tables do not change until the commit
        tables = self._block_tables([p.request.req_id for p in plans])  # [R, max_blocks]
        decoding = [p for p in plans if not p.prefill]
        prefill_tokens = sum(len(p.fed) for p in plans if p.prefill)
        drafts = (self._draft(decoding, tables) if self._should_draft(decoding, prefill_tokens)
                  else None)
        t_draft = time.perf_counter()
        surv = self._apply_budget(decoding, drafts, prefill_tokens)
        t_budget = time.perf_counter()
        batch = self._verify_batch(plans, drafts, tables)
        result = self.runner.forward(batch)
        t_verify = time.perf_counter()
        self._score_prompts(plans, result.logits)
        sampled = self._sample(plans, drafts, result.logits)
        t_sample = time.perf_counter()
        if self.draft_worker is not None:
            self._extend(plans, sampled, result.features, tables)
        outputs, finished = self._commit(out, plans, sampled)
        t_end = time.perf_counter()
        if surv is not None:
            self._stale_surv.append(surv)
        self._track_acceptance(plans, surv)
        # drafting's own cost: proposing, plus extending the drafter cache at commit
        draft_seconds = (t_draft - t_sched) + (t_end - t_sample)
        self._observe_costs(batch.num_tokens, t_verify - t_budget, drafts, draft_seconds)
        self.step_count += 1
        stats = self._stats(out, plans, drafts, sampled, finished, batch.num_tokens,
                            (t0, t_sched, t_draft, t_budget, t_verify, t_sample, t_end))
        return StepResult(outputs, stats)

    # ------------------------------------------------------------------ drafting + budget
    def _draft(self, decoding: list[_Plan], tables: torch.Tensor) -> DraftOutput | None:
        if self.draft_worker is None:
            return None
        caps = []
        for p in decoding:
            remaining = p.request.max_tokens - len(p.request.output_ids)
            cap = max(0, min(p.item.num_lookahead, remaining - 1))
            if not self.draft_worker.ready(p.request.req_id):
                # NOTE: a prefix-cache hit can leave a request decoding before the drafter
                # has seen any of its rows; it drafts from the next step on
                cap = 0
            caps.append(cap)
        chosen = [p for p, cap in zip(decoding, caps) if cap > 0]
        if not chosen:
            return None
        for row, p in enumerate(chosen):
            p.draft_row = row
        for p, cap in zip(decoding, caps):
            p.num_draft = cap
        block = self.drafter.config.block_size
        uniforms = torch.stack([
            torch.rand(block, generator=self.states[p.request.req_id].generator)
            if self.states[p.request.req_id].params.temperature > 0 else torch.zeros(block)
            for p in chosen
        ]).to(self.device)  # [R, K]
        temps = torch.tensor(
            [self.states[p.request.req_id].params.temperature for p in chosen],
            device=self.device,
        )
        rows = torch.tensor([p.row for p in chosen], device=self.device)
        return self.draft_worker.propose(
            [p.request.req_id for p in chosen],
            torch.tensor([p.fed[0] for p in chosen], device=self.device),
            torch.tensor([p.start for p in chosen], device=self.device),
            tables.index_select(0, rows),
            max(p.num_draft for p in chosen),
            temps,
            uniforms,
        )

    def _should_draft(self, decoding: list[_Plan], prefill_tokens: int) -> bool:
        """Draft this step unless drafting cannot pay: expected tokens per second with
        drafting (recent acceptance, profiled draft cost and SPS) against plain decoding.
        Uses only what earlier steps observed, so either choice stays lossless."""
        if self.draft_worker is None or not decoding:
            return False
        if (
            not self.gated
            or self._num_tracked < 4  # too few estimates yet
            or self._since_draft + 1 >= self.config.probe_every
        ):
            return True
        num = len(decoding)
        base = num + prefill_tokens + self._external()
        cost = self.costs.table
        t_plain = 1.0 / cost.sps(base)
        t_spec = 1.0 / self.draft_costs.table.sps(num) + 1.0 / cost.sps(
            base + round(num * self._ell)
        )
        # NOTE: a 5% margin: a break-even guess is not worth the drafter's cost
        draft = (1.0 + self._gain) / t_spec > 1.05 / t_plain
        self._since_draft = 0 if draft else self._since_draft + 1
        return draft

    def _observe_costs(self, num_verify, verify_seconds, drafts, draft_seconds) -> None:
        self.costs.observe(num_verify, verify_seconds)
        self._rates = torch.tensor(self.costs.table.steps_per_second, device=self.device)
        if drafts is not None and self.draft_costs is not None:
            self.draft_costs.observe(drafts.tokens.shape[0], draft_seconds)

    def _track_acceptance(self, plans: list[_Plan], surv: torch.Tensor | None) -> None:
        """EWMA of the calibrated expected accepted drafts per drafted request under the
        chosen ℓ_r (sum of admitted survivals), and of ℓ_r itself."""
        drafted = [p for p in plans if p.draft_row >= 0]
        if not drafted or surv is None:
            return
        self._since_draft = 0
        lengths = torch.tensor([p.num_draft for p in drafted], device=surv.device)
        admitted = torch.arange(surv.shape[1], device=surv.device)[None] < lengths[:, None]
        gain = float(torch.where(admitted, surv, 0.0).sum()) / len(drafted)
        ell = float(lengths.sum()) / len(drafted)
        alpha = 0.3
        self._num_tracked += 1
        self._gain = gain if self._gain is None else (1 - alpha) * self._gain + alpha * gain
        self._ell = (1 - alpha) * self._ell + alpha * ell

    def _apply_budget(self, decoding, drafts, prefill_tokens) -> torch.Tensor | None:
        """Set each drafted plan's ℓ_r; returns this step's survival matrix (or None)."""
        chosen = [p for p in decoding if p.draft_row >= 0]
        if drafts is None or not chosen:
            return None
        caps = torch.tensor([p.num_draft for p in chosen], device=self.device)  # [R]
        width = drafts.tokens.shape[1]
        proposed = torch.arange(width, device=self.device)[None] < caps[:, None]  # [R, n]
        surv = None
        mode = self.config.budget
        if drafts.conf_logits is not None:
            conf = torch.sigmoid(drafts.conf_logits / self.sts[:width])  # [R, n]
            surv = torch.where(proposed, conf.cumprod(1), torch.full_like(conf, -1.0))
        if mode == "fixed":
            lengths = caps
        elif mode == "threshold":
            ok = (conf >= self.config.threshold) & proposed
            lengths = ok.long().cumprod(1).sum(1)
        else:
            other = prefill_tokens + (len(decoding) - len(chosen)) + self._external()
            capacity = -1
            if mode == "topk":
                capacity = self._stale_capacity(other, len(chosen))
            lengths = select_prefixes(surv, self._sizes, self._rates, other, capacity)
        for p, n in zip(chosen, lengths.tolist()):
            p.num_draft = n
        return surv

    def _external(self) -> int:
        if self.config.budget != "cluster" or self.external_tokens is None:
            return 0
        try:
            return max(0, int(self.external_tokens()))
        except Exception:  # NOTE: stale load is safe: fall back to local information
            logger.debug("external load unavailable", exc_info=True)
            return 0

    def _stale_capacity(self, other: int, num_req: int) -> int:
        """§5.2: capacity K from the survival estimates of two steps earlier (only numbers
        known before this step's drafts were sampled); one draft per request before that."""
        if len(self._stale_surv) < 2:
            return num_req
        stale = self._stale_surv[0]
        return int(select_prefixes(stale, self._sizes, self._rates, other).sum())

    # ------------------------------------------------------------------ verify + sample
    def _block_tables(self, req_ids: list[str]) -> torch.Tensor:
        rows = [self.blocks.table(r).block_ids for r in req_ids]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], device=self.device)

    def _verify_batch(self, plans: list[_Plan], drafts: DraftOutput | None,
                      tables: torch.Tensor) -> VerifyBatch:
        draft_lists = drafts.tokens.tolist() if drafts is not None else []
        ids, positions, cu, seq_lens, logit_rows = [], [], [0], [], []
        for p in plans:
            if p.draft_row >= 0 and p.num_draft > 0:
                p.fed = p.fed + draft_lists[p.draft_row][: p.num_draft]
            row0 = len(ids)
            ids += p.fed
            positions += range(p.start, p.start + len(p.fed))
            cu.append(len(ids))
            seq_lens.append(p.start + len(p.fed))
            p.logit_start = len(logit_rows)
            if p.prefill and self._scores_prompt(p):
                # NOTE: every row of the chunk scores the prompt token after it; the last
                # row of the final chunk is also the one the first token is drawn from
                p.num_scored = len(p.fed) - (1 if p.samples else 0)
                logit_rows += range(row0, len(ids))
            elif p.samples:
                first = row0 + len(p.fed) - 1 if p.prefill else row0
                logit_rows += range(first, len(ids))
        dev = self.device
        return VerifyBatch(
            input_ids=torch.tensor(ids, device=dev),
            positions=torch.tensor(positions, device=dev),
            cu_q=torch.tensor(cu, device=dev),
            block_tables=tables,
            seq_lens=torch.tensor(seq_lens, device=dev),
            max_q=max(len(p.fed) for p in plans),
            logit_rows=torch.tensor(logit_rows, device=dev, dtype=torch.long),
        )

    def _sample(self, plans, drafts, logits) -> dict[str, tuple[int, list[int]]]:
        """Rejection sampling of every sampling request: req_id -> (accepted, new tokens)."""
        sampling = [p for p in plans if p.samples]
        if not sampling:
            return {}
        params = [self.states[p.request.req_id].params for p in sampling]
        rows_per = [p.num_draft + 1 for p in sampling]
        if any(p.num_scored for p in plans):  # keep only the rows tokens are drawn from
            keep = [p.logit_start + p.num_scored + k for p, n in zip(sampling, rows_per)
                    for k in range(n)]
            logits = logits.index_select(0, torch.tensor(keep, device=self.device))
        raw = logits  # [M, V] what logprobs report
        logits = self._process(sampling, drafts, logits, rows_per)
        temps = torch.tensor(
            [pr.temperature for pr, n in zip(params, rows_per) for _ in range(n)],
            device=self.device,
        )
        probs = target_probs_batch(logits, temps, [pr.top_p for pr in params], rows_per)
        lens = [p.num_draft for p in sampling]
        cu = torch.tensor([0, *itertools.accumulate(lens)], device=self.device)
        if drafts is not None and sum(lens):
            draft_ids = torch.cat([drafts.tokens[p.draft_row, : p.num_draft] for p in sampling])
            draft_probs = torch.cat([drafts.probs[p.draft_row, : p.num_draft] for p in sampling])
        else:
            draft_ids = torch.zeros(0, dtype=torch.long, device=self.device)
            draft_probs = probs.new_zeros(0, probs.shape[-1])
        out = rejection_sample_batch(
            draft_ids, cu, draft_probs, probs,
            [pr.temperature == 0.0 for pr in params],
            [self.states[p.request.req_id].generator for p in sampling],
        )
        start = 0
        for p, n, ids in zip(sampling, rows_per, out.output_ids):
            state = self.states[p.request.req_id]
            if state.params.logprobs is not None:
                state.new_logprobs = token_logprobs(raw[start : start + len(ids)], ids,
                                                    state.params.logprobs)
            start += n
        return {
            p.request.req_id: (a, ids)
            for p, a, ids in zip(sampling, out.num_accepted, out.output_ids)
        }

    def _process(self, sampling, drafts, logits, rows_per) -> torch.Tensor:
        """Apply each request's penalties, bias and min_tokens at every verified position
        (the drafts before a position count as generated there)."""
        if not any(self.states[p.request.req_id].params.modifies_logits for p in sampling):
            return logits
        logits = logits.clone()
        start = 0
        for p, n in zip(sampling, rows_per):
            state = self.states[p.request.req_id]
            if state.params.modifies_logits:
                extra = (drafts.tokens[p.draft_row, : p.num_draft].tolist()
                         if p.draft_row >= 0 else [])
                logits[start : start + n] = process_logits(
                    logits[start : start + n], state.params, p.request.output_ids, extra,
                    p.request.stop_ids)
            start += n
        return logits

    def _scores_prompt(self, p: _Plan) -> bool:
        state = self.states[p.request.req_id]
        return state.params.prompt_logprobs is not None and not state.prompt_delivered

    def _score_prompts(self, plans: list[_Plan], logits: torch.Tensor) -> None:
        """Record the target's log-probability of every prompt token a chunk's rows
        predict."""
        for p in plans:
            if not (p.prefill and self._scores_prompt(p)):
                continue
            state, prompt = self.states[p.request.req_id], p.request.prompt_ids
            rows = len(p.fed)  # every fed row has a logit row when scoring
            positions = [p.start + k for k in range(rows)]
            wanted = [k for k, pos in enumerate(positions)
                      if pos + 1 < len(prompt) and pos not in state.prompt_scores]
            if not wanted:
                continue
            index = torch.tensor([p.logit_start + k for k in wanted], device=self.device)
            scores = token_logprobs(logits.index_select(0, index),
                                    [prompt[positions[k] + 1] for k in wanted],
                                    state.params.prompt_logprobs)
            for k, score in zip(wanted, scores):
                state.prompt_scores[positions[k]] = score

    # ------------------------------------------------------------------ commit
    def _extend(self, plans, sampled, features, tables) -> None:
        """Write the drafter K/V of the positions committed this step."""
        rows, next_ids, positions, cu, req_ids = [], [], [], [0], []
        offset = 0
        for p in plans:
            req = p.request
            if p.prefill:
                num = len(p.fed)
                following = req.all_ids[p.start + 1 : p.start + num + 1]
                if p.samples:
                    following = following + sampled[req.req_id][1][:1]
            else:
                accepted, new = sampled[req.req_id]
                num, following = accepted + 1, new
            rows += range(offset, offset + num)
            next_ids += following[:num]
            positions += range(p.start, p.start + num)
            cu.append(len(rows))
            req_ids.append(req.req_id)
            offset += len(p.fed)
        dev = self.device
        self.draft_worker.extend(ExtendBatch(
            req_ids=req_ids,
            features=features[torch.tensor(rows, device=dev)],
            next_ids=torch.tensor(next_ids, device=dev),
            positions=torch.tensor(positions, device=dev),
            cu=torch.tensor(cu, device=dev),
            block_tables=tables,
            max_q=max(b - a for a, b in zip(cu, cu[1:])),
        ))

    def _commit(self, out, plans, sampled):
        results, before = [], {}
        for p in plans:
            req = p.request
            before[req.req_id] = len(req.output_ids)
            new = sampled[req.req_id][1] if req.req_id in sampled else []
            results.append(RequestResult(req.req_id, new))
            if p.draft_row >= 0:
                self.states[req.req_id].spec.record(p.num_draft, sampled[req.req_id][0])
        finished = self.scheduler.update(out, results)
        done = {r.req_id for r in finished}
        outputs = []
        for p in plans:
            req, state = p.request, self.states[p.request.req_id]
            new = req.output_ids[before[req.req_id]:]
            if new or req.req_id in done:
                outputs.append(self._output(req, state, new, req.req_id in done))
            state.new_logprobs = []
            if req.req_id in done:
                self._forget(req.req_id)
        return outputs, finished

    def _output(self, req: Request, state: _State, new: list[int], finished: bool
                ) -> RequestOutput:
        """What the caller gets for one request this step (logprobs only when asked)."""
        spec = state.spec.to_dict() if finished and self.draft_worker is not None else None
        output = RequestOutput(req.req_id, new, finished, req.finish_reason, spec)
        if state.params.logprobs is not None:
            output.logprobs = state.new_logprobs[: len(new)]
        if state.params.prompt_logprobs is not None and not state.prompt_delivered:
            output.prompt_logprobs = [None] + [
                state.prompt_scores[i] for i in range(len(req.prompt_ids) - 1)]
            state.prompt_delivered = True
        return output

    def _stats(self, out, plans, drafts, sampled, finished, num_verify, times) -> StepStats:
        t0, t_sched, t_draft, t_budget, t_verify, t_sample, t_end = times
        width = max(self.gamma, 1)
        hist = [0] * (width + 1)
        per_pos = [0] * width
        drafted = [p for p in plans if p.draft_row >= 0]
        accepted_total = 0
        for p in drafted:
            hist[p.num_draft] += 1
            a = sampled[p.request.req_id][0]
            accepted_total += a
            for k in range(a):
                per_pos[k] += 1
        return StepStats(
            step=self.step_count,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_scheduled_requests=len(plans),
            num_prefill_tokens=sum(len(p.fed) for p in plans if p.prefill),
            num_decode_requests=sum(1 for p in plans if not p.prefill),
            num_drafts=len(drafted),
            num_draft_tokens=int(drafts.tokens.shape[1]) * len(drafted) if drafts else 0,
            verify_budget=sum(p.num_draft for p in drafted),
            num_accepted_tokens=accepted_total,
            num_output_tokens=sum(len(v[1]) for v in sampled.values()),
            num_verify_tokens=num_verify,
            num_scheduled_tokens=out.num_scheduled_tokens,
            ell_histogram=hist,
            accepted_per_position=per_pos,
            num_preempted=len(out.preempted),
            num_finished=len(finished),
            num_errors=self.num_errors,
            free_blocks=self.blocks.num_free_blocks,
            step_time=t_end - t0,
            time_schedule=t_sched - t0,
            time_draft=t_draft - t_sched,
            time_budget=t_budget - t_draft,
            time_verify=t_verify - t_budget,
            time_sample=t_sample - t_verify,
            time_update=t_end - t_sample,
        )

    # ------------------------------------------------------------------ convenience
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        stop_ids: Iterable[int] = (),
    ) -> list[list[int]]:
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


def target_probs_batch(
    logits: torch.Tensor,  # [M, V]
    temperatures: torch.Tensor,  # [M] per row
    top_ps: list[float],  # per request
    rows_per: list[int],  # rows of each request, summing to M
) -> torch.Tensor:  # [M, V]
    """The target's distribution at every logit row: one-hot argmax at temperature 0,
    ``softmax(logits / T)`` restricted to the top-p nucleus otherwise."""
    logits = logits.float()
    greedy = temperatures <= 0
    one_hot = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    if bool(greedy.all()):
        return one_hot
    temp = torch.where(greedy, torch.ones_like(temperatures), temperatures)
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temp[:, None], -1)
    probs = torch.where(greedy[:, None], one_hot, probs)
    start = 0
    for top_p, n in zip(top_ps, rows_per):
        if top_p < 1.0 and not bool(greedy[start]):
            probs[start : start + n] = sampling_probs(
                logits[start : start + n], float(temperatures[start]), top_p
            )
        start += n
    return probs
