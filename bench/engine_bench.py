"""`dspark bench engine`: an in-process closed-loop load benchmark of the engine.

For each configuration (no speculation, MTP-1, DFlash γ=7, DSpark γ=7, DSpark + Algorithm 1,
DSpark + async top-K), temperature and concurrency C, C requests are kept in flight: when
one finishes the next prompt enters. Prompts are the held-out math, code and chat prompts,
interleaved, the same list for every configuration.

- *per-user tokens/s*: a request's output tokens over the time from its arrival to its
  last token, averaged over requests;
- *aggregate tokens/s*: all output tokens over the wall time of the cell;
- ratios are taken against no speculation and against MTP-1 at the same C and temperature,
  all measured in one run: within a cell the configurations share the machine step by step,
  each timed on its own clock (``bench/closed_loop.py``), and the sweep repeats ``rounds``
  times.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dspark.bench.closed_loop import ClosedLoop, interleave, run_cell, step_order
from dspark.bench.machine import describe, header
from dspark.bench.paired import paired_markdown, paired_ratios
from dspark.models.drafter_checkpoint import load_drafter
from dspark.models.generation import SamplingParams
from dspark.models.target import TargetModel
from dspark.workers.engine import Engine, EngineConfig


@dataclass(frozen=True)
class BenchConfig:
    concurrencies: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    temperatures: tuple[float, ...] = (0.0, 1.0)
    max_tokens: int = 64
    """Output tokens per request (requests may stop earlier at end of turn)."""
    min_requests: int = 32
    """Requests finished per cell: max(min_requests, 2 * C)."""
    seed: int = 0
    """The engines' seed: the random streams of the (unseeded) requests."""
    rounds: int = 3
    """Times the whole sweep is repeated; each cell reports the median over rounds."""

    def __post_init__(self) -> None:
        if not self.concurrencies or min(self.concurrencies) < 1:
            raise ValueError("concurrencies must be >= 1")
        if any(t < 0 for t in self.temperatures):
            raise ValueError("temperatures must be >= 0")
        if self.max_tokens < 1 or self.min_requests < 1 or self.rounds < 1:
            raise ValueError("max_tokens, min_requests and rounds must be >= 1")


@dataclass(frozen=True)
class System:
    label: str
    drafter: str | None  # subdirectory of the drafters directory
    budget: str = "fixed"
    gamma: int | None = None
    gating: bool = True
    """Per-request draft gating (``EngineConfig.draft_gating``; cost-aware budgets only)."""
    margin: float = 1.05
    """``EngineConfig.draft_margin``; ``inf``: nobody drafts but the gate's probes."""
    # NOTE: these are the ``EngineConfig`` fields draft_prior, prefill_weight, online_costs,
    # draft_arms, draft_with_prefill, draft_vocab, draft_fit and cuda_graphs (a GPU only)
    prior: float = EngineConfig.draft_prior
    prefill_weight: float = EngineConfig.prefill_weight
    online_costs: str = EngineConfig.online_costs
    arms: bool = EngineConfig.draft_arms
    with_prefill: bool = EngineConfig.draft_with_prefill
    vocab: int = EngineConfig.draft_vocab
    fit: bool = EngineConfig.draft_fit
    graphs: bool = EngineConfig.cuda_graphs
    light: str | None = None
    """The engine's light drafter (a subdirectory of the drafters directory; ``Engine``'s
    ``light_drafter``), or None."""

    def engine_fields(self) -> dict:
        """The ``EngineConfig`` fields this system sets."""
        return {"budget": self.budget, "num_speculative_tokens": self.gamma,
                "draft_gating": self.gating, "draft_margin": self.margin,
                "draft_prior": self.prior, "prefill_weight": self.prefill_weight,
                "online_costs": self.online_costs, "draft_arms": self.arms,
                "draft_with_prefill": self.with_prefill, "draft_vocab": self.vocab,
                "draft_fit": self.fit, "cuda_graphs": self.graphs}

    def build(self, target: TargetModel, drafters_dir: str | Path, base: EngineConfig,
              seed: int) -> Engine:
        """This system's engine over ``target``: ``base`` with this system's fields and
        ``seed``, its drafters loaded from ``drafters_dir``."""
        def load(sub: str | None):
            return load_drafter(Path(drafters_dir) / sub, target) if sub else None

        config = EngineConfig(**{**asdict(base), **self.engine_fields(), "seed": seed})
        return Engine(target, load(self.drafter), config, light_drafter=load(self.light))


