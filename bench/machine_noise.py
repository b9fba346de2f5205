"""How much this machine's speed moves on its own: a fixed matmul-and-softmax loop counted
in half-second windows.

    python -m dspark.bench.machine_noise [--seconds 40] [--threads 2]

Prints the windows' iterations per second (min, median, max) and their coefficient of
variation. The same work in every window: what moves is the machine (other tenants, the
host, frequency), which is why the benchmarks compare systems side by side in time
(``bench/closed_loop.py``, ``dspark bench serve --together``).
"""

from __future__ import annotations

import argparse
import statistics
import time


def windows(seconds: float, window: float = 0.5) -> list[float]:
    import torch

    w, x = torch.randn(192, 4096), torch.randn(8, 192)
    rates, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < window:
            for _ in range(50):
                (x @ w).softmax(-1)
            n += 1
        rates.append(n / (time.perf_counter() - start))
    return rates


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="how long to count")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rates = windows(args.seconds)
    print(f"{len(rates)} windows of 0.5 s: iterations/s min {min(rates):.1f} median "
          f"{statistics.median(rates):.1f} max {max(rates):.1f}; coefficient of variation "
          f"{100 * statistics.pstdev(rates) / statistics.mean(rates):.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
