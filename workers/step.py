"""What one engine step carries between its stages, and the drafting and verification
stages themselves.

- ``StepSeq``: one scheduled request in this step (made once from the scheduler output);
- ``DraftProposal``: what the drafter proposed, for which requests, with which caps;
- ``Verifier.verify``: lays the verify batch out, runs the target, applies each request's
  logit modifiers, scores prompts, and asks ``dspark.workers.sampling`` for the committed
  tokens; then writes the drafter K/V of the committed positions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dspark.models.generation import SamplingParams, TokenLogprob, process_logits, token_logprobs
from dspark.workers.budget import VerificationPlan
from dspark.workers.drafting import DraftWorker, ExtendBatch
from dspark.workers.model_runner import ModelRunner, VerifyBatch
from dspark.workers.sampling import RequestSampling, draft_noise, target_probs, verify
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
        return cls(row, item, req, state, start, [req.all_ids[-1]], False, True)

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


def block_tables(blocks, seqs: list[StepSeq], device) -> torch.Tensor:
    """The step's block tables [R, max_blocks] (fixed until the commit)."""
    rows = [blocks.table(s.request.req_id).block_ids for s in seqs]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)


def propose(worker: DraftWorker, decoding: list[StepSeq], tables: torch.Tensor
            ) -> DraftProposal | None:
    """Draft for every decoding request that can use drafts this step."""
    caps = []
    for s in decoding:
        remaining = s.request.max_tokens - len(s.request.output_ids)
        # NOTE: a prefix-cache hit can leave a request decoding before the drafter has seen
        # any of its rows; it drafts from the next step on
        ready = worker.ready(s.request.req_id)
        caps.append(max(0, min(s.item.num_lookahead, remaining - 1)) if ready else 0)
    chosen = [(s, c) for s, c in zip(decoding, caps) if c > 0]
    if not chosen:
        return None
    seqs, caps = [s for s, _ in chosen], [c for _, c in chosen]
    device, cfg = tables.device, worker.config
    noise = draft_noise([s.state.sampling for s in seqs], [s.first_position for s in seqs],
                        cfg.block_size, cfg.vocab_size, device)
    out = worker.propose(
        [s.request.req_id for s in seqs],
        torch.tensor([s.known[0] for s in seqs], device=device),
        torch.tensor([s.start for s in seqs], device=device),
        tables.index_select(0, torch.tensor([s.row for s in seqs], device=device)),
        max(caps),
        torch.tensor([s.state.params.temperature for s in seqs], device=device),
        noise.uniforms,
        noise,
    )
    return DraftProposal(seqs, caps, out.tokens, out.probs, out.conf_logits)


@dataclass(frozen=True)
class Verified:
    """What verification committed this step."""

    new_tokens: dict[str, list[int]]
    """Per sampling request: accepted drafts + the recovered/bonus (or first) token."""
    num_accepted: dict[str, int]
    num_tokens: int
    """Rows of the target forward."""


@dataclass
class _Layout:
    """Where one request's rows sit in the verify batch and its logits."""

    seq: StepSeq
    fed: list[int]
    drafts: list[int]
    logit_start: int = 0
    num_scored: int = 0


