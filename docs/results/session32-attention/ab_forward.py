"""In one process, alternating: the target's verify forward and a 2-layer DSpark drafting
call with ``kernels/attention.py``'s matrix path (as committed) and with the flash kernel
everywhere (``MIN_ROWS`` above every batch), the median of 25 calls each.

Run from the repository root: ``python -P docs/results/session32-attention/ab_forward.py``
(``--min-rows N``: the matrix path from N query rows instead of the committed threshold)
"""

from __future__ import annotations

import sys
import time

import torch

import dspark.kernels.attention as attention
from dspark.models.drafter_checkpoint import load_drafter
from dspark.models.generation import load_for_generation
from dspark.workers.draft_profile import propose
from dspark.workers.engine import Engine
from dspark.workers.engine_config import EngineConfig
from dspark.workers.model_runner import dummy_batch

REPEATS = 25
MATRIX, FLASH = attention.MIN_ROWS, 10**9


def alternate(call) -> tuple[float, float]:
    """Median ms of ``call`` with the flash kernel and with the matrix path."""
    times: dict[int, list[float]] = {FLASH: [], MATRIX: []}
    with torch.inference_mode():
        for _ in range(REPEATS):
            for rows in (FLASH, MATRIX):
                attention.MIN_ROWS = rows
                start = time.perf_counter()
                call()
                times[rows].append(time.perf_counter() - start)
    attention.MIN_ROWS = MATRIX
    return tuple(sorted(t)[len(t) // 2] * 1e3 for t in (times[FLASH], times[MATRIX]))


def main() -> None:
    global MATRIX
    if "--min-rows" in sys.argv:
        MATRIX = int(sys.argv[sys.argv.index("--min-rows") + 1])
    torch.set_num_threads(2)
    target, _ = load_for_generation("checkpoints/target")
    target.eval()
    drafter = load_drafter("checkpoints/drafters/dspark-d2", target)
    engine = Engine(target, drafter, EngineConfig(max_num_seqs=64, budget="algorithm1"))
    runner, vocab, context = engine.runner, target.config.vocab_size, 200
    print("verify forward (requests x tokens each, 200 tokens of context)")
    for num_req, each in [(1, 6), (4, 4), (8, 4), (16, 1), (16, 3), (32, 1), (32, 3),
                          (64, 1), (64, 2)]:
        batch = dummy_batch(num_req * each, num_req, context, runner.block_size, vocab,
                            runner.device)
        flash, matrix = alternate(lambda batch=batch: runner.forward(batch))
        print(f"  {num_req:3d} x {each}: flash {flash:6.2f} ms  matrix path {matrix:6.2f} ms"
              f"  ratio {matrix / flash:.3f}")
    worker = engine.lanes[0].worker
    block = worker.config.block_size
    per_req = -(-(context + 1) // worker.block_size)
    print(f"drafting call (requests x {block} slots, 200 tokens of context)")
    for num_req in (1, 4, 8, 16, 32, 64):
        ids = [f"ab-{i}" for i in range(num_req)]
        for r in ids:
            worker.last_h[r] = torch.zeros(worker.config.hidden_size)
        args = (ids, torch.randint(5, worker.config.vocab_size, (num_req,)),
                torch.full((num_req,), context),
                torch.arange(num_req * per_req).view(num_req, per_req), block,
                torch.zeros(num_req), torch.zeros(num_req, block))
        flash, matrix = alternate(lambda args=args: propose(worker, context, args))
        print(f"  {num_req:3d}: flash {flash:6.2f} ms  matrix path {matrix:6.2f} ms"
              f"  ratio {matrix / flash:.3f}")
        for r in ids:
            worker.forget(r)


if __name__ == "__main__":
    main()
