"""``dspark bench engine`` and ``dspark bench serve``: the in-process engine benchmark and
the online HTTP load benchmark, every system measured side by side in one run."""

from __future__ import annotations

import argparse
from pathlib import Path

from dspark.cluster.cli.common import (
    DEFAULT_DRAFTERS,
    DEFAULT_TARGET,
    Mirror,
    Subparsers,
    add_flag,
    add_switch,
    recorded_command,
)

ENGINE_SYSTEMS = ("no-spec", "mtp-1", "dflash-g7", "dspark-g7", "dspark-alg1", "dspark-topk",
                  "dflash-d1-g7", "dspark-d2-alg1", "dspark-d1-alg1", "dspark-d1-nogate",
                  "dspark-idle", "dspark-alg1-prior0", "dspark-alg1-pw4",
                  "dspark-alg1-times", "dspark-alg1-nogate", "dspark-alg1-noarms",
                  "dspark-alg1-prefill", "dspark-alg1-fullvocab", "dspark-d1-fullvocab",
                  "dspark-d2-fullvocab", "dspark-d2-mtp", "dspark-d2-nogate", "dspark-d2-idle",
                  "dspark-d2-full", "no-spec-graphs", "dspark-d2-alg1-graphs")
"""The labels of ``dspark.bench.engine_bench.SYSTEMS`` (kept here so that ``--help`` needs
no torch import; a test checks they agree)."""

# NOTE: the serve benchmark gives each replica one torch thread (ServeConfig: torch's
# default), so the replicas it starts side by side do not fight over the cores.
MIRRORS = (
    Mirror(("bench", "engine"), "dspark.bench.engine_bench:BenchConfig",
           renamed={"concurrency": "concurrencies"}),
    Mirror(("bench", "serve"), "dspark.cluster.config:ServeConfig",
           own_defaults=frozenset({"threads"})),
    Mirror(("bench", "serve"), "dspark.bench.serve_bench:ServeBenchConfig",
           renamed={"concurrency": "concurrencies"}),
    Mirror(("bench", "ep"), "dspark.bench.ep_bench:EpBenchConfig"),
    Mirror(("bench", "drift"), "dspark.bench.drift_bench:DriftBenchConfig"),
)


def add_parser(sub: Subparsers) -> None:
    bench = sub.add_parser("bench", help="load benchmarks")
    which = bench.add_subparsers(dest="what", required=True)
    _add_engine(which)
    _add_serve(which)
    _add_ep(which)
    _add_drift(which)
    for name, text in (("faults", "faults injected into a running dspark serve under load "
                                  "(bench/faults.py; --help: its flags)"),
                       ("attacks", "bad input and abuse against a running app, each with its "
                                   "status (bench/attacks.py)")):
        script = which.add_parser(name, help=text, add_help=False)
        script.add_argument("rest", nargs=argparse.REMAINDER)


def _add_engine(which: Subparsers) -> None:
    eng = which.add_parser(
        "engine", help="in-process closed-loop engine benchmark (all systems in one run)"
    )
    add_flag(eng, "--target", str(DEFAULT_TARGET), "target checkpoint directory",
             shown="checkpoints/target")
    add_flag(eng, "--drafters", str(DEFAULT_DRAFTERS), "directory of the drafter checkpoints",
             shown="checkpoints/drafters")
    add_flag(eng, "--concurrency", "1,2,4,8,16,32,64",
             "concurrencies to sweep, comma-separated")
    add_flag(eng, "--temperatures", "0,1", "temperatures to sweep, comma-separated")
    add_flag(eng, "--max-tokens", 64,
             "Output tokens per request (requests may stop earlier at end of turn).", type=int)
    add_flag(eng, "--min-requests", 32, "Requests finished per cell: max(min_requests, 2 * C).",
             type=int)
    add_flag(eng, "--prompts-per-domain", 24, "prompts of each domain (math, code, chat)",
             type=int)
    add_flag(eng, "--rounds", 3, "Times the whole sweep is repeated; each cell reports the "
             "median over rounds.", type=int)
    add_flag(eng, "--systems", ",".join(ENGINE_SYSTEMS),
             "a subset of the systems, comma-separated")
    add_flag(eng, "--threads", 0, "torch threads (0: torch's default)", type=int)
    add_flag(eng, "--device", "cpu", "torch device of the target and the drafters")
    add_switch(eng, "--phase-sync", "on a GPU, wait for the device at the end of every stage "
               "of a step, so that each stage's time (phase_ms) is its whole cost; slower "
               "steps (EngineConfig.phase_sync, a diagnostic)")
    add_flag(eng, "--out", "runs/bench-engine", "results directory (JSON, markdown, PNGs)")