SYSTEMS = (
    System("no-spec", None),
    System("mtp-1", "mtp"),
    System("dflash-g7", "dflash", "fixed", 7),
    System("dspark-g7", "dspark", "fixed", 7),
    System("dspark-alg1", "dspark", "algorithm1"),
    System("dspark-topk", "dspark", "topk"),
    # drafters sized to the target: 1 and 2 backbone layers against the 3 above
    System("dflash-d1-g7", "dflash-d1", "fixed", 7),
    System("dspark-d2-alg1", "dspark-d2", "algorithm1"),
    System("dspark-d1-alg1", "dspark-d1", "algorithm1"),
    System("dspark-d1-nogate", "dspark-d1", "algorithm1", gating=False),
    # the serving default when nobody is worth drafting: what the machinery costs
    System("dspark-idle", "dspark", "algorithm1", margin=float("inf")),
    # the serving default without its prior: each request's own record alone
    System("dspark-alg1-prior0", "dspark", "algorithm1", prior=0.0),
    # the serving default with first tokens weighted 4x in the step's cost model
    System("dspark-alg1-pw4", "dspark", "algorithm1", prefill_weight=4.0),
    # the serving default with the online cost tables of observed times (before 2026-12-02)
    System("dspark-alg1-times", "dspark", "algorithm1", online_costs="times"),
    # the serving default drafting for every request in every step (no gate)
    System("dspark-alg1-nogate", "dspark", "algorithm1", gating=False),
    # the serving default without the measured arms per load (the cost gate alone, as
    # until session 14)
    System("dspark-alg1-noarms", "dspark", "algorithm1", arms=False),
    # the serving default drafting in steps with a prefill chunk too (as until session 14)
    System("dspark-alg1-prefill", "dspark", "algorithm1", with_prefill=True),
    # the serving default drafting over the whole vocabulary (as until session 16)
    System("dspark-alg1-fullvocab", "dspark", "algorithm1", vocab=0),
    # the 1-layer drafter over the whole vocabulary
    System("dspark-d1-fullvocab", "dspark-d1", "algorithm1", vocab=0),
    # the serving default (2 layers) drafting over the whole vocabulary
    System("dspark-d2-fullvocab", "dspark-d2", "algorithm1", vocab=0),
    # the 2-layer DSpark with MTP-1 beside it (asked first in loaded steps, else where the
    # DSpark gate drafts for nobody): what `dspark serve` runs by default since session 32
    System("dspark-d2-mtp", "dspark-d2", "algorithm1", light="mtp"),
    # the serving default drafting for every request in every step (no gate)
    System("dspark-d2-nogate", "dspark-d2", "algorithm1", gating=False),
    # the serving default when nobody is worth drafting: what its machinery costs
    System("dspark-d2-idle", "dspark-d2", "algorithm1", margin=float("inf")),
    # the serving default drafting whole blocks of 7 slots (as until session 28)
    System("dspark-d2-full", "dspark-d2", "algorithm1", fit=False),
    # on a GPU: no speculation and the serving default with their decode and verify
    # forwards replayed from CUDA graphs
    System("no-spec-graphs", None, graphs=True),
    System("dspark-d2-alg1-graphs", "dspark-d2", "algorithm1", graphs=True),
)


