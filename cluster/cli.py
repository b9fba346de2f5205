"""The ``dspark`` command line. Each subcommand imports its folder lazily."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TARGET = REPO_ROOT / "checkpoints" / "target"
DEFAULT_DRAFTERS = REPO_ROOT / "checkpoints" / "drafters"


def _add_train(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train the demo target or a drafter")
    which = train.add_subparsers(dest="what", required=True)
    tgt = which.add_parser("target", help="train the demo MoE target on CPU")
    tgt.add_argument("--out", default="checkpoints/target", help="final checkpoint directory")
    tgt.add_argument("--work-dir", default="runs/target", help="corpus, state, curves")
    tgt.add_argument("--steps", type=int, default=1150)
    tgt.add_argument("--tokens-per-batch", type=int, default=4096)
    tgt.add_argument("--lr", type=float, default=2e-3)
    tgt.add_argument("--seed", type=int, default=0)
    tgt.add_argument("--eval-every", type=int, default=100)
    tgt.add_argument("--save-every", type=int, default=100)
    tgt.add_argument(
        "--model",
        default="{}",
        help="JSON overrides of TargetConfig, e.g. '{\"hidden_size\": 128}'",
    )
    tgt.add_argument("--resume", action="store_true", help="continue from --work-dir's state")
    tgt.add_argument("--no-progress", action="store_true")
    tgt.add_argument(
        "--eval-only",
        action="store_true",
        help="only measure held-out nats/token of the checkpoint at --out (corpus of --seed)",
    )
    _add_train_drafter(which)


def _add_train_drafter(which: argparse._SubParsersAction) -> None:
    dr = which.add_parser("drafter", help="train a drafter from target-regenerated data")
    dr.add_argument("--method", required=True, choices=["dspark", "dflash", "eagle3", "mtp"])
    dr.add_argument("--name", default="", help="variant name (default: the method)")
    dr.add_argument("--target", default=str(DEFAULT_TARGET))
    dr.add_argument("--out", default=None, help="default: checkpoints/drafters/<name>")
    dr.add_argument("--work-dir", default="runs/drafters", help="shared data cache, states")
    dr.add_argument("--epochs", type=int, default=3)
    dr.add_argument("--batch-size", type=int, default=16)
    dr.add_argument("--lr", type=float, default=1e-3)
    dr.add_argument("--num-layers", type=int, default=3)
    dr.add_argument("--num-anchors", type=int, default=64)
    dr.add_argument("--markov-type", default="vanilla", choices=["vanilla", "gated", "rnn"])
    dr.add_argument("--markov-rank", type=int, default=64)
    dr.add_argument("--alpha-ce", type=float, default=None)
    dr.add_argument("--alpha-l1", type=float, default=None)
    dr.add_argument("--alpha-conf", type=float, default=None)
    dr.add_argument("--block-size", type=int, default=7)
    dr.add_argument("--prompts-per-domain", type=int, default=1000)
    dr.add_argument("--calibration-prompts", type=int, default=60, help="per domain, for STS")
    dr.add_argument("--no-calibrate", action="store_true")
    dr.add_argument("--seed", type=int, default=0)
    dr.add_argument("--resume", action="store_true")
    dr.add_argument("--no-progress", action="store_true")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="offline acceptance table of the drafters (paper Table 1)")
    ev.add_argument("--target", default=str(DEFAULT_TARGET))
    ev.add_argument(
        "--drafters",
        default=str(DEFAULT_DRAFTERS),
        help="a directory of drafter checkpoints, or NAME=PATH pairs separated by commas",
    )
    ev.add_argument("--sets", default="math,code,chat,gsm8k,math500,humaneval,mbpp,mt-bench")
    ev.add_argument("--prompts", default=None, help='JSONL file of {"turns": [...]} records')
    ev.add_argument("--num-prompts", type=int, default=50, help="prompts per set")
    ev.add_argument("--max-new-tokens", type=int, default=128)
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--seed", type=int, default=980406)
    ev.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    ev.add_argument("--out", default="runs/eval", help="JSON, markdown table and PNGs")
    ev.add_argument("--no-progress", action="store_true")
    ev.add_argument(
        "--write-subsets",
        default=None,
        metavar="SRC_DIR",
        help="re-pick the committed benchmark subsets from full JSONL files and exit",
    )


def _int_list(value: str, name: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise ValueError(f"{name} must be comma-separated integers, got {value!r}") from exc
    if not out or min(out) < 1:
        raise ValueError(f"{name} must list integers >= 1, got {value!r}")
    return out


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="load benchmarks")
    which = bench.add_subparsers(dest="what", required=True)
    eng = which.add_parser(
        "engine", help="in-process closed-loop engine benchmark (all systems in one run)"
    )
    eng.add_argument("--target", default=str(DEFAULT_TARGET))
    eng.add_argument("--drafters", default=str(DEFAULT_DRAFTERS))
    eng.add_argument("--concurrency", default="1,2,4,8,16,32")
    eng.add_argument("--temperatures", default="0,1")
    eng.add_argument("--max-tokens", type=int, default=64)
    eng.add_argument("--min-requests", type=int, default=8, help="finished per cell: max(this, 2C)")
    eng.add_argument("--prompts-per-domain", type=int, default=24)
    eng.add_argument("--rounds", type=int, default=3, help="repeat the sweep; report medians")
    eng.add_argument(
        "--systems",
        default="no-spec,mtp-1,dflash-g7,dspark-g7,dspark-alg1,dspark-topk",
        help="a subset of the systems, comma-separated",
    )
    eng.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    eng.add_argument("--device", default="cpu")
    eng.add_argument("--out", default="runs/bench-engine")
    srv = which.add_parser(
        "serve", help="online HTTP load benchmark of the served app (systems and routers)"
    )
    srv.add_argument("--concurrency", default="1,4,16")
    srv.add_argument("--max-tokens", type=int, default=64)
    srv.add_argument("--skew-concurrency", type=int, default=8)
    srv.add_argument("--prompts-per-domain", type=int, default=16)
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    srv.add_argument("--systems", default="no-spec,mtp-1,dspark-local,dspark-cluster")
    srv.add_argument("--routers", default="board,pow2", help="'' to skip the router run")
    srv.add_argument("--skew-rounds", type=int, default=1,
                     help="repeat the router comparison, alternating routers")
    srv.add_argument("--out", default="runs/bench-serve")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    """One flag per ``ServeConfig`` field (``--max-num-seqs`` for ``max_num_seqs``), its
    help the field's docstring and its default the field's, so neither can drift."""
    from dataclasses import MISSING, fields

    from dspark.cluster.config import ServeConfig

    srv = sub.add_parser("serve", help="serve the OpenAI API on a local Ray cluster")
    srv.add_argument("--config", default=None,
                     help="YAML file of serve settings (flags override it)")
    docs = ServeConfig.field_docs()
    for f in fields(ServeConfig):
        kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
        default = f.default if f.default is not MISSING else None
        shown = "none" if default is None else default
        if f.name == "budget":
            shown = "cluster for a drafter with a confidence head, fixed otherwise"
        elif f.name == "target":
            shown = "checkpoints/target"
        help_text = f"{docs.get(f.name, f.name.replace('_', ' '))} (default: {shown})"
        srv.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind,
                         default=None, help=help_text.replace("%", "%%"))


def serve_config(args: argparse.Namespace):
    """The ``ServeConfig`` of ``dspark serve``: the YAML file's, with every given flag over
    it."""
    from dataclasses import fields

    from dspark.cluster.config import ServeConfig

    base = ServeConfig.from_yaml(args.config).to_dict() if args.config else {}
    given = {f.name: getattr(args, f.name) for f in fields(ServeConfig)}
    base.update({k: v for k, v in given.items() if v is not None})
    return ServeConfig.from_dict(base)


def _cmd_serve(args: argparse.Namespace) -> int:
    from dspark.cluster.serve import main as serve_main

    return serve_main(serve_config(args))


def _add_generate(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="stream text from the target model")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--checkpoint", default=str(DEFAULT_TARGET))
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-tokens", type=int, default=200)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--drafter",
        default=None,
        help="speculative decoding with a drafter: dspark, dflash, eagle3, mtp or a path",
    )


def _add_corpus(sub: argparse._SubParsersAction) -> None:
    corpus = sub.add_parser("corpus", help="build the training corpus")
    which = corpus.add_subparsers(dest="what", required=True)
    build = which.add_parser("build", help="write train/calibration/held-out JSONL per domain")
    build.add_argument("--out", default="data/corpus")
    build.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_train(sub)
    _add_corpus(sub)
    _add_eval(sub)
    _add_bench(sub)
    _add_serve(sub)
    return parser


def _cmd_train_target(args: argparse.Namespace) -> int:
    from dspark.training.target_train import TargetTrainer, TrainTargetConfig, evaluate_checkpoint

    if args.eval_only:
        print(json.dumps(evaluate_checkpoint(args.out, seed=args.seed), indent=2))
        return 0
    try:
        overrides = json.loads(args.model)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--model must be a JSON object: {exc}") from exc
    cfg = TrainTargetConfig(
        steps=args.steps,
        tokens_per_batch=args.tokens_per_batch,
        lr=args.lr,
        seed=args.seed,
        eval_every=args.eval_every,
        save_every=args.save_every,
        model=overrides,
    )
    trainer = TargetTrainer(cfg, args.work_dir, args.out)
    metrics = trainer.run(resume=args.resume, progress=not args.no_progress)
    print(
        json.dumps(
            {
                k: metrics[k]
                for k in ("heldout_nats_per_answer_token", "steps", "tokens_seen", "parameters")
            },
            indent=2,
        )
    )
    print(f"checkpoint written to {args.out}; curve at {Path(args.work_dir) / 'loss_curve.png'}")
    return 0


def _resolve_drafter(value: str) -> Path:
    path = Path(value)
    if path.is_dir():
        return path
    if (DEFAULT_DRAFTERS / value).is_dir():
        return DEFAULT_DRAFTERS / value
    raise ValueError(
        f"--drafter {value!r} is neither a directory nor one of "
        f"{sorted(p.name for p in DEFAULT_DRAFTERS.glob('*') if p.is_dir())}"
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    from dspark.models.generation import SamplingParams, generate_stream, load_for_generation

    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed
    )
    model, tokenizer = load_for_generation(args.checkpoint)
    ids = tokenizer.chat_prompt(args.prompt) if args.chat else tokenizer.encode(args.prompt)
    if not args.chat:
        sys.stdout.write(args.prompt)
    if args.drafter:
        return _generate_speculative(args, model, tokenizer, ids, params)
    for piece in generate_stream(model, tokenizer, ids, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _generate_speculative(args, model, tokenizer, ids, params) -> int:
    """Stream the text; after each round print the round's accepted length on stderr."""
    from dspark.models.drafter_checkpoint import load_drafter
    from dspark.models.speculative import speculative_generate
    from dspark.models.tokenizer import StreamDecoder

    drafter = load_drafter(_resolve_drafter(args.drafter), model)
    rounds: list = []
    decoder = StreamDecoder(tokenizer)

    def on_round(rec) -> None:
        rounds.append(rec)
        tau = sum(r.committed for r in rounds) / len(rounds)
        sys.stderr.write(f"[{rec.committed}/{rec.proposed + 1} τ={tau:.2f}]")
        sys.stderr.flush()

    stops = tokenizer.stop_ids
    for token in speculative_generate(model, drafter, ids, params, stops, on_round=on_round):
        if token in stops and not params.ignore_eos:
            break
        piece = decoder.push(token)
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    if rounds:
        tau = sum(r.committed for r in rounds) / len(rounds)
        sys.stderr.write(
            f"\n{drafter.config.method}: {len(rounds)} rounds, accepted length τ = {tau:.2f} "
            "tokens per target forward (bonus included)\n"
        )
    return 0


