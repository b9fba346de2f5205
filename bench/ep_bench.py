"""`dspark bench ep`: what the cluster budget is worth in an imbalanced expert-parallel group.

Two processes on this machine form one ep_size=2 group over torch.distributed (gloo): each
holds half of the demo target's routed experts, schedules its own requests and exchanges
tokens with the other at every MoE layer, in lock-step (``workers/expert_parallel.py``).
Rank 0 keeps ``heavy`` requests in flight, rank 1 ``light`` (closed loop: a finished
request is replaced at once). The arms (``ARMS``) are engines over the same sharded target:

- ``no-spec``: no drafter;
- ``local`` (``algorithm1``): the drafter, its budget pricing SPS(B) at this rank's own
  tokens;
- ``cluster``: the drafter, the step priced per rank from what the other rank did in the
  previous step (its verify tokens and committed tokens, from an all-gather after every
  step, the freshest the load board can be): the private part of a step at the larger of
  the two ranks' tokens, the experts' profiled share at the group's tokens per rank, and
  the other rank's committed tokens in the throughput maximised (``CostModel``);
- ``local+lane``, ``cluster+lane``: the same with ``light_drafter`` beside the drafter (the
  light lane of ``dspark serve``'s default, ``Engine``'s ``light_drafter``).

Each round runs ``steps`` lock-step steps of each arm's engine, the engines stepping in
turn (the order rotated every round), each timed on its own clock: the machine's slow
stretches fall on all alike. Reported per arm (medians over rounds): aggregate tokens/s of
the group, per-user tokens/s on each rank, mean ℓ_r per drafted request on each rank, the
share of steps that drafted and the mean step time.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dspark.bench.machine import describe, header

ARMS = {"no-spec": (None, False), "local": ("algorithm1", False),
        "cluster": ("cluster", False), "local+lane": ("algorithm1", True),
        "cluster+lane": ("cluster", True)}
"""Arm -> (budget of its drafter, None: no drafter; whether the light lane runs beside)."""


@dataclass(frozen=True)
class EpBenchConfig:
    heavy: int = 16
    """Requests in flight on rank 0."""
    light: int = 2
    """Requests in flight on rank 1."""
    steps: int = 200
    """Lock-step steps per budget per round."""
    rounds: int = 3
    """Rounds; the budgets step in turn, which goes first flipped every round."""
    max_tokens: int = 64
    """Output tokens per request."""
    temperature: float = 0.0
    """Sampling temperature of every request."""
    threads: int = 1
    """torch threads per rank."""
    arms: str = "local,cluster"
    """The engines compared, comma-separated, of no-spec, local, cluster, local+lane and
    cluster+lane (the first is the ratios' baseline)."""
    light_drafter: str = "mtp"
    """The lane arms' light drafter: under the drafters directory, or a path."""

    def __post_init__(self) -> None:
        for name in ("heavy", "light", "steps", "rounds", "max_tokens", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        arms = self.arm_list
        unknown = [a for a in arms if a not in ARMS]
        if unknown or not arms or len(set(arms)) != len(arms):
            raise ValueError(f"arms must list distinct arms of {', '.join(ARMS)}, got "
                             f"{self.arms!r}")

    @property
    def arm_list(self) -> list[str]:
        return [a.strip() for a in self.arms.split(",") if a.strip()]


def _rank_main(rank: int, port: int, cfg: EpBenchConfig, target_dir: str, drafter_dir: str,
               light_dir: str | None, out: str) -> None:
    import torch.distributed as dist

    from dspark.bench.engine_bench import domain_prompts
    from dspark.models.drafter_checkpoint import load_drafter
    from dspark.models.generation import SamplingParams, load_for_generation
    from dspark.workers.budget import GroupLoad
    from dspark.workers.engine import Engine, EngineConfig
    from dspark.workers.expert_parallel import shard_experts

    torch.set_num_threads(cfg.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    target, tokenizer = load_for_generation(target_dir)
    target.eval()
    prompts = domain_prompts(tokenizer, target.config.max_position_embeddings,
                             cfg.max_tokens, 8, rank)
    shard_experts(target, dist.group.WORLD, rank, 2)
    drafter = load_drafter(drafter_dir, target)
    arms = cfg.arm_list
    light = load_drafter(light_dir, target) if light_dir is not None else None
    others = {arm: [GroupLoad()] for arm in arms}
    engines, cost = {}, None
    for arm in arms:
        # NOTE: both ranks build their engines in the same order: profiling runs target
        # forwards, whose MoE exchanges need both ranks
        budget, lane = ARMS[arm]
        engines[arm] = Engine(
            target, drafter if budget else None,
            EngineConfig(budget=budget or "fixed", max_num_seqs=64), cost,
            lockstep=True, group_load=lambda seen=others[arm]: seen[0],
            light_drafter=light if lane else None)
        cost = engines[arm].profiled_cost_table
    conc = cfg.heavy if rank == 0 else cfg.light
    params = SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens)
    rows = []
    for rnd in range(cfg.rounds):
        order = arms[rnd % len(arms):] + arms[:rnd % len(arms)]
        if rnd // len(arms) % 2:
            order.reverse()
        ran = _run({a: engines[a] for a in order}, prompts, tokenizer.stop_ids, conc, params,
                   cfg.steps, others)
        rows += [{"round": rnd, "budget": a, "rank": rank, **ran[a]} for a in arms]
    gathered = [None, None]
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        Path(out).write_text(json.dumps([r for part in gathered for r in part]))
    dist.barrier()
    dist.destroy_process_group()


def _run(engines: dict, prompts, stop_ids, conc: int, params, steps: int,
         others: dict) -> dict:
    """``steps`` lock-step steps of every budget's engine, in turn step by step, each a
    closed loop on its own clock with ``conc`` requests kept in flight (leftovers aborted);
    after each step the ranks exchange what they did, and ``others[budget][0]`` gets the
    other rank's ``GroupLoad``."""
    import torch.distributed as dist

    from dspark.bench.closed_loop import ClosedLoop
    from dspark.workers.budget import GroupLoad

    loops = {b: ClosedLoop(e, prompts, stop_ids, conc, sys.maxsize, lambda i: params)
             for b, e in engines.items()}
    for _ in range(steps):
        for budget, loop in loops.items():
            stats = loop.tick()
            mine = torch.tensor([stats.num_verify_tokens, stats.num_output_tokens]
                                if stats is not None else [0, 0])
            both = [torch.zeros(2, dtype=torch.long) for _ in range(2)]
            dist.all_gather(both, mine)
            theirs = both[1 - dist.get_rank()].tolist()
            others[budget][0] = GroupLoad((theirs[0],), float(theirs[1]))
    return {budget: _result(loop) for budget, loop in loops.items()}


def _result(loop) -> dict:
    """One budget's loop on this rank, its requests in flight aborted."""
    loop.abort()
    per_user, tokens, wall, stats = loop.result()
    drafted = sum(s.num_drafts for s in stats)
    return {"tokens": tokens, "wall": wall,
            "per_user_tps": statistics.mean(per_user) if per_user else 0.0,
            "finished": len(per_user),
            "mean_ell": sum(s.verify_budget for s in stats) / drafted if drafted else 0.0,
            "step_ms": 1000 * statistics.mean(s.step_time for s in stats) if stats else 0.0,
            "drafted": sum(1 for s in stats if s.num_drafts) / len(stats) if stats else 0.0,
            "shared": loop.engine.costs.shared}


def summarize(rows: list[dict]) -> list[dict]:
    """Per arm (in the order of first appearance), medians over rounds: the group's
    aggregate tokens/s (both ranks' tokens over the slower rank's wall time) and each
    rank's per-user tokens/s and mean ℓ_r; ``aggregate_paired``: the median over rounds of
    the arm's aggregate over the first arm's in the same round."""
    out, first, arms = [], {}, list(dict.fromkeys(r["budget"] for r in rows))
    for budget in arms:
        rounds = sorted({r["round"] for r in rows if r["budget"] == budget})
        agg, cells = [], {0: [], 1: []}
        for rnd in rounds:
            pair = {r["rank"]: r for r in rows if r["budget"] == budget and r["round"] == rnd}
            agg.append(sum(p["tokens"] for p in pair.values())
                       / max(p["wall"] for p in pair.values()))
            for rank, row in pair.items():
                cells[rank].append(row)
        first = first or dict(zip(rounds, agg))
        entry = {"budget": budget, "aggregate_tps": statistics.median(agg),
                 "aggregate_spread": [min(agg), max(agg)],
                 "aggregate_paired": statistics.median(a / first[r] for r, a in zip(rounds, agg))}
        for rank in (0, 1):
            for key in ("per_user_tps", "mean_ell", "step_ms", "shared", "drafted"):
                entry[f"rank{rank}_{key}"] = statistics.median(c[key] for c in cells[rank])
        out.append(entry)
    return out


def markdown(summary: list[dict], cfg: EpBenchConfig) -> str:
    base = summary[0]
    shared = next((s["rank0_shared"] for s in summary if s.get("rank0_shared") is not None),
                  None)
    lines = [f"ep_size=2, rank 0 with {cfg.heavy} requests in flight, rank 1 with "
             f"{cfg.light}; T={cfg.temperature:g}, {cfg.steps} steps per arm per round, "
             f"medians of {cfg.rounds} rounds; lane arms: `{cfg.light_drafter}` beside the "
             "drafter."
             + (f" Profiled share of a step in the experts (rank 0): {shared:.2f}."
                if shared is not None else ""), "",
             f"| arm | aggregate tok/s [min–max] | × {base['budget']} | × {base['budget']} "
             "paired | per-user tok/s rank 0 / 1 | mean ℓ rank 0 / 1 | steps drafted rank 0 / 1 "
             "| step ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        lo, hi = s["aggregate_spread"]
        lines.append(
            f"| {s['budget']} | {s['aggregate_tps']:.1f} [{lo:.0f}–{hi:.0f}] | "
            f"{s['aggregate_tps'] / base['aggregate_tps']:.2f} | "
            f"{s['aggregate_paired']:.3f} | "
            f"{s['rank0_per_user_tps']:.1f} / {s['rank1_per_user_tps']:.1f} | "
            f"{s['rank0_mean_ell']:.2f} / {s['rank1_mean_ell']:.2f} | "
            f"{s['rank0_drafted']:.0%} / {s['rank1_drafted']:.0%} | {s['rank0_step_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def run_ep_benchmark(cfg: EpBenchConfig, target_dir: str, drafter_dir: str,
                     light_dir: str | None = None) -> dict:
    """Start the two ranks, wait for them, and summarise (``light_dir``: the lane arms'
    light drafter, needed when ``cfg`` has lane arms)."""
    if light_dir is None and any(ARMS[a][1] for a in cfg.arm_list):
        raise ValueError(f"arms {cfg.arms!r} have the light lane: a light drafter is needed")
    import tempfile

    import torch.multiprocessing as mp

    from dspark.router.redis_server import free_port

    with tempfile.TemporaryDirectory() as work:
        raw = Path(work) / "rounds.json"
        lane = any(ARMS[a][1] for a in cfg.arm_list)
        mp.start_processes(_rank_main, args=(free_port(), cfg, str(target_dir),
                                             str(drafter_dir),
                                             str(light_dir) if lane else None, str(raw)),
                           nprocs=2, start_method="spawn")
        rows = json.loads(raw.read_text())
    return {"config": asdict(cfg), "rounds": rows, "summary": summarize(rows)}


def write_results(result: dict, out_dir: str | Path, command: str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = describe()
    (out_dir / "ep.json").write_text(json.dumps(dict(result, command=command,
                                                     machine=machine), indent=1))
    cfg = EpBenchConfig(**result["config"])
    (out_dir / "ep.md").write_text(header(command, machine) + markdown(result["summary"], cfg))
    return [out_dir / "ep.json", out_dir / "ep.md"]
