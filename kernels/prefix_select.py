"""The verification budget's prefix selection over a whole step, vectorised.

Candidates are all drafts (r, j) of the step with their survival ``a_{r,j}``, sorted in
descending survival (ties: earlier position, then request order). Admitting the first n
candidates verifies ``base + n`` tokens and expects ``R + sum of their a`` tokens, where R
counts every request the step serves: the drafted ones, and ``other_requests`` (undrafted
decoding requests and prefilling ones, whose progress a longer step delays as much).

- Algorithm 1 (``capacity < 0``): n* is the length of the leading run of candidates whose
  admission raises the expected throughput ``(R + cum a) * SPS(base + n)``; the first one
  that does not raise it stops the scan (the early stop that keeps admission causal).
- Top-K (``capacity >= 0``): n* = min(capacity, number of candidates), no early stop.

Because survival never rises along a request's drafts, each request's admitted candidates
form a prefix, and ℓ_r is simply how many of the first n* candidates belong to r.

``prefix_cut_torch`` is the tensor twin, ``prefix_cut_triton`` the kernel (one program, the
sorted candidates in one block); ``select_prefixes`` does the sort and count.
``select_prefixes_host`` is the CPU path: the same rule over Python floats from one
``tolist()``; a step's few dozen candidates cost a few microseconds there against some 40
tensor operations. All equal the oracle's Algorithm 1 / top-K (tested).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def sps_torch(batch: torch.Tensor, sizes: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
    """``StepCostTable.sps`` on a tensor: piecewise-linear SPS between profiled sizes,
    constant below them, step time proportional to B beyond them; batch: [N] float."""
    top = float(sizes[-1])
    b = batch.float().clamp(float(sizes[0]), top)
    hi = torch.searchsorted(sizes.float(), b, right=True).clamp(1, sizes.numel() - 1)
    lo = hi - 1
    span = (sizes[hi] - sizes[lo]).float()
    w = torch.where(span > 0, (b - sizes[lo].float()) / span, torch.zeros_like(b))
    return (rates[lo] * (1 - w) + rates[hi] * w) * (top / batch.float().clamp(min=top))


def group_sps_torch(batch: torch.Tensor, sizes: torch.Tensor, rates: torch.Tensor,
                    group: tuple[int, int, int, float] | None) -> torch.Tensor:
    """SPS of this rank's step at ``batch`` tokens [N]: ``sps_torch`` alone; in an
    expert-parallel group ``(most, total, members, shared)`` of the other members, the
    per-rank model of ``dspark.workers.budget.CostModel``."""
    if group is None:
        return sps_torch(batch, sizes, rates)
    most, total, members, shared = group
    private = 1.0 / sps_torch(batch.clamp(min=most), sizes, rates)
    common = 1.0 / sps_torch((batch + total) / members, sizes, rates)
    return 1.0 / ((1.0 - shared) * private + shared * common)


def prefix_cut_torch(
    a_sorted: torch.Tensor,  # [N] survival in descending order, < 0 for no candidate
    sizes: torch.Tensor,  # [T] profiled batch sizes
    rates: torch.Tensor,  # [T] SPS at each size
    num_req: float,
    base_tokens: int,  # tokens verified with no draft admitted (anchors + other tokens)
    capacity: int,  # < 0: Algorithm 1; else top-K
    group: tuple[int, int, int, float] | None = None,  # see group_sps_torch
) -> torch.Tensor:  # [] int64: the number of candidates admitted
    valid = a_sorted >= 0
    if capacity >= 0:
        return torch.clamp(valid.long().sum(), max=capacity)
    n = torch.arange(1, a_sorted.numel() + 1, device=a_sorted.device)
    cum = torch.cumsum(torch.where(valid, a_sorted, 0.0), 0)  # [N]
    after = (num_req + cum) * group_sps_torch(base_tokens + n, sizes, rates, group)
    before = (num_req + cum - a_sorted) * group_sps_torch(base_tokens + n - 1, sizes, rates,
                                                          group)
    raises = valid & (after > before)
    return raises.long().cumprod(0).sum()


if triton is not None:

    @triton.jit
    def _cut_kernel(
        a_ptr, size_ptr, rate_ptr, out_ptr, N, T, num_req, base_tokens, capacity,
        BLOCK: tl.constexpr,
    ):
        offs = tl.arange(0, BLOCK)
        inside = offs < N
        a = tl.load(a_ptr + offs, mask=inside, other=-1.0)
        valid = inside & (a >= 0)
        if capacity >= 0:
            count = tl.sum(tl.where(valid, 1, 0), axis=0)
            tl.store(out_ptr, tl.minimum(count, capacity))
        else:
            cum = tl.cumsum(tl.where(valid, a, 0.0), axis=0)
            n = (offs + 1).to(tl.float32)
            lo_size = tl.load(size_ptr).to(tl.float32)
            hi_size = tl.load(size_ptr + T - 1).to(tl.float32)
            b_after = tl.minimum(tl.maximum(base_tokens + n, lo_size), hi_size)
            b_before = tl.minimum(tl.maximum(base_tokens + n - 1, lo_size), hi_size)
            sps_after = tl.zeros([BLOCK], dtype=tl.float32) + tl.load(rate_ptr)
            sps_before = tl.zeros([BLOCK], dtype=tl.float32) + tl.load(rate_ptr)
            for i in range(T - 1):
                s0 = tl.load(size_ptr + i).to(tl.float32)
                s1 = tl.load(size_ptr + i + 1).to(tl.float32)
                r0 = tl.load(rate_ptr + i)
                r1 = tl.load(rate_ptr + i + 1)
                w_a = (b_after - s0) / (s1 - s0)
                w_b = (b_before - s0) / (s1 - s0)
                sps_after = tl.where(b_after >= s0, r0 * (1 - w_a) + r1 * w_a, sps_after)
                sps_before = tl.where(b_before >= s0, r0 * (1 - w_b) + r1 * w_b, sps_before)
            # beyond the largest profiled size, step time grows in proportion to B
            sps_after *= hi_size / tl.maximum(base_tokens + n, hi_size)
            sps_before *= hi_size / tl.maximum(base_tokens + n - 1, hi_size)
            after = (num_req + cum) * sps_after
            before = (num_req + cum - a) * sps_before
            stops = (~valid) | (after <= before)
            first = tl.min(tl.where(stops, offs, BLOCK), axis=0)
            tl.store(out_ptr, tl.minimum(first, N))


def prefix_cut_triton(a_sorted, sizes, rates, num_req, base_tokens, capacity):
    if triton is None:
        raise RuntimeError("triton is not installed")
    out = torch.zeros((), dtype=torch.int64, device=a_sorted.device)
    num = a_sorted.numel()
    if num == 0:
        return out
    _cut_kernel[(1,)](
        a_sorted.float().contiguous(),
        sizes.to(torch.int64).contiguous(),
        rates.float().contiguous(),
        out,
        num,
        sizes.numel(),
        num_req,
        base_tokens,
        capacity,
        BLOCK=triton.next_power_of_2(num),
    )
    return out


def select_prefixes_host(
    surv: torch.Tensor,  # [R, K] survival, < 0 where nothing was proposed
    sps: Callable[[float], float],  # SPS of a step of B tokens (per rank in a group)
    other_tokens: int = 0,
    capacity: int = -1,
    other_requests: float = 0,
) -> list[int]:  # ℓ_r
    """``select_prefixes`` over Python floats (one ``tolist()``)."""
    rows = surv.tolist()
    num_req = len(rows)
    lengths = [0] * num_req
    # NOTE: j-major, and a stable sort: ties go to the earlier position, then the request
    cands = [(a, r) for j in range(len(rows[0]) if rows else 0)
             for r, row in enumerate(rows) if (a := row[j]) >= 0]
    cands.sort(key=lambda c: -c[0])
    if capacity >= 0:
        for _, r in cands[:capacity]:
            lengths[r] += 1
        return lengths
    batch = num_req + other_tokens
    expected = num_req + other_requests
    best = expected * sps(batch)
    for a, r in cands:
        after = (expected + a) * sps(batch + 1)
        if not after > best:
            break  # NOTE: the early stop is what keeps the admission causal
        lengths[r] += 1
        batch, expected, best = batch + 1, expected + a, after
    return lengths


def select_prefixes(
    surv: torch.Tensor,  # [R, K] survival, < 0 where nothing was proposed
    sizes: torch.Tensor,  # [T]
    rates: torch.Tensor,  # [T]
    other_tokens: int = 0,
    capacity: int = -1,
    other_requests: float = 0,
    group: tuple[int, int, int, float] | None = None,
) -> torch.Tensor:  # [R] int64 ℓ_r
    """ℓ_r of every request; ``group``: the rest of an expert-parallel group, priced per
    rank (``group_sps_torch``; on the tensor path)."""
    num_req, width = surv.shape
    # j-major flattening so that a stable sort breaks ties by position, then request
    flat = surv.T.reshape(-1)  # [K * R]
    order = torch.sort(flat, descending=True, stable=True).indices
    a_sorted = flat[order]
    base = num_req + other_tokens
    if a_sorted.is_cuda and triton is not None and group is None:
        cut = prefix_cut_triton(a_sorted, sizes, rates, num_req + other_requests, base, capacity)
    else:
        cut = prefix_cut_torch(a_sorted, sizes, rates, num_req + other_requests, base, capacity,
                               group)
    taken = torch.arange(flat.numel(), device=surv.device) < cut
    req_of = order % num_req
    # NOTE: a sum per request by scatter: a masked index or ``bincount`` would read a size
    # back (a sync on a GPU)
    return torch.zeros(num_req, dtype=torch.int64, device=surv.device).scatter_add_(
        0, req_of, taken.long())
