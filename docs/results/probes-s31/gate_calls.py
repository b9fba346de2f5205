"""The lane's turn of each step timed (``propose_lane``, and inside it the gate's
``declines`` and ``choose`` and the worker's ``caps``), per call and per step.
Usage (repository root): python -P docs/results/probes-s31/gate_calls.py SYSTEM C"""

import collections
import sys

import torch

import dspark.workers.engine as engine_module
from dspark.bench.closed_loop import ClosedLoop
from dspark.bench.gate_audit import timed_calls, warmed_engine

torch.set_num_threads(2)
label, conc = sys.argv[1], int(sys.argv[2])
eng, prompts, tok, params = warmed_engine(label, conc)
calls, spent = collections.Counter(), collections.Counter()


def timed(name, fn):
    return timed_calls(fn, name, spent, calls)


eng.gate.choose = timed("choose", eng.gate.choose)
eng.gate.declines = timed("declines", eng.gate.declines)
eng.draft_worker.caps = timed("caps", eng.draft_worker.caps)
engine_module.propose_lane = timed("propose_lane", engine_module.propose_lane)
loop = ClosedLoop(eng, prompts, tok.stop_ids, conc, 4 * conc, params)
steps = 0
while not loop.done:
    steps += loop.tick() is not None
print("steps", steps)
for name in calls:
    print(f"{name:14s} calls {calls[name]:5d}  ms/call {1000 * spent[name] / calls[name]:.3f}"
          f"  ms/step {1000 * spent[name] / steps:.3f}")
