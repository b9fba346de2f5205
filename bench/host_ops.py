"""`python -m dspark.bench.host_ops`: the per-step vocabulary-wide operations the engine
replaced, timed side by side on this machine (docs/engine.md, "Less host work, second
pass"): ``torch.argmax`` against ``row_argmax`` and a max reduction, and the inverse CDF by
comparison and sum (the code before) against bisection (``inverse_cdf``). Each result is
checked equal before it is timed."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from dspark.kernels.row_argmax import row_argmax
from dspark.models.generation import inverse_cdf


def compare_and_sum(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The inverse CDF as it was: the count of CDF entries <= u * total, by comparison."""
    cdf = probs.float().cumsum(-1)
    drawn = (cdf <= uniforms[:, None] * cdf[:, -1:]).sum(-1)
    return drawn.clamp_max(probs.shape[-1] - 1)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def time_ops(logits: torch.Tensor, probs: torch.Tensor, uniforms: torch.Tensor,
             repeats: int) -> dict[str, float]:
    return {
        "torch.argmax": median_ms(lambda: logits.argmax(-1), repeats),
        "row_argmax": median_ms(lambda: row_argmax(logits), repeats),
        "amax": median_ms(lambda: logits.amax(-1), repeats),
        "inverse CDF, compare and sum": median_ms(lambda: compare_and_sum(probs, uniforms),
                                                  repeats),
        "inverse CDF, bisect": median_ms(lambda: inverse_cdf(probs, uniforms), repeats),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=4096, help="row width (the demo's)")
    parser.add_argument("--rows", default="32,128", help="row counts, comma-separated")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=300, help="timed calls per number")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"median ms per call, {args.vocab} wide, {args.threads} threads")
    for rows in (int(r) for r in args.rows.split(",")):
        logits = torch.randn(rows, args.vocab, generator=gen) * 3
        probs = torch.softmax(logits, -1)
        uniforms = torch.rand(rows, generator=gen)
        assert torch.equal(row_argmax(logits), logits.argmax(-1))
        assert torch.equal(inverse_cdf(probs, uniforms), compare_and_sum(probs, uniforms))
        cells = time_ops(logits, probs, uniforms, args.repeats)
        print(f"{rows} rows: " + ", ".join(f"{k} {v:.3f}" for k, v in cells.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
