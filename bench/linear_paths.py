"""`python -m dspark.bench.linear_paths`: the models' linear products on a few rows, by
``F.linear`` (``x @ W^T``) and by ``models/linear.py``'s ``W @ x^T``, side by side on this
machine (docs/engine.md, "Session 24").

1. Products of the demo target's and drafter's weight shapes at ``--rows`` rows, each path's
   median time over ``--repeats`` calls, the two paths taking turns call by call. With
   ``--cold`` a 64 MB buffer is written before every call, so the weight comes from memory
   as in a step, where the whole model passes through the caches between two uses of a
   layer.
2. Whole verify forwards of the demo target (``checkpoints/target``) at ``--tokens`` tokens
   (one request up to 8 tokens, then 8 tokens per request, 100 tokens of context each):
   each path's median over ``--forwards`` forwards, the paths alternating forward by
   forward; the results are checked equal up to rounding before timing.

Ratios are the small-row path over ``F.linear`` (below 1: it is faster).
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


SMALL_ROWS = linear_module.SMALL_ROWS  # NOTE: the models' own range, whatever it is


def small_rows(on: bool) -> None:
    """Turn ``linear``'s small-row path on (its own range), or off (every row count takes
    ``F.linear``)."""
    linear_module.SMALL_ROWS = SMALL_ROWS if on else (2, 1)


def time_pair(first: Callable[[], object], second: Callable[[], object], repeats: int,
              before: Callable[[], object] = lambda: None) -> tuple[float, float]:
    """Median ms of each function, called in turn ``repeats`` times (``before`` untimed
    ahead of every call)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in zip((first, second), times):
            before()
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return tuple(1000 * statistics.median(t) for t in times)  # type: ignore[return-value]


def products(rows: list[int], repeats: int, cold: bool) -> None:
    junk = torch.zeros(16 * 1024 * 1024) if cold else None
    before = (lambda: junk.add_(1.0)) if junk is not None else (lambda: None)
    print(f"products ({'weights from memory' if cold else 'weights in cache'}): "
          "ms F.linear / ms W @ x^T (ratio)")
    print("| shape (in -> out) | " + " | ".join(f"{r} rows" for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for name, (width, out) in SHAPES.items():
        weight = torch.randn(out, width)
        cells = []
        for num in rows:
            x = torch.randn(num, width)
            small_rows(True)
            torch.testing.assert_close(linear_module.linear(x, weight), F.linear(x, weight),
                                       rtol=1e-5, atol=1e-4)
            old, new = time_pair(lambda x=x, w=weight: F.linear(x, w),
                                 lambda x=x, w=weight: linear_module.linear(x, w), repeats,
                                 before)
            cells.append(f"{old:.3f} / {new:.3f} ({new / old:.2f})")
        print(f"| {name} ({width} -> {out}) | " + " | ".join(cells) + " |")


def forwards(tokens: list[int], repeats: int) -> None:
    from dspark.models.generation import load_for_generation
    from dspark.workers.engine import Engine, EngineConfig
    from dspark.workers.model_runner import dummy_batch

    target, _ = load_for_generation("checkpoints/target")
    runner = Engine(target, None, EngineConfig(max_num_seqs=64)).runner
    runner.feature_layers = [1, 3, 4]  # NOTE: the serving default's features, as with DSpark
    vocab = target.config.vocab_size

    def run(batch, on: bool):
        small_rows(on)
        return runner.forward(batch)

    print("\nverify forwards of the demo target: ms F.linear / ms W @ x^T (ratio)")
    print("| tokens (requests) | F.linear ms | W @ x^T ms | ratio |")
    print("|---|---:|---:|---:|")
    for num in tokens:
        batch = dummy_batch(num, max(1, num // 8), 100, runner.block_size, vocab,
                            runner.device)
        torch.testing.assert_close(run(batch, True).logits, run(batch, False).logits,
                                   rtol=1e-4, atol=1e-4)
        old, new = time_pair(lambda b=batch: run(b, False), lambda b=batch: run(b, True), repeats)
        print(f"| {num} ({max(1, num // 8)}) | {old:.2f} | {new:.2f} | {new / old:.2f} |")
    small_rows(True)


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
