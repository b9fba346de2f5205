"""What metrics and tracing cost the engine thread, measured directly.

    python -m dspark.bench.observability_cost [--out docs/results/observability]

The serving default's engine (DSpark, Algorithm 1) runs closed-loop cells at C = 1, 4, 16
(T = 1, 64 tokens), alternately bare and observed, for ``--rounds`` rounds. Observed means
what a replica with metrics and tracing at ratio 1 runs on its engine thread: the
``ShardMetrics`` step listener, and the ``on_request_step`` records with one span per
request and one event per request-step, exported over OTLP/HTTP to a sink in this process.
Two numbers per cell:

- **observer share**: seconds inside the observers over the cell's step seconds (timed
  around each call: exact, not a difference of noisy throughputs);
- **throughput ratio**: observed over bare aggregate tok/s (medians over rounds; this
  machine's cells vary by about ±15 %, so it bounds nothing finer than that).

Export runs on background threads (the span processor's, the metrics flush), which share
the interpreter; the throughput ratio includes them, the observer share does not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

CONCURRENCIES = (1, 4, 16)


class Timed:
    """Wraps a callable, adding its wall time to ``seconds``."""

    def __init__(self, fn) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args):
        start = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.seconds += time.perf_counter() - start


def _observe(engine, tracer, metrics):
    """Attach what an observed replica runs on its engine thread; the timed observers and
    a hook that opens each new request's span."""
    from dspark.cluster.tracing import add_step_events

    spans: dict[str, object] = {}
    listener = Timed(metrics.on_step)
    engine.on_request_step = lambda rows: add_step_events(spans, rows)
    # NOTE: timed where the engine builds the step's records and hands them over
    steps = engine._observe_requests = Timed(engine._observe_requests)
    real_add = engine.add_request

    def add_request(*args, **kwargs):
        req_id = real_add(*args, **kwargs)
        spans[req_id] = tracer.start_span("dspark.replica")
        return req_id

    engine.add_request = add_request
    real_step = engine.step

    def step():  # NOTE: as AsyncEngine runs its step listeners, after each step
        result = real_step()
        if result.stats is not None:
            listener(result.stats)
        return result

    engine.step = step
    return listener, steps, spans


def run(rounds: int, max_tokens: int, threads: int) -> dict:
    import ray
    import torch

    from dspark.bench.closed_loop import run_cell
    from dspark.bench.engine_bench import domain_prompts
    from dspark.bench.serve_bench import OtlpSink
    from dspark.cluster.metrics import ShardMetrics
    from dspark.cluster.tracing import make_tracer
    from dspark.models.drafter_checkpoint import load_drafter
    from dspark.models.generation import SamplingParams, load_for_generation
    from dspark.workers.engine import Engine, EngineConfig

    torch.set_num_threads(threads)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    sink = OtlpSink()
    target, tok = load_for_generation("checkpoints/target")
    prompts = domain_prompts(tok, target.config.max_position_embeddings, max_tokens, 24, 0)
    drafter = load_drafter(Path("checkpoints/drafters/dspark"), target)
    config = EngineConfig(budget="algorithm1", max_num_seqs=max(CONCURRENCIES))
    bare, observed = Engine(target, drafter, config), Engine(target, drafter, config)
    tracer = make_tracer(sink.url, 1.0, "bench")
    metrics = ShardMetrics("bench", "bench", "dspark-demo", observed.gamma, "algorithm1")
    listener, steps, spans = _observe(observed, tracer, metrics)
    cells = []
    try:
        for rnd in range(rounds):
            for conc in CONCURRENCIES:
                for label, engine in (("bare", bare), ("observed", observed))[:: 1 - 2 * (rnd % 2)]:
                    before = listener.seconds + steps.seconds
                    _, tokens, wall, stats = run_cell(
                        engine, prompts, tok.stop_ids, conc, max(8, 2 * conc),
                        lambda i: SamplingParams(temperature=1.0, max_tokens=max_tokens))
                    if label == "observed":
                        for span in spans.values():
                            span.end()
                        spans.clear()
                    step_s = sum(s.step_time for s in stats)
                    cells.append({"round": rnd, "system": label, "concurrency": conc,
                                  "aggregate_tps": tokens / wall, "step_seconds": step_s,
                                  "observer_seconds": listener.seconds + steps.seconds - before})
    finally:
        metrics.close()
        sink.close()
        ray.shutdown()
    return {"cells": cells, "summary": summarize(cells), "rounds": rounds,
            "max_tokens": max_tokens, "threads": threads}


def summarize(cells: list[dict]) -> list[dict]:
    out = []
    for conc in CONCURRENCIES:
        def med(system, key, conc=conc):
            return statistics.median(c[key] for c in cells
                                     if c["system"] == system and c["concurrency"] == conc)
        obs = [c for c in cells if c["system"] == "observed" and c["concurrency"] == conc]
        share = sum(c["observer_seconds"] for c in obs) / sum(c["step_seconds"] for c in obs)
        out.append({"concurrency": conc, "bare_tps": med("bare", "aggregate_tps"),
                    "observed_tps": med("observed", "aggregate_tps"),
                    "ratio": med("observed", "aggregate_tps") / med("bare", "aggregate_tps"),
                    "observer_share": share})
    return out


def markdown(result: dict, command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"Engine (DSpark, Algorithm 1), T=1, {result['max_tokens']} tokens, "
             f"{result['rounds']} rounds alternating bare and observed (metrics + every "
             "request traced).", "",
             "| C | bare tok/s | observed tok/s | observed / bare | engine-thread time in "
             "the observers |", "|---:|---:|---:|---:|---:|"]
    for row in result["summary"]:
        lines.append(f"| {row['concurrency']} | {row['bare_tps']:.1f} | "
                     f"{row['observed_tps']:.1f} | {row['ratio']:.3f} | "
                     f"{100 * row['observer_share']:.2f} % |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="rounds (systems alternate)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", default="runs/observability-cost", help="results directory")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    result = run(args.rounds, args.max_tokens, args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m dspark.bench.observability_cost " + " ".join(argv)
    (out / "cost.json").write_text(json.dumps({**result, "command": command.strip()}, indent=1))
    text = markdown(result, command.strip())
    (out / "cost.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
