"""Offline decoding on the engine: a prompt set run to completion, every drafted round
recorded. ``dspark eval`` (the acceptance table), calibration (STS is fitted on these
rounds) and ``dspark generate`` all decode here, on the same engine that serves."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from dspark.models.generation import SamplingParams
from dspark.workers.budget import StepCostTable
from dspark.workers.engine import Engine, EngineConfig
from dspark.workers.stats import RoundRecord

UNIT_COST = StepCostTable((1,), (1.0,))
"""The fixed budget reads no step costs: offline engines skip profiling."""


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


def offline_engine(target, drafter, num_prompts: int, on_round=None, seed: int = 0,
                   max_num_seqs: int = 16, draft_vocab: int | None = None) -> Engine:
    """An engine for offline decoding: fixed budget (every proposed draft is verified, as
    the paper's τ is measured), enough KV for ``max_num_seqs`` full contexts;
    ``draft_vocab``: ``EngineConfig.draft_vocab`` (None: the serving default)."""
    context = target.config.max_position_embeddings
    seqs = max(1, min(max_num_seqs, num_prompts))
    block = 16
    config = EngineConfig(
        budget="fixed", block_size=block, num_blocks=seqs * (-(-context // block) + 1),
        max_num_seqs=seqs, max_num_batched_tokens=max(1024, context), seed=seed,
        draft_vocab=EngineConfig.draft_vocab if draft_vocab is None else draft_vocab,
    )
    return Engine(target, drafter, config, UNIT_COST, on_round=on_round)


def run_rounds(
    target,
    drafter,
    prompts: Sequence[Sequence[int]],
    stop_ids: Sequence[int],
    temperature: float,
    max_new_tokens: int,
    seed: int,
    coupled: bool = False,
    progress: bool = False,
    label: str = "rounds",
    draft_vocab: int | None = None,
) -> Rounds:
    """Decode every prompt speculatively on the engine; record all rounds. Prompt i samples
    with seed + i: through rejection sampling (an unseeded request of an engine seeded with
    ``seed``), or with ``coupled`` as a request seeded with seed + i (Gumbel coupling).
    ``draft_vocab``: ``offline_engine``'s."""
    from rich.progress import Progress

    out = Rounds()
    engine = offline_engine(target, drafter, len(prompts),
                            lambda req_id, r: out.records.append(r), seed,
                            draft_vocab=draft_vocab)
    with Progress(disable=not progress) as bar:
        task = bar.add_task(label, total=len(prompts))
        for i, ids in enumerate(prompts):
            engine.add_request(ids, SamplingParams(
                temperature=temperature, max_tokens=max_new_tokens,
                seed=seed + i if coupled else None), stop_ids)
        while engine.has_unfinished():
            for o in engine.step().outputs:
                if o.finished:
                    out.prompts += 1
                    bar.advance(task)
    return out


def stream_tokens(engine: Engine, prompt_ids: Sequence[int], params: SamplingParams,
                  stop_ids: Sequence[int] = ()) -> Iterator[int]:
    """One request on the engine, its tokens as steps commit them (``dspark generate``)."""
    req_id = engine.add_request(prompt_ids, params, stop_ids)
    try:
        while engine.has_unfinished():
            for o in engine.step().outputs:
                if o.req_id == req_id:
                    yield from o.new_token_ids
                    if o.finished:
                        if o.finish_reason and o.finish_reason.startswith("error"):
                            raise RuntimeError(o.finish_reason)
                        return
    finally:
        engine.abort(req_id)
