"""Plots of drafter evaluations, written as PNG files (matplotlib, Agg backend).

Terms:

* A *calibration report* is the dict returned by ``dspark.models.calibration
  .calibration_report``; its ``reliability`` entry gives, per draft position, the non-empty
  bins as ``[mean_pred, mean_label, count]``.
* *Conditional acceptance* at draft position k is P(draft k accepted | drafts 1..k-1
  accepted).
* *tau* (accepted length) is the mean number of tokens accepted per verification round.

matplotlib is imported lazily, inside each function, so importing this module is cheap.
"""

from __future__ import annotations

import math
from pathlib import Path

_NCOLS = 3  # panels per row in the reliability grid


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    """Write ``fig`` to ``path`` as PNG (creating parent folders), close it, return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return out


def _require(mapping: dict, name: str) -> None:
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{name} must be a non-empty dict")


def _by_position(report: dict, key: str) -> dict[int, dict]:
    """``report[key]`` (a list of per-position dicts) keyed by position."""
    return {row["position"]: row for row in report.get(key, [])}


def _panel_title(position: int, reports: dict[str, dict]) -> str:
    """``"position k (ECE raw 3.1% / STS 0.8%)"`` over the labels that have position k."""
    parts = []
    for label, report in reports.items():
        row = _by_position(report, "positions").get(position)
        if row is not None:
            parts.append(f"{label} {100.0 * row['ece']:.1f}%")
    return f"position {position} (ECE {' / '.join(parts)})" if parts else f"position {position}"


def plot_reliability(reports: dict[str, dict], path) -> Path:
    """Reliability diagrams: one panel per draft position, 3 per row.

    Each panel plots, for every label in ``reports`` (e.g. "raw", "STS"), the per-bin mean
    predicted prefix survival against the observed prefix acceptance, plus the y = x line.
    """
    _require(reports, "reports")
    positions = sorted({p for r in reports.values() for p in _by_position(r, "reliability")})
    if not positions:
        raise ValueError("reports must hold at least one position with reliability bins")
    plt = _pyplot()
    nrows = math.ceil(len(positions) / _NCOLS)
    fig, axes = plt.subplots(nrows, _NCOLS, figsize=(4.2 * _NCOLS, 3.8 * nrows), squeeze=False)
    for ax, position in zip(axes.flat, positions):
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="y = x")
        for label, report in reports.items():
            entry = _by_position(report, "reliability").get(position)
            if entry is None or not entry["bins"]:
                continue
            mean_pred = [b[0] for b in entry["bins"]]
            mean_label = [b[1] for b in entry["bins"]]
            ax.plot(mean_pred, mean_label, marker="o", markersize=3, label=label)
        ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), title=_panel_title(position, reports))
        ax.set_xlabel("mean predicted survival")
        ax.set_ylabel("observed prefix acceptance")
        ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(positions) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def plot_conditional_acceptance(
    curves: dict[str, list[float | None]], path, title: str = ""
) -> Path:
    """Conditional acceptance vs draft position 1..K, one line per drafter; None is skipped."""
    _require(curves, "curves")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, values in curves.items():
        points = [(k, v) for k, v in enumerate(values, start=1) if v is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("draft position")
    ax.set_ylabel("conditional acceptance")
    ax.set_ylim(0, 1.02)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_threshold_sweep(curves: dict[str, list[tuple[float, float]]], path) -> Path:
    """Accepted length tau against verified tokens per round, one line per name.

    Each curve is a list of ``(mean verified tokens per round, tau)`` points, typically one
    per confidence threshold; points are drawn in order of increasing verified tokens.
    """
    _require(curves, "curves")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, points in curves.items():
        if not points:
            continue
        xs, ys = zip(*sorted((float(x), float(y)) for x, y in points))
        ax.plot(xs, ys, marker="o", markersize=4, label=name)
    ax.set_xlabel("verified tokens per round")
    ax.set_ylabel("accepted length τ")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_bars(table: dict[str, dict[str, float]], path, title: str) -> Path:
    """Grouped bar chart: one group per column (dataset), one bar per row (drafter).

    ``table[row][column]`` is the value; a missing cell leaves a gap.
    """
    _require(table, "table")
    columns: list[str] = []
    for cells in table.values():
        columns += [c for c in cells if c not in columns]
    if not columns:
        raise ValueError("table must hold at least one column (dataset)")
    plt = _pyplot()
    width = 0.8 / len(table)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.4 * len(columns) * max(1, len(table) / 2)), 4.2))
    for i, (row, cells) in enumerate(table.items()):
        xs = [j + (i - (len(table) - 1) / 2) * width for j, c in enumerate(columns) if c in cells]
        ys = [float(cells[c]) for c in columns if c in cells]
        bars = ax.bar(xs, ys, width=width, label=row)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)