def _add_serve(which: Subparsers) -> None:
    srv = which.add_parser(
        "serve", help="online HTTP load benchmark of the served app (systems and routers)"
    )
    add_flag(srv, "--concurrency", "1,4,16",
             "Concurrencies of the system comparison (closed-loop clients). Comma-separated.")
    add_flag(srv, "--max-tokens", 64, "Output tokens per request, >= 4 (the skewed workload "
             "asks 4 times as many of one request in four and a quarter as many of the "
             "others).", type=int)
    add_flag(srv, "--skew-concurrency", 8,
             "Concurrency of the router comparison (one long request in four).", type=int)
    add_flag(srv, "--rounds", 3, "Rounds; in each, at each concurrency, the systems take "
             "turns in an order rotated every round. A cell reports the median and the "
             "spread [min-max] over rounds.", type=int)
    add_flag(srv, "--skew-rounds", 0, "Rounds of the router comparison, the routers taking "
             "turns the same way (0: rounds).", type=int)
    add_flag(srv, "--skew-requests", 0, "Requests finished per round of the router "
             "comparison (0: 4 * skew_concurrency).", type=int)
    add_flag(srv, "--min-requests", 8, "Requests finished per cell of the system comparison: "
             "max(min_requests, 2 * C).", type=int)
    add_switch(srv, "--together", "The systems run at the same time, each under its own "
               "concurrency-C clients, instead of taking turns.")
    add_flag(srv, "--baseline", "", "System the paired ratios are taken against ('': no-spec "
             "when it is served, else the first system).")
    add_flag(srv, "--prompts-per-domain", 16, "prompts of each domain (math, code, chat)",
             type=int)
    add_flag(srv, "--port", 8000, "Port of the HTTP API.", type=int)
    add_flag(srv, "--threads", 1, "Torch threads per replica (0: torch's default).", type=int)
    add_flag(srv, "--systems", "no-spec,mtp-1,dspark-local,dspark-cluster",
             "a subset of the systems, comma-separated ('' to skip the system comparison)")
    add_flag(srv, "--routers", "board,pow2", "routers to compare; '' to skip the router run")
    add_flag(srv, "--out", "runs/bench-serve", "results directory (JSON, markdown)")


def _add_ep(which: Subparsers) -> None:
    ep = which.add_parser(
        "ep", help="an imbalanced ep_size=2 group: the cluster budget against the local one, "
        "the light lane, no speculation")
    add_flag(ep, "--target", str(DEFAULT_TARGET), "target checkpoint directory",
             shown="checkpoints/target")
    add_flag(ep, "--drafter", "dspark-d1", "drafter under --drafters, or a path")
    add_flag(ep, "--drafters", str(DEFAULT_DRAFTERS), "directory of the drafter checkpoints",
             shown="checkpoints/drafters")
    add_flag(ep, "--heavy", 16, "Requests in flight on rank 0.", type=int)
    add_flag(ep, "--light", 2, "Requests in flight on rank 1.", type=int)
    add_flag(ep, "--steps", 200, "Lock-step steps per budget per round.", type=int)
    add_flag(ep, "--rounds", 3, "Rounds; the budgets step in turn, which goes first flipped "
             "every round.", type=int)
    add_flag(ep, "--max-tokens", 64, "Output tokens per request.", type=int)
    add_flag(ep, "--temperature", 0.0, "Sampling temperature of every request.", type=float)
    add_flag(ep, "--threads", 1, "torch threads per rank.", type=int)
    add_flag(ep, "--arms", "local,cluster", "The engines compared, comma-separated, of "
             "no-spec, local, cluster, local+lane and cluster+lane (the first is the ratios' "
             "baseline).")
    add_flag(ep, "--light-drafter", "mtp", "The lane arms' light drafter: under the "
             "drafters directory, or a path.")
    add_flag(ep, "--out", "runs/bench-ep", "results directory (JSON, markdown)")


