"""`python -m dspark.bench.host_ops`: the per-step vocabulary-wide operations the engine
replaced, timed side by side on this machine (docs/engine.md, "Less host work, second
pass"): ``torch.argmax`` against ``row_argmax`` and a max reduction, and the inverse CDF by
comparison and sum (the code before) against bisection (``inverse_cdf``), and a step
without drafts of R requests at T=1: ``target_probs`` then ``verify`` (until session 20)
against ``_plain_softmax``, and its softmax with the maximum subtracted first (until
session 23) against ``softmax_rows``. Each result is checked equal before it is timed. Then the verification budget's Algorithm 1 over a step of
R requests with 7 drafts each: the tensor twin (``select_prefixes``) against the host path
(``select_prefixes_host``, the CPU's since session 14), ``--budget-requests``. Then the
verification of R rejection-sampling requests with ℓ drafts each: ``verify_tensors``
against ``verify_host`` (the CPU's since session 19), checked equal, ``--verify``. Then
two things tried and not used (docs/engine.md, "Session 22"): the inverse CDF in two
levels (sums of blocks of 64 tokens, then bisection inside the block drawn), with the rows
of ``--rows``; and the drafter's matrix products (the demo drafter's shapes: a draft block
of 7 rows per request) in float32 against bfloat16, ``--linear-requests``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from dspark.kernels.prefix_select import select_prefixes, select_prefixes_host
from dspark.kernels.row_argmax import row_argmax
from dspark.models.generation import inverse_cdf


def compare_and_sum(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The inverse CDF as it was: the count of CDF entries <= u * total, by comparison."""
    cdf = probs.float().cumsum(-1)
    drawn = (cdf <= uniforms[:, None] * cdf[:, -1:]).sum(-1)
    return drawn.clamp_max(probs.shape[-1] - 1)


def two_level_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor,
                          block: int = 64) -> torch.Tensor:
    """The inverse CDF by blocks: the block whose running sum first exceeds u * total,
    then the token inside it (another order of summation than ``inverse_cdf``'s, so a
    draw at an interval's very end may differ; never a zero-probability token)."""
    rows = probs.shape[0]
    blocks = probs.float().view(rows, -1, block)  # [R, nb, B]
    sums = blocks.sum(-1)
    ends = sums.cumsum(-1)
    value = (uniforms[:, None] * ends[:, -1:]).contiguous()
    drawn = torch.minimum(torch.searchsorted(ends, value, right=True), _last_positive(sums))
    start = torch.nn.functional.pad(ends, (1, 0)).gather(1, drawn)
    inner = blocks.gather(1, drawn[:, :, None].expand(-1, -1, block))[:, 0]  # [R, B]
    at = torch.searchsorted(inner.cumsum(-1), (value - start).contiguous(), right=True)
    return (drawn * block + torch.minimum(at, _last_positive(inner)))[:, 0]


def _last_positive(x: torch.Tensor) -> torch.Tensor:
    """[R, n] -> [R, 1] the index of each row's last positive entry."""
    ranks = torch.arange(1, x.shape[-1] + 1, device=x.device)
    return ((x > 0) * ranks).argmax(-1, keepdim=True)


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
        "inverse CDF, two levels (not used)": median_ms(
            lambda: two_level_inverse_cdf(probs, uniforms), repeats),
        **time_plain_step(logits, repeats),
    }


def time_plain_step(logits: torch.Tensor, repeats: int) -> dict[str, float]:
    """A step without drafts, a row per unseeded T=1 request: the general path against
    ``_plain_softmax`` (checked equal on fresh streams of the same seeds)."""
    from dspark.models.generation import SamplingParams, softmax_rows
    from dspark.workers.sampling import RequestSampling, _plain_softmax, target_probs, verify

    rows = logits.shape[0]
    empty = logits.new_zeros(0, logits.shape[1])

    def samplers():
        return [RequestSampling.create(SamplingParams(temperature=1.0), r) for r in range(rows)]

    def general(on):
        return verify(on, [0] * rows, target_probs(logits, on, [1] * rows), [[]] * rows, empty)

    def shifted_first():  # NOTE: ``softmax_rows`` at T=1 until session 23
        return torch.softmax(logits.float() - logits.amax(-1, keepdim=True), -1)

    assert general(samplers()).output_ids == _plain_softmax(samplers(), logits).output_ids
    assert torch.equal(shifted_first(), softmax_rows(logits, [1.0] * rows))
    on_general, on_plain = samplers(), samplers()
    return {"plain step, target_probs + verify": median_ms(lambda: general(on_general), repeats),
            "plain step, _plain_softmax": median_ms(
                lambda: _plain_softmax(on_plain, logits), repeats),
            "T=1 softmax, max subtracted first": median_ms(shifted_first, repeats),
            "T=1 softmax_rows": median_ms(lambda: softmax_rows(logits, [1.0] * rows), repeats)}


DRAFT_LINEARS = {"qkv": (192, 384), "gate+up": (192, 1024), "down": (512, 192),
                 "draft vocabulary head": (192, 2048)}
"""The demo drafter's products per layer and its head: (in, out) features."""


