"""Compare a committed results JSON with its version at an earlier git revision.

    python -P -m dspark.bench.compare_runs docs/results/acceptance.json --before REV
    python -P -m dspark.bench.compare_runs docs/results/engine.json --before REV

For ``dspark eval`` results: every (drafter, set) cell's τ before and after, the change in
standard errors (the two cells' errors combined), its committed tokens and mean drafts per
round, how many cells moved by more than two,
and the macro averages. For ``dspark bench engine`` results: every (system, T, C) cell's
aggregate tokens/s after / before, and its ratio to no speculation before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
from pathlib import Path


def load_before(path: str, rev: str) -> dict:
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True,
                          text=True, check=True).stdout.strip()
    rel = Path(path).resolve().relative_to(root)
    shown = subprocess.run(["git", "show", f"{rev}:{rel}"], capture_output=True, text=True,
                           check=True, cwd=root)
    return json.loads(shown.stdout)


def compare_acceptance(old: dict, new: dict) -> list[str]:
    lines, moved, total = [], 0, 0
    for drafter, entry in new["drafters"].items():
        for name, cell in entry["sets"].items():
            before = old["drafters"].get(drafter, {}).get("sets", {}).get(name)
            if before is None:
                continue
            error = math.hypot(before["tau_stderr"], cell["tau_stderr"]) or 1.0
            z = (cell["tau"] - before["tau"]) / error
            total += 1
            moved += abs(z) > 2
            lines.append(f"{drafter:10s} {name:10s} tau {before['tau']:.2f} -> {cell['tau']:.2f}"
                         f"  ({z:+.1f} stderr)  tokens {before['tokens']} -> {cell['tokens']}"
                         f"  drafts per round {before['mean_proposed']:.2f} -> "
                         f"{cell['mean_proposed']:.2f}")
    lines.append(f"{moved} of {total} cells moved by more than two standard errors")
    return lines


def compare_engine(old: dict, new: dict) -> list[str]:
    def keyed(result, part):
        return {(c["system"], c["temperature"], c["concurrency"]): c for c in result[part]}

    old_cells, new_cells = keyed(old, "cells"), keyed(new, "cells")
    old_ratios, new_ratios = keyed(old, "ratios"), keyed(new, "ratios")
    lines = []
    for key in sorted(new_cells, key=lambda k: (k[1], k[0], k[2])):
        if key not in old_cells:
            continue
        speed = new_cells[key]["aggregate_tps"] / old_cells[key]["aggregate_tps"]
        ratio = ""
        if key in old_ratios and key in new_ratios:
            ratio = (f"  x no-spec {old_ratios[key]['aggregate_vs_no-spec']:.2f} -> "
                     f"{new_ratios[key]['aggregate_vs_no-spec']:.2f}")
        lines.append(f"{key[0]:12s} T={key[1]:g} C={key[2]:<3d} aggregate tok/s after / "
                     f"before {speed:.2f}{ratio}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a results JSON of dspark eval or dspark bench engine")
    parser.add_argument("--before", required=True, help="the git revision to compare with")
    args = parser.parse_args(argv)
    new = json.loads(Path(args.path).read_text())
    old = load_before(args.path, args.before)
    compare = compare_acceptance if "drafters" in new else compare_engine
    print("\n".join(compare(old, new)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