def _cmd_train_drafter(args: argparse.Namespace) -> int:
    from dspark.models.generation import load_for_generation
    from dspark.training.calibrate import calibrate_drafter
    from dspark.training.drafter_data import DrafterDataConfig, prepare_drafter_data
    from dspark.training.drafter_train import DrafterTrainer, TrainDrafterConfig

    cfg = TrainDrafterConfig(
        method=args.method,
        name=args.name,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        num_layers=args.num_layers,
        num_anchors=args.num_anchors,
        markov_type=args.markov_type,
        markov_rank=args.markov_rank,
        alpha_ce=args.alpha_ce,
        alpha_l1=args.alpha_l1,
        alpha_conf=args.alpha_conf,
        block_size=args.block_size,
    )
    data_cfg = DrafterDataConfig(prompts_per_domain=args.prompts_per_domain, seed=args.seed)
    progress = not args.no_progress
    cache = prepare_drafter_data(args.target, args.work_dir, data_cfg, progress=progress)
    target, tokenizer = load_for_generation(args.target)
    if tokenizer.mask_id is None:
        raise ValueError(
            f"the tokenizer of {args.target} has no <mask> token; parallel drafters need a "
            "reserved id that never occurs in the data"
        )
    out = Path(args.out) if args.out else DEFAULT_DRAFTERS / cfg.variant
    work = Path(args.work_dir) / cfg.variant
    trainer = DrafterTrainer(cfg, target, cache, tokenizer.mask_id, work, out)
    drafter_cfg = trainer.run(resume=args.resume, progress=progress)
    print(f"{cfg.variant}: {trainer.step} steps on {cache.num_samples} samples -> {out}")
    if drafter_cfg is not None and drafter_cfg.confidence_head and not args.no_calibrate:
        summary = calibrate_drafter(
            args.target, out, args.calibration_prompts, seed=args.seed, progress=progress
        )
        print(json.dumps(summary, indent=2))
    return 0


