"""What metrics and tracing cost the engine thread, measured directly.

    python -m dspark.bench.observability_cost [--out docs/results/observability]

The serving default's engine (DSpark, Algorithm 1) runs closed-loop cells at C = 1, 4, 16
(T = 1, 64 tokens) for ``--rounds`` rounds, bare and observed sharing the machine step by
step (``bench.closed_loop.interleave``, each on its own clock). Observed means what a
replica with metrics and every request traced runs: the ``ShardMetrics`` step listener and
the ``StepEvents`` rows on the engine thread, and, when a request ends, its step events
written to its span and the span ended (on the observed engine's clock here; a replica's
event loop does it). Spans go over OTLP/HTTP to a sink in this process. Per cell:

- **throughput ratio**: observed over bare aggregate tok/s, paired by round;
- **engine-thread share**: seconds inside the step observers over the step seconds;
- **span-close share**: seconds writing events and ending spans over the step seconds
  (both timed around each call: exact, not a difference of throughputs).

Export runs on background threads (the span processor's, the metrics flush), which share
the interpreter and the cores; the throughput ratio includes them, the shares do not.
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
    """Attach what an observed replica runs: the metrics step listener and the step rows
    of ``StepEvents`` on the engine thread, and, when a request finishes, its events
    written to its span and the span ended (the replica's event loop does that part).
    Returns the timed parts: (listener, step rows, span close)."""
    from dspark.cluster.tracing import StepEvents
    from dspark.workers import engine as engine_module

    events = StepEvents()
    spans: dict[str, object] = {}
    listener = Timed(metrics.on_step)
    engine.on_request_step = events.on_request_step
    # NOTE: timed where the engine builds the step's records and hands them over (only an
    # engine with ``on_request_step`` calls it)
    steps = engine_module.observe_requests = Timed(engine_module.observe_requests)

    def close(req_id: str) -> None:
        span = spans.pop(req_id)
        events.close(req_id, span)
        span.end()

    closing = Timed(close)
    real_add = engine.add_request

    def add_request(*args, **kwargs):
        req_id = real_add(*args, **kwargs)
        spans[req_id] = tracer.start_span("dspark.replica")
        events.open(req_id, spans[req_id])
        return req_id

    engine.add_request = add_request
    real_step = engine.step

    def step():  # NOTE: as AsyncEngine runs its step listeners, after each step
        result = real_step()
        if result.stats is not None:
            listener(result.stats)
        for out in result.outputs:
            if out.finished:
                closing(out.req_id)
        return result

    engine.step = step
    return listener, steps, closing


def run(rounds: int, max_tokens: int, threads: int) -> dict:
    import ray
    import torch

    from dspark.bench.closed_loop import ClosedLoop, interleave
    from dspark.bench.engine_bench import domain_prompts
    from dspark.bench.serve_bench import OtlpSink
    from dspark.cluster.metrics import ShardMetrics
    from dspark.cluster.tracing import make_tracer
    from dspark.models.drafter_checkpoint import load_drafter
    from dspark.models.generation import SamplingParams, load_for_generation
    from dspark.router.tracing import shutdown_tracing
    from dspark.workers.engine import Engine, EngineConfig

    torch.set_num_threads(threads)
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    sink = OtlpSink()
    target, tok = load_for_generation("checkpoints/target")
    prompts = domain_prompts(tok, target.config.max_position_embeddings, max_tokens, 24, 0)
    drafter = load_drafter(Path("checkpoints/drafters/dspark"), target)
    config = EngineConfig(budget="algorithm1", max_num_seqs=max(CONCURRENCIES))
    bare, observed = Engine(target, drafter, config), Engine(target, drafter, config)
    tracer = make_tracer(sink.url, 1.0, "bench")
    metrics = ShardMetrics("bench", "bench", "dspark-demo", observed.gamma, "algorithm1")
    timed = _observe(observed, tracer, metrics)
    params = lambda i: SamplingParams(temperature=1.0, max_tokens=max_tokens)  # noqa: E731
    cells = []
    try:
        for rnd in range(rounds):
            for conc in CONCURRENCIES:
                before = [t.seconds for t in timed]
                loops = {label: ClosedLoop(engine, prompts, tok.stop_ids, conc,
                                           max(8, 2 * conc), params)
                         for label, engine in (("bare", bare), ("observed", observed))}
                interleave(list(loops.values())[:: 1 - 2 * (rnd % 2)])
                spent = [t.seconds - b for t, b in zip(timed, before)]
                for label, loop in loops.items():
                    _, tokens, clock, stats = loop.result()
                    cells.append({"round": rnd, "system": label, "concurrency": conc,
                                  "aggregate_tps": tokens / clock,
                                  "step_seconds": sum(s.step_time for s in stats),
                                  "observer_seconds": spent[0] + spent[1],
                                  "close_seconds": spent[2]})
    finally:
        metrics.close()
        shutdown_tracing()
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
        rounds = sorted({c["round"] for c in cells})
        by = {(c["round"], c["system"]): c for c in cells if c["concurrency"] == conc}
        ratios = [by[r, "observed"]["aggregate_tps"] / by[r, "bare"]["aggregate_tps"]
                  for r in rounds]
        obs = [c for c in cells if c["system"] == "observed" and c["concurrency"] == conc]
        step_s = sum(c["step_seconds"] for c in obs)
        out.append({"concurrency": conc, "bare_tps": med("bare", "aggregate_tps"),
                    "observed_tps": med("observed", "aggregate_tps"),
                    "ratio": statistics.median(ratios), "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                    "observer_share": sum(c["observer_seconds"] for c in obs) / step_s,
                    "close_share": sum(c["close_seconds"] for c in obs) / step_s})
    return out


def markdown(result: dict, command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"Engine (DSpark, Algorithm 1), T=1, {result['max_tokens']} tokens, "
             f"{result['rounds']} rounds; in each, bare and observed (metrics + every request "
             "traced) share the machine step by step. Ratios are paired by round: median "
             "[min–max].", "",
             "| C | bare tok/s | observed tok/s | observed / bare | engine thread: step "
             "observers | span close: step events written | ",
             "|---:|---:|---:|---:|---:|---:|"]
    for row in result["summary"]:
        lines.append(f"| {row['concurrency']} | {row['bare_tps']:.1f} | "
                     f"{row['observed_tps']:.1f} | {row['ratio']:.3f} "
                     f"[{row['ratio_min']:.3f}–{row['ratio_max']:.3f}] | "
                     f"{100 * row['observer_share']:.2f} % | {100 * row['close_share']:.2f} % |")
    lines.append("")
    lines.append("Shares are of the observed engine's step time.")
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
