"""The draft vocabulary's ranking: the target's vocabulary ordered by how often the target
generates each token, counted over the replies it regenerated for drafter training (the
tokens a drafter learns to propose). ``dspark train draft-vocab`` writes it into drafter
checkpoints (``draft_vocab.json``); the engine drafts among its first
``EngineConfig.draft_vocab`` tokens (``dspark.workers.draft_vocab``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from dspark.models.drafter_checkpoint import write_token_ranking
from dspark.training.feature_cache import FeatureCache


def reply_token_counts(cache: FeatureCache, vocab_size: int) -> torch.Tensor:
    """How often each id occurs among the cache's reply tokens: [vocab_size]."""
    ids = cache.input_ids[cache.loss_mask.bool()].long()
    return torch.bincount(ids, minlength=vocab_size)


def coverage(counts: torch.Tensor, sizes: Sequence[int]) -> dict[int, float]:
    """Share of the counted tokens inside the ``size`` most frequent ids, per size."""
    ranked = counts.sort(descending=True).values.cumsum(0)
    total = max(int(ranked[-1]), 1)
    return {n: float(ranked[min(n, ranked.numel()) - 1]) / total for n in sizes}


def rank_drafters(cache: FeatureCache, vocab_size: int, drafters: Sequence[str | Path],
                  source: str) -> dict[int, float]:
    """Write the ranking into every drafter checkpoint; returns the coverage of 256 to
    2,048 tokens."""
    counts = reply_token_counts(cache, vocab_size)
    for path in drafters:
        write_token_ranking(path, counts, source)
    return coverage(counts, (256, 512, 1024, 2048))