@dataclass
class Cell:
    system: str
    temperature: float
    concurrency: int
    num_requests: int
    output_tokens: int
    wall_time: float
    per_user_tps: float
    aggregate_tps: float
    mean_tau: float
    mean_budget_per_request: float
    """Mean ℓ_r over drafted request-steps."""
    step_time_ms: float
    draft_ms_per_request: float
    """Drafting time (gate + proposal) per drafted request, over drafted steps."""
    schedule_and_sampling_frac: float
    """Share of step time in the scheduler, the budget and rejection sampling."""
    phase_ms: dict = field(default_factory=dict)
    num_errors: int = 0
    ttft_p50_ms: float = 0.0
    """Time to first token, median over the cell's requests (arrival to first token on the
    engine's clock: queueing and the prefill step)."""
    ttft_p90_ms: float = 0.0
    round: int = 0
    """The round a measured cell ran in (a median over rounds: 0)."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of ``values``, nearest rank; 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(system, temperature, concurrency, per_user, num_tokens, wall, stats,
              ttft: Sequence[float] = ()) -> Cell:
    drafted = sum(s.num_drafts for s in stats)
    step_time = sum(s.step_time for s in stats)
    overhead = sum(s.time_schedule + s.time_budget + s.time_sample for s in stats)
    phases = {
        name: 1000 * sum(getattr(s, f"time_{name}") for s in stats) / max(len(stats), 1)
        for name in ("schedule", "draft", "budget", "verify", "sample", "update")
    }
    return Cell(
        system=system,
        temperature=temperature,
        concurrency=concurrency,
        num_requests=len(per_user),
        output_tokens=num_tokens,
        wall_time=wall,
        per_user_tps=sum(per_user) / max(len(per_user), 1),
        aggregate_tps=num_tokens / wall,
        mean_tau=(sum(s.num_accepted_tokens for s in stats) + drafted) / drafted if drafted else 1.0,
        mean_budget_per_request=sum(s.verify_budget for s in stats) / drafted if drafted else 0.0,
        step_time_ms=1000 * step_time / max(len(stats), 1),
        draft_ms_per_request=1000 * sum(s.time_draft for s in stats if s.num_drafts)
        / drafted if drafted else 0.0,
        schedule_and_sampling_frac=overhead / step_time if step_time else 0.0,
        phase_ms=phases,
        ttft_p50_ms=1000 * percentile(ttft, 0.5),
        ttft_p90_ms=1000 * percentile(ttft, 0.9),
    )


def run_benchmark(
    target: TargetModel,
    drafters_dir: str | Path,
    prompts: Sequence[list[int]],
    stop_ids: Sequence[int],
    cfg: BenchConfig,
    systems: Sequence[System] = SYSTEMS,
    engine_config: EngineConfig | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    # NOTE: room for the largest concurrency, so that every request of a cell runs at once
    base = engine_config or EngineConfig(max_num_seqs=max(32, *cfg.concurrencies))
    engines: dict[str, Engine] = {}
    tables = {}
    for system in systems:
        engine = system.build(target, drafters_dir, base, cfg.seed)
        tables[system.label] = {"profiled": asdict(engine.profiled_cost_table)}
        # warm-up, not measured
        run_cell(engine, prompts, stop_ids, 2, 2, lambda i: SamplingParams(max_tokens=8))
        engines[system.label] = engine
    raw: list[Cell] = []
    for rnd in range(cfg.rounds):
        for temp in cfg.temperatures:
            for conc in cfg.concurrencies:
                num = max(cfg.min_requests, 2 * conc)

                # NOTE: unseeded, as most users send: rejection sampling at T > 0 (a
                # seeded request would couple); the engine's seed keeps the run reproducible
                def params_for(i: int, temp=temp) -> SamplingParams:
                    return SamplingParams(temperature=temp, max_tokens=cfg.max_tokens)

                # NOTE: the systems share the machine step by step, each on its own clock
                # (bench/closed_loop.py): drift of the machine's speed hits them alike
                order = step_order(list(systems), rnd)
                loops = [ClosedLoop(engines[s.label], prompts, stop_ids, conc, num, params_for)
                         for s in order]
                interleave(loops)
                for system, loop in zip(order, loops):
                    cell = summarize(system.label, temp, conc, *loop.result(), loop.ttft)
                    cell.num_errors, cell.round = engines[system.label].num_errors, rnd
                    raw.append(cell)
                    log(f"[{rnd + 1}/{cfg.rounds}] {cell_line(cell)}")
    cells = median_cells(raw)
    for label, engine in engines.items():
        tables[label]["online"] = asdict(engine.cost_table)
        if engine.costs.draft is not None:
            tables[label]["draft_online"] = asdict(engine.costs.draft.table)
    errors = {label: e.num_errors for label, e in engines.items() if e.num_errors}
    if errors:
        raise RuntimeError(f"engine steps failed during the benchmark: {errors}")
    rounds = [asdict(c) for c in raw]
    return {"cells": [asdict(c) for c in cells], "cost_tables": tables,
            "ratios": ratios(cells), "config": asdict(cfg), "rounds": rounds,
            "paired": paired_ratios(rounds, "system", "no-spec", PAIRED,
                                    ("temperature", "concurrency"))}


PAIRED = (("aggregate_tps", "aggregate tok/s"), ("per_user_tps", "per-user tok/s"),
          ("ttft_p50_ms", "TTFT p50"), ("ttft_p90_ms", "TTFT p90"))
"""The paired ratios against no-spec (``bench/paired.py``): key and column header."""


def cell_line(cell: Cell) -> str:
    return (f"{cell.system:12s} T={cell.temperature:g} C={cell.concurrency:2d}  per-user "
            f"{cell.per_user_tps:7.1f}  aggregate {cell.aggregate_tps:7.1f} tok/s  tau "
            f"{cell.mean_tau:.2f}  budget {cell.mean_budget_per_request:.2f}")


def median_cells(raw: Sequence[Cell]) -> list[Cell]:
    """One cell per (system, T, C): the median of every measured number over rounds."""
    groups: dict[tuple, list[Cell]] = {}
    for c in raw:
        groups.setdefault((c.system, c.temperature, c.concurrency), []).append(c)
    out = []
    for runs in groups.values():
        def med(values):
            values = sorted(values)
            mid = len(values) // 2
            return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

        first = runs[0]
        fields = {name: med([getattr(r, name) for r in runs]) for name in (
            "wall_time", "per_user_tps", "aggregate_tps", "mean_tau", "mean_budget_per_request",
            "step_time_ms", "draft_ms_per_request", "schedule_and_sampling_frac",
            "ttft_p50_ms", "ttft_p90_ms")}
        phases = {k: med([r.phase_ms[k] for r in runs]) for k in first.phase_ms}
        out.append(Cell(
            system=first.system, temperature=first.temperature,
            concurrency=first.concurrency, num_requests=sum(r.num_requests for r in runs),
            output_tokens=sum(r.output_tokens for r in runs), phase_ms=phases,
            num_errors=max(r.num_errors for r in runs), **fields,
        ))
    return out


def baseline_ratios(cells: Sequence[dict], keys: Sequence[str]) -> list[dict]:
    """Per cell: per-user and aggregate ratios against no-spec and MTP-1 among the cells
    that share ``keys`` (e.g. temperature and concurrency)."""
    index = {(c["system"], *(c[k] for k in keys)): c for c in cells}
    out = []
    for c in cells:
        row = {"system": c["system"], **{k: c[k] for k in keys}}
        for ref in ("no-spec", "mtp-1"):
            base = index.get((ref, *(c[k] for k in keys)))
            if base is not None:
                row[f"per_user_vs_{ref}"] = c["per_user_tps"] / base["per_user_tps"]
                row[f"aggregate_vs_{ref}"] = c["aggregate_tps"] / base["aggregate_tps"]
        out.append(row)
    return out


def ratio_columns(row: dict) -> str:
    """``a / b | c / d``: per-user / aggregate ratios against no-spec, then against MTP-1."""
    def x(key: str) -> str:
        return f"{row[key]:.2f}" if key in row else "–"

    return (f"{x('per_user_vs_no-spec')} / {x('aggregate_vs_no-spec')} | "
            f"{x('per_user_vs_mtp-1')} / {x('aggregate_vs_mtp-1')}")


def ttft_ratios(row: dict) -> str:
    """``p50 / p90`` of TTFT against no speculation's, or dashes."""
    def x(key: str) -> str:
        return f"{row[key]:.2f}" if key in row else "–"

    return f"{x('ttft_p50_vs_no-spec')} / {x('ttft_p90_vs_no-spec')}"