def time_linears(num_req: int, gen: torch.Generator, repeats: int) -> dict[str, float]:
    """Each of the drafter's products on a draft block of 7 rows per request, float32
    against bfloat16 weights (the input cast to bfloat16 and the output back to float32,
    as a drafter computing in bfloat16 beside a float32 target would)."""
    out = {}
    for name, (fan_in, fan_out) in DRAFT_LINEARS.items():
        x = torch.randn(num_req * 7, fan_in, generator=gen)
        weight = torch.randn(fan_out, fan_in, generator=gen) / fan_in ** 0.5
        half = weight.bfloat16()
        out[f"{name} float32"] = median_ms(
            lambda x=x, w=weight: torch.nn.functional.linear(x, w), repeats)
        out[f"{name} bfloat16"] = median_ms(
            lambda x=x, w=half: torch.nn.functional.linear(x.bfloat16(), w).float(), repeats)
    return out


def time_selection(num_req: int, gen: torch.Generator, repeats: int) -> dict[str, float]:
    """Algorithm 1 over R requests' 7 drafts on a decode-like SPS(B), both paths."""
    from dspark.workers.budget import StepCostTable

    sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    table = StepCostTable(sizes, tuple(250.0 / (1.0 + b / 24.0) for b in sizes))
    surv = (0.4 + 0.6 * torch.rand(num_req, 7, generator=gen)).cumprod(1)
    size_t, rate_t = torch.tensor(sizes), torch.tensor(table.steps_per_second)
    twin = select_prefixes(surv, size_t, rate_t)
    assert twin.tolist() == select_prefixes_host(surv, table.sps)
    return {
        "Algorithm 1, tensor twin": median_ms(lambda: select_prefixes(surv, size_t, rate_t),
                                              repeats),
        "Algorithm 1, host path": median_ms(lambda: select_prefixes_host(surv, table.sps),
                                            repeats),
    }


def time_verification(num_req: int, drafts: int, vocab: int, gen: torch.Generator,
                      repeats: int) -> dict[str, float]:
    """``verify_tensors`` against ``verify_host``: R unseeded T=1 requests with ℓ drafts
    each over ``vocab`` tokens (checked equal on fresh streams of the same seeds, then
    timed on streams that go on drawing)."""
    from dspark.models.generation import SamplingParams
    from dspark.workers.sampling import RequestSampling, verify_host, verify_tensors

    q = torch.softmax(torch.randn(num_req * drafts, vocab, generator=gen) * 2, -1)
    p = torch.softmax(torch.randn(num_req * (drafts + 1), vocab, generator=gen) * 2, -1)
    ids = torch.multinomial(q, 1, generator=gen)[:, 0].view(num_req, drafts).tolist()

    def samplers():
        return [RequestSampling.create(SamplingParams(temperature=1.0), r)
                for r in range(num_req)]

    host, tensors = verify_host(samplers(), p, ids, q), verify_tensors(
        samplers(), [0] * num_req, p, ids, q)
    assert (host.num_accepted, host.output_ids) == (tensors.num_accepted, tensors.output_ids)
    on_tensors, on_host = samplers(), samplers()
    return {
        "verify, tensor path": median_ms(
            lambda: verify_tensors(on_tensors, [0] * num_req, p, ids, q), repeats),
        "verify, host path": median_ms(lambda: verify_host(on_host, p, ids, q), repeats),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=4096, help="row width (the demo's)")
    parser.add_argument("--rows", default="32,128", help="row counts, comma-separated")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=300, help="timed calls per number")
    parser.add_argument("--budget-requests", default="1,8,64",
                        help="requests per step of the budget's selection, comma-separated")
    parser.add_argument("--verify", default="1x5,4x3,16x2,64x1,64x3",
                        help="verified steps timed, RxL (requests x drafts), comma-separated")
    parser.add_argument("--linear-requests", default="1,8",
                        help="requests per drafting call of the products timed, "
                             "comma-separated ('' to skip)")
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
        drawn = two_level_inverse_cdf(probs, uniforms)
        assert bool((probs.gather(1, drawn[:, None]) > 0).all())
        cells = time_ops(logits, probs, uniforms, args.repeats)
        print(f"{rows} rows: " + ", ".join(f"{k} {v:.3f}" for k, v in cells.items()))
    for num_req in (int(r) for r in args.budget_requests.split(",")):
        cells = time_selection(num_req, gen, args.repeats)
        print(f"budget, {num_req} requests: "
              + ", ".join(f"{k} {v:.3f}" for k, v in cells.items()))
    for shape in filter(None, args.verify.split(",")):
        num_req, drafts = (int(x) for x in shape.split("x"))
        cells = time_verification(num_req, drafts, args.vocab, gen, args.repeats)
        print(f"verification, {num_req} requests x {drafts} drafts: "
              + ", ".join(f"{k} {v:.3f}" for k, v in cells.items()))
    for num_req in (int(r) for r in filter(None, args.linear_requests.split(","))):
        cells = time_linears(num_req, gen, args.repeats)
        print(f"drafter products, {num_req} requests x 7 rows: "
              + ", ".join(f"{k} {v:.3f}" for k, v in cells.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
