"""Plain (non-speculative) autoregressive generation from the target with its KV cache.

This is the reference every speculative path must match: at temperature 0 it is greedy
argmax decoding; above 0 it samples from ``softmax(logits / T)`` restricted to the top-p
nucleus, with a per-request ``torch.Generator`` so a seeded request reproduces.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dspark.models.checkpoint import load_target
from dspark.models.target import TargetModel
from dspark.models.tokenizer import StreamDecoder, Tokenizer


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
    """Seeds the request's own random generator."""
    ignore_eos: bool = False
    """Keep generating past end-of-turn tokens."""

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
    cdf = probs.float().cumsum(-1)  # [R, V]
    drawn = (cdf <= uniforms[:, None].to(cdf.device) * cdf[:, -1:]).sum(-1)
    return drawn.clamp_max(probs.shape[-1] - 1)


def sample_next(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    # logits: [V]
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = sampling_probs(logits, params.temperature, params.top_p)
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
    """Yield new token ids one by one; stops at a stop id (yielded), max_tokens or context."""
    check_prompt(model, prompt_ids)
    context = model.config.max_position_embeddings
    budget = min(params.max_tokens, context - len(prompt_ids))
    gen = None
    if params.temperature > 0:
        gen = torch.Generator().manual_seed(params.seed if params.seed is not None else 0)
        if params.seed is None:
            gen.seed()
    cache = model.new_kv_cache(batch_size=1, max_len=context)
    device = model.lm_head.weight.device
    logits = model(torch.tensor([list(prompt_ids)], device=device), kv_cache=cache).logits[0, -1]
    for n in range(budget):
        token = sample_next(logits, params, gen)
        yield token
        if token in stop_ids and not params.ignore_eos:
            return
        if n + 1 < budget:
            step = torch.tensor([[token]], device=device)
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
