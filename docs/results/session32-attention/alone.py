"""Timed alone (hot caches), 2 torch threads, median of 300 calls after 20: the flash kernel
(``F.scaled_dot_product_attention``) against ``kernels/attention.py``'s matrix path in the
drafter's and the verify forward's shapes; and the verified drafts' distributions gathered
as a slice per request and a ``cat`` (before 77bef89) against one ``index_select``.

Run from the repository root: ``python -P docs/results/session32-attention/alone.py``
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import dspark.kernels.attention as attention


def median_ms(call, n: int = 300) -> float:
    for _ in range(20):
        call()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[n // 2] * 1e3


def main() -> None:
    torch.set_num_threads(2)
    attention.MIN_ROWS = 1  # NOTE: the matrix path for every shape timed here
    print("attention alone: requests x queries x keys (4 query heads, 2 kv heads, dim 48)")
    for num_req, queries, keys in [(32, 4, 203), (32, 7, 207), (32, 1, 200), (1, 7, 207)]:
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(num_req, queries, 4, 48, generator=gen).transpose(1, 2)
        k = torch.randn(num_req, 2, keys, 48, generator=gen)
        v = torch.randn(num_req, 2, keys, 48, generator=gen)
        mask = torch.ones(num_req, 1, queries, keys, dtype=torch.bool)
        mask[..., -2:] = False
        args = (q, k, v, mask)
        flash = median_ms(lambda a=args: F.scaled_dot_product_attention(
            *a[:3], attn_mask=a[3], enable_gqa=True))
        if queries >= 2:
            matrix = f"{median_ms(lambda a=args: attention.attention(*a)):.3f} ms"
        else:
            matrix = "- (one query: always the flash kernel)"
        print(f"  {num_req:3d} x {queries} x {keys}: flash {flash:.3f} ms  matrix path {matrix}")
    print("verified drafts' distributions, 32 requests x 1 draft over 4096 tokens")
    probs, lens = torch.rand(32, 1, 4096), [1] * 32

    def sliced():
        return torch.cat([probs[i, :n] for i, n in enumerate(lens) if n])

    def gathered():
        flat = [i * probs.shape[1] + k for i, n in enumerate(lens) for k in range(n)]
        return probs.reshape(-1, probs.shape[-1]).index_select(0, torch.tensor(flat))

    assert torch.equal(sliced(), gathered())
    print(f"  slices and cat {median_ms(sliced):.3f} ms  one gather {median_ms(gathered):.3f} ms")


if __name__ == "__main__":
    main()
