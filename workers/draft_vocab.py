"""A parallel drafter's draft vocabulary: the target's most frequently generated tokens.

The LM head and the Markov head of a parallel drafter (DSpark, DFlash) are products over
the whole vocabulary for every slot of every drafted request; on the small demo target
they are most of a drafting call at a few requests and up (docs/engine.md, "Session
16"). Restricted to the N tokens the target generates most often (counted over
the drafter's training replies: ``dspark train draft-vocab``, kept in the drafter's
checkpoint as ``draft_vocab.json``), they cost about N / V of that.

Lossless as before: a draft is drawn from q restricted to those N tokens, and the very
same q (zero elsewhere) is what verification divides by and subtracts from p; a token
outside them is never proposed, and the target still commits it when it is its choice.
"""

from __future__ import annotations

import torch

from dspark.models.drafter_checkpoint import Drafter


class DraftVocab:
    """Rows of the drafter's LM head and Markov output for the draft vocabulary, taken from
    its weights once (they do not change while it serves)."""

    def __init__(self, drafter: Drafter, ids: torch.Tensor) -> None:
        device = drafter.lm_head.weight.device
        self.ids = ids.to(device=device, dtype=torch.long)  # [N] vocabulary ids
        self.size = int(self.ids.numel())
        self.vocab_size = drafter.config.vocab_size
        self.head = drafter.lm_head.weight.index_select(0, self.ids).contiguous()  # [N, d]
        markov = getattr(drafter, "markov", None)
        self.w1 = markov.w1.weight if markov is not None else None  # [V, r]
        self.w2 = (markov.w2.weight.index_select(0, self.ids).contiguous()
                   if markov is not None else None)  # [N, r]
        self._rows: torch.Tensor | None = None

    @classmethod
    def of(cls, drafter: Drafter, size: int) -> DraftVocab | None:
        """The ``size`` most frequent tokens of the drafter's ranking; None (the whole
        vocabulary) for size 0, a size not below the vocabulary, or no ranking."""
        ranking = getattr(drafter, "token_ranking", None)
        if ranking is None or size <= 0 or size >= drafter.config.vocab_size:
            return None
        return cls(drafter, ranking[:size])

    def markov_rows(self, anchors: torch.Tensor, fresh: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The Markov embedding in draft-vocabulary order, then each anchor's own row
        (an anchor may lie outside the draft vocabulary): [N + R, r], and the anchors' rows
        in it [R]. ``fresh``: made anew, not in the buffer kept between calls (a captured
        CUDA graph must own what it writes)."""
        num = anchors.numel()
        need = self.size + num
        if fresh:
            return (torch.cat([self.w1.index_select(0, self.ids),
                               self.w1.index_select(0, anchors)]),
                    torch.arange(self.size, need, device=anchors.device))
        if self._rows is None or self._rows.shape[0] < need:
            rows = self.w1.new_empty(self.size + 2 * max(num, 8), self.w1.shape[1])
            torch.index_select(self.w1, 0, self.ids, out=rows[: self.size])
            self._rows = rows
        torch.index_select(self.w1, 0, anchors, out=self._rows[self.size : need])
        return self._rows[:need], torch.arange(self.size, need, device=anchors.device)

    def full(self, probs: torch.Tensor) -> torch.Tensor:
        """Distributions over the draft vocabulary [..., N] -> over the whole vocabulary
        [..., V] (zeros outside)."""
        out = probs.new_zeros(*probs.shape[:-1], self.vocab_size)
        out[..., self.ids] = probs
        return out
