"""The engine's configuration: one frozen dataclass, validated with errors that name the
field and its allowed range."""

from __future__ import annotations

from dataclasses import dataclass

from dspark.workers.modes import BudgetMode


@dataclass(frozen=True)
class EngineConfig:
    budget: BudgetMode = BudgetMode.FIXED
    """Verification budget (``BudgetMode``): fixed, threshold, algorithm1, topk, or cluster
    (Algorithm 1 with SPS evaluated at this replica's tokens plus what the rest of its
    expert-parallel group schedules)."""
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
    """Seeds unseeded requests' generators (the i-th request added gets seed + i)."""
    draft_gating: bool = True
    """algorithm1/topk/cluster only: per step and per request, draft only for the requests
    whose recent acceptance pays for their drafting and verification at this step's load
    (``dspark.workers.gate``)."""
    draft_margin: float = 1.05
    """The gate drafts only when drafting promises this many times the step's throughput
    without it (>= 1; ``inf``: nobody drafts but the gate's probes)."""
    draft_prior: float = 4.0
    """Pseudo-count of the engine-wide acceptance in each request's gain estimate: the gate
    prices a request at ``(n * own + prior * engine) / (n + prior)``, n its drafted steps
    (at most its EWMA's memory). 0: its own record alone, however few steps it holds
    (docs/engine.md: 2 lifted the worst cell of the benchmark from 0.87 to 0.94; 4 with
    the longer memories of session 13)."""
    draft_arms: bool = True
    """With the cost gate: in steps without a prefill chunk, measure per load (decoding
    requests, by powers of two) the tokens per second of steps where everyone drafted and
    of steps where nobody did, and draft for everyone while that measures faster
    (``dspark.workers.gate.LoadArms``); False: the per-request cost gate alone, as until
    session 14."""
    probe_every: int = 8
    """A request not drafted for this many decoding steps is stale: the gate probes it (a
    few per step, backing off while nobody is worth drafting) to refresh its record."""
    online_costs: str = "ratio"
    """How the engine's step times refine the profiled cost tables: ``ratio`` (the
    profile's shape, the observed level per bucket; buckets never observed take the
    nearest observed one's) or ``times`` (the observed times per bucket, as until
    2026-12-02: a table that goes flat when small batches run slow)."""
    draft_with_prefill: bool = False
    """With the cost gate: whether a step that carries a prefill chunk may draft. False
    (since session 14): such a step drafts for nobody, so a new request's first token
    waits for a plain step (a drafted one costs about twice as much here); True: the gate
    prices it as any step, with ``prefill_weight``."""
    draft_vocab: int = 2048
    """Parallel drafters (DSpark, DFlash) draft among this many of the target's most often
    generated tokens (the ranking in the drafter's ``draft_vocab.json``), which cuts their
    LM head and Markov head to that share of the vocabulary; 0, or a drafter without a
    ranking: the whole vocabulary. Lossless either way (q is zero outside them)."""
    draft_fit: bool = True
    """In steps of 8 or more decoding requests, a proposal drafts as many slots as its
    requests are expected to verify, plus one (``lanes.fitted_slots``): a parallel
    drafter's last layer runs those slots only, an autoregressive one drafts fewer steps.
    False: every proposal drafts γ (as until session 28). Lossless either way: fewer
    drafts, the same tokens for greedy and seeded requests and the same distribution for
    the others."""
    cuda_graphs: bool = False
    """Decode and verify forwards (no prefill chunk) padded to buckets of requests, query
    rows and context blocks, each bucket replayed from a CUDA graph captured at its first
    batch (``dspark.workers.graphs``). A CUDA target only, and not with expert
    parallelism. Off by default until the GPU check has measured it in the engine."""
    phase_sync: bool = False
    """A diagnostic: on a GPU, wait for the device at the end of every stage of a step, so
    that each stage's time in ``StepStats`` is its whole cost (its kernels' run included,
    not only their launch). It makes every step slower; off when serving."""
    prefill_weight: float = 1.0
    """How many decoding requests a prefilling request counts as in the step's cost model
    (the gate and the budget): a longer step delays its first token as it delays their next
    one; above 1, first tokens matter more than throughput (>= 0). With the cost gate it
    acts only where ``draft_with_prefill`` lets a step that prefills draft."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", BudgetMode.parse(self.budget))
        if self.num_speculative_tokens is not None and not 1 <= self.num_speculative_tokens <= 32:
            raise ValueError(
                f"num_speculative_tokens must be in [1, 32], got {self.num_speculative_tokens}"
            )
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        for name in ("block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.draft_margin >= 1.0:
            raise ValueError(f"draft_margin must be >= 1.0, got {self.draft_margin}")
        if not self.draft_prior >= 0.0:
            raise ValueError(f"draft_prior must be >= 0, got {self.draft_prior}")
        if not self.prefill_weight >= 0.0:
            raise ValueError(f"prefill_weight must be >= 0, got {self.prefill_weight}")
        if self.online_costs not in ("ratio", "times"):
            raise ValueError(f"online_costs must be 'ratio' or 'times', got {self.online_costs!r}")
        if self.draft_vocab < 0:
            raise ValueError(f"draft_vocab must be >= 0 (0: the whole vocabulary), got "
                             f"{self.draft_vocab}")
        if self.probe_every < 1:
            raise ValueError(f"probe_every must be >= 1, got {self.probe_every}")
        if not self.profile_batch_sizes or min(self.profile_batch_sizes) < 1:
            raise ValueError("profile_batch_sizes must be a non-empty tuple of sizes >= 1")

    @property
    def gates_drafting(self) -> bool:
        """The cost gate runs (a budget that weighs step costs, with gating on)."""
        return self.draft_gating and self.budget in (
            BudgetMode.ALGORITHM1, BudgetMode.TOPK, BudgetMode.CLUSTER)

    def check_drafter(self, drafter, target) -> None:
        """A drafter this configuration cannot run with is a configuration error."""
        if drafter is None:
            return
        drafter.config.check_target(target.config)
        if self.budget.needs_confidence and getattr(drafter, "confidence", None) is None:
            raise ValueError(
                f"budget {self.budget.value!r} needs a drafter with a confidence head "
                f"(dspark); {drafter.config.method} has none: use budget='fixed'")

    def check_light_drafter(self, light, drafter, target) -> None:
        """A light drafter (``Engine``'s ``light_drafter``) is a one-slot MTP-1 beside a
        main drafter, under the cost gate that decides when each drafts."""
        if light is None:
            return
        light.config.check_target(target.config)
        if light.config.method != "mtp":
            raise ValueError(f"light_drafter must be an mtp drafter (one slot), got "
                             f"{light.config.method}")
        if drafter is None or drafter.config.method == "mtp":
            raise ValueError("light_drafter needs a main drafter other than mtp")
        if not self.gates_drafting:
            raise ValueError("light_drafter needs the cost gate (draft_gating with budget "
                             "algorithm1, topk or cluster)")

    def gamma(self, drafter) -> int:
        """Drafts proposed per request per step (0 without a drafter)."""
        if drafter is None:
            return 0
        block = drafter.config.block_size
        return min(self.num_speculative_tokens or block, block)

    def verify_profile_sizes(self) -> list[int]:
        return [b for b in self.profile_batch_sizes if b <= self.max_num_batched_tokens] or [1]

    def draft_profile_sizes(self) -> list[int]:
        return [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= self.max_num_seqs]
