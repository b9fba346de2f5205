"""``dspark corpus build``: write the train/calibration/held-out JSONL of every domain."""

from __future__ import annotations

import argparse

from dspark.cluster.cli.common import Mirror, Subparsers, add_flag

MIRRORS = (Mirror(("corpus", "build"), "dspark.training.corpus.build:CorpusConfig"),)


def add_parser(sub: Subparsers) -> None:
    corpus = sub.add_parser("corpus", help="build the training corpus")
    which = corpus.add_subparsers(dest="what", required=True)
    build = which.add_parser("build", help="write train/calibration/held-out JSONL per domain")
    add_flag(build, "--out", "data/corpus", "output directory")
    add_flag(build, "--seed", 0,
             "Seeds every choice: phrasing, shuffles, split membership, math problems.", type=int)


def run_build(args: argparse.Namespace) -> int:
    from dspark.training.corpus.build import CorpusConfig, build_corpus, write_corpus

    corpus = build_corpus(CorpusConfig(seed=args.seed))
    for path in write_corpus(corpus, args.out):
        print(path)
    return 0