def _parse_drafters(value: str) -> dict[str, str]:
    if "=" in value:
        pairs = [item.split("=", 1) for item in value.split(",") if item]
        return {k.strip(): v.strip() for k, v in pairs}
    root = Path(value)
    if not root.is_dir():
        raise ValueError(f"--drafters {value!r} is not a directory of drafter checkpoints")
    from dspark.bench.eval_table import DRAFTER_ORDER

    found = {p.name: str(p) for p in root.iterdir() if (p / "config.json").is_file()}
    if not found:
        raise ValueError(f"--drafters {value!r} holds no drafter checkpoints")
    rank = {n: i for i, n in enumerate(DRAFTER_ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (rank.get(kv[0], 99), kv[0])))


def _cmd_eval(args: argparse.Namespace) -> int:
    from dspark.bench.acceptance import EvalConfig
    from dspark.bench.eval_report import build_report, markdown, markdown_details
    from dspark.bench.eval_table import load_prompt_sets, run_jobs, write_benchmark_subsets
    from dspark.models.drafter_checkpoint import read_drafter_config
    from dspark.models.generation import load_for_generation

    cfg = EvalConfig(
        temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed
    )
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    target, tokenizer = load_for_generation(args.target)
    context = target.config.max_position_embeddings
    if args.write_subsets:
        for path in write_benchmark_subsets(args.write_subsets, tokenizer, context, 64, cfg):
            print(path)
        return 0
    drafters = _parse_drafters(args.drafters)
    configs = {name: read_drafter_config(path) for name, path in drafters.items()}
    for cfg_d in configs.values():
        cfg_d.check_target(target.config)
    names = [] if args.prompts else [s for s in args.sets.split(",") if s]
    sets = load_prompt_sets(tokenizer, context, cfg, names, args.num_prompts, args.prompts)
    raw = run_jobs(args.target, drafters, sets, cfg, args.jobs, progress=not args.no_progress)
    command = (
        "dspark eval " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else "dspark eval"
    )
    report = build_report(raw, configs, vars(args) | {"eval": cfg.__dict__}, args.out, command)
    table = markdown(report)
    details = markdown_details(report)
    header = f"Command: `{command}`\n\nAccepted length τ per round (T={cfg.temperature}, block 7, bonus counted, pooled over rounds)\n\n"
    (Path(args.out) / "acceptance.md").write_text(header + table + details)
    print(table)
    print(json.dumps(report["ratios"], indent=2))
    print(f"results in {args.out}/acceptance.json and {args.out}/*.png")
    return 0


