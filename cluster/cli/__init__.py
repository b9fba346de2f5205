"""The ``dspark`` command line. Each subcommand imports its folder lazily."""

from __future__ import annotations

import argparse
import os
import sys

from dspark.cluster.cli import bench, corpus, dashboards, generate, k8s, serve, train
from dspark.cluster.cli import eval as eval_cmd

# NOTE: every subcommand module is imported above to build the parser, so each keeps its
# heavy imports (torch, bench, training) inside its run functions: `dspark --help` stays fast.
HANDLERS = {
    ("generate", None): generate.run,
    ("train", "target"): train.run_target,
    ("corpus", "build"): corpus.run_build,
    ("train", "drafter"): train.run_drafter,
    ("train", "draft-vocab"): train.run_draft_vocab,
    ("eval", None): eval_cmd.run,
    ("bench", "engine"): bench.run_engine,
    ("bench", "serve"): bench.run_serve,
    ("bench", "ep"): bench.run_ep,
    ("bench", "drift"): bench.run_drift,
    ("bench", "faults"): bench.run_faults,
    ("bench", "attacks"): bench.run_attacks,
    ("serve", None): serve.run,
    ("dashboards", None): dashboards.run,
    ("k8s", "render"): k8s.run_render,
}
"""(command, subcommand or None) -> the function that runs it."""

MIRRORS = generate.MIRRORS + train.MIRRORS + corpus.MIRRORS + eval_cmd.MIRRORS + bench.MIRRORS
"""Every set of flags that carries a config dataclass's fields (checked by the tests)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (generate, train, corpus, eval_cmd, bench, serve, dashboards, k8s):
        module.add_parser(sub)
    return parser


SCRIPTS = {("bench", "faults"), ("bench", "attacks")}
"""Subcommands that hand their flags to a script's own parser."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    key = (args.command, getattr(args, "what", None))
    if key in SCRIPTS:
        args.rest = extra + args.rest  # NOTE: flags before the first plain argument
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler = HANDLERS[key]
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
