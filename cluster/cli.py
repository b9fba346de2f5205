"""The ``dspark`` command line. Each subcommand imports its folder lazily."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_TARGET = Path(__file__).resolve().parent.parent / "checkpoints" / "target"


def _add_train(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train the demo target (and, later, drafters)")
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


def _add_generate(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="stream text from the target model")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--checkpoint", default=str(DEFAULT_TARGET))
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-tokens", type=int, default=200)
    gen.add_argument("--seed", type=int, default=0)


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


def _cmd_generate(args: argparse.Namespace) -> int:
    from dspark.models.generation import SamplingParams, generate_stream, load_for_generation

    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed
    )
    model, tokenizer = load_for_generation(args.checkpoint)
    ids = tokenizer.chat_prompt(args.prompt) if args.chat else tokenizer.encode(args.prompt)
    if not args.chat:
        sys.stdout.write(args.prompt)
    for piece in generate_stream(model, tokenizer, ids, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
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