def ratios(cells: Sequence[Cell]) -> list[dict]:
    """``baseline_ratios``, and each cell's TTFT p50 and p90 over no speculation's."""
    rows = baseline_ratios([asdict(c) for c in cells], ("temperature", "concurrency"))
    base = {(c.temperature, c.concurrency): c for c in cells if c.system == "no-spec"}
    for row, cell in zip(rows, cells):
        ref = base.get((cell.temperature, cell.concurrency))
        for q in ("p50", "p90"):
            if ref is not None and getattr(ref, f"ttft_{q}_ms") > 0:
                row[f"ttft_{q}_vs_no-spec"] = (getattr(cell, f"ttft_{q}_ms")
                                               / getattr(ref, f"ttft_{q}_ms"))
    return rows


def domain_prompts(tokenizer, context: int, max_tokens: int, per_domain: int, seed: int):
    """Held-out math, code and chat prompts, interleaved, that fit the context."""
    from dspark.bench.acceptance import fitting_prompts
    from dspark.training.corpus.build import CorpusConfig, build_corpus

    corpus = build_corpus(CorpusConfig(seed=0))
    limit = context - max_tokens - 9
    per = []
    for domain in ("math", "code", "chat"):
        texts = [r["messages"][0]["content"] for r in corpus[domain]["heldout"]]
        per.append(fitting_prompts(texts, tokenizer, limit, per_domain, seed))
    return [p for group in zip(*per) for p in group]


