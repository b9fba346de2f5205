"""The acceptance report: JSON, a markdown table and the figures (paper Table 1, Figs 2/5/6)."""

from __future__ import annotations

import json
from pathlib import Path

from dspark.bench.acceptance import BENCHMARKS, DOMAIN_SETS, threshold_sweep
from dspark.bench.plots import (
    plot_bars,
    plot_conditional_acceptance,
    plot_reliability,
    plot_threshold_sweep,
)
from dspark.models.calibration import calibration_report
from dspark.models.drafter_config import DrafterConfig
from dspark.workers.offline import Rounds
from dspark.workers.stats import RoundRecord

GROUPS = {"held-out (ours)": DOMAIN_SETS, "benchmarks": BENCHMARKS}
THRESHOLDS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]


def to_rounds(recs: list[dict], prompts: int) -> Rounds:
    return Rounds(records=[RoundRecord(**r) for r in recs], prompts=prompts)


def pooled(per_set: dict[str, Rounds], names) -> Rounds:
    out = Rounds()
    for n in names:
        if n in per_set:
            out.records += per_set[n].records
            out.prompts += per_set[n].prompts
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def build_report(
    raw: dict[str, dict[str, tuple[list[dict], int]]],
    configs: dict[str, DrafterConfig],
    eval_config: dict,
    out_dir: str | Path,
    command: str,
) -> dict:
    out_dir = Path(out_dir)
    rounds = {d: {s: to_rounds(*v) for s, v in sets.items()} for d, sets in raw.items()}
    table: dict[str, dict] = {}
    for name, per_set in rounds.items():
        block = configs[name].block_size
        sets = {s: r.metrics(max(block, 1)) for s, r in per_set.items()}
        macro = {
            g: _mean([sets[s]["tau"] for s in members if s in sets])
            for g, members in GROUPS.items()
        }
        custom = [s for s in sets if s not in DOMAIN_SETS + BENCHMARKS]
        table[name] = {
            "method": configs[name].method,
            "sets": sets,
            "macro": macro,
            "custom_sets": custom,
        }
    report = {"command": command, "config": eval_config, "drafters": table}
    report["ratios"] = _ratios(table)
    present = {s for per_set in rounds.values() for s in per_set}
    groups = {g: [s for s in members if s in present] for g, members in GROUPS.items()}
    groups["other prompts"] = sorted(present - set(DOMAIN_SETS + BENCHMARKS))
    report["conditional_acceptance"] = {
        g: {
            d: pooled(rounds[d], members).metrics(7)["conditional_acceptance"]
            for d in rounds
            if configs[d].block_size > 1
        }
        for g, members in groups.items()
        if members
    }
    report["calibration"], report["threshold_sweep"] = _confidence(rounds, configs, out_dir)
    _figures(report, out_dir)
    (out_dir / "acceptance.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _ratios(table: dict[str, dict]) -> dict:
    out: dict = {}
    for g in GROUPS:
        taus = {d: row["macro"][g] for d, row in table.items() if row["macro"][g] is not None}
        if not taus:
            continue
        entry = {}
        for a, b in (("dspark", "dflash"), ("dspark", "eagle3"), ("dflash", "eagle3")):
            if a in taus and b in taus:
                entry[f"{a}/{b}"] = taus[a] / taus[b]
        if "mtp" in taus:
            entry["above_mtp"] = {d: taus[d] > taus["mtp"] for d in taus if d != "mtp"}
        out[g] = entry
    return out


def _confidence(rounds, configs, out_dir: Path) -> tuple[dict, dict]:
    calib, sweep = {}, {}
    for name, per_set in rounds.items():
        cfg = configs[name]
        if not cfg.confidence_head:
            continue
        allr = pooled(per_set, list(per_set))
        logits, proposed, accepted = allr.confidence_arrays(cfg.block_size)
        raw = calibration_report(logits, proposed, accepted)
        entry = {"raw": raw}
        if cfg.sts_temperatures is not None:
            entry["sts"] = calibration_report(
                logits, proposed, accepted, temperatures=cfg.sts_temperatures
            )
        calib[name] = entry
        labels = {"raw": raw} | ({"STS": entry["sts"]} if "sts" in entry else {})
        plot_reliability(labels, out_dir / f"reliability_{name}.png")
        sweep[name] = threshold_sweep(allr, cfg.sts_temperatures, THRESHOLDS)
    return calib, sweep


def _figures(report: dict, out_dir: Path) -> None:
    slugs = {"held-out (ours)": "heldout", "benchmarks": "benchmarks", "other prompts": "other"}
    for g, curves in report["conditional_acceptance"].items():
        slug = slugs[g]
        if curves:
            plot_conditional_acceptance(
                curves,
                out_dir / f"conditional_acceptance_{slug}.png",
                title=f"conditional acceptance per position, {g}",
            )
    if report["threshold_sweep"]:
        plot_threshold_sweep(
            {
                d: [(p["verified_per_round"], p["tau"]) for p in pts]
                for d, pts in report["threshold_sweep"].items()
            },
            out_dir / "threshold_sweep.png",
        )
    bars = {
        d: {s: m["tau"] for s, m in row["sets"].items()} for d, row in report["drafters"].items()
    }
    plot_bars(bars, out_dir / "tau.png", "accepted length τ (T=1, block 7)")


def markdown(report: dict) -> str:
    drafters = report["drafters"]
    seen = {s for row in drafters.values() for s in row["sets"]}
    order = list(DOMAIN_SETS + BENCHMARKS)
    sets = [s for s in order if s in seen] + sorted(seen - set(order))
    head = "| drafter | " + " | ".join(sets) + " | macro held-out | macro benchmarks |"
    lines = [head, "|" + "---|" * (len(sets) + 3)]
    for name, row in drafters.items():
        cells = [f"{row['sets'][s]['tau']:.2f}" if s in row["sets"] else "–" for s in sets]
        macro = [row["macro"][g] for g in GROUPS]
        cells += [f"{m:.2f}" if m is not None else "–" for m in macro]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}%" if pct else f"{x:.2f}"


