"""`python -m dspark.bench.linear_paths`: the models' linear products on a few rows, by
``F.linear`` (``x @ W^T``) and by ``models/linear.py``'s ``W @ x^T``, side by side on this
machine (docs/engine.md, "Session 24").

1. Products of the demo target's and drafter's weight shapes at ``--rows`` rows, each path's
   median time over ``--repeats`` calls, the two paths taking turns call by call. With
   ``--cold`` a 64 MB buffer is written before every call, so the weight comes from memory
   as in a step, where the whole model passes through the caches between two uses of a
   layer.
   The column "the rule takes it" says whether the models take ``W @ x^T`` for that shape
   (output at least ``MIN_WIDENING`` x the input).
2. Whole verify forwards of the demo target (``checkpoints/target``) at ``--tokens`` tokens
   (one request up to 8 tokens, then 8 tokens per request, 100 tokens of context each):
   ``F.linear`` everywhere, ``W @ x^T`` on every shape (session 24's rule) and the models'
   rule, each one's median over ``--forwards`` forwards, the three taking turns forward by
   forward; the results are checked equal up to rounding before timing.

Ratios are over ``F.linear`` (below 1: faster).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dspark.models import linear as linear_module

SHAPES = {"attention qkv": (192, 384), "dense experts gate+up": (192, 3072),
          "dense experts down": (1536, 192), "LM head": (192, 4096),
          "drafter gate+up": (192, 1024), "drafter down": (512, 192),
          "draft vocabulary head": (192, 2048)}


SMALL_ROWS = linear_module.SMALL_ROWS  # NOTE: the models' own rule, whatever it is
MIN_WIDENING = linear_module.MIN_WIDENING
MODES = ("F.linear", "every shape", "rule")
"""``F.linear`` everywhere; ``W @ x^T`` on every shape at the models' row counts (session 24);
the models' own rule (only outputs ``MIN_WIDENING`` x their input or wider)."""


def paths(mode: str) -> None:
    """Set ``linear``'s small-row path to one of ``MODES``."""
    linear_module.SMALL_ROWS = (2, 1) if mode == "F.linear" else SMALL_ROWS
    linear_module.MIN_WIDENING = 0 if mode == "every shape" else MIN_WIDENING


def time_turns(fns: list[Callable[[], object]], repeats: int,
               before: Callable[[], object] = lambda: None) -> list[float]:
    """Median ms of each function, called in turn ``repeats`` times (``before`` untimed
    ahead of every call)."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            before()
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


def products(rows: list[int], repeats: int, cold: bool) -> None:
    junk = torch.zeros(16 * 1024 * 1024) if cold else None
    before = (lambda: junk.add_(1.0)) if junk is not None else (lambda: None)
    print(f"products ({'weights from memory' if cold else 'weights in cache'}): "
          "ms F.linear / ms W @ x^T (ratio)")
    print("| shape (in -> out) | the rule takes it | " + " | ".join(f"{r} rows" for r in rows)
          + " |")
    print("|---|---|" + "---:|" * len(rows))
    for name, (width, out) in SHAPES.items():
        weight = torch.randn(out, width)
        cells = []
        for num in rows:
            x = torch.randn(num, width)
            paths("every shape")
            torch.testing.assert_close(linear_module.linear(x, weight), F.linear(x, weight),
                                       rtol=1e-5, atol=1e-4)
            old, new = time_turns([lambda x=x, w=weight: F.linear(x, w),
                                   lambda x=x, w=weight: linear_module.linear(x, w)],
                                  repeats, before)
            cells.append(f"{old:.3f} / {new:.3f} ({new / old:.2f})")
        taken = "yes" if out >= MIN_WIDENING * width else "no"
        print(f"| {name} ({width} -> {out}) | {taken} | " + " | ".join(cells) + " |")
    paths("rule")


def forwards(tokens: list[int], repeats: int) -> None:
    from dspark.models.generation import load_for_generation
    from dspark.workers.engine import Engine, EngineConfig
    from dspark.workers.model_runner import dummy_batch

    target, _ = load_for_generation("checkpoints/target")
    runner = Engine(target, None, EngineConfig(max_num_seqs=64)).runner
    runner.feature_layers = [1, 3, 4]  # NOTE: the serving default's features, as with DSpark
    vocab = target.config.vocab_size

    def run(batch, mode: str):
        paths(mode)
        return runner.forward(batch)

    print("\nverify forwards of the demo target: ms with F.linear, with W @ x^T on every shape, "
          "with the models' rule (ratios over F.linear)")
    print("| tokens (requests) | F.linear ms | every shape ms (ratio) | rule ms (ratio) |")
    print("|---|---:|---:|---:|")
    for num in tokens:
        batch = dummy_batch(num, max(1, num // 8), 100, runner.block_size, vocab,
                            runner.device)
        ref = run(batch, "F.linear").logits
        for mode in MODES[1:]:
            torch.testing.assert_close(run(batch, mode).logits, ref, rtol=1e-4, atol=1e-4)
        ms = time_turns([lambda b=batch, m=m: run(b, m) for m in MODES], repeats)
        print(f"| {num} ({max(1, num // 8)}) | {ms[0]:.2f} | "
              + " | ".join(f"{t:.2f} ({t / ms[0]:.2f})" for t in ms[1:]) + " |")
    paths("rule")


def main(argv: list[str] | None = None) -> int:
    from dspark.bench.machine import describe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32,64", help="rows of the products")
    parser.add_argument("--tokens", default="1,2,5,8,16,32,64",
                        help="tokens of the verify forwards")
    parser.add_argument("--repeats", type=int, default=200, help="calls per product")
    parser.add_argument("--forwards", type=int, default=40, help="forwards per size")
    parser.add_argument("--cold", action="store_true", help="evict the caches before a call")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"machine: {describe()}")
    products([int(r) for r in args.rows.split(",")], args.repeats, args.cold)
    if args.tokens:
        forwards([int(t) for t in args.tokens.split(",")], args.forwards)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
