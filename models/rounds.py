"""Speculative decoding over a prompt set, recorded round by round.

Shared by calibration (STS is fitted on calibration-split rounds) and by ``dspark eval``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dspark.models.generation import SamplingParams
from dspark.models.speculative import RoundRecord, speculative_generate
from dspark.models.tokenizer import Tokenizer


@dataclass
class Rounds:
    """Every round of a prompt set, with how many prompts produced them."""

    records: list[RoundRecord] = field(default_factory=list)
    prompts: int = 0

    def confidence_arrays(self, block: int):
        """(logits [N, K] NaN-padded, proposed [N], accepted [N]) of rounds with confidences."""
        with_conf = [r for r in self.records if r.conf_logits is not None]
        logits = np.full((len(with_conf), block), np.nan)
        for i, r in enumerate(with_conf):
            logits[i, : len(r.conf_logits)] = r.conf_logits
        proposed = np.array([r.proposed for r in with_conf], dtype=np.int64)
        accepted = np.array([r.accepted for r in with_conf], dtype=np.int64)
        return logits, proposed, accepted

    def metrics(self, block: int) -> dict:
        """τ pooled over rounds, conditional acceptance per position (paper Fig. 2) and the
        unconditional prefix survival."""
        if not self.records:
            return {"tau": None, "rounds": 0, "prompts": self.prompts}
        proposed = np.array([r.proposed for r in self.records])
        accepted = np.array([r.accepted for r in self.records])
        committed = np.array([r.committed for r in self.records])
        cond, surv = [], []
        for k in range(1, block + 1):
            reached = (proposed >= k) & (accepted >= k - 1)
            cond.append(float((accepted[reached] >= k).mean()) if reached.any() else None)
            offered = proposed >= k
            surv.append(float((accepted[offered] >= k).mean()) if offered.any() else None)
        n = len(self.records)
        return {
            "tau": float(committed.mean()),
            "tau_stderr": float(committed.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
            "rounds": n,
            "prompts": self.prompts,
            "tokens": int(committed.sum()),
            "mean_proposed": float(proposed.mean()),
            "conditional_acceptance": cond,
            "prefix_survival": surv,
        }


def run_rounds(
    target,
    drafter,
    prompts: Sequence[Sequence[int]],
    tokenizer: Tokenizer,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    progress: bool = False,
    label: str = "rounds",
) -> Rounds:
    """Decode every prompt speculatively (prompt i with seed + i); record all rounds."""
    from rich.progress import Progress

    out = Rounds()
    with Progress(disable=not progress) as bar:
        task = bar.add_task(label, total=len(prompts))
        for i, ids in enumerate(prompts):
            params = SamplingParams(
                temperature=temperature, max_tokens=max_new_tokens, seed=seed + i
            )
            for _ in speculative_generate(
                target, drafter, ids, params, tokenizer.stop_ids, on_round=out.records.append
            ):
                pass
            out.prompts += 1
            bar.advance(task)
    return out
