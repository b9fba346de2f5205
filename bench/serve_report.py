"""The report of `dspark bench serve`: markdown tables of the cells (medians with their
spread over rounds), the paired ratios, the router comparison, and the files written."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from dspark.bench.engine_bench import ratio_columns
from dspark.bench.machine import describe, header
from dspark.bench.paired import paired_markdown
from dspark.bench.replica_engine import NUMBERS as ENGINE_NUMBERS
from dspark.bench.serve_bench import PAIRED


def spread(cell: dict, name: str, scale: float = 1.0, digits: int = 1) -> str:
    """``median [min–max]`` (just the median for a cell without a spread)."""
    text = f"{scale * cell[name]:.{digits}f}"
    if f"{name}_min" in cell and cell.get("rounds", 1) > 1:
        text += (f" [{scale * cell[f'{name}_min']:.{digits}f}–"
                 f"{scale * cell[f'{name}_max']:.{digits}f}]")
    return text


def _x(row: dict | None, key: str) -> str:
    return f"{row[key]:.2f}" if row and key in row else "–"


def markdown(result: dict) -> str:
    return "\n".join(system_markdown(result) + engine_markdown(result)
                     + paired_table(result.get("paired", [])) + router_markdown(result)
                     + paired_table(result.get("router_paired", []), "router")) + "\n"


def paired_table(rows: Sequence[dict], label: str = "system") -> list[str]:
    """The paired ratios of the HTTP benchmark (``bench/paired.py``)."""
    return paired_markdown(rows, label, (("concurrency", "C"),), PAIRED)


def system_markdown(result: dict) -> list[str]:
    if not result["cells"]:
        return []
    ratio = {(r["system"], r["concurrency"]): r for r in result["ratios"]}
    lines = ["Each number is the median over rounds, with [min–max] over rounds; ratios are "
             "of medians.", "",
             "| system | C | per-user tok/s | aggregate tok/s | × no-spec (user / agg) | "
             "× MTP-1 (user / agg) | TTFT p50 ms | TTFT p90 ms | TTFT × no-spec (p50 / p90) "
             "| TPOT p50 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["cells"]:
        r = ratio[(c["system"], c["concurrency"])]
        lines.append(
            f"| {c['system']} | {c['concurrency']} | {spread(c, 'per_user_tps')} | "
            f"{spread(c, 'aggregate_tps')} | {ratio_columns(r)} | "
            f"{spread(c, 'ttft_p50', 1000, 0)} | {spread(c, 'ttft_p90', 1000, 0)} | "
            f"{_x(r, 'ttft_p50_vs_no-spec')} / {_x(r, 'ttft_p90_vs_no-spec')} | "
            f"{spread(c, 'tpot_p50', 1000)} |")
    return lines + [""]


def engine_markdown(result: dict) -> list[str]:
    """Each system's replica engine during its cells (``bench/replica_engine.py``), medians
    over rounds; empty where no cell has them."""
    cells = [c for c in result["cells"] if "engine_busy" in c]
    if not cells:
        return []
    lines = ["The replica's engine during each cell, from its own counters (medians over "
             "rounds): busy is its time in steps over the cell's wall time (the rest it "
             "waited for requests on the HTTP path); drafted, the share of decoding "
             "request-steps that drafted; draft share, of its step time.", "",
             "| system | C | " + " | ".join(h for _, h, _ in ENGINE_NUMBERS) + " |",
             "|---|---:|" + "---:|" * len(ENGINE_NUMBERS)]
    for c in cells:
        lines.append(f"| {c['system']} | {c['concurrency']} | " + " | ".join(
            f"{c[k]:.{digits}f}" for k, _, digits in ENGINE_NUMBERS) + " |")
    return lines + [""]


def router_markdown(result: dict) -> list[str]:
    if not result["routers"]:
        return []
    ratio = {(r["router"], r["concurrency"]): r for r in result.get("router_ratios", [])}
    lines = ["Skewed workload (one request in four is 4× long), two replicas; medians over "
             "rounds with [min–max]:", "",
             "| router | C | per-user tok/s | aggregate tok/s | TTFT p50 ms | TTFT p90 ms | "
             "TTFT p99 ms | × pow2 (agg / TTFT p50 / TTFT p90) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["routers"]:
        r = ratio.get((c["router"], c["concurrency"]))
        lines.append(
            f"| {c['router']} | {c['concurrency']} | {spread(c, 'per_user_tps')} | "
            f"{spread(c, 'aggregate_tps')} | {spread(c, 'ttft_p50', 1000, 0)} | "
            f"{spread(c, 'ttft_p90', 1000, 0)} | {1000 * c['ttft_p99']:.0f} | "
            f"{_x(r, 'aggregate_tps_vs_pow2')} / {_x(r, 'ttft_p50_vs_pow2')} / "
            f"{_x(r, 'ttft_p90_vs_pow2')} |")
    rounds = result.get("router_rounds", [])
    if rounds:
        lines += ["", "Each round (routers in turn, the order rotated every round):", "",
                  "| round | router | aggregate tok/s | TTFT p50 / p90 / p99 ms |",
                  "|---:|---|---:|---:|"]
        lines += [f"| {c['round'] + 1} | {c['router']} | {c['aggregate_tps']:.1f} | "
                  f"{1000 * c['ttft_p50']:.0f} / {1000 * c['ttft_p90']:.0f} / "
                  f"{1000 * c['ttft_p99']:.0f} |" for c in rounds]
    return lines


def write_results(result: dict, out_dir: str | Path, command: str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = describe()
    (out_dir / "serve.json").write_text(json.dumps(dict(result, command=command,
                                                        machine=machine), indent=1))
    (out_dir / "serve.md").write_text(header(command, machine) + markdown(result))
    return [out_dir / "serve.json", out_dir / "serve.md"]
