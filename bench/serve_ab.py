"""Servers already running, compared side by side in time: at each concurrency, closed-loop
streaming clients take turns on each server (the order rotated every round), and each
server's numbers are paired with the first's of the same round.

    python -m dspark.bench.serve_ab --url base=http://127.0.0.1:8301 \\
        --url grpc=http://127.0.0.1:8302 [--concurrency 4,16] [--rounds 4] [--requests 48]

For what holds cluster-wide, which ``dspark bench serve`` cannot vary inside its one Ray
cluster (Ray's and Ray Serve's environment variables): start each setting as its own
``dspark serve --port P`` (each starts its own local Ray cluster) and name them here. The
prompts are ``dspark bench serve``'s (held-out math, code and chat), 64 tokens each, T=0.
Prints each cell, then the paired ratios of aggregate tokens/s, TTFT p50 and p90.
"""

from __future__ import annotations

import argparse
import asyncio

from dspark.bench.closed_loop import turn_order
from dspark.bench.paired import paired_markdown, paired_ratios
from dspark.bench.serve_bench import closed_loop, serve_prompts

NUMBERS = (("aggregate_tps", "aggregate tok/s"), ("ttft_p50", "TTFT p50"),
           ("ttft_p90", "TTFT p90"))


def parse_urls(items: list[str]) -> dict[str, str]:
    """``name=url`` pairs, in order; at least two, names distinct."""
    urls: dict[str, str] = {}
    for item in items:
        name, sep, url = item.partition("=")
        if not sep or not name or not url.startswith("http") or name in urls:
            raise ValueError(f"--url: NAME=http://HOST:PORT with distinct names, got {item!r}")
        urls[name] = url.rstrip("/")
    if len(urls) < 2:
        raise ValueError("--url: at least two servers to compare")
    return urls


def run(urls: dict[str, str], prompts: list[str], concurrencies: list[int], rounds: int,
        requests: int, model: str, max_tokens: int = 64) -> list[dict]:
    """Every round, at every concurrency, each server in turn: one record per cell."""
    def body(_i: int) -> dict:
        return {"max_tokens": max_tokens, "temperature": 0.0}

    raw = []
    for r in range(rounds):
        for j, c in enumerate(concurrencies):
            for name in turn_order(list(urls), r + j):
                cell = asyncio.run(closed_loop(urls[name], model, prompts, c,
                                               max(requests, 2 * c), body))
                raw.append({"server": name, "concurrency": c, "round": r, **cell})
                print(f"[{r + 1}/{rounds}] {name:10s} C={c:3d} aggregate "
                      f"{cell['aggregate_tps']:7.1f} tok/s  TTFT p50 "
                      f"{1000 * cell['ttft_p50']:5.0f} p90 {1000 * cell['ttft_p90']:5.0f} ms",
                      flush=True)
    return raw


def main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    from dspark.models.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", action="append", default=[], help="NAME=URL, repeated")
    parser.add_argument("--concurrency", default="4,16", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=4, help="rounds (>= 1)")
    parser.add_argument("--requests", type=int, default=48,
                        help="requests finished per cell: max(requests, 2 * C)")
    parser.add_argument("--model", default="dspark-demo", help="the served model's name")
    parser.add_argument("--target", default="checkpoints/target",
                        help="target checkpoint (its tokenizer sizes the prompts)")
    args = parser.parse_args(argv)
    urls = parse_urls(args.url)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if args.rounds < 1 or not concurrencies or min(concurrencies) < 1:
        raise ValueError("--rounds and every --concurrency must be >= 1")
    tok = Tokenizer.from_file(Path(args.target) / "tokenizer.json")
    prompts = serve_prompts(tok, 64, 16)
    raw = run(urls, prompts, concurrencies, args.rounds, args.requests, args.model)
    rows = paired_ratios(raw, "server", next(iter(urls)), NUMBERS)
    print(f"\nPaired against {next(iter(urls))} (median over rounds [min–max]):")
    print("\n".join(paired_markdown(rows, "server", (("concurrency", "C"),), NUMBERS)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
