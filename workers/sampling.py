"""Sampling: every random draw a request makes, and the rule that turns the target's
distributions and the drafts into committed tokens. This module is the one owner of the
per-request random order that losslessness rests on; nothing else draws for a request.

How a request samples is fixed when it is added (``RequestSampling.create``):
- *greedy* (temperature 0): no randomness. A draft is accepted while it equals the target's
  argmax; the output equals greedy decoding token for token.
- *coupled* (a request with a ``seed``, temperature > 0): no random stream at all. The noise
  of token position p is ``position_gumbel(seed, p)``, a vector over the vocabulary that
  depends on nothing else. The token committed at p is the target's Gumbel-max sample
  ``argmax(log p_target + noise)`` (an exact sample of the target), a draft is accepted iff
  it equals that token, and the drafter draws its token at p as ``argmax(log q + noise)``
  with the same noise, which is what makes drafts match often (drafter-invariant coupling,
  Daliri et al.). The text is a function of (seed, prompt, target): the same whatever the
  drafter, the budget, the batch, the load and the replica, and the same as decoding with
  no drafter (``dspark.models.generation.generate_tokens``).
- *rejection* (no seed, temperature > 0): standard speculative rejection sampling from the
  request's own ``torch.Generator`` (seeded from the engine's seed and the request's
  arrival). Each step draws, in this order: when the request drafts, K draft uniforms (K:
  the drafter's block size, whatever ℓ_r turns out to be), then ℓ_r acceptance uniforms
  (draft k survives iff ``u_k < min(1, p(d_k) / q(d_k))`` and every earlier one did), then
  one token uniform (the recovered token from ``normalize(max(p - q, 0))`` after a
  rejection, else the bonus token from p). Exact in distribution; its text depends on ℓ_r.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from dspark.kernels.accept import accepted_lengths
from dspark.kernels.markov_sample import sample_rows
from dspark.kernels.row_argmax import row_argmax
from dspark.kernels.transfer import device_tensor
from dspark.models.generation import (
    SamplingParams,
    draw_softmax,
    gumbel_max,
    inverse_cdf,
    position_gumbel,
    process_logits,
    sampling_probs,
    softmax_rows,
    token_logprobs,
)

if TYPE_CHECKING:  # NOTE: step.py imports this module at run time
    from dspark.workers.step import DraftProposal, SeqRows


class UniformStream:
    """A rejection-sampling request's uniforms: its generator's draws, in order, fetched
    ``CHUNK`` at a time. A CPU generator gives the same numbers in the same order however
    its draws are split, so this is the stream of drawing them one by one, without a
    tensor operation per request per step."""

    CHUNK = 64

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self._ahead: list[float] = []
        self._next = 0

    def take(self, num: int) -> list[float]:
        """The stream's next ``num`` uniforms in [0, 1)."""
        if self._next + num > len(self._ahead):
            fresh = torch.rand(max(self.CHUNK, num), generator=self.generator).tolist()
            self._ahead, self._next = self._ahead[self._next :] + fresh, 0
        out = self._ahead[self._next : self._next + num]
        self._next += num
        return out


@dataclass(frozen=True)
class RequestSampling:
    """How one request draws its tokens (made once, when the request is added)."""

    params: SamplingParams
    seed: int
    """The request's seed, or the engine's seed for its arrival when it gave none."""
    stream: UniformStream | None
    """The rejection-sampling stream (None for greedy and coupled requests)."""

    greedy: bool = field(init=False)
    """Temperature 0."""
    coupled: bool = field(init=False)
    """A seeded request sampled at a temperature above 0."""
    batched: bool = field(init=False)
    """Sampled from a plain softmax (no seed, no top-p): its rows share one batched
    softmax."""
    modifies_logits: bool = field(init=False)

    def __post_init__(self) -> None:
        # NOTE: fixed for the request's life; read several times per request per step
        p = self.params
        object.__setattr__(self, "greedy", p.temperature == 0.0)
        object.__setattr__(self, "coupled", not self.greedy and p.seed is not None)
        object.__setattr__(self, "batched", not (self.greedy or self.coupled or p.top_p < 1.0))
        object.__setattr__(self, "modifies_logits", p.modifies_logits)

    @classmethod
    def create(cls, params: SamplingParams, fallback_seed: int) -> RequestSampling:
        seed = params.seed if params.seed is not None else fallback_seed
        stream = None
        if params.temperature > 0 and params.seed is None:
            stream = UniformStream(torch.Generator(device="cpu").manual_seed(seed))
        return cls(params, seed, stream)


