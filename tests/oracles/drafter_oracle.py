"""The drafters' single-request decoding state, kept as a test oracle: one request's
context K/V as plain tensors (parallel drafters) or a contiguous cache (EAGLE-3/MTP-1),
proposing one round at a time. The engine's batched drafting over its paged cache must
propose exactly what these propose (tests/workers/test_drafting.py), and the drafters'
training forwards must agree with them (tests/models/test_drafters.py). tests/ is not a
package (pytest's importlib mode): load this file with ``load_oracle()`` of those tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark.models.autoregressive_drafter import AutoregressiveDrafter
from dspark.models.draft_layers import ContextAttention
from dspark.models.generation import sampling_probs
from dspark.models.kv_cache import ContiguousAttention
from dspark.models.parallel_drafter import ParallelDrafter


def draft_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T), or the argmax one-hot at T = 0; logits: [..., V]."""
    if temperature <= 0.0:
        idx = logits.argmax(-1, keepdim=True)
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, idx, 1.0)
    return sampling_probs(logits, temperature, 1.0)


def new_session(drafter):
    """The single-request drafting state of ``drafter``."""
    if isinstance(drafter, AutoregressiveDrafter):
        return AutoregressiveSession(drafter)
    return ParallelSession(drafter)


@dataclass
class Proposal:
    """One round's drafts: tokens, the distribution each was sampled from, confidences."""

    tokens: list[int]  # m draft tokens
    probs: torch.Tensor  # [m, V] draft distribution of each token (one-hot when greedy)
    conf_logits: torch.Tensor | None = None  # [m] raw confidence logits, or None


def sample_token(probs: torch.Tensor, temperature: float, gen: torch.Generator | None) -> int:
    # probs: [V]
    if temperature <= 0.0:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=gen))


