"""32 of 64 rows of 4,096 probabilities gathered by indexing with a tensor of rows and by
``index_select``, on 2 threads (median of 500 calls after 20).

Run from the repository root: ``python -P docs/results/session33-sampling/gathers.py``."""

from __future__ import annotations

import time

import torch


def median_ms(fn, repeats: int = 500) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


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
