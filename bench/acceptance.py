"""`dspark eval`: offline acceptance of every drafter (the paper's Table 1 in miniature).

Protocol (method digest §9): batch size 1, chain drafting of a fixed block (7), T = 1 with
exact rejection sampling, one seed per prompt (``seed + index``), single-turn prompts in
the chat template. Per round the *acceptance length* counts the accepted drafts plus the
recovered/bonus token (no bonus when an accepted draft ends the reply); τ is pooled over
all rounds of a prompt set. The token sampled at prefill is not a round.

Also recorded per round: the proposal length, the accepted count and the raw confidence
logits, from which come the per-position conditional acceptance (paper Fig. 2), the
calibration metrics before/after STS (Fig. 6) and the static-threshold sweep (Fig. 5).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dspark.models.tokenizer import Tokenizer
from dspark.workers.offline import Rounds

PROMPT_DIR = Path(__file__).resolve().parent / "eval_prompts"
BENCHMARKS = ("gsm8k", "math500", "humaneval", "mbpp", "mt-bench")
DOMAIN_SETS = ("math", "code", "chat")


@dataclass(frozen=True)
class EvalConfig:
    temperature: float = 1.0
    """Sampling temperature of target and drafter."""
    max_new_tokens: int = 128
    """New tokens per prompt (the prefill token included)."""
    seed: int = 980406
    """Prompt i is decoded with seed + i."""
    coupled: bool = False
    """At T > 0: Gumbel coupling (each prompt a request seeded with seed + i) instead of
    rejection sampling (the paper's rule)."""
    draft_vocab: int = 0
    """DSpark and DFlash draft among their checkpoint's N most generated tokens, as the
    serving engine's ``--draft-vocab`` (0: the whole vocabulary, as every other drafter:
    the table compares methods)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if self.draft_vocab < 0:
            raise ValueError(f"draft_vocab must be >= 0 (0: the whole vocabulary), got "
                             f"{self.draft_vocab}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def read_turns(path: str | Path) -> list[str]:
    """First user turn of every ``{"turns": [...]}`` record of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from exc
        turns = rec.get("turns") if isinstance(rec, dict) else None
        if not turns or not isinstance(turns[0], str):
            raise ValueError(f'{path}:{n}: expected {{"turns": ["..."]}} with a string first turn')
        prompts.append(turns[0])
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def fitting_texts(
    texts: Sequence[str], tokenizer: Tokenizer, max_prompt_tokens: int, limit: int, seed: int
) -> list[str]:
    """A seeded shuffle of ``texts``, keeping the first ``limit`` whose chat prompt fits."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    out = []
    for i in order:
        if len(tokenizer.chat_prompt(texts[i])) <= max_prompt_tokens:
            out.append(texts[i])
        if len(out) == limit:
            break
    return out


def fitting_prompts(
    texts: Sequence[str], tokenizer: Tokenizer, max_prompt_tokens: int, limit: int, seed: int
) -> list[list[int]]:
    """Chat-prompt ids of ``fitting_texts``."""
    chosen = fitting_texts(texts, tokenizer, max_prompt_tokens, limit, seed)
    return [tokenizer.chat_prompt(t) for t in chosen]


def threshold_sweep(
    rounds: Rounds, temperatures: Sequence[float] | None, thresholds: Sequence[float]
) -> list[dict]:
    """Static confidence threshold θ (digest §4.3): verify up to the first position whose
    calibrated per-position confidence σ(z_k / T_k) < θ.

    NOTE: computed from full-block rounds. Truncating a proposal before the target runs
    leaves the accept decisions of the kept prefix unchanged (same drafts, same uniforms),
    so a round under θ commits min(a, ℓ_θ) + 1 tokens; the committed tokens follow the
    target's distribution either way, so the contexts are equally distributed too.
    """
    logits, proposed, accepted = rounds.confidence_arrays(32)
    if len(proposed) == 0:
        return []
    temps = np.ones(logits.shape[1])
    if temperatures is not None:
        temps[: len(temperatures)] = temperatures
    conf = 1.0 / (1.0 + np.exp(-logits / temps))  # NaN past the proposal
    out = []
    for theta in thresholds:
        below = np.nan_to_num(conf, nan=-1.0) < theta  # [N, K]; unproposed count as "below"
        first_low = np.where(below.any(1), below.argmax(1), logits.shape[1])
        verify = np.minimum(first_low, proposed)
        committed = np.minimum(accepted, verify) + 1
        out.append(
            {
                "threshold": float(theta),
                "tau": float(committed.mean()),
                "verified_per_round": float((verify + 1).mean()),
                "efficiency": float(committed.mean() / (verify + 1).mean()),
            }
        )
    return out