def _add_drift(which: Subparsers) -> None:
    dr = which.add_parser(
        "drift", help="the calibration-drift monitor: calibrated, miscalibrated, refitted")
    add_flag(dr, "--target", str(DEFAULT_TARGET), "target checkpoint directory",
             shown="checkpoints/target")
    add_flag(dr, "--drafter", str(DEFAULT_DRAFTERS / "dspark"),
             "DSpark drafter checkpoint (with a confidence head)",
             shown="checkpoints/drafters/dspark")
    add_flag(dr, "--offline", "docs/results/acceptance.json",
             "dspark eval's results, for the offline ECE to compare with")
    add_flag(dr, "--requests", 160, "Requests per phase.", type=int)
    add_flag(dr, "--concurrency", 16, "Requests in flight.", type=int)
    add_flag(dr, "--max-tokens", 64, "Output tokens per request.", type=int)
    add_flag(dr, "--temperature", 1.0, "Sampling temperature.", type=float)
    add_flag(dr, "--miscalibration", 0.25, "Factor on the STS temperatures in the "
             "miscalibrated phase (< 1: over-confident).", type=float)
    add_flag(dr, "--threshold", 0.05, "The monitor's drift threshold (online ECE).", type=float)
    add_flag(dr, "--window", 4096, "Observations kept per position.", type=int)
    add_flag(dr, "--check-every", 256, "Rounds between drift checks.", type=int)
    add_flag(dr, "--threads", 2, "torch threads", type=int)
    add_flag(dr, "--out", "runs/bench-drift", "results directory (JSON, markdown)")


def run_drift(args: argparse.Namespace) -> int:
    from dspark.bench.drift_bench import (
        DriftBenchConfig,
        offline_ece,
        run_drift_benchmark,
        write_results,
    )

    cfg = DriftBenchConfig(
        requests=args.requests, concurrency=args.concurrency, max_tokens=args.max_tokens,
        temperature=args.temperature, miscalibration=args.miscalibration,
        threshold=args.threshold, window=args.window, check_every=args.check_every,
        threads=args.threads)
    result = run_drift_benchmark(cfg, args.target, args.drafter)
    result["offline_ece"] = offline_ece(args.offline)
    for path in write_results(result, args.out, recorded_command("bench", "drift")):
        print(path)
    print((Path(args.out) / "drift.md").read_text())
    return 0


def run_ep(args: argparse.Namespace) -> int:
    from dspark.bench.ep_bench import ARMS, EpBenchConfig, run_ep_benchmark, write_results

    cfg = EpBenchConfig(heavy=args.heavy, light=args.light, steps=args.steps,
                        rounds=args.rounds, max_tokens=args.max_tokens,
                        temperature=args.temperature, threads=args.threads, arms=args.arms,
                        light_drafter=args.light_drafter)

    def under_drafters(flag: str, name: str) -> str:
        """A drafter checkpoint under --drafters, or the path itself (checked here, before
        the ranks start)."""
        path = Path(args.drafters) / name
        path = path if path.is_dir() else Path(name)
        if not (path / "config.json").is_file():
            raise ValueError(f"{flag}: {name!r} is neither a drafter under {args.drafters} nor "
                             "a drafter checkpoint directory")
        return str(path)

    lane = any(ARMS[a][1] for a in cfg.arm_list)
    result = run_ep_benchmark(cfg, args.target, under_drafters("--drafter", args.drafter),
                              under_drafters("--light-drafter", args.light_drafter)
                              if lane else None)
    for path in write_results(result, args.out, recorded_command("bench", "ep")):
        print(path)
    return 0