class Verifier:
    def __init__(self, runner: ModelRunner, draft_worker: DraftWorker | None) -> None:
        self.runner, self.draft_worker = runner, draft_worker

    def verify(self, seqs: list[StepSeq], proposal: DraftProposal | None,
               plan: VerificationPlan | None, tables: torch.Tensor, clock: list) -> Verified:
        layout = self._layout(seqs, proposal, plan)
        batch = self._batch(layout, tables)
        result = self.runner.forward(batch)
        clock.append(_now())
        self._score_prompts(layout, result.logits)
        new_tokens, accepted = self._sample(layout, proposal, result.logits)
        clock.append(_now())
        if self.draft_worker is not None:
            self._extend(layout, new_tokens, result.features, tables)
        return Verified(new_tokens, accepted, batch.num_tokens)

    @staticmethod
    def _layout(seqs, proposal, plan) -> list[_Layout]:
        drafted = {}
        if proposal is not None:
            tokens = proposal.tokens.tolist()
            drafted = {s.row: tokens[i][:n]
                       for i, (s, n) in enumerate(zip(proposal.seqs, plan.lengths))}
        return [_Layout(s, s.known + drafted.get(s.row, []), drafted.get(s.row, []))
                for s in seqs]

    def _batch(self, layout: list[_Layout], tables: torch.Tensor) -> VerifyBatch:
        ids, positions, cu, seq_lens, logit_rows = [], [], [0], [], []
        for lay in layout:
            s, row0 = lay.seq, len(ids)
            ids += lay.fed
            positions += range(s.start, s.start + len(lay.fed))
            cu.append(len(ids))
            seq_lens.append(s.start + len(lay.fed))
            lay.logit_start = len(logit_rows)
            if s.scores:
                # NOTE: every row of the chunk scores the prompt token after it; the last
                # row of the final chunk is also the one the first token is drawn from
                lay.num_scored = len(lay.fed) - (1 if s.samples else 0)
                logit_rows += range(row0, len(ids))
            elif s.samples:
                first = row0 + len(lay.fed) - 1 if s.prefill else row0
                logit_rows += range(first, len(ids))
        dev = tables.device
        return VerifyBatch(
            input_ids=torch.tensor(ids, device=dev),
            positions=torch.tensor(positions, device=dev),
            cu_q=torch.tensor(cu, device=dev),
            block_tables=tables,
            seq_lens=torch.tensor(seq_lens, device=dev),
            max_q=max(len(lay.fed) for lay in layout),
            logit_rows=torch.tensor(logit_rows, device=dev, dtype=torch.long),
        )

    @staticmethod
    def _score_prompts(layout: list[_Layout], logits: torch.Tensor) -> None:
        """Record the target's log-probability of every prompt token a chunk's rows
        predict."""
        for lay in layout:
            s = lay.seq
            if not s.scores:
                continue
            state, prompt = s.state, s.request.prompt_ids
            wanted = [k for k in range(len(lay.fed))
                      if s.start + k + 1 < len(prompt) and s.start + k not in state.prompt_scores]
            if not wanted:
                continue
            index = torch.tensor([lay.logit_start + k for k in wanted], device=logits.device)
            scores = token_logprobs(logits.index_select(0, index),
                                    [prompt[s.start + k + 1] for k in wanted],
                                    state.params.prompt_logprobs)
            for k, score in zip(wanted, scores):
                state.prompt_scores[s.start + k] = score

    def _sample(self, layout, proposal, logits):
        sampling = [lay for lay in layout if lay.seq.samples]
        if not sampling:
            return {}, {}
        rows_per = [len(lay.drafts) + 1 for lay in sampling]
        if any(lay.num_scored for lay in layout):  # keep only the rows tokens are drawn from
            keep = [lay.logit_start + lay.num_scored + k
                    for lay, n in zip(sampling, rows_per) for k in range(n)]
            logits = logits.index_select(0, torch.tensor(keep, device=logits.device))
        raw = logits  # [M, V] what logprobs report
        logits = _process(sampling, logits, rows_per)
        samplers = [lay.seq.state.sampling for lay in sampling]
        probs = target_probs(logits, samplers, rows_per)
        draft_probs = _draft_probs(sampling, proposal, probs)
        out = verify(samplers, [lay.seq.first_position for lay in sampling], probs,
                     [lay.drafts for lay in sampling], draft_probs)
        start = 0
        for lay, n, ids in zip(sampling, rows_per, out.output_ids):
            state = lay.seq.state
            if state.params.logprobs is not None:
                state.new_logprobs = token_logprobs(raw[start : start + len(ids)], ids,
                                                    state.params.logprobs)
            start += n
        ids = [lay.seq.request.req_id for lay in sampling]
        return dict(zip(ids, out.output_ids)), dict(zip(ids, out.num_accepted))

    def _extend(self, layout, new_tokens, features, tables) -> None:
        """Write the drafter K/V of the positions committed this step."""
        rows, next_ids, positions, cu, req_ids = [], [], [], [0], []
        offset = 0
        for lay in layout:
            s = lay.seq
            req = s.request
            new = new_tokens.get(req.req_id, [])
            if s.prefill:
                num = len(lay.fed)
                following = req.all_ids[s.start + 1 : s.start + num + 1] + new[:1]
            else:
                num, following = len(new), new
            rows += range(offset, offset + num)
            next_ids += following[:num]
            positions += range(s.start, s.start + num)
            cu.append(len(rows))
            req_ids.append(req.req_id)
            offset += len(lay.fed)
        dev = tables.device
        self.draft_worker.extend(ExtendBatch(
            req_ids=req_ids,
            features=features[torch.tensor(rows, device=dev)],
            next_ids=torch.tensor(next_ids, device=dev),
            positions=torch.tensor(positions, device=dev),
            cu=torch.tensor(cu, device=dev),
            block_tables=tables,
            max_q=max(b - a for a, b in zip(cu, cu[1:])),
        ))


def _process(sampling: list[_Layout], logits: torch.Tensor, rows_per) -> torch.Tensor:
    """Apply each request's penalties, bias and min_tokens at every verified position
    (the drafts before a position count as generated there)."""
    if not any(lay.seq.state.params.modifies_logits for lay in sampling):
        return logits
    logits, start = logits.clone(), 0
    for lay, n in zip(sampling, rows_per):
        params, req = lay.seq.state.params, lay.seq.request
        if params.modifies_logits:
            logits[start : start + n] = process_logits(
                logits[start : start + n], params, req.output_ids, lay.drafts, req.stop_ids)
        start += n
    return logits


def _draft_probs(sampling, proposal, probs) -> torch.Tensor:
    """[sum ℓ_r, V] the distribution each verified draft was drawn from."""
    if proposal is None or not sum(len(lay.drafts) for lay in sampling):
        return probs.new_zeros(0, probs.shape[-1])
    index = {s.row: i for i, s in enumerate(proposal.seqs)}
    return torch.cat([proposal.probs[index[lay.seq.row], : len(lay.drafts)]
                      for lay in sampling if lay.drafts])


def _now() -> float:
    return time.perf_counter()
