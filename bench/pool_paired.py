"""`python -m dspark.bench.pool_paired RUN.json ... --system S --baseline B`: the paired
ratios of several `dspark bench serve` runs pooled (docs/observability.md): each round's
S over B in the same round and at the same C, from every run's ``rounds``; per C the
median, quartiles and mean over all pooled rounds, for aggregate tokens/s and for the
apps' CPU per output token."""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def pooled(runs: list[dict], system: str, baseline: str) -> dict[int, dict[str, list[float]]]:
    """C -> metric -> the paired ratio of every round of every run."""
    out: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        cells = {(r["round"], r["system"], r["concurrency"]): r for r in run["rounds"]}
        for (rnd, name, conc), cell in cells.items():
            base = cells.get((rnd, baseline, conc))
            if name != system or base is None:
                continue
            for metric in ("aggregate_tps", "cpu_ms_per_token"):
                out[conc][metric].append(cell[metric] / base[metric])
    return out


def summary(values: list[float]) -> str:
    v = sorted(values)
    q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return f"{statistics.median(v):.3f} [{q1:.3f}–{q3:.3f}] mean {statistics.mean(v):.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="serve.json files of `dspark bench serve`")
    parser.add_argument("--system", required=True, help="the system measured")
    parser.add_argument("--baseline", required=True, help="the system it is paired with")
    args = parser.parse_args(argv)
    runs = [json.load(open(path, encoding="utf-8")) for path in args.runs]
    for conc, metrics in sorted(pooled(runs, args.system, args.baseline).items()):
        n = len(metrics["aggregate_tps"])
        print(f"C={conc} rounds {n}: aggregate tok/s {summary(metrics['aggregate_tps'])}; "
              f"CPU per token {summary(metrics['cpu_ms_per_token'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
