"""Plain (non-speculative) autoregressive generation from the target with its KV cache.

This is the reference every speculative path must match: at temperature 0 it is greedy
argmax decoding; above 0 it samples from ``softmax(logits / T)`` restricted to the top-p
nucleus, with a per-request ``torch.Generator`` so a seeded request reproduces.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from dspark.kernels.transfer import device_tensor
from dspark.models.checkpoint import load_target
from dspark.models.target import TargetModel
from dspark.models.tokenizer import StreamDecoder, Tokenizer


class TokenLogprob(NamedTuple):
    """A token's log-probability under the target and the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    """(token id, log-probability), most likely first."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded."""

    temperature: float = 0.0
    """0 is greedy; > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of tokens whose probability reaches top_p, in (0, 1]."""
    max_tokens: int = 128
    """Most new tokens to generate, >= 1."""
    seed: int | None = None
    """At temperature > 0 the request samples by Gumbel coupling from this seed: the same text
    whatever the drafter, budget, batch, load or replica, and the same as decoding without a
    drafter. None: a fresh random stream (rejection sampling)."""
    ignore_eos: bool = False
    """Keep generating past end-of-turn tokens."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated, in [-2, 2]."""
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    """Token id -> value added to its logit, in [-100, 100]."""
    min_tokens: int = 0
    """Stop tokens cannot be drawn before this many tokens are generated, >= 0."""
    logprobs: int | None = None
    """Return the target's log-probability of each generated token and this many top
    alternatives (0-20); None returns none."""
    prompt_logprobs: int | None = None
    """Also score every prompt token (and this many top alternatives, 0-20); None: no."""

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {token!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 20:
                raise ValueError(f"{name} must be in [0, 20], got {value}")

    @property
    def modifies_logits(self) -> bool:
        """Penalties, bias or min_tokens change the distribution tokens are drawn from."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.min_tokens)


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution a token is drawn from; logits: [..., V] -> probs [..., V]."""
    logits = logits.float()
    # subtract the max first: logits / T overflows float32 for tiny temperatures
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # keep a token if the mass strictly before it is < top_p (the top token always stays)
        keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one token per row by inverting the CDF at ``uniforms``: probs [R, V] (need not
    be normalised), uniforms [R] in [0, 1) -> token ids [R]. A zero-probability token is
    never drawn."""
    cdf = probs.float().cumsum(-1)  # [R, V], non-decreasing: probs are never negative
    # NOTE: the count of CDF entries <= u * total, found by bisection (a comparison over
    # the vocabulary and its sum cost twice as much)
    value = (uniforms[:, None].to(cdf.device) * cdf[:, -1:]).contiguous()
    drawn = torch.searchsorted(cdf, value, right=True)[:, 0]
    return drawn.clamp_max(probs.shape[-1] - 1)


def softmax_rows(logits: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """``softmax(logits / T)`` of each row (logits [R, V], a temperature above 0 per row):
    ``sampling_probs``' arithmetic without top-p, for all rows at once (the maximum
    subtracted before dividing). Where every T is 1 neither is needed: softmax subtracts
    the maximum itself, and ``x - max`` has a maximum of exactly 0, so the same values bit
    for bit (``tests/models/test_generation.py``)."""
    if all(t == 1.0 for t in temperatures):
        return torch.softmax(logits.float(), -1)
    shifted = logits.float() - logits.amax(-1, keepdim=True)
    shifted = shifted / device_tensor(temperatures, logits.device)[:, None]
    return torch.softmax(shifted, -1)


def draw_softmax(logits: torch.Tensor, temperatures: Sequence[float],
                 uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of ``softmax_rows`` by ``inverse_cdf`` at ``uniforms`` [R]."""
    return inverse_cdf(softmax_rows(logits, temperatures), uniforms)


