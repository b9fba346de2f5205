"""Is the light rank's extra work hidden behind the heavy rank's in a lock-step ep_size=2
group on this machine? The per-rank cost model of the cluster budget (``CostModel``)
assumes so: it prices a rank's private part of a step at the larger of the two ranks'
tokens, so a light rank's tokens up to the heavy rank's cost only their share of the
experts.

Two processes (gloo, one torch thread each, the demo target's experts split between them)
run verify forwards in lock-step: rank 0 always ``HEAVY`` tokens (32 requests), rank 1 b
tokens for each b of ``LIGHT`` (8 requests, then more), each pair of sizes timed ``REPEATS``
times in turns, the fastest kept. Prints, per b, rank 0's measured forward and what the
per-rank model predicts from the equal-load profile of the same run.

Run from the repository root: ``python -P docs/results/session34-ep-hidden/hidden.py``."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HEAVY = 128
LIGHT = (8, 16, 32, 64, 128)
REPEATS = 25


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from dspark.models.generation import load_for_generation
    from dspark.workers.expert_parallel import shard_experts
    from dspark.workers.model_runner import ModelRunner, dummy_batch, profile_step_costs

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    target, _ = load_for_generation("checkpoints/target")
    target.eval()
    shard_experts(target, dist.group.WORLD, rank, 2)
    runner = ModelRunner(target, 2048, 16)
    vocab = target.config.vocab_size
    # NOTE: the equal-load profile both ranks run together, as the engine's start-up does
    table = profile_step_costs(runner, sorted({*LIGHT, HEAVY}), 32, 128, 2048)
    mine = [HEAVY] * len(LIGHT) if rank == 0 else list(LIGHT)
    batches = [dummy_batch(n, min(32, n), 128, 16, vocab, torch.device("cpu")) for n in mine]
    best = [float("inf")] * len(batches)
    with torch.no_grad():
        for batch in batches:
            runner.forward(batch)  # warm-up
        for _ in range(REPEATS):
            for i, batch in enumerate(batches):
                dist.barrier()
                start = time.perf_counter()
                runner.forward(batch)
                best[i] = min(best[i], time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps({
            "measured": best, "sizes": list(table.batch_sizes),
            "sps": list(table.steps_per_second), "shared": list(table.shared)}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    from dspark.router.redis_server import free_port
    from dspark.workers.budget import CostModel, GroupLoad, StepCostTable

    with tempfile.TemporaryDirectory() as work:
        out = str(Path(work) / "hidden.json")
        mp.start_processes(_rank, args=(free_port(), out), nprocs=2, start_method="spawn")
        res = json.loads(Path(out).read_text())
    table = StepCostTable(tuple(res["sizes"]), tuple(res["sps"]), tuple(res["shared"]))
    model = CostModel(table, None, torch.device("cpu"))
    print(f"rank 0 with {HEAVY} tokens; the experts' share of a profiled forward "
          f"{model.shared:.2f}; equal-load t({HEAVY}) = {1e3 / table.sps(HEAVY):.1f} ms")
    print("| rank 1 tokens | rank 0 forward ms (fastest of "
          f"{REPEATS}) | × at 8 | per-rank model ms | model × at 8 |")
    print("|---:|---:|---:|---:|---:|")
    base, base_model = res["measured"][0], None
    for b, seconds in zip(LIGHT, res["measured"]):
        model.group = GroupLoad((b,), 0.0)
        predicted = model.verify_seconds(HEAVY)
        base_model = base_model or predicted
        print(f"| {b} | {1e3 * seconds:.1f} | {seconds / base:.2f} | {1e3 * predicted:.1f} | "
              f"{predicted / base_model:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