def sample_block(
    drafter, h: torch.Tensor, anchor: int, temperature: float, gen: torch.Generator | None
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Left-to-right sampling through the Markov head; h: [K, d].

    Returns the tokens, the corrected logits [K, V] and their draft distribution [K, V].
    """
    base = drafter.lm_head(h)  # [K, V]
    if drafter.markov is None:
        probs = draft_probs(base, temperature)
        return [sample_token(p, temperature, gen) for p in probs], base, probs
    # NOTE: order matters: sample x_k, then compute the bias of slot k+1 from x_k.
    prev = torch.tensor([anchor], device=h.device)
    state = drafter.markov.init_state(1, h)
    tokens, rows, prob_rows = [], [], []
    for k in range(h.shape[0]):
        bias, state = drafter.markov.step(prev, h[k : k + 1], state)
        logits_k = base[k] + bias[0]
        probs_k = draft_probs(logits_k, temperature)
        token = sample_token(probs_k, temperature, gen)
        tokens.append(token)
        rows.append(logits_k)
        prob_rows.append(probs_k)
        prev = torch.tensor([token], device=h.device)
    return tokens, torch.stack(rows), torch.stack(prob_rows)


class ParallelSession:
    """Per-request drafting state: the context K/V of every draft layer.

    NOTE: block K/V are never stored; after a round only verified target features extend
    the context, so the cache holds exactly the positions before the next anchor.
    """

    def __init__(self, drafter: ParallelDrafter) -> None:
        self.drafter = drafter
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.length = 0
        self.report_base_probs = False
        """Report the uncorrected backbone distribution instead of the one the tokens were
        sampled from. Never set in serving: it exists so a test can show that this breaks
        losslessness (method digest §12.10)."""

    @torch.no_grad()
    def extend(self, features: torch.Tensor, next_tokens: list[int]) -> None:
        """Append target features [n, F] of the next n positions (``next_tokens`` unused)."""
        del next_tokens
        num = features.shape[0]
        pos = torch.arange(self.length, self.length + num, device=features.device)[None]
        new = self.drafter.context_kv(features[None], pos)
        if self.kv is None:
            self.kv = new
        else:
            self.kv = [
                (torch.cat([k, nk], 2), torch.cat([v, nv], 2))
                for (k, v), (nk, nv) in zip(self.kv, new)
            ]
        self.length += num

    @torch.no_grad()
    def propose(
        self, anchor: int, temperature: float, gen: torch.Generator | None, max_tokens: int
    ) -> Proposal:
        """Draft up to ``max_tokens`` (≤ γ) tokens after ``anchor`` (at position ``length``)."""
        drafter = self.drafter
        device = drafter.lm_head.weight.device
        block_ids, block_pos = drafter.draft_blocks(
            torch.tensor([anchor], device=device), torch.tensor([self.length], device=device)
        )  # [1, K] each
        h = drafter.run_blocks(block_ids, block_pos, ContextAttention(self.kv, None))[0]  # [K, d]
        h = h[:max_tokens]
        tokens, _, probs = sample_block(drafter, h, anchor, temperature, gen)
        if self.report_base_probs:
            probs = draft_probs(drafter.lm_head(h), temperature)
        conf = None
        if drafter.confidence is not None:
            prev = torch.tensor([anchor] + tokens[:-1], device=device)
            prev_embed = drafter.markov.w1(prev) if drafter.markov is not None else None
            conf = drafter.confidence(h, prev_embed)
        return Proposal(tokens=tokens, probs=probs, conf_logits=conf)


class AutoregressiveSession:
    """Per-request state: the layer's K/V of committed pairs (a contiguous cache) and the
    last pair's output.

    NOTE: drafts' K/V are written past the committed length while proposing and rolled back
    after, so the cache holds exactly the committed pairs between calls.
    """

    def __init__(self, drafter: AutoregressiveDrafter) -> None:
        self.drafter = drafter
        self.cache = drafter.new_kv_cache()
        self.last_h: torch.Tensor | None = None  # [1, 1, d]

    @property
    def length(self) -> int:
        return self.cache.length

    @torch.no_grad()
    def extend(self, features: torch.Tensor, next_tokens: list[int]) -> None:
        """Append pairs (feature of position j, token j + 1) for the next n positions."""
        device = features.device
        num = features.shape[0]
        h0 = self.drafter.fc(features[None].float())  # [1, n, d]
        tokens = torch.tensor([next_tokens], device=device)
        pos = torch.arange(self.length, self.length + num, device=device)[None]
        out = self.drafter.step(h0, tokens, pos, ContiguousAttention(self.cache))
        self.cache.advance(num)
        self.last_h = out[:, -1:]

    @torch.no_grad()
    def propose(
        self,
        anchor: int,
        temperature: float,
        gen: torch.Generator | None,
        max_tokens: int,
        stop_ids: tuple[int, ...] = (),
    ) -> Proposal:
        """Up to ``max_tokens`` drafts, stopping after a stop token; the anchor is already
        paired with the last committed feature."""
        del anchor
        d, committed = self.drafter, self.length
        attention = ContiguousAttention(self.cache)
        h = self.last_h
        tokens, prob_rows = [], []
        for i in range(min(max_tokens, d.config.block_size)):
            probs = draft_probs(d.logits(h)[0, -1], temperature)
            token = sample_token(probs, temperature, gen)
            tokens.append(token)
            prob_rows.append(probs)
            if token in stop_ids or i + 1 == min(max_tokens, d.config.block_size):
                break
            pos = torch.tensor([[committed + i]], device=h.device)
            h = d.step(h, torch.tensor([[token]], device=h.device), pos, attention)
            self.cache.advance(1)
        self.cache.truncate(committed)
        return Proposal(tokens=tokens, probs=torch.stack(prob_rows))


def drafter_features(out, drafter) -> torch.Tensor:
    """The per-token target feature the drafter reads: [B, T, F]."""
    return out.hidden_states if drafter.config.method == "mtp" else out.layer_features