def process_logits(
    logits: torch.Tensor,  # [R, V] rows of one request, row k after k more generated tokens
    params: SamplingParams,
    output_ids: Sequence[int],  # generated before row 0
    extra_ids: Sequence[int],  # [R - 1] the tokens generated between consecutive rows
    stop_ids: Sequence[int],
) -> torch.Tensor:  # [R, V]
    """The logits a token is drawn from under ``params``' modifiers (OpenAI's definitions):
    ``logit - presence * [count > 0] - frequency * count + bias``, counts over the generated
    tokens so far, and stop tokens masked while fewer than ``min_tokens`` are generated.

    NOTE: speculative verification applies this to every verified position with the
    draft prefix before it counted as generated, so an accepted draft sees exactly the
    distribution plain decoding would have drawn from; the draft's own distribution need
    not know the modifiers (rejection sampling corrects for it)."""
    if not params.modifies_logits:
        return logits
    rows, vocab = logits.shape
    out = logits.float().clone()
    if params.presence_penalty or params.frequency_penalty:
        counts = torch.zeros(rows, vocab, device=logits.device)  # [R, V]
        if output_ids:
            base = device_tensor(list(output_ids), logits.device)
            # NOTE: a count per token by scatter (``bincount`` reads its size back: a sync
            # on a GPU)
            counts += torch.zeros(vocab, device=logits.device).index_add_(
                0, base, torch.ones_like(base, dtype=torch.float))
        if rows > 1:
            extra = device_tensor(list(extra_ids[: rows - 1]), logits.device)
            step = torch.zeros(rows, vocab, device=logits.device)
            step[torch.arange(1, rows, device=logits.device), extra] = 1.0
            counts += step.cumsum(0)
        out -= params.presence_penalty * (counts > 0).float() + params.frequency_penalty * counts
    if params.logit_bias:
        ids = [t for t in params.logit_bias if t < vocab]
        bias = device_tensor([params.logit_bias[t] for t in ids], logits.device)
        out[:, device_tensor(ids, logits.device, torch.long)] += bias
    if params.min_tokens and stop_ids and not params.ignore_eos:
        generated = len(output_ids) + torch.arange(rows, device=logits.device)  # [R]
        early = generated < params.min_tokens
        stops = device_tensor([t for t in stop_ids if t < vocab], logits.device, torch.long)
        masked = out[:, stops].masked_fill(early[:, None], float("-inf"))
        out[:, stops] = masked
    return out


def token_logprobs(
    logits: torch.Tensor,  # [R, V] the target's raw logits
    token_ids: Sequence[int],  # [R] the token scored at each row
    top: int,
) -> list[TokenLogprob]:
    """(token, its log-probability, the ``top`` most likely (token, log-probability)) per
    row, from the target's raw distribution (before temperature, penalties and top-p)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
    ids = device_tensor(list(token_ids), logits.device, torch.long)
    chosen = logp.gather(1, ids[:, None])[:, 0].tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in token_ids]
    if top:
        values, indices = logp.topk(top, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    return [TokenLogprob(int(t), lp, tp) for t, lp, tp in zip(token_ids, chosen, tops)]


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) of int64 tensors holding values < 2**32;
    products stay below 2**59, so it is exact on every device."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def position_gumbel(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """The Gumbel noise of token positions under request seeds: seeds, positions [M] int64
    -> [M, V] float32, a pure function of (seed, position, token id), identical on every
    device, batch and replica. A coupled request draws the token at position p as
    ``argmax(log probs + noise)`` (``gumbel_max``), which is an exact sample of ``probs``."""
    seeds, positions = seeds.long(), positions.long()
    key = _mix32(_mix32((seeds & _MASK32) ^ 0x9E3779B9) ^ ((seeds >> 32) & _MASK32))
    key = _mix32(key ^ (positions & _MASK32))  # [M]
    tokens = _mix32(torch.arange(vocab, dtype=torch.long, device=seeds.device) + 0x6A09E667)
    bits = _mix32(_mix32(key[:, None] ^ tokens[None]) ^ 0x3C6EF372)  # [M, V]
    uniform = (bits.double() + 0.5) / 2.0**32  # in (0, 1)
    return (-torch.log(-torch.log(uniform))).float()


def gumbel_max(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """probs [M, V] (zeros allowed), noise [M, V] -> the token of each row [M]."""
    return (torch.log(probs.float()) + noise).argmax(-1)


def sample_next(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None,
                position: int) -> int:
    """logits [V] -> the token at ``position``: argmax at temperature 0; for a seeded request
    the Gumbel-max sample under its position noise; else a draw from ``gen``."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = sampling_probs(logits, params.temperature, params.top_p)
    if params.seed is not None:
        noise = position_gumbel(torch.tensor([params.seed]), torch.tensor([position]),
                                probs.shape[-1]).to(probs.device)
        return int(gumbel_max(probs[None], noise)[0])
    return int(torch.multinomial(probs, 1, generator=gen))