def markdown(result: dict) -> str:
    cells = result["cells"]
    ratio = {(r["system"], r["temperature"], r["concurrency"]): r for r in result["ratios"]}
    lines = []
    for temp in result["config"]["temperatures"]:
        lines += [f"### T = {temp:g}", "",
                  "| system | C | per-user tok/s | aggregate tok/s | × no-spec (user / agg) "
                  "| × MTP-1 (user / agg) | τ | mean ℓ | step ms | draft ms / request "
                  "| sched+budget+sample | TTFT p50 / p90 ms | TTFT × no-spec (p50 / p90) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in cells:
            if c["temperature"] != temp:
                continue
            r = ratio[(c["system"], temp, c["concurrency"])]
            lines.append(
                f"| {c['system']} | {c['concurrency']} | {c['per_user_tps']:.1f} | "
                f"{c['aggregate_tps']:.1f} | {ratio_columns(r)} | {c['mean_tau']:.2f} | "
                f"{c['mean_budget_per_request']:.2f} | {c['step_time_ms']:.1f} | "
                f"{c.get('draft_ms_per_request', 0.0):.2f} | "
                f"{100 * c['schedule_and_sampling_frac']:.1f}% | "
                f"{c.get('ttft_p50_ms', 0.0):.0f} / {c.get('ttft_p90_ms', 0.0):.0f} | "
                f"{ttft_ratios(r)} |"
            )
        lines.append("")
    lines += paired_markdown(result.get("paired", []), "system",
                             (("temperature", "T"), ("concurrency", "C")), PAIRED)
    return "\n".join(lines + depth_table(result))


DEPTHS = (("dspark-d1-alg1", 1), ("dspark-d2-alg1", 2), ("dspark-alg1", 3))
"""The DSpark drafters of 1, 2 and 3 backbone layers, each with Algorithm 1 and gating."""


def depth_table(result: dict) -> list[str]:
    """Drafter depth against τ, drafting cost, step time and speed, at the lowest and the
    highest concurrency of the run (T=0 for speed; τ at every temperature run)."""
    cells = {(c["system"], c["temperature"], c["concurrency"]): c for c in result["cells"]}
    ratio = {(r["system"], r["temperature"], r["concurrency"]): r for r in result["ratios"]}
    temps = result["config"]["temperatures"]
    concs = result["config"]["concurrencies"]
    lo, hi, t0 = min(concs), max(concs), min(temps)
    present = [(s, d) for s, d in DEPTHS if (s, t0, lo) in cells and (s, t0, hi) in cells]
    if not present:
        return []
    lines = [f"### Drafter depth (DSpark + Algorithm 1; C = {lo} and C = {hi}, speed at "
             f"T = {t0:g})", "",
             f"| layers | τ at C={lo}, T = {' / '.join(f'{t:g}' for t in temps)} | "
             f"draft ms per request C={lo} / {hi} | step ms C={lo} / {hi} | "
             f"per-user tok/s C={lo} (× no-spec) | aggregate tok/s C={hi} (× no-spec) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for system, depth in present:
        a, b = cells[(system, t0, lo)], cells[(system, t0, hi)]
        taus = " / ".join(f"{cells[(system, t, lo)]['mean_tau']:.2f}" for t in temps
                          if (system, t, lo) in cells)
        user = ratio[(system, t0, lo)].get("per_user_vs_no-spec")
        agg = ratio[(system, t0, hi)].get("aggregate_vs_no-spec")
        lines.append(
            f"| {depth} | {taus} | {a.get('draft_ms_per_request', 0.0):.2f} / "
            f"{b.get('draft_ms_per_request', 0.0):.2f} | {a['step_time_ms']:.1f} / "
            f"{b['step_time_ms']:.1f} | {a['per_user_tps']:.1f} "
            f"({user:.2f}) | {b['aggregate_tps']:.1f} ({agg:.2f}) |"
            if user is not None and agg is not None else
            f"| {depth} | {taus} | | | {a['per_user_tps']:.1f} | {b['aggregate_tps']:.1f} |")
    return lines + [""]


def plot(result: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    systems = list(dict.fromkeys(c["system"] for c in cells))
    temps = result["config"]["temperatures"]
    paths = []
    fig, axes = plt.subplots(1, len(temps), figsize=(6 * len(temps), 4.5), squeeze=False)
    for ax, temp in zip(axes[0], temps):
        for name in systems:
            pts = [c for c in cells if c["system"] == name and c["temperature"] == temp]
            ax.plot([c["per_user_tps"] for c in pts], [c["aggregate_tps"] for c in pts],
                    marker="o", label=name)
            for c in pts:
                ax.annotate(str(c["concurrency"]), (c["per_user_tps"], c["aggregate_tps"]),
                            fontsize=7)
        ax.set_xlabel("per-user tokens/s")
        ax.set_ylabel("aggregate tokens/s")
        ax.set_title(f"Throughput vs per-user speed, T={temp:g} (labels: concurrency)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "engine-pareto.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in systems:
        for temp in temps:
            pts = [c for c in cells if c["system"] == name and c["temperature"] == temp]
            if not any(c["mean_budget_per_request"] for c in pts):
                continue
            ax.plot([c["concurrency"] for c in pts], [c["mean_budget_per_request"] for c in pts],
                    marker="o", label=f"{name} T={temp:g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.set_ylabel("mean verified drafts per request per step (ℓ)")
    ax.set_title("Verification budget vs concurrency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "engine-budget.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def write_results(result: dict, out_dir: str | Path, command: str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = describe()
    result = dict(result, command=command, torch_threads=torch.get_num_threads(),
                  machine=machine)
    (out_dir / "engine.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "engine.md").write_text(header(command, machine) + markdown(result))
    written = [out_dir / "engine.json", out_dir / "engine.md"]
    try:
        written += plot(result, out_dir)
    except ImportError:  # the GPU machine has no matplotlib: the JSON holds everything
        pass
    return written