@dataclass(frozen=True)
class DraftNoise:
    """What the drafter draws its tokens with, one row per drafting request."""

    uniforms: torch.Tensor  # [R, K] inverse-CDF draws (rejection rows; zeros otherwise)
    gumbel: torch.Tensor | None  # [R, K, V] position noise of coupled rows (zeros in other
    # rows); None when no row couples
    coupled: torch.Tensor  # [R] bool


def draft_noise(samplers: Sequence[RequestSampling], first_positions: Sequence[int],
                block: int, vocab: int, device, slots: int | None = None) -> DraftNoise:
    """The noise of the draft slots after each request's anchor; slot k drafts the token at
    ``first_positions[r] + k``. Rejection rows draw all K = ``block`` uniforms (the
    documented order); the position noise of coupled rows is computed on ``device`` for the
    first ``slots`` slots only (the ones drafted this step)."""
    slots = block if slots is None else slots
    draws = [s.stream.take(block) if s.stream is not None else [0.0] * block
             for s in samplers]
    uniforms = device_tensor(draws, device).view(len(samplers), block)
    coupled = [s.coupled for s in samplers]
    gumbel = None
    if any(coupled):
        rows = [r for r, c in enumerate(coupled) if c]
        seeds = device_tensor([samplers[r].seed for r in rows], device)
        positions = device_tensor([first_positions[r] for r in rows], device)
        positions = (positions[:, None] + torch.arange(slots, device=device)).reshape(-1)
        gumbel = torch.zeros(len(samplers), slots, vocab, device=device)
        gumbel[device_tensor(rows, device)] = position_gumbel(
            seeds.repeat_interleave(slots), positions, vocab).view(len(rows), slots, vocab)
    return DraftNoise(uniforms, gumbel, device_tensor(coupled, device))


