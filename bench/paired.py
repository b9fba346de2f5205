"""Paired ratios: in each round, a system's number over the baseline's in the same round
and the same cell; the median over rounds with its min and max.

A round's systems run back to back (``dspark bench serve``) or step by step (``dspark bench
engine``), so a drift of the machine's speed between rounds cancels out of a round's ratio;
a ratio of medians over rounds keeps it."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def paired_ratios(raw: Sequence[dict], label: str, baseline: str,
                  columns: Sequence[tuple[str, str]],
                  within: Sequence[str] = ("concurrency",)) -> list[dict]:
    """Per (``label`` value, ``within`` values): each round's numbers (the keys of
    ``columns``, (key, header) pairs as ``paired_markdown`` takes them) over the
    ``baseline``'s in the same round with the same ``within`` values; the median over
    rounds with its min and max (``<number>_min``, ``<number>_max``). Every record of
    ``raw`` carries ``round``."""
    numbers = [key for key, _ in columns]

    def cell(c: dict) -> tuple:
        return tuple(c[k] for k in within)

    base = {(c["round"], *cell(c)): c for c in raw if c[label] == baseline}
    groups: dict[tuple, list[dict]] = {}
    for c in raw:
        ref = base.get((c["round"], *cell(c)))
        if c[label] == baseline or ref is None:
            continue
        groups.setdefault((c[label], *cell(c)), []).append(
            {q: c[q] / ref[q] if ref[q] else float("nan") for q in numbers
             if q in c and q in ref})
    out = []
    for (name, *where), rows in groups.items():
        row = {label: name, **dict(zip(within, where)), "baseline": baseline,
               "rounds": len(rows)}
        for q in numbers:
            values = [r[q] for r in rows if q in r]
            if values:
                row[q], row[f"{q}_min"], row[f"{q}_max"] = (statistics.median(values),
                                                            min(values), max(values))
        out.append(row)
    return out


def paired_markdown(rows: Sequence[dict], label: str, within: Sequence[tuple[str, str]],
                    numbers: Sequence[tuple[str, str]]) -> list[str]:
    """The paired ratios as a table: ``label``, the ``within`` columns and the rounds, then
    each of ``numbers`` as median [min–max] ((key, header) pairs)."""
    if not rows:
        return []

    def r(row: dict, q: str) -> str:
        if q not in row:
            return "–"
        return f"{row[q]:.3f} [{row[q + '_min']:.3f}–{row[q + '_max']:.3f}]"

    where = " and ".join(header for _, header in within)
    lines = ["", f"Paired ratios against {rows[0]['baseline']}: in each round, the {label}'s "
             f"number over the baseline's in the same round and at the same {where}; the "
             f"median over rounds with [min–max]:", "",
             "| " + " | ".join([label, *(h for _, h in within), "rounds",
                                 *(h for _, h in numbers)]) + " |",
             "|---|" + "---:|" * (len(within) + 1 + len(numbers))]
    for row in rows:
        cells = [str(row[label]), *(f"{row[k]:g}" for k, _ in within), str(row["rounds"]),
                 *(r(row, q) for q, _ in numbers)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]
