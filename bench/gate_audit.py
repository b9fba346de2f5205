"""What the per-request draft gate predicted against what its steps realized, and where a
drafter call's time goes, on the demo checkpoints in process.

    python -m dspark.bench.gate_audit --concurrency 16 --temperature 0

Runs the serving default's engine (DSpark, Algorithm 1, gating on) closed-loop at the given
C and T (4C requests after a warm-up) and prints:

- gains: for the requests the gate drafted for cost (not probes), the accepted drafts per
  step their records promised against those accepted;
- step times: the gate's predicted step time (scaled by its realism factor) against the
  measured one, for steps with and without drafting;
- decode-only steps (no prefill in them), drafted and plain: committed tokens per ms;
- a drafter call, timed by part (backbone, LM head, Markov sampling, the rest) on a second
  engine with γ = 7 for every request, at the same C.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from pathlib import Path


def timed_calls(fn, name: str, spent: Counter, calls: Counter):
    """``fn`` wrapped to add its wall time to ``spent[name]`` and count it in
    ``calls[name]``."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start
            calls[name] += 1
    return wrapper


def recorded_steps(engine) -> list:
    """A list that gets the stats of every step ``engine`` takes from now on (its ``step``
    wrapped; steps that scheduled nothing have none)."""
    steps, step = [], engine.step

    def recording():
        result = step()
        if result.stats:
            steps.append(result.stats)
        return result

    engine.step = recording
    return steps


def warmed_engine(label: str, concurrency: int, max_tokens: int = 64):
    """An engine of the benchmark system ``label`` on the demo checkpoints after a warm-up
    of ``concurrency`` requests: (engine, prompts, tokenizer, params_for), ``params_for``
    the greedy ``max_tokens`` sampling of every request."""
    from dspark.bench.closed_loop import ClosedLoop
    from dspark.bench.engine_bench import SYSTEMS, domain_prompts
    from dspark.models.generation import SamplingParams, load_for_generation
    from dspark.workers.engine import EngineConfig

    known = {s.label: s for s in SYSTEMS}
    target, tok = load_for_generation("checkpoints/target")
    prompts = domain_prompts(tok, target.config.max_position_embeddings, max_tokens, 24, 0)
    engine = known[label].build(target, "checkpoints/drafters", EngineConfig(max_num_seqs=64),
                                0)

    def params_for(i):
        return SamplingParams(max_tokens=max_tokens)

    loop = ClosedLoop(engine, prompts, tok.stop_ids, concurrency, concurrency, params_for)
    while not loop.done:
        loop.tick()
    return engine, prompts, tok, params_for


def audit_gate(engine, loop_args) -> dict:
    from dspark.bench.closed_loop import run_cell
    from dspark.workers.gate import CostGate

    gate, promised, pairs, steps = engine.gate, {}, [], []
    choose, observe = gate.choose, gate.observe

    def audited_choose(cands, *args):
        picks = choose(cands, *args)
        promised.clear()
        for i, (c, pick) in enumerate(zip(cands, picks)):
            if pick and i not in gate.probes:
                promised[id(c.record)] = c.record.gain if c.record.gain is not None else gate.gain
        return picks

    def audited_observe(records, lengths, accepted, idle=(), seconds=None, others=0,
                        written=0.0):
        pairs.extend((promised[id(r)], a) for r, a in zip(records, accepted) if id(r) in promised)
        if gate.prediction is not None and seconds:
            (drafted, mixed), predicted = gate.prediction
            steps.append((drafted, predicted * gate.step_realism[drafted, mixed], seconds))
        return observe(records, lengths, accepted, idle, seconds, others, written)

    assert isinstance(gate, CostGate)
    gate.choose, gate.observe = audited_choose, audited_observe
    _, tokens, clock, stats = run_cell(engine, *loop_args)
    out = {"tok_s": tokens / clock, "cost_drafted": len(pairs)}
    if pairs:
        out["promised"] = statistics.mean(p for p, _ in pairs)
        out["accepted"] = statistics.mean(a for _, a in pairs)
    for drafted in (True, False):
        group = [s for s in steps if s[0] is drafted]
        if group:
            out[f"predicted_ms_{drafted}"] = 1000 * statistics.mean(s[1] for s in group)
            out[f"measured_ms_{drafted}"] = 1000 * statistics.mean(s[2] for s in group)
    for drafted in (True, False):
        group = [s for s in stats if not s.num_prefill_tokens and bool(s.num_drafts) is drafted]
        if group:
            out[f"decode_tok_per_ms_{drafted}"] = (sum(s.num_output_tokens for s in group)
                                                    / sum(1000 * s.step_time for s in group))
    return out


def audit_drafter(engine, loop_args) -> dict:
    """Mean ms per drafter call, by part (hooks on the drafter's modules and functions)."""
    import dspark.workers.drafting as drafting
    from dspark.bench.closed_loop import run_cell

    spent, calls = Counter(), Counter()

    def timed(fn, name):
        return timed_calls(fn, name, spent, calls)

    drafter, worker = engine.draft_worker.drafter, engine.draft_worker
    saved = (drafter.run_blocks, drafter.lm_head.forward, drafting.markov_sample, worker.propose)
    drafter.run_blocks = timed(drafter.run_blocks, "backbone")
    drafter.lm_head.forward = timed(drafter.lm_head.forward, "lm_head")
    drafting.markov_sample = timed(drafting.markov_sample, "markov")
    worker.propose = timed(worker.propose, "call")
    try:
        run_cell(engine, *loop_args)
    finally:
        drafter.run_blocks, drafter.lm_head.forward, drafting.markov_sample, worker.propose = saved
    n = max(calls["call"], 1)
    out = {k: 1000 * spent[k] / n for k in ("call", "backbone", "lm_head", "markov")}
    out["rest"] = out["call"] - out["backbone"] - out["lm_head"] - out["markov"]
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from dspark.bench.closed_loop import run_cell
    from dspark.bench.engine_bench import domain_prompts
    from dspark.models.drafter_checkpoint import load_drafter
    from dspark.models.generation import SamplingParams, load_for_generation
    from dspark.workers.engine import Engine, EngineConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--temperature", type=float, default=0.0, help="of every request")
    parser.add_argument("--drafter", default="dspark", help="under checkpoints/drafters")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--max-tokens", type=int, default=64, help="of every request")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    target, tok = load_for_generation("checkpoints/target")
    prompts = domain_prompts(tok, target.config.max_position_embeddings, 64, 8, 0)
    drafter = load_drafter(Path("checkpoints/drafters") / args.drafter, target)
    c = args.concurrency
    loop = (prompts, tok.stop_ids, c, 4 * c,
            lambda i: SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature))
    warm = (prompts, tok.stop_ids, 2, 2, lambda i: SamplingParams(max_tokens=8))
    results = {}
    for name, budget, audit in (("gate", "algorithm1", audit_gate),
                                ("drafter", "fixed", audit_drafter)):
        engine = Engine(target, drafter, EngineConfig(max_num_seqs=max(c, 8), budget=budget))
        run_cell(engine, *warm)
        results[name] = audit(engine, loop)
    print(f"C={c} T={args.temperature:g} drafter {args.drafter}")
    for name, row in results.items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
