"""32 of 64 rows of 4,096 probabilities gathered by indexing with a tensor of rows and by
``index_select``, on 2 threads (median of 500 calls after 20).

Run from the repository root: ``python -P docs/results/session33-sampling/gathers.py``."""

from __future__ import annotations

import torch

from dspark.bench.host_ops import median_ms as median_after_one


def median_ms(fn, repeats: int = 500) -> float:
    """``bench.host_ops.median_ms`` after 20 warm-up calls (its own one included)."""
    for _ in range(19):
        fn()
    return median_after_one(fn, repeats)


def main() -> None:
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, 4096, generator=gen) * 3, -1)
    rows = torch.arange(0, 64, 2)
    assert torch.equal(probs[rows], probs.index_select(0, rows))
    print(f"probs[rows] {median_ms(lambda: probs[rows]):.4f} ms, "
          f"probs.index_select(0, rows) {median_ms(lambda: probs.index_select(0, rows)):.4f} ms")


if __name__ == "__main__":
    main()
