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
    recorded_command,
)

# NOTE: the serve benchmark gives each replica one torch thread (ServeConfig: torch's
# default), so the replicas it starts side by side do not fight over the cores.
MIRRORS = (
    Mirror(("bench", "engine"), "dspark.bench.engine_bench:BenchConfig",
           renamed={"concurrency": "concurrencies"}),
    Mirror(("bench", "serve"), "dspark.cluster.config:ServeConfig",
           own_defaults=frozenset({"threads"})),
)


def add_parser(sub: Subparsers) -> None:
    bench = sub.add_parser("bench", help="load benchmarks")
    which = bench.add_subparsers(dest="what", required=True)
    _add_engine(which)
    _add_serve(which)


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
    add_flag(eng, "--min-requests", 8, "Requests finished per cell: max(min_requests, 2 * C).",
             type=int)
    add_flag(eng, "--prompts-per-domain", 24, "prompts of each domain (math, code, chat)",
             type=int)
    add_flag(eng, "--rounds", 3, "Times the whole sweep is repeated; each cell reports the "
             "median over rounds.", type=int)
    add_flag(eng, "--systems", "no-spec,mtp-1,dflash-g7,dspark-g7,dspark-alg1,dspark-topk",
             "a subset of the systems, comma-separated")
    add_flag(eng, "--threads", 0, "torch threads (0: torch's default)", type=int)
    add_flag(eng, "--device", "cpu", "torch device of the target and the drafters")
    add_flag(eng, "--out", "runs/bench-engine", "results directory (JSON, markdown, PNGs)")


def _add_serve(which: Subparsers) -> None:
    srv = which.add_parser(
        "serve", help="online HTTP load benchmark of the served app (systems and routers)"
    )
    add_flag(srv, "--concurrency", "1,4,16", "concurrencies to sweep, comma-separated")
    add_flag(srv, "--max-tokens", 64, "output tokens per request, >= 4", type=int)
    add_flag(srv, "--skew-concurrency", 8,
             "concurrency of the router comparison (one long request in four)", type=int)
    add_flag(srv, "--prompts-per-domain", 16, "prompts of each domain (math, code, chat)",
             type=int)
    add_flag(srv, "--port", 8000, "Port of the HTTP API.", type=int)
    add_flag(srv, "--threads", 1, "Torch threads per replica (0: torch's default).", type=int)
    add_flag(srv, "--systems", "no-spec,mtp-1,dspark-local,dspark-cluster",
             "a subset of the systems, comma-separated")
    add_flag(srv, "--routers", "board,pow2", "routers to compare; '' to skip the router run")
    add_flag(srv, "--skew-rounds", 1, "repeat the router comparison, alternating routers",
             type=int)
    add_flag(srv, "--out", "runs/bench-serve", "results directory (JSON, markdown)")


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
    result = run_benchmark(
        target, args.drafters, prompts, tokenizer.stop_ids, cfg, [known[s] for s in wanted]
    )
    for path in write_results(result, args.out, recorded_command("bench", "engine")):
        print(path)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from dspark.bench.acceptance import fitting_texts
    from dspark.bench.serve_bench import SYSTEMS, run_serve_benchmark, write_results
    from dspark.cluster.config import ServeConfig
    from dspark.cluster.serve import stop
    from dspark.models.tokenizer import Tokenizer
    from dspark.router.redis_server import EmbeddedRedis
    from dspark.training.corpus.build import CorpusConfig, build_corpus

    concurrencies = int_list(args.concurrency, "--concurrency")
    if args.max_tokens < 4 or args.skew_concurrency < 1:
        raise ValueError("--max-tokens must be >= 4 and --skew-concurrency >= 1")
    base = ServeConfig(port=args.port, threads=args.threads)
    tok = Tokenizer.from_file(Path(base.target) / "tokenizer.json")
    corpus = build_corpus(CorpusConfig(seed=0))
    limit = 512 - 4 * args.max_tokens - 8
    groups = [fitting_texts([r["messages"][0]["content"] for r in corpus[d]["heldout"]], tok,
                            limit, args.prompts_per_domain, 0) for d in ("math", "code", "chat")]
    prompts = [p for group in zip(*groups) for p in group]
    redis = EmbeddedRedis().start()
    try:
        known = {s.label: s for s in SYSTEMS}
        wanted = [s for s in args.systems.split(",") if s]
        if any(s not in known for s in wanted):
            raise ValueError(f"--systems: choose from {list(known)}")
        routers = [r for r in args.routers.split(",") if r] * max(1, args.skew_rounds)
        result = run_serve_benchmark(replace(base, redis_url=redis.url), prompts,
                                     concurrencies, args.max_tokens, args.skew_concurrency,
                                     systems=[known[s] for s in wanted], routers=routers)
    finally:
        stop(redis)
    for path in write_results(result, args.out, recorded_command("bench", "serve")):
        print(path)
    return 0