def markdown_details(report: dict) -> str:
    """Ratios, per-position conditional acceptance, calibration and the threshold sweep."""
    out = ["", "### Ratios of macro-average τ", ""]
    for group, entry in report["ratios"].items():
        pairs = ", ".join(f"{k} = {v:.3f}" for k, v in entry.items() if k != "above_mtp")
        above = entry.get("above_mtp", {})
        beaten = [d for d, ok in above.items() if not ok]
        tail = "every drafter above MTP-1" if not beaten else f"not above MTP-1: {beaten}"
        out.append(f"- {group}: {pairs}; {tail}")
    for group, curves in report["conditional_acceptance"].items():
        out += ["", f"### Conditional acceptance per position, {group}", ""]
        out.append("| drafter | " + " | ".join(str(k) for k in range(1, 8)) + " |")
        out.append("|---" * 8 + "|")
        for d, vals in curves.items():
            out.append(f"| {d} | " + " | ".join(_fmt(v) for v in vals) + " |")
    for d, entry in report["calibration"].items():
        out += ["", f"### Confidence head of {d}: raw vs STS (all evaluation rounds pooled)", ""]
        out.append(
            "| position | rounds | ECE raw | ECE STS | AUC raw | AUC STS | Brier raw | Brier STS |"
        )
        out.append("|---" * 8 + "|")
        sts = {p["position"]: p for p in entry.get("sts", {}).get("positions", [])}
        for p in entry["raw"]["positions"]:
            q = sts.get(p["position"], {})
            out.append(
                f"| {p['position']} | {p['count']} | {_fmt(p['ece'], True)} | "
                f"{_fmt(q.get('ece'), True)} | {_fmt(p['auc'])} | {_fmt(q.get('auc'))} | "
                f"{_fmt(p['brier'])} | {_fmt(q.get('brier'))} |"
            )
    for d, points in report["threshold_sweep"].items():
        out += ["", f"### Static confidence threshold sweep, {d} (STS-calibrated σ)", ""]
        out.append("| θ | verified tokens / round | τ | τ / verified |")
        out.append("|---|---|---|---|")
        for pt in points:
            out.append(
                f"| {pt['threshold']:.2f} | {pt['verified_per_round']:.2f} | {pt['tau']:.2f} | "
                f"{pt['efficiency']:.3f} |"
            )
    return "\n".join(out) + "\n"