def draw_drafts(logits: torch.Tensor, temperatures: torch.Tensor, uniforms: torch.Tensor,
                noise: DraftNoise | None, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft slot ``slot`` of every row: logits [R, V] -> tokens [R], their distribution
    [R, V]. Rows invert the CDF at ``uniforms``; coupled rows take the Gumbel-max under
    their position noise instead (greedy rows the argmax)."""
    tokens, probs = sample_rows(logits, temperatures, uniforms)
    if noise is not None and noise.gumbel is not None:
        coupled = gumbel_max(probs, noise.gumbel[:, slot])
        tokens = torch.where(noise.coupled, coupled, tokens)
    return tokens, probs


def target_probs(
    logits: torch.Tensor,  # [M, V]
    samplers: Sequence[RequestSampling],  # one per request
    rows_per: Sequence[int],  # rows of each request, summing to M
    top: torch.Tensor | None = None,  # [M] the argmax of every row, when known
) -> torch.Tensor:  # [M, V]
    """The target's distribution at every logit row: one-hot argmax at temperature 0,
    ``softmax(logits / T)`` restricted to the top-p nucleus otherwise.

    NOTE: coupled rows go through ``sampling_probs`` one request at a time, the very
    arithmetic of plain decoding, so a seeded text is bit-for-bit the same; the other
    sampled rows without top-p share one batched softmax."""
    logits = logits.float()
    if any(s.greedy for s in samplers):
        top = row_argmax(logits) if top is None else top
        probs = torch.zeros_like(logits).scatter_(-1, top[:, None], 1.0)
        if all(s.greedy for s in samplers):
            return probs
    else:  # NOTE: every row is written below
        probs = torch.empty_like(logits)
    start, batched, temps = 0, [], []
    for s, n in zip(samplers, rows_per):
        if s.batched:
            batched += range(start, start + n)
            temps += [s.params.temperature] * n
        elif not s.greedy:
            probs[start : start + n] = sampling_probs(
                logits[start : start + n], s.params.temperature, s.params.top_p)
        start += n
    if batched:
        if len(batched) == logits.shape[0]:  # every row: no gather, no scatter
            return softmax_rows(logits, temps)
        rows = device_tensor(batched, logits.device)
        probs.index_copy_(0, rows, softmax_rows(logits.index_select(0, rows), temps))
    return probs


@dataclass(frozen=True)
class RejectionOutput:
    """What verification committed for each sampling request."""

    num_accepted: list[int]
    output_ids: list[list[int]]
    """Accepted drafts + the recovered/bonus token."""


HOST_MAX_DRAFTS = 128
"""Most drafts in a step that ``verify`` checks on the host path: above, the tensor path's
fixed operations cost less than the host's Python per draft (``python -m
dspark.bench.host_ops``: 64 requests x 3 drafts 0.73 ms tensor, 0.76 ms host)."""


def verify(
    samplers: Sequence[RequestSampling],  # [R]
    first_positions: Sequence[int],  # [R] position of the token each request's row 0 draws
    probs: torch.Tensor,  # [sum(ℓ_r) + R, V] target distributions, ℓ_r + 1 rows each
    draft_ids: Sequence[Sequence[int]],  # [R] the ℓ_r verified drafts
    draft_probs: torch.Tensor,  # [sum(ℓ_r), V] the distribution each draft was drawn from
    argmax: torch.Tensor | None = None,  # [sum(ℓ_r) + R] of ``probs``' rows, when known
) -> RejectionOutput:
    """Accept a prefix of every request's drafts and draw its next token (module doc): on
    the CPU, up to ``HOST_MAX_DRAFTS`` drafts and without coupled requests, by
    ``verify_host``; else by ``verify_tensors``."""
    num = sum(len(d) for d in draft_ids)
    if (probs.device.type == "cpu" and 0 < num <= HOST_MAX_DRAFTS
            and not any(s.coupled for s in samplers)):
        return verify_host(samplers, probs, draft_ids, draft_probs, argmax)
    return verify_tensors(samplers, first_positions, probs, draft_ids, draft_probs, argmax)


def verify_tensors(
    samplers: Sequence[RequestSampling],
    first_positions: Sequence[int],
    probs: torch.Tensor,
    draft_ids: Sequence[Sequence[int]],
    draft_probs: torch.Tensor,
    argmax: torch.Tensor | None = None,
) -> RejectionOutput:
    """``verify`` in tensor operations (every device, coupled requests included)."""
    device, num_req = probs.device, len(samplers)
    lens = [len(d) for d in draft_ids]
    chosen = _deterministic_tokens(samplers, first_positions, probs, lens, argmax)  # [M]
    if not any(lens):
        return _plain(samplers, probs, chosen)
    cu = device_tensor([0, *lens], device).cumsum(0)  # [R + 1] drafts before each
    starts = cu[:-1] + torch.arange(num_req, device=device)  # [R] its first target row
    flat = device_tensor([t for d in draft_ids for t in d], device, torch.long)
    req_of = torch.repeat_interleave(torch.arange(num_req, device=device),
                                     device_tensor(lens, device, torch.long),
                                     output_size=sum(lens))
    target_row = torch.arange(flat.numel(), device=device) + req_of  # [D]
    deterministic = device_tensor([s.stream is None for s in samplers], device)
    # NOTE: deterministic rows accept iff the draft is the target's token (uniform 0 < 1)
    match = (flat == chosen.index_select(0, target_row)).float()
    vocab = probs.shape[-1]
    ratio = _flat(probs, target_row * vocab + flat) / _flat(draft_probs, torch.arange(
        flat.numel(), device=device) * vocab + flat).clamp_min(1e-8) if flat.numel() else match
    ratio = torch.where(deterministic[req_of], match, ratio.clamp(max=1.0))
    random = [i for i, s in enumerate(samplers) if s.stream is not None]
    # NOTE: deterministic rows compare 0 < match
    uniforms = [u for s, n in zip(samplers, lens)
                for u in (s.stream.take(n) if s.stream is not None else [0.0] * n)]
    accepted = accepted_lengths(ratio, device_tensor(uniforms, device), cu, max(lens))  # [R]
    tokens = chosen[starts + accepted]
    if random:
        tokens = torch.where(deterministic, tokens, _random_tokens(
            samplers, probs, draft_probs, starts, accepted, cu, lens))
    accepted_l, tokens_l = torch.stack([accepted, tokens]).tolist()  # NOTE: one read-back
    return RejectionOutput(
        accepted_l, [list(d[:a]) + [t] for d, a, t in zip(draft_ids, accepted_l, tokens_l)])


def verify_host(
    samplers: Sequence[RequestSampling],
    probs: torch.Tensor,
    draft_ids: Sequence[Sequence[int]],
    draft_probs: torch.Tensor,
    argmax: torch.Tensor | None = None,
) -> RejectionOutput:
    """``verify`` on the CPU for greedy and rejection requests (no coupled one; arguments
    as ``verify``'s): the target's and the drafter's probabilities of every rejection draft
    in one gather, each request's accepted prefix found in Python, and the rejection
    requests' next tokens in one draw (``_next_tokens``). The same arithmetic, uniforms and
    order as the tensor path, so the same tokens, with fewer operations: a step at a few
    requests costs their count, not their arithmetic (``python -m dspark.bench.host_ops``
    times both)."""
    lens = [len(d) for d in draft_ids]
    greedy = any(s.greedy for s in samplers)
    top = (row_argmax(probs) if argmax is None else argmax).tolist() if greedy else None
    starts = list(itertools.accumulate((n + 1 for n in lens), initial=0))
    firsts = list(itertools.accumulate(lens, initial=0))  # each request's first draft row
    vocab, at_p, at_q = probs.shape[-1], [], []  # NOTE: flat offsets of (row, draft)
    for s, start, first, drafts in zip(samplers, starts, firsts, draft_ids):
        if s.stream is not None and drafts:
            at_p += (vocab * (start + k) + d for k, d in enumerate(drafts))
            at_q += (vocab * (first + k) + d for k, d in enumerate(drafts))
    ratios = (_flat(probs, at_p) / _flat(draft_probs, at_q).clamp_min(1e-8)).clamp(
        max=1.0).tolist() if at_p else []
    accepted, output, rest, at = [], [], [], 0
    for i, (s, start, first, drafts) in enumerate(zip(samplers, starts, firsts, draft_ids)):
        n = a = len(drafts)
        if s.stream is None:  # NOTE: greedy: the draft is the target's argmax
            a = _argmax_prefix(drafts, top, start)
            output.append([*drafts[:a], top[start + a]])
        else:
            draws = s.stream.take(n)
            a = next((k for k in range(n) if not draws[k] < ratios[at + k]), n)
            at += n
            rest.append((i, start + a, first + a if a < n else -1))
            output.append(list(drafts[:a]))
        accepted.append(a)
    for (i, _, _), token in zip(rest, _next_tokens(samplers, probs, draft_probs, rest)):
        output[i].append(token)
    return RejectionOutput(accepted, output)


def _next_tokens(samplers, probs, draft_probs, rest) -> list[int]:
    """The recovered token (after a rejection: from ``max(p - q, 0)``) or the bonus token
    (from p) of each (request, target row, draft row or -1: none rejected) of ``rest``,
    one uniform each (``_random_tokens``' arithmetic)."""
    if not rest:
        return []
    dist = probs.index_select(0, torch.tensor([row for _, row, _ in rest])).float()
    rejected = [k for k, (_, _, q) in enumerate(rest) if q >= 0]
    if rejected:
        q = draft_probs.index_select(0, torch.tensor([rest[k][2] for k in rejected]))
        at = torch.tensor(rejected)  # NOTE: when every draw recovers, no gather or scatter
        dist = _recovery(dist, q) if len(rejected) == len(rest) else dist.index_copy_(
            0, at, _recovery(dist.index_select(0, at), q))
    draws = [samplers[i].stream.take(1)[0] for i, _, _ in rest]
    return inverse_cdf(dist, torch.tensor(draws)).tolist()


def _flat(rows: torch.Tensor, offsets: list[int] | torch.Tensor) -> torch.Tensor:
    """The entries of ``rows`` [N, V] at flat ``offsets`` (row * V + column): one
    ``index_select``, a fifth of the time of indexing by (rows, columns) on a CPU."""
    if not isinstance(offsets, torch.Tensor):
        offsets = device_tensor(offsets, rows.device, torch.long)
    return rows.reshape(-1).index_select(0, offsets)


def verify_greedy(top: torch.Tensor, draft_ids: Sequence[Sequence[int]]) -> RejectionOutput:
    """``verify`` when every request is greedy: a draft is accepted while it is the
    target's argmax at its row (``top`` [M]: ℓ_r + 1 rows per request), then the argmax
    of the first row not accepted is the next token. One read of ``top``; no
    distribution is built."""
    chosen, accepted, output, start = top.tolist(), [], [], 0
    for drafts in draft_ids:
        n = _argmax_prefix(drafts, chosen, start)
        accepted.append(n)
        output.append([*drafts[:n], chosen[start + n]])
        start += len(drafts) + 1
    return RejectionOutput(accepted, output)


def _argmax_prefix(drafts: Sequence[int], top: list[int], start: int) -> int:
    """Drafts of a greedy request accepted: while each is the target's argmax at its row
    (``top[start + k]``)."""
    return next((k for k, d in enumerate(drafts) if d != top[start + k]), len(drafts))


def _plain(samplers, probs, chosen) -> RejectionOutput:
    """A step without drafts: row r is request r's, and its token is drawn from it (the
    argmax or Gumbel-max drawn already, or one uniform of its generator)."""
    random = [i for i, s in enumerate(samplers) if s.stream is not None]
    if random:
        draws = device_tensor([samplers[i].stream.take(1)[0] for i in random], probs.device)
        if len(random) == len(samplers):  # every row draws: no gather, no scatter
            chosen = inverse_cdf(probs, draws)
        else:
            index = device_tensor(random, probs.device)
            chosen = chosen.index_put((index,), inverse_cdf(probs.index_select(0, index), draws))
    return RejectionOutput([0] * len(samplers), [[t] for t in chosen.tolist()])


def _plain_softmax(samplers, logits) -> RejectionOutput:
    """``target_probs`` then ``verify`` when every request samples a plain softmax and none
    drafted: the same arithmetic and uniforms (so the same tokens) in a few operations."""
    draws = device_tensor([s.stream.take(1)[0] for s in samplers], logits.device)
    tokens = draw_softmax(logits, [s.params.temperature for s in samplers], draws)
    return RejectionOutput([0] * len(samplers), [[t] for t in tokens.tolist()])


def _deterministic_tokens(samplers, first_positions, probs, lens, argmax=None
                          ) -> torch.Tensor:
    """The token of every row for greedy (argmax) and coupled (Gumbel-max under the
    position noise) requests: [M]; rejection rows hold the argmax, or 0 when no request
    is greedy (unused either way)."""
    if argmax is not None:
        chosen = argmax.clone()
    elif any(s.greedy for s in samplers):
        chosen = row_argmax(probs)
    else:  # NOTE: no row reads an argmax: coupled rows are written below, the rest drawn
        chosen = torch.zeros(probs.shape[0], dtype=torch.long, device=probs.device)
    rows, seeds, positions, start = [], [], [], 0
    for s, pos, n in zip(samplers, first_positions, lens):
        if s.coupled:
            rows += range(start, start + n + 1)
            seeds += [s.seed] * (n + 1)
            positions += range(pos, pos + n + 1)
        start += n + 1
    if rows:
        dev = probs.device
        index = device_tensor(rows, dev)
        noise = position_gumbel(device_tensor(seeds, dev),
                                device_tensor(positions, dev), probs.shape[-1])
        chosen[index] = gumbel_max(probs[index], noise)
    return chosen


def _recovery(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The distribution a rejected draft's recovered token is drawn from, rows [N, V] of
    the target's ``p`` and the drafter's ``q``: ``max(p - q, 0)`` (normalized by the
    draw), or p where p == q up to rounding leaves nothing to correct."""
    residual = (p - q.float()).clamp_min_(0.0)
    usable = residual.sum(-1, keepdim=True) > 1e-8
    if p.device.type == "cpu" and bool(usable.all()):  # NOTE: no read-back off the CPU
        return residual
    return torch.where(usable, residual, p)


def _random_tokens(samplers, probs, draft_probs, starts, accepted, cu, lens) -> torch.Tensor:
    """Rejection requests' recovered (after a rejection) or bonus token: [R]; one uniform
    each, drawn after its acceptance uniforms."""
    dist = probs.index_select(0, starts + accepted).float()  # [R, V]
    if draft_probs.shape[0]:
        rejected = accepted < device_tensor(lens, probs.device)
        q_rows = (cu[:-1] + accepted).clamp_max(draft_probs.shape[0] - 1)
        dist = torch.where(rejected[:, None],
                           _recovery(dist, draft_probs.index_select(0, q_rows)), dist)
    draws = [s.stream.take(1)[0] if s.stream is not None else 0.0 for s in samplers]
    return inverse_cdf(dist, device_tensor(draws, probs.device))


def sample_step(rows: list[SeqRows], proposal: DraftProposal | None, logits: torch.Tensor
                ) -> tuple[dict[str, list[int]], dict[str, int]]:
    """The committed tokens of every request that samples this step: its logit rows
    with its modifiers applied, then ``verify``; the logprobs it asked for are stored on
    its state. Returns (req_id -> new tokens, req_id -> accepted drafts)."""
    sampling = [lay for lay in rows if lay.seq.samples]
    if not sampling:
        return {}, {}
    rows_per = [len(lay.drafts) + 1 for lay in sampling]
    if any(lay.num_scored for lay in rows):  # keep only the rows tokens are drawn from
        keep = [lay.logit_start + lay.num_scored + k
                for lay, n in zip(sampling, rows_per) for k in range(n)]
        logits = logits.index_select(0, device_tensor(keep, logits.device))
    raw = logits  # [M, V] what logprobs report
    logits = _process(sampling, logits, rows_per)
    samplers = [lay.seq.state.sampling for lay in sampling]
    # NOTE: one argmax of the logits serves the one-hot rows and the greedy tokens (a
    # reduction over the vocabulary of every row costs as much as the softmax on a CPU);
    # a step without greedy requests needs none
    top = row_argmax(logits) if any(s.greedy for s in samplers) else None  # [M]
    if all(s.greedy for s in samplers):
        out = verify_greedy(top, [lay.drafts for lay in sampling])
    elif len(samplers) == logits.shape[0] and all(s.batched for s in samplers):
        out = _plain_softmax(samplers, logits)  # NOTE: no drafts: a row per request
    else:
        probs = target_probs(logits, samplers, rows_per, top)
        draft_probs = _draft_probs(sampling, proposal, probs)
        out = verify(samplers, [lay.seq.first_position for lay in sampling], probs,
                     [lay.drafts for lay in sampling], draft_probs, top)
    start = 0
    for lay, n, ids in zip(sampling, rows_per, out.output_ids):
        state = lay.seq.state
        if state.params.logprobs is not None:
            state.new_logprobs = token_logprobs(raw[start : start + len(ids)], ids,
                                                state.params.logprobs)
        start += n
    ids = [lay.seq.request.req_id for lay in sampling]
    return dict(zip(ids, out.output_ids)), dict(zip(ids, out.num_accepted))


def _process(sampling: list[SeqRows], logits: torch.Tensor, rows_per) -> torch.Tensor:
    """Apply each request's penalties, bias and min_tokens at every verified position
    (the drafts before a position count as generated there)."""
    if not any(lay.seq.state.sampling.modifies_logits for lay in sampling):
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
    width = proposal.probs.shape[1]
    # NOTE: one gather of the flattened [R * n, V] rows, not a slice per request and a cat
    flat = [index[lay.seq.row] * width + k for lay in sampling for k in range(len(lay.drafts))]
    rows = proposal.probs.reshape(-1, proposal.probs.shape[-1])
    rows = rows[: len(flat)] if flat == list(range(len(flat))) else rows.index_select(
        0, device_tensor(flat, probs.device, torch.long))  # NOTE: leading rows: no copy
    return rows if proposal.vocab is None else proposal.vocab.full(rows)
