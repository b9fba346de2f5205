"""``dspark train target`` and ``dspark train drafter``: train the demo MoE target on CPU, or
a drafter on target-regenerated data."""

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
)

# NOTE: the target's CLI defaults are the recipe of the committed demo target
# (docs/target-model.md: 1,150 steps of <= 4,096 tokens, state every 100 steps), which is
# smaller than the dataclass's full-size recipe.
MIRRORS = (
    Mirror(("train", "target"), "dspark.training.target_train:TrainTargetConfig",
           own_defaults=frozenset({"steps", "tokens_per_batch", "eval_every", "save_every"})),
    Mirror(("train", "drafter"), "dspark.training.drafter_train:TrainDrafterConfig"),
    Mirror(("train", "drafter"), "dspark.training.drafter_data:DrafterDataConfig"),
)


def add_parser(sub: Subparsers) -> None:
    train = sub.add_parser("train", help="train the demo target or a drafter")
    which = train.add_subparsers(dest="what", required=True)
    _add_target(which)
    _add_drafter(which)
    _add_draft_vocab(which)


def _add_target(which: Subparsers) -> None:
    tgt = which.add_parser("target", help="train the demo MoE target on CPU")
    add_flag(tgt, "--out", "checkpoints/target", "final checkpoint directory")
    add_flag(tgt, "--work-dir", "runs/target", "corpus, state, curves")
    add_flag(tgt, "--steps", 1150, "Optimiser steps.", type=int)
    add_flag(tgt, "--tokens-per-batch", 4096,
             "Padded tokens per batch (sequences are length-bucketed).", type=int)
    add_flag(tgt, "--lr", 2e-3, "Peak learning rate.", type=float)
    add_flag(tgt, "--seed", 0, "Seeds the corpus, the tokenizer, the init and the batch order.",
             type=int)
    add_flag(tgt, "--eval-every", 100, "Steps between held-out evaluations on a subset.",
             type=int)
    add_flag(tgt, "--save-every", 100, "Steps between resumable state files.", type=int)
    add_flag(tgt, "--model", "{}", "Overrides of ``TargetConfig`` fields (the vocabulary comes "
             "from the tokenizer). A JSON object, e.g. '{\"hidden_size\": 128}'")
    add_switch(tgt, "--resume", "continue from --work-dir's state")
    add_switch(tgt, "--no-progress", "no progress bar")
    add_switch(tgt, "--eval-only",
               "only measure held-out nats/token of the checkpoint at --out (corpus of --seed)")


def _add_drafter(which: Subparsers) -> None:
    dr = which.add_parser("drafter", help="train a drafter from target-regenerated data")
    dr.add_argument("--method", required=True, choices=["dspark", "dflash", "eagle3", "mtp"],
                    help="dspark, dflash, eagle3 or mtp. (required)")
    add_flag(dr, "--name", "", "Name of the variant (e.g. ``dflash-l1``); defaults to the method.",
             shown="the method")
    add_flag(dr, "--target", str(DEFAULT_TARGET), "target checkpoint directory",
             shown="checkpoints/target")
    add_flag(dr, "--out", None, "drafter checkpoint directory",
             shown="checkpoints/drafters/<name>")
    add_flag(dr, "--work-dir", "runs/drafters", "shared data cache, states")
    add_flag(dr, "--epochs", 3, "passes over the regenerated data", type=int)
    add_flag(dr, "--batch-size", 16, "Samples per optimiser step.", type=int)
    add_flag(dr, "--lr", 1e-3, "peak learning rate", type=float)
    add_flag(dr, "--num-layers", 3, "Backbone depth of the parallel drafters (EAGLE-3 and MTP-1 "
             "always use 1).", type=int)
    add_flag(dr, "--num-anchors", 64, "Anchors (blocks) per sample for the parallel drafters.",
             type=int)
    add_flag(dr, "--markov-type", "vanilla", "DSpark's Markov head",
             choices=["vanilla", "gated", "rnn"])
    add_flag(dr, "--markov-rank", 64, "rank of DSpark's Markov head", type=int)
    for term in ("ce", "l1", "conf"):
        add_flag(dr, f"--alpha-{term}", None, f"weight of the {term} loss", type=float,
                 shown="the method's")
    add_flag(dr, "--block-size", 7, "draft tokens per block", type=int)
    add_flag(dr, "--prompts-per-domain", 1000, "Training prompts taken from each domain's train "
             "split (math, code, chat).", type=int)
    add_flag(dr, "--calibration-prompts", 60, "per domain, for STS", type=int)
    add_switch(dr, "--no-calibrate", "skip the STS calibration of the confidence head")
    add_flag(dr, "--seed", 0, "Seeds prompt choice and sampling. Also seeds the training run "
             "and the calibration.", type=int)
    add_switch(dr, "--resume", "continue from the variant's state under --work-dir")
    add_switch(dr, "--no-progress", "no progress bar")


def _add_draft_vocab(which: Subparsers) -> None:
    dv = which.add_parser("draft-vocab", help="rank the target's vocabulary by how often it "
                          "generates each token, into drafter checkpoints (draft_vocab.json)")
    add_flag(dv, "--drafters", str(DEFAULT_DRAFTERS), "directory of drafter checkpoints: "
             "the ranking goes into every parallel drafter (DSpark, DFlash) under it",
             shown="checkpoints/drafters")
    add_flag(dv, "--target", str(DEFAULT_TARGET), "target checkpoint directory",
             shown="checkpoints/target")
    add_flag(dv, "--work-dir", "runs/drafters", "shared data cache (the drafters' training "
             "data; made when missing)")
    add_flag(dv, "--prompts-per-domain", 1000, "Training prompts taken from each domain's train "
             "split (math, code, chat).", type=int)
    add_flag(dv, "--seed", 0, "Seeds prompt choice and sampling.", type=int)
    add_switch(dv, "--no-progress", "no progress bar")


def run_draft_vocab(args: argparse.Namespace) -> int:
    from dspark.models.checkpoint import read_config
    from dspark.models.drafter_checkpoint import read_drafter_config
    from dspark.training.draft_vocab import rank_drafters
    from dspark.training.drafter_data import DrafterDataConfig, prepare_drafter_data

    data_cfg = DrafterDataConfig(prompts_per_domain=args.prompts_per_domain, seed=args.seed)
    cache = prepare_drafter_data(args.target, args.work_dir, data_cfg,
                                 progress=not args.no_progress)
    drafters = [str(d) for d in sorted(Path(args.drafters).iterdir())
                if (d / "config.json").is_file() and read_drafter_config(d).is_parallel]
    vocab = read_config(args.target).vocab_size
    source = (f"reply tokens of the drafter training data ({cache.num_samples} samples, "
              f"{data_cfg.prompts_per_domain} prompts per domain, seed {data_cfg.seed})")
    shares = rank_drafters(cache, vocab, drafters, source)
    print(json.dumps({"drafters": drafters, "coverage": shares}, indent=2))
    return 0


def run_target(args: argparse.Namespace) -> int:
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


def run_drafter(args: argparse.Namespace) -> int:
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
