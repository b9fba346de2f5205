"""`python -m dspark.bench.moe_paths`: one MoE layer of the demo target on N tokens, its
routed experts run the sparse way (each active expert on its rows) and the dense way
(every expert on every row, ``dspark.models.dense_experts``), called in turn on this
machine. Each pair of outputs is checked close before it is timed. Prints the median µs
per call of each and their ratio, per N."""

from __future__ import annotations

import argparse

import torch

from dspark.bench.host_ops import median_ms


def main(argv: list[str] | None = None) -> int:
    from dspark.models.dense_experts import dense_experts
    from dspark.models.generation import load_for_generation

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="checkpoints/target", help="checkpoint directory")
    parser.add_argument("--tokens", default="1,2,4,8,16,32,48,64,128", help="N, comma-separated")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=300, help="timed calls per number")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    target, _ = load_for_generation(args.target)
    block = target.model.layers[0].mlp
    gen = torch.Generator().manual_seed(0)
    print(f"one MoE layer ({block.num_experts} experts, top {block.top_k}), median µs per call,"
          f" {args.threads} threads")
    print("N  sparse  dense  dense/sparse")
    with torch.no_grad():
        for n in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(n, target.config.hidden_size, generator=gen)
            routing = block.route(x)
            torch.testing.assert_close(dense_experts(block, x, routing),
                                       block.sparse_experts(x, routing), atol=1e-5, rtol=1e-4)
            sparse, dense = 0.0, 0.0
            for _ in range(3):  # NOTE: in turn, so a slow stretch falls on both
                sparse += 1000 * median_ms(lambda x=x, r=routing: block.sparse_experts(x, r),
                                           args.repeats // 3)
                dense += 1000 * median_ms(lambda x=x, r=routing: dense_experts(block, x, r),
                                          args.repeats // 3)
            print(f"{n:<3}{sparse / 3:7.0f}{dense / 3:7.0f}{dense / sparse:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