def _cmd_bench_engine(args: argparse.Namespace) -> int:
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
        concurrencies=_int_list(args.concurrency, "--concurrency"),
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
    command = "dspark bench engine " + " ".join(sys.argv[3:]) if sys.argv[1:3] == [
        "bench", "engine"] else "dspark bench engine"
    for path in write_results(result, args.out, command.strip()):
        print(path)
    return 0


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from dspark.bench.acceptance import fitting_texts
    from dspark.bench.serve_bench import SYSTEMS, run_serve_benchmark, write_results
    from dspark.cluster.config import ServeConfig
    from dspark.cluster.serve import stop
    from dspark.models.tokenizer import Tokenizer
    from dspark.router.redis_server import EmbeddedRedis
    from dspark.training.corpus.build import CorpusConfig, build_corpus

    concurrencies = _int_list(args.concurrency, "--concurrency")
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
    command = "dspark bench serve " + " ".join(sys.argv[3:]) if sys.argv[1:3] == [
        "bench", "serve"] else "dspark bench serve"
    for path in write_results(result, args.out, command.strip()):
        print(path)
    return 0


def _cmd_corpus_build(args: argparse.Namespace) -> int:
    from dspark.training.corpus.build import CorpusConfig, build_corpus, write_corpus

    corpus = build_corpus(CorpusConfig(seed=args.seed))
    for path in write_corpus(corpus, args.out):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        ("generate", None): _cmd_generate,
        ("train", "target"): _cmd_train_target,
        ("corpus", "build"): _cmd_corpus_build,
        ("train", "drafter"): _cmd_train_drafter,
        ("eval", None): _cmd_eval,
        ("bench", "engine"): _cmd_bench_engine,
        ("bench", "serve"): _cmd_bench_serve,
        ("serve", None): _cmd_serve,
    }
    handler = handlers[(args.command, getattr(args, "what", None))]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dspark {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `dspark generate ... | head -c 10`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
