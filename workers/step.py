"""The values one engine step carries between its stages (definitions only; each is made
once by its owner and read by the next stage):

- ``StepSeq``: one scheduled request in this step (the engine, from the scheduler output);
- ``DraftProposal``: what the drafter proposed, for which requests, with which caps
  (``DraftWorker.propose_step``);
- ``SeqRows``: where a request's rows sit in the verify batch (``ModelRunner.verify``);
- ``Verified``: what verification committed (``sampling.sample_step``);
- ``RequestState`` / ``RequestOutput``: a live request's bookkeeping, and what a step
  returns for it.
"""

from __future__ import annotations

import array
from dataclasses import dataclass, field

import torch

from dspark.kernels.transfer import to_device
from dspark.models.generation import SamplingParams, TokenLogprob
from dspark.workers.draft_vocab import DraftVocab
from dspark.workers.gate import DraftRecord
from dspark.workers.sampling import RequestSampling
from dspark.workers.scheduler import Request, ScheduledRequest
from dspark.workers.stats import SpecStats


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
    error: str | None = None
    """On a request the engine failed (finish reason ``error: ...``): the exception's type."""


@dataclass
class RequestState:
    """The engine's bookkeeping of one live request (dropped when it finishes)."""

    sampling: RequestSampling
    spec: SpecStats
    prompt_scores: dict[int, TokenLogprob] = field(default_factory=dict)
    """Prompt position -> score of the token there (kept across preemption)."""
    prompt_delivered: bool = False
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    """This step's logprobs of the committed tokens (consumed by the commit)."""
    drafting: DraftRecord = field(default_factory=DraftRecord)
    """Its recent drafting record, which the draft gate reads."""
    light_drafting: DraftRecord = field(default_factory=DraftRecord)
    """Its record with the engine's light drafter (``Engine``'s ``light_drafter``)."""

    @classmethod
    def create(cls, params: SamplingParams, fallback_seed: int, gamma: int) -> RequestState:
        return cls(RequestSampling.create(params, fallback_seed), SpecStats(max(gamma, 1)))

    @property
    def params(self) -> SamplingParams:
        return self.sampling.params

    @property
    def scores_prompt(self) -> bool:
        return self.params.prompt_logprobs is not None and not self.prompt_delivered

    def output(self, req: Request, new: list[int], finished: bool, speculative: bool
               ) -> RequestOutput:
        """What the caller gets this step (logprobs only when asked)."""
        spec = self.spec.to_dict() if finished and speculative else None
        out = RequestOutput(req.req_id, new, finished, req.finish_reason, spec)
        if self.params.logprobs is not None:
            out.logprobs = self.new_logprobs[: len(new)]
        if self.params.prompt_logprobs is not None and not self.prompt_delivered:
            out.prompt_logprobs = [None] + [
                self.prompt_scores[i] for i in range(len(req.prompt_ids) - 1)]
            self.prompt_delivered = True
        return out


@dataclass(frozen=True)
class StepSeq:
    """One scheduled request in this step."""

    row: int
    """Its row in the step's block tables."""
    item: ScheduledRequest
    request: Request
    state: RequestState
    start: int
    """Position of the first fed token."""
    known: list[int]
    """Known tokens fed: a prompt chunk, or the anchor (the newest committed token)."""
    prefill: bool
    samples: bool
    """A token is drawn for it this step (decoding, or the chunk that ends the prompt)."""

    @classmethod
    def create(cls, row: int, item: ScheduledRequest, req: Request, state: RequestState
               ) -> StepSeq:
        start = req.num_computed_tokens
        if req.is_prefill:
            known = req.all_ids[start : start + item.num_new_tokens]
            return cls(row, item, req, state, start, known,
                       True, start + len(known) == req.num_tokens)
        last = req.output_ids[-1] if req.output_ids else req.prompt_ids[-1]
        return cls(row, item, req, state, start, [last], False, True)

    @property
    def first_position(self) -> int:
        """Position of the first token drawn for it this step."""
        return self.request.num_tokens

    @property
    def scores(self) -> bool:
        """Every row of this prefill chunk scores the prompt token after it."""
        return self.prefill and self.state.scores_prompt


@dataclass(frozen=True)
class DraftProposal:
    """What the drafter proposed this step, one row per drafted request."""

    seqs: list[StepSeq]
    caps: list[int]
    """Drafts each request may verify (its lookahead, its remaining max_tokens)."""
    tokens: torch.Tensor  # [R, n]
    probs: torch.Tensor  # [R, n, V] the distribution each draft was drawn from
    conf_logits: torch.Tensor | None  # [R, n] raw confidence logits (DSpark)
    vocab: DraftVocab | None = None
    """The draft vocabulary ``probs`` is over ([R, n, N]); None: the whole vocabulary."""
    light: bool = False
    """Drafted by the engine's light drafter (its own gate, every draft verified)."""


def block_tables(blocks, seqs: list[StepSeq], device) -> torch.Tensor:
    """The step's block tables [R, max_blocks] (fixed until the commit)."""
    rows = [blocks.table(s.request.req_id).block_ids for s in seqs]
    width = max(len(r) for r in rows)
    # NOTE: the ids pass through one flat array (a C loop): torch.tensor of a list of
    # lists costs about five times as much at 32 requests
    flat = array.array("q")
    for r in rows:
        flat.extend(r)
        flat.extend([0] * (width - len(r)))
    if not flat:
        return torch.zeros(len(rows), 0, dtype=torch.long, device=device)
    return to_device(torch.frombuffer(flat, dtype=torch.long).view(len(rows), width), device)


@dataclass(frozen=True)
class Verified:
    """What verification committed this step."""

    new_tokens: dict[str, list[int]]
    """Per sampling request: accepted drafts + the recovered/bonus (or first) token."""
    num_accepted: dict[str, int]
    num_tokens: int
    """Rows of the target forward."""


@dataclass
class SeqRows:
    """Where one request's rows sit in the verify batch and its logits (laid out by the
    model runner)."""

    seq: StepSeq
    fed: list[int]
    drafts: list[int]
    logit_start: int = 0
    num_scored: int = 0


