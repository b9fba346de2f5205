"""`python -m dspark.bench.query_groups`: verify forwards of the demo target with every
request's queries padded to the step's longest run (one group) and grouped by query length
(``kernels/paged_attention.py``'s ``query_groups``), side by side on this machine
(docs/engine.md, "Session 25").

Each batch names its requests' rows (``31x1+1x8``: 31 requests verify one row, one request
eight: a drafted request among decoding ones; ``+1x64``: a prefill chunk), every request
with ``--context`` tokens of KV before them. The two layouts take turns forward by forward,
``--forwards`` times each; each one's median is printed with the ratio grouped / one group
(below 1: grouping is faster). The outputs are checked equal up to rounding first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dspark.kernels import paged_attention

BATCHES = {"32x1": [1] * 32, "31x1+1x8": [1] * 31 + [8], "28x1+4x(2,4,6,8)": [1] * 28 + [2, 4, 6, 8],
           "24x1+8x4": [1] * 24 + [4] * 8, "8x1": [1] * 8, "7x1+1x8": [1] * 7 + [8],
           "4x(8,3,3,2)": [8, 3, 3, 2], "31x1+1x64": [1] * 31 + [64], "7x1+1x64": [1] * 7 + [64]}


def verify_batch(sizes: list[int], context: int, block_size: int, vocab: int):
    from dspark.workers.model_runner import VerifyBatch

    blocks = -(-(context + max(sizes)) // block_size)
    lens = [context + n for n in sizes]
    gen = torch.Generator().manual_seed(0)
    return VerifyBatch(
        input_ids=torch.randint(5, vocab, (sum(sizes),), generator=gen),
        positions=torch.cat([torch.arange(context, context + n) for n in sizes]),
        cu_q=torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()]),
        block_tables=torch.arange(len(sizes) * blocks).view(len(sizes), blocks),
        seq_lens=torch.tensor(lens), logit_rows=torch.arange(sum(sizes)), q_lens=list(sizes),
        key_lens=lens)


def main(argv: list[str] | None = None) -> int:
    from dspark.bench.machine import describe
    from dspark.models.generation import load_for_generation
    from dspark.workers.engine import Engine, EngineConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forwards", type=int, default=20, help="forwards per batch and layout")
    parser.add_argument("--context", type=int, default=150, help="tokens of KV per request")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"machine: {describe()}")
    target, _ = load_for_generation("checkpoints/target")
    runner = Engine(target, None, EngineConfig(max_num_seqs=64)).runner
    runner.feature_layers = [1, 3, 4]  # NOTE: the serving default's features, as with DSpark
    most = paged_attention.MAX_GROUPS
    batches = {name: verify_batch(sizes, args.context, runner.block_size,
                                  target.config.vocab_size) for name, sizes in BATCHES.items()}

    def run(name: str, groups: int):
        paged_attention.MAX_GROUPS = groups
        return runner.forward(batches[name])

    for name in batches:
        torch.testing.assert_close(run(name, 1).logits, run(name, most).logits,
                                   rtol=1e-4, atol=1e-4)
    times = {(name, g): [] for name in batches for g in (1, most)}
    for _ in range(args.forwards):
        for name in batches:
            for groups in (1, most):
                start = time.perf_counter()
                run(name, groups)
                times[name, groups].append(time.perf_counter() - start)
    paged_attention.MAX_GROUPS = most
    print(f"\nverify forwards, {args.context} tokens of context per request: ms with one "
          f"group, grouped (at most {most} groups)")
    print("| batch | tokens | one group ms | grouped ms | grouped / one | groups |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, sizes in BATCHES.items():
        one, grouped = (1000 * statistics.median(times[name, g]) for g in (1, most))
        print(f"| {name} | {sum(sizes)} | {one:.2f} | {grouped:.2f} | {grouped / one:.2f} | "
              f"{len(paged_attention.query_groups(sizes))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
