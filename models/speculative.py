"""Lossless speculative generation for one request with any drafter.

Vocabulary (one *round*):
- *anchor*: the last committed token, not yet run through the target, at position ``start``.
- *drafts* d_1..d_m: proposed tokens with their draft distributions q_k (Markov-corrected
  for DSpark); the target verifies ``[anchor, d_1..d_m]`` in one forward.
- *accepted*: d_k survives iff ``u_k < min(1, p_k(d_k) / q_k(d_k))`` and all earlier drafts
  survived; ``a`` counts them.
- *recovered token*: after the first rejection, a draw from ``normalize(max(p - q, 0))``;
  *bonus token*: after full acceptance, a draw from the target at position start + m.
- *acceptance length*: tokens committed in the round, ``a + 1`` (the recovered/bonus token
  included), or ``a`` when an accepted draft is a stop token (the request ends there).

At temperature 0 every distribution is one-hot and the rule reduces to "accept while the
draft equals the target's argmax", so the output equals greedy decoding token for token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from dspark.models.drafter_checkpoint import Drafter
from dspark.models.generation import SamplingParams, check_prompt, inverse_cdf, sampling_probs
from dspark.models.parallel_drafter import draft_probs
from dspark.models.target import TargetModel, TargetOutput


@dataclass
class RoundRecord:
    """What one round proposed and committed (the unit of τ and of calibration)."""

    proposed: int
    accepted: int
    committed: int  # acceptance length: accepted + 1, or accepted when a stop was accepted
    conf_logits: list[float] | None  # raw confidence logits of the proposed positions


def drafter_features(out: TargetOutput, drafter: Drafter) -> torch.Tensor:
    """The per-token target feature the drafter reads: [B, T, F]."""
    if drafter.config.method == "mtp":
        return out.hidden_states
    return out.layer_features


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    # logits: [n, V] -> [n, V] (one-hot at temperature 0)
    if params.temperature == 0.0:
        return draft_probs(logits, 0.0)
    return sampling_probs(logits, params.temperature, params.top_p)


def rejection_sample(
    draft_tokens: Sequence[int],
    draft_probs: torch.Tensor,  # [m, V]
    probs: torch.Tensor,  # [m + 1, V] target distributions at start .. start + m
    gen: torch.Generator | None,
    greedy: bool,
) -> tuple[int, int]:
    """Accept a prefix of the drafts; return (accepted count, recovered-or-bonus token)."""
    num = len(draft_tokens)
    if greedy:
        target_ids = probs.argmax(-1).tolist()
        accepted = 0
        while accepted < num and draft_tokens[accepted] == target_ids[accepted]:
            accepted += 1
        return accepted, target_ids[accepted]
    idx = torch.tensor(draft_tokens, dtype=torch.long)
    p = probs[:num].gather(-1, idx[:, None]).squeeze(-1)  # [m]
    q = draft_probs.gather(-1, idx[:, None]).squeeze(-1)  # [m]
    uniforms = torch.rand(num, generator=gen)
    ok = (uniforms < torch.clamp(p / q.clamp_min(1e-8), max=1.0)).tolist()
    accepted = 0
    while accepted < num and ok[accepted]:
        accepted += 1
    if accepted == num:
        dist = probs[num]
    else:
        dist = (probs[accepted] - draft_probs[accepted]).clamp_min(0.0)
        if float(dist.sum()) <= 1e-8:  # p == q up to rounding: nothing left to correct
            dist = probs[accepted]
    return accepted, int(inverse_cdf(dist[None], torch.rand(1, generator=gen))[0])


def _cut_after_stop(tokens: list[int], stop_ids: Sequence[int]) -> int:
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return i + 1
    return len(tokens)


@torch.no_grad()
def speculative_generate(
    target: TargetModel,
    drafter: Drafter,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    stop_ids: Sequence[int] = (),
    on_round: Callable[[RoundRecord], None] | None = None,
    max_draft: int | None = None,
) -> Iterator[int]:
    """Yield new tokens exactly as plain decoding would (greedy) or in distribution (T > 0).

    ``max_draft`` caps drafts per round (default: the drafter's block size).
    """
    drafter.config.check_target(target.config)
    check_prompt(target, prompt_ids)
    if params.modifies_logits:
        raise ValueError("penalties, logit_bias and min_tokens are applied by the batched "
                         "engine (dspark.workers.engine.Engine); this single-request path "
                         "does not take them")
    stops = () if params.ignore_eos else tuple(stop_ids)
    context = target.config.max_position_embeddings
    budget = min(params.max_tokens, context - len(prompt_ids))
    greedy = params.temperature == 0.0
    gen = torch.Generator().manual_seed(params.seed if params.seed is not None else 0)
    if params.seed is None:
        gen.seed()
    layers = drafter.config.feature_layers
    device = target.lm_head.weight.device
    cache = target.new_kv_cache(batch_size=1, max_len=context)
    out = target(
        torch.tensor([list(prompt_ids)], device=device), kv_cache=cache, feature_layers=layers
    )
    first = int(torch.multinomial(target_probs(out.logits[0, -1:], params)[0], 1, generator=gen))
    yield first
    if first in stops or budget == 1:
        return
    session = drafter.new_session()
    session.extend(drafter_features(out, drafter)[0], list(prompt_ids[1:]) + [first])
    anchor, start, produced = first, len(prompt_ids), 1
    limit = max_draft or drafter.config.block_size
    while produced < budget:
        room = min(limit, context - 1 - start)
        if drafter.config.is_parallel:
            proposal = session.propose(anchor, params.temperature, gen, room)
            keep = _cut_after_stop(proposal.tokens, stops)
        else:
            proposal = session.propose(anchor, params.temperature, gen, room, stops)
            keep = len(proposal.tokens)
        drafts = proposal.tokens[:keep]
        verify = torch.tensor([[anchor, *drafts]], device=device)
        out = target(verify, kv_cache=cache, feature_layers=layers)
        probs = target_probs(out.logits[0], params)
        accepted, token = rejection_sample(drafts, proposal.probs[:keep], probs, gen, greedy)
        committed = drafts[:accepted] + [token]
        stop_at = _cut_after_stop(committed, stops)
        conf = proposal.conf_logits
        record = RoundRecord(
            proposed=keep,
            accepted=accepted,
            committed=min(stop_at, accepted + 1),
            conf_logits=conf[:keep].tolist() if conf is not None else None,
        )
        if on_round is not None:
            on_round(record)
        committed = committed[:stop_at]
        yield from committed[: budget - produced]
        produced += len(committed)
        if stop_at <= accepted or committed[-1] in stops:
            return
        cache.truncate(start + accepted + 1)
        if produced < budget:
            session.extend(drafter_features(out, drafter)[0, : accepted + 1], committed)
        anchor, start = token, start + accepted + 1
