"""How many of the serving default's steps carry a prefill chunk, and how many draft, at a
concurrency C (T=1): 4 C requests of 64 tokens after a warm-up, a closed loop. Prints the
mean phase times per step and the counts.

Run from the repository root: ``python -P docs/results/session34-final/prefill_steps.py C``."""

from __future__ import annotations

import sys

import torch

from dspark.bench.closed_loop import ClosedLoop
from dspark.bench.gate_audit import recorded_steps, warmed_engine
from dspark.models.generation import SamplingParams

PHASES = ("step_time", "time_schedule", "time_draft", "time_budget", "time_verify",
          "time_sample", "time_update")


def main(concurrency: int) -> None:
    torch.set_num_threads(2)
    engine, prompts, tok, _ = warmed_engine("dspark-d2-mtp", concurrency)
    steps = recorded_steps(engine)
    loop = ClosedLoop(engine, prompts, tok.stop_ids, concurrency, 4 * concurrency,
                      lambda i: SamplingParams(max_tokens=64, temperature=1.0))
    while not loop.done:
        loop.tick()
    n = len(steps)
    print(f"C={concurrency}: {n} steps; " + " ".join(
        f"{name}={1e3 * sum(getattr(s, name) for s in steps) / n:.2f}" for name in PHASES)
        + " (ms a step)")
    prefill = [s for s in steps if s.num_prefill_tokens]
    print(f"steps with a prefill chunk {len(prefill)}/{n} (mean "
          f"{sum(s.num_prefill_tokens for s in prefill) / max(len(prefill), 1):.1f} prefill "
          f"tokens), drafted {sum(1 for s in steps if s.num_drafts)}/{n}, drafted with a "
          f"prefill chunk {sum(1 for s in prefill if s.num_drafts)}")


if __name__ == "__main__":
    main(int(sys.argv[1]))