def int_list(value: str, name: str) -> tuple[int, ...]:
    """A comma-separated list of integers >= 1 (``name`` is the flag, for the error)."""
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise ValueError(f"{name} must be comma-separated integers, got {value!r}") from exc
    if not out or min(out) < 1:
        raise ValueError(f"{name} must list integers >= 1, got {value!r}")
    return out


def run_engine(args: argparse.Namespace) -> int:
    import torch

    from dspark.bench.engine_bench import (
        SYSTEMS,
        BenchConfig,
        domain_prompts,
        run_benchmark,
        write_results,
    )
    from dspark.models.generation import load_for_generation
    from dspark.workers.engine_config import EngineConfig

    temps = tuple(float(t) for t in args.temperatures.split(",") if t.strip())
    cfg = BenchConfig(
        concurrencies=int_list(args.concurrency, "--concurrency"),
        temperatures=temps,
        max_tokens=args.max_tokens,
        min_requests=args.min_requests,
        rounds=args.rounds,
    )
    known = {s.label: s for s in SYSTEMS}
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in known]
    if unknown or not wanted:
        raise ValueError(f"--systems: unknown {unknown}; choose from {list(known)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    target, tokenizer = load_for_generation(args.target)
    target = target.to(args.device).eval()
    context = target.config.max_position_embeddings
    prompts = domain_prompts(tokenizer, context, cfg.max_tokens, args.prompts_per_domain, 0)
    base = EngineConfig(max_num_seqs=max(32, *cfg.concurrencies), phase_sync=args.phase_sync)
    result = run_benchmark(
        target, args.drafters, prompts, tokenizer.stop_ids, cfg, [known[s] for s in wanted],
        engine_config=base,
    )
    for path in write_results(result, args.out, recorded_command("bench", "engine")):
        print(path)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from dspark.bench.serve_bench import (
        ROUTERS,
        SYSTEMS,
        ServeBenchConfig,
        run_serve_benchmark,
        serve_prompts,
    )
    from dspark.bench.serve_report import write_results
    from dspark.cluster.config import ServeConfig
    from dspark.cluster.serve import stop
    from dspark.models.tokenizer import Tokenizer
    from dspark.router.redis_server import EmbeddedRedis

    cfg = ServeBenchConfig(
        concurrencies=int_list(args.concurrency, "--concurrency"), max_tokens=args.max_tokens,
        skew_concurrency=args.skew_concurrency, rounds=args.rounds, skew_rounds=args.skew_rounds,
        skew_requests=args.skew_requests, min_requests=args.min_requests,
        baseline=args.baseline, together=args.together,
    )
    known = {s.label: s for s in SYSTEMS}
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    routers = [r.strip() for r in args.routers.split(",") if r.strip()]
    if any(s not in known for s in wanted) or len(set(wanted)) < len(wanted):
        raise ValueError(f"--systems: distinct names from {list(known)}, got {args.systems!r}")
    if args.baseline and args.baseline not in wanted:
        raise ValueError(f"--baseline: one of the systems run {wanted}, got {args.baseline!r}")
    if any(r not in ROUTERS for r in routers) or len(set(routers)) < len(routers):
        raise ValueError(f"--routers: distinct names from {list(ROUTERS)}, got {args.routers!r}")
    base = ServeConfig(port=args.port, threads=args.threads)
    tok = Tokenizer.from_file(Path(base.target) / "tokenizer.json")
    prompts = serve_prompts(tok, cfg.max_tokens, args.prompts_per_domain)
    redis = EmbeddedRedis().start()
    try:
        result = run_serve_benchmark(replace(base, redis_url=redis.url), prompts, cfg,
                                     systems=[known[s] for s in wanted], routers=routers)
    finally:
        stop(redis)
    for path in write_results(result, args.out, recorded_command("bench", "serve")):
        print(path)
    return 0


def run_faults(args: argparse.Namespace) -> int:
    """``dspark bench faults [flags]``: ``python -m dspark.bench.faults [flags]``."""
    from dspark.bench.faults import main

    return main(args.rest)


def run_attacks(args: argparse.Namespace) -> int:
    """``dspark bench attacks [flags]``: ``python -m dspark.bench.attacks [flags]``."""
    from dspark.bench.attacks import main

    return main(args.rest)
