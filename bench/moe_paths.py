"""`python -m dspark.bench.moe_paths`: one MoE layer of the demo target on N tokens, its
routed experts run the sparse way (each active expert on its rows), the dense way (every
expert on every row, ``dspark.models.dense_experts``) and the grouped way (two grouped
products over the expert-sorted rows, ``dspark.models.grouped_experts``), called in turn on
this machine. Each output is checked close to the sparse one before it is timed. Prints the
median µs per call of each and their ratios to sparse, per N."""

from __future__ import annotations

import argparse

import torch

from dspark.bench.host_ops import median_ms


def main(argv: list[str] | None = None) -> int:
    from dspark.models.dense_experts import dense_experts
    from dspark.models.generation import load_for_generation
    from dspark.models.grouped_experts import grouped_experts

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
    print("N    sparse   dense grouped  dense/sparse  grouped/sparse")
    paths = {"sparse": lambda x, r: block.sparse_experts(x, r),
             "dense": lambda x, r: dense_experts(block, x, r),
             "grouped": lambda x, r: grouped_experts(block, x, r)}
    with torch.no_grad():
        for n in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(n, target.config.hidden_size, generator=gen)
            routing = block.route(x)
            for fn in paths.values():
                torch.testing.assert_close(fn(x, routing), paths["sparse"](x, routing),
                                           atol=1e-5, rtol=1e-4)
            us = dict.fromkeys(paths, 0.0)
            for _ in range(3):  # NOTE: in turn, so a slow stretch falls on all
                for name, fn in paths.items():
                    us[name] += 1000 * median_ms(lambda x=x, r=routing, fn=fn: fn(x, r),
                                                 args.repeats // 3) / 3
            print(f"{n:<3}{us['sparse']:8.0f}{us['dense']:8.0f}{us['grouped']:8.0f}"
                  f"{us['dense'] / us['sparse']:14.2f}{us['grouped'] / us['sparse']:16.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
