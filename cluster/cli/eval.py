"""``dspark eval``: the offline acceptance table of the drafters (paper Table 1)."""

from __future__ import annotations

import argparse
import json
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

MIRRORS = (Mirror(("eval",), "dspark.bench.acceptance:EvalConfig"),)


def add_parser(sub: Subparsers) -> None:
    ev = sub.add_parser("eval", help="offline acceptance table of the drafters (paper Table 1)")
    add_flag(ev, "--target", str(DEFAULT_TARGET), "target checkpoint directory",
             shown="checkpoints/target")
    add_flag(ev, "--drafters", str(DEFAULT_DRAFTERS),
             "a directory of drafter checkpoints, or NAME=PATH pairs separated by commas",
             shown="checkpoints/drafters")
    add_flag(ev, "--sets", "math,code,chat,gsm8k,math500,humaneval,mbpp,mt-bench",
             "prompt sets, comma-separated")
    add_flag(ev, "--prompts", None,
             'JSONL file of {"turns": [...]} records, evaluated instead of --sets')
    add_flag(ev, "--num-prompts", 50, "prompts per set", type=int)
    add_flag(ev, "--max-new-tokens", 128, "New tokens per prompt (the prefill token included).",
             type=int)
    add_flag(ev, "--temperature", 1.0, "Sampling temperature of target and drafter.", type=float)
    add_flag(ev, "--seed", 980406, "Prompt i is decoded with seed + i.", type=int)
    add_switch(ev, "--coupled", "At T > 0: Gumbel coupling (each prompt a request seeded with "
               "seed + i) instead of rejection sampling (the paper's rule).")
    add_flag(ev, "--draft-vocab", 0, "DSpark and DFlash draft among their checkpoint's N most "
             "generated tokens, as the serving engine's ``--draft-vocab`` (0: the whole "
             "vocabulary, as every other drafter: the table compares methods).", type=int)
    add_flag(ev, "--jobs", 2, "worker processes (one thread each)", type=int)
    add_flag(ev, "--out", "runs/eval", "JSON, markdown table and PNGs")
    add_switch(ev, "--no-progress", "no progress bar")
    add_flag(ev, "--write-subsets", None,
             "re-pick the committed benchmark subsets from full JSONL files and exit",
             metavar="SRC_DIR")


def run(args: argparse.Namespace) -> int:
    from dspark.bench.acceptance import EvalConfig
    from dspark.bench.eval_report import build_report, markdown, markdown_details
    from dspark.bench.eval_table import load_prompt_sets, run_jobs, write_benchmark_subsets
    from dspark.models.drafter_checkpoint import read_drafter_config
    from dspark.models.generation import load_for_generation

    cfg = EvalConfig(
        temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
        coupled=args.coupled, draft_vocab=args.draft_vocab,
    )
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    target, tokenizer = load_for_generation(args.target)
    context = target.config.max_position_embeddings
    if args.write_subsets:
        for path in write_benchmark_subsets(args.write_subsets, tokenizer, context, 64, cfg):
            print(path)
        return 0
    drafters = parse_drafters(args.drafters)
    configs = {name: read_drafter_config(path) for name, path in drafters.items()}
    for cfg_d in configs.values():
        cfg_d.check_target(target.config)
    names = [] if args.prompts else [s for s in args.sets.split(",") if s]
    sets = load_prompt_sets(tokenizer, context, cfg, names, args.num_prompts, args.prompts)
    raw = run_jobs(args.target, drafters, sets, cfg, args.jobs, progress=not args.no_progress)
    command = recorded_command("eval")
    report = build_report(raw, configs, vars(args) | {"eval": cfg.__dict__}, args.out, command)
    table = markdown(report)
    details = markdown_details(report)
    rule = "Gumbel coupling" if cfg.coupled else "rejection sampling"
    vocab = (f"DSpark and DFlash drafting among {cfg.draft_vocab} tokens" if cfg.draft_vocab
             else "whole vocabulary")
    header = (f"Command: `{command}`\n\nAccepted length τ per round (T={cfg.temperature}, "
              f"{rule}, block 7, bonus counted, pooled over rounds; decoded on the serving "
              f"engine, fixed budget, {vocab})\n\n")
    (Path(args.out) / "acceptance.md").write_text(header + table + details)
    print(table)
    print(json.dumps(report["ratios"], indent=2))
    print(f"results in {args.out}/acceptance.json and {args.out}/*.png")
    return 0


def parse_drafters(value: str) -> dict[str, str]:
    """``--drafters``: NAME=PATH pairs, or every checkpoint in a directory in the table's
    order."""
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