def check_prompt(model: TargetModel, prompt_ids: Sequence[int]) -> None:
    context = model.config.max_position_embeddings
    if len(prompt_ids) == 0:
        raise ValueError("prompt is empty: it must contain at least one token")
    if len(prompt_ids) >= context:
        raise ValueError(
            f"prompt has {len(prompt_ids)} tokens but the model's context is {context} tokens "
            f"(max_position_embeddings); shorten the prompt to at most {context - 1} tokens"
        )
    bad = [t for t in prompt_ids if not 0 <= t < model.config.vocab_size]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} outside [0, {model.config.vocab_size})")


@torch.no_grad()
def generate_tokens(
    model: TargetModel,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    stop_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Yield new token ids one by one; stops at a stop id (yielded), max_tokens or context.

    The reference decoding every speculative path must match: greedy token for token, and
    a seeded request at temperature > 0 token for token too (the coupled sampling of
    ``dspark.workers.sampling``); unseeded requests draw from a fresh generator."""
    check_prompt(model, prompt_ids)
    context = model.config.max_position_embeddings
    budget = min(params.max_tokens, context - len(prompt_ids))
    gen = None
    if params.temperature > 0 and params.seed is None:
        gen = torch.Generator()
        gen.seed()
    cache = model.new_kv_cache(batch_size=1, max_len=context)
    device = model.lm_head.weight.device
    logits = model(device_tensor([list(prompt_ids)], device), kv_cache=cache).logits[0, -1]
    output: list[int] = []
    for n in range(budget):
        logits = process_logits(logits[None], params, output, (), stop_ids)[0]
        token = sample_next(logits, params, gen, len(prompt_ids) + n)
        output.append(token)
        yield token
        if token in stop_ids and not params.ignore_eos:
            return
        if n + 1 < budget:
            step = device_tensor([[token]], device)
            logits = model(step, kv_cache=cache).logits[0, -1]


def generate_stream(
    model: TargetModel, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams
) -> Iterator[str]:
    """Yield text pieces as tokens are generated (stop tokens are not printed)."""
    decoder = StreamDecoder(tokenizer)
    for token in generate_tokens(model, prompt_ids, params, tokenizer.stop_ids):
        if token in tokenizer.stop_ids and not params.ignore_eos:
            return
        piece = decoder.push(token)
        if piece:
            yield piece


def generate_text(
    model: TargetModel, tokenizer: Tokenizer, prompt: str, params: SamplingParams, chat: bool = True
) -> str:
    ids = tokenizer.chat_prompt(prompt) if chat else tokenizer.encode(prompt)
    return "".join(generate_stream(model, tokenizer, ids, params))


def load_for_generation(path: str | Path) -> tuple[TargetModel, Tokenizer]:
    """Load a checkpoint directory's model and its ``tokenizer.json``."""
    model = load_target(path)
    tokenizer = Tokenizer.from_file(Path(path) / "tokenizer.json")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}"
        )
    return model, tokenizer
