"""The serving default's decode-only steps sorted by why they drafted (the gate's reasons,
``Engine.on_request_step``): steps, ms per step, tokens per ms, drafted per step.
Usage (repository root): python -P docs/results/probes-s31/gate_kinds.py SYSTEM C THREADS"""

import collections
import sys

import torch

from dspark.bench.closed_loop import ClosedLoop
from dspark.bench.gate_audit import warmed_engine

torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
label, conc = sys.argv[1], int(sys.argv[2])
eng, prompts, tok, params = warmed_engine(label, conc)
last = {}
eng.on_request_step = lambda rows: last.__setitem__("rows", rows)
loop = ClosedLoop(eng, prompts, tok.stop_ids, conc, 6 * conc, params)
cat = collections.defaultdict(lambda: [0, 0.0, 0, 0, 0])  # steps, s, tokens, requests, drafted
while not loop.done:
    st = loop.tick()
    if st is None or st.num_prefill_tokens:
        continue
    reasons = collections.Counter(r.gate for r in last.get("rows", []) if r.drafted)
    c = cat["plain" if not reasons else "+".join(sorted(reasons))]
    c[0] += 1
    c[1] += st.step_time
    c[2] += st.num_output_tokens
    c[3] += st.num_decode_requests
    c[4] += sum(reasons.values())
for kind, (n, sec, toks, reqs, dr) in sorted(cat.items(), key=lambda x: -x[1][0]):
    print(f"{kind:16s} steps {n:4d}  ms/step {1000 * sec / n:6.2f}  tok/ms "
          f"{toks / (1000 * sec):.3f}  req/step {reqs / n:5.1f}  drafted/step {dr / n:4.1f}  "
          f"tok/req {toks / reqs:.2f}")
