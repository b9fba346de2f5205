"""Requests that arrive at their own times, as users' do: a Poisson process of arrivals into
each system's serving front (``AsyncEngine``, the one a replica runs), in this process, with
no HTTP and no Ray between, so what it measures is the engine's.

    python -m dspark.bench.open_loop [--rates 2,4,8] [--requests 48] [--rounds 4] \\
        [--systems no-spec,dspark-d2-alg1,dspark-d2-alg1/serial] [--threads 2] [--out DIR]

``dspark bench engine`` sends a request when another finishes, so its requests always
arrive between steps; here they arrive in the middle of steps, and a step that drafts is
longer to wait for. A system is a ``dspark bench engine`` system; ``NAME/serial`` is the same
system with requests joining at the next step only (no ``Engine.intake``: as before late
admission). In each round, at each rate, the systems take turns over the same arrival times
and prompts (the order rotated every round); each cell reports time to first token, time per
output token after it and the tokens/s over the cell, and the paired ratios over the first
system of the same round (``bench/paired.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from dspark.bench.closed_loop import turn_order
from dspark.bench.engine_bench import SYSTEMS, domain_prompts, percentile
from dspark.bench.paired import paired_markdown, paired_ratios
from dspark.models.generation import SamplingParams
from dspark.workers.async_engine import AsyncEngine

NUMBERS = (("aggregate_tps", "tok/s"), ("ttft_p50_ms", "TTFT p50"),
           ("ttft_p90_ms", "TTFT p90"), ("tpot_p50_ms", "TPOT p50"))
"""The paired numbers: key and column header."""


def arrival_times(rate: float, num: int, seed: int) -> list[float]:
    """``num`` arrival times (seconds from the cell's start) of a Poisson process of
    ``rate`` requests per second; the first at 0."""
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(num):
        times.append(now)
        now += rng.expovariate(rate)
    return times


async def run_cell(front: AsyncEngine, prompts: Sequence[list[int]], arrivals: Sequence[float],
                   params: SamplingParams, stop_ids: Sequence[int]) -> list[dict]:
    """Request i (prompt ``i mod len(prompts)``) sent at ``arrivals[i]`` seconds from now;
    returns each one's sending, first-token and end times (``perf_counter``) and tokens."""
    start = time.perf_counter()

    async def one(i: int) -> dict:
        await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
        sent, first, tokens = time.perf_counter(), None, 0
        async for out in front.generate(prompts[i % len(prompts)], params, stop_ids):
            if out.new_token_ids and first is None:
                first = time.perf_counter()
            tokens += len(out.new_token_ids)
        return {"sent": sent, "first": first, "end": time.perf_counter(), "tokens": tokens}

    return list(await asyncio.gather(*(one(i) for i in range(len(arrivals)))))


def summarize(requests: Sequence[dict]) -> dict:
    """A cell's numbers: TTFT and TPOT percentiles (ms), tokens/s from the first sending to
    the last end, and the mean requests in flight over that span (Little's law)."""
    span = max(r["end"] for r in requests) - min(r["sent"] for r in requests)
    ttft = [1000 * (r["first"] - r["sent"]) for r in requests if r["first"] is not None]
    tpot = [1000 * (r["end"] - r["first"]) / (r["tokens"] - 1)
            for r in requests if r["first"] is not None and r["tokens"] > 1]
    return {"requests": len(requests), "tokens": sum(r["tokens"] for r in requests),
            "aggregate_tps": sum(r["tokens"] for r in requests) / span,
            "ttft_p50_ms": percentile(ttft, 0.5), "ttft_p90_ms": percentile(ttft, 0.9),
            "tpot_p50_ms": percentile(tpot, 0.5),
            "in_flight": sum(r["end"] - r["sent"] for r in requests) / span}


def run(fronts: dict[str, AsyncEngine], prompts: Sequence[list[int]],
        stop_ids: Sequence[int], rates: Sequence[float], rounds: int, requests: int,
        params: SamplingParams, seed: int = 0, log=print) -> list[dict]:
    """Every round, at every rate, each system in turn over the same arrivals: one record
    per cell."""
    raw = []
    for rnd in range(rounds):
        for j, rate in enumerate(rates):
            arrivals = arrival_times(rate, requests, seed + 1000 * rnd + j)
            for name in turn_order(list(fronts), rnd + j):
                cell = summarize(asyncio.run(
                    run_cell(fronts[name], prompts, arrivals, params, stop_ids)))
                raw.append({"system": name, "rate": rate, "round": rnd, **cell})
                log(f"[{rnd + 1}/{rounds}] {name:24s} rate {rate:g}/s  {cell['aggregate_tps']:7.1f}"
                    f" tok/s  TTFT p50 {cell['ttft_p50_ms']:6.1f} p90 {cell['ttft_p90_ms']:6.1f}"
                    f" ms  TPOT p50 {cell['tpot_p50_ms']:5.1f} ms  in flight "
                    f"{cell['in_flight']:4.1f}")
    return raw


def build_fronts(names: Sequence[str], target, drafters_dir: Path, max_num_seqs: int,
                 seed: int) -> dict[str, AsyncEngine]:
    """One engine and its front per system name (``NAME`` or ``NAME/serial``, NAME a ``dspark
    bench engine`` system)."""
    from dspark.workers.engine import EngineConfig

    known = {s.label: s for s in SYSTEMS}
    fronts = {}
    for name in names:
        label, _, variant = name.partition("/")
        if label not in known or variant not in ("", "serial"):
            raise ValueError(f"--systems: {name!r} is not one of {sorted(known)}, "
                             "optionally with /serial")
        engine = known[label].build(target, drafters_dir, EngineConfig(
            max_num_seqs=max_num_seqs), seed)
        fronts[name] = AsyncEngine(engine)
        if variant == "serial":
            engine.intake = None  # NOTE: arrivals wait for the next step, as before
    return fronts


def paired(raw: list[dict], names: Sequence[str]) -> list[list[dict]]:
    """The paired ratios against the first system, then each ``NAME`` against ``NAME/serial``
    where both ran (what late admission changes)."""
    sets = [paired_ratios(raw, "system", names[0], NUMBERS, ("rate",))]
    for name in names:
        if f"{name}/serial" in names:
            sets.append([r for r in paired_ratios(raw, "system", f"{name}/serial", NUMBERS,
                                                  ("rate",)) if r["system"] == name])
    return sets


def markdown(raw: list[dict], sets: list[list[dict]], header: str) -> str:
    """Every cell, the paired ratios (``paired``), the medians over rounds; ``header``: the
    command and the machine (``bench/machine.py``)."""
    lines = [header.rstrip("\n"), "",
             "| round | system | rate /s | tok/s | TTFT p50 ms | TTFT p90 ms | TPOT p50 ms | "
             "in flight |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for c in raw:
        lines.append(f"| {c['round']} | {c['system']} | {c['rate']:g} | "
                     f"{c['aggregate_tps']:.1f} | {c['ttft_p50_ms']:.1f} | "
                     f"{c['ttft_p90_ms']:.1f} | {c['tpot_p50_ms']:.1f} | {c['in_flight']:.1f} |")
    for rows in sets:
        lines += paired_markdown(rows, "system", (("rate", "rate /s"),), NUMBERS)
    medians = {}
    for c in raw:
        medians.setdefault((c["system"], c["rate"]), []).append(c)
    lines += ["Medians over rounds:", "", "| system | rate /s | tok/s | TTFT p50 ms | "
              "TTFT p90 ms | TPOT p50 ms |", "|---|---:|---:|---:|---:|---:|"]
    for (name, rate), cells in medians.items():
        med = {k: statistics.median(c[k] for c in cells) for k, _ in NUMBERS}
        lines.append(f"| {name} | {rate:g} | {med['aggregate_tps']:.1f} | "
                     f"{med['ttft_p50_ms']:.1f} | {med['ttft_p90_ms']:.1f} | "
                     f"{med['tpot_p50_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def write(result: dict, out: str | None) -> str:
    """The report of ``result`` (cells, systems, command, machine), printed, and with the
    result written to ``out``/results.json and results.md when given."""
    from dspark.bench.machine import header

    text = markdown(result["cells"], paired(result["cells"], result["systems"]),
                    header(result["command"], result["machine"]))
    print(text)
    if out:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "results.json").write_text(json.dumps(result, indent=1))
        (path / "results.md").write_text(text)
    return text


def measure(args, names: list[str], rates: list[float]) -> list[dict]:
    import torch

    from dspark.models.generation import load_for_generation

    torch.set_num_threads(args.threads)
    target, tok = load_for_generation(args.target)
    prompts = domain_prompts(tok, target.config.max_position_embeddings, args.max_tokens, 24, 0)
    fronts = build_fronts(names, target, Path(args.drafters), 64, 0)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    try:
        for front in fronts.values():  # warm-up, not measured
            asyncio.run(run_cell(front, prompts, [0.0] * 4, params, tok.stop_ids))
        return run(fronts, prompts, tok.stop_ids, rates, args.rounds, args.requests, params)
    finally:
        for front in fronts.values():
            front.shutdown()


def main(argv: list[str] | None = None) -> int:
    import shlex
    import sys

    from dspark.bench.machine import describe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default="no-spec,dspark-d2-alg1,dspark-d2-alg1/serial",
                        help="comma-separated; the first is the baseline of the ratios")
    parser.add_argument("--rates", default="2,4,8", help="requests per second, comma-separated")
    parser.add_argument("--requests", type=int, default=48, help="requests per cell (>= 2)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds (>= 1)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--target", default="checkpoints/target")
    parser.add_argument("--drafters", default="checkpoints/drafters")
    parser.add_argument("--out", default=None, help="directory for results.json and results.md")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="measure nothing: report DIR/results.json again (into --out)")
    args = parser.parse_args(argv)
    if args.report:
        result = json.loads((Path(args.report) / "results.json").read_text())
        result.setdefault("systems", [s for s in args.systems.split(",") if s.strip()])
        write(result, args.out)
        return 0
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    names = [s for s in args.systems.split(",") if s.strip()]
    if not rates or min(rates) <= 0 or args.rounds < 1 or args.requests < 2 or len(names) < 2:
        raise ValueError("--rates must be > 0, --rounds >= 1, --requests >= 2, and "
                         "--systems must name at least two systems")
    raw = measure(args, names, rates)
    command = shlex.join(["python", "-m", "dspark.bench.open_loop", *sys.argv[1:]])
    write({"cells": raw, "systems": names, "command": command, "machine": describe()},
          args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
