"""``dspark generate``: stream text from the target model, optionally with a drafter."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dspark.cluster.cli.common import (
    DEFAULT_DRAFTERS,
    DEFAULT_TARGET,
    Mirror,
    Subparsers,
    add_flag,
    add_switch,
)

# NOTE: a 200-token reply and seed 0 (reproducible sampling) suit a terminal better than
# the API's defaults (128 tokens, unseeded).
MIRRORS = (
    Mirror(("generate",), "dspark.models.generation:SamplingParams",
           own_defaults=frozenset({"max_tokens", "seed"})),
)


SEED_HELP = ("At temperature > 0 the request samples by Gumbel coupling from this seed: the "
             "same text whatever the drafter, budget, batch, load or replica, and the same as "
             "decoding without a drafter. None: a fresh random stream (rejection sampling).")


def add_parser(sub: Subparsers) -> None:
    gen = sub.add_parser("generate", help="stream text from the target model")
    gen.add_argument("prompt")
    add_switch(gen, "--chat", "wrap the prompt in the chat template")
    add_flag(gen, "--checkpoint", str(DEFAULT_TARGET), "target checkpoint directory",
             shown="checkpoints/target")
    add_flag(gen, "--temperature", 0.0,
             "0 is greedy; > 0 samples from softmax(logits / temperature).", type=float)
    add_flag(gen, "--top-p", 1.0, "Nucleus: keep the smallest set of tokens whose probability "
             "reaches top_p, in (0, 1].", type=float)
    add_flag(gen, "--max-tokens", 200, "Most new tokens to generate, >= 1.", type=int)
    add_flag(gen, "--seed", 0, SEED_HELP, type=int)
    add_flag(gen, "--drafter", None,
             "speculative decoding with a drafter: dspark, dflash, eagle3, mtp or a path")


def run(args: argparse.Namespace) -> int:
    """Stream the text from the serving engine (a batch of one); with a drafter, print each
    round's accepted length on stderr."""
    from dspark.models.drafter_checkpoint import load_drafter
    from dspark.models.generation import SamplingParams, load_for_generation
    from dspark.models.tokenizer import StreamDecoder
    from dspark.workers.offline import offline_engine, stream_tokens

    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed
    )
    model, tokenizer = load_for_generation(args.checkpoint)
    ids = tokenizer.chat_prompt(args.prompt) if args.chat else tokenizer.encode(args.prompt)
    drafter = load_drafter(resolve_drafter(args.drafter), model) if args.drafter else None
    rounds: list = []

    def on_round(req_id, rec) -> None:
        rounds.append(rec)
        tau = sum(r.committed for r in rounds) / len(rounds)
        sys.stderr.write(f"[{rec.committed}/{rec.proposed + 1} τ={tau:.2f}]")
        sys.stderr.flush()

    engine = offline_engine(model, drafter, 1, on_round)
    if not args.chat:
        sys.stdout.write(args.prompt)
    decoder, stops = StreamDecoder(tokenizer), tokenizer.stop_ids
    for token in stream_tokens(engine, ids, params, stops):
        if token in stops:
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


def resolve_drafter(value: str) -> Path:
    """``--drafter``: a directory, or the name of one under checkpoints/drafters."""
    path = Path(value)
    if path.is_dir():
        return path
    if (DEFAULT_DRAFTERS / value).is_dir():
        return DEFAULT_DRAFTERS / value
    raise ValueError(
        f"--drafter {value!r} is neither a directory nor one of "
        f"{sorted(p.name for p in DEFAULT_DRAFTERS.glob('*') if p.is_dir())}"
    )
