"""The sample phase of the default (``dspark-d2-mtp``) at C=32, T=1, inside the engine's
steps: each sampling function wrapped in a timer (``bench.gate_audit.timed_calls``), 64
requests of 64 tokens after a warm-up. Prints the step and sample phase per step and each
function's milliseconds per call.

Run from the repository root: ``python -P docs/results/session33-sampling/step_phases.py``
(on another checkout: ``PYTHONPATH=<dir holding dspark/>``)."""

from __future__ import annotations

from collections import Counter

import torch

import dspark.workers.sampling as sampling
from dspark.bench.closed_loop import ClosedLoop
from dspark.bench.gate_audit import timed_calls, warmed_engine
from dspark.models.generation import SamplingParams

NAMES = ["target_probs", "_draft_probs", "verify_host", "_next_tokens", "_plain_softmax"]


def main() -> None:
    torch.set_num_threads(2)
    engine, prompts, tok, _ = warmed_engine("dspark-d2-mtp", 32)
    spent, calls = Counter(), Counter()
    for name in NAMES:
        setattr(sampling, name, timed_calls(getattr(sampling, name), name, spent, calls))
    steps, step = [], engine.step

    def counted():
        result = step()
        if result.stats:
            steps.append(result.stats)
        return result

    engine.step = counted
    loop = ClosedLoop(engine, prompts, tok.stop_ids, 32, 64,
                      lambda i: SamplingParams(max_tokens=64, temperature=1.0))
    while not loop.done:
        loop.tick()
    n = len(steps)
    print(f"{n} steps: step {1e3 * sum(s.step_time for s in steps) / n:.2f} ms, sample phase "
          f"{1e3 * sum(s.time_sample for s in steps) / n:.3f} ms a step")
    for name in NAMES:
        if calls[name]:
            print(f"{name}: {calls[name]} calls, {1e3 * spent[name] / calls[name]:.3f} ms a call")


if __name__ == "__main__":
    main()
