"""Profiles of what drafting costs, taken at engine start-up before any request holds
KV: drafting calls per second against the requests drafted for, and seconds per deferred
drafter row written (``DraftWorker``'s lazy rows, which a proposal writes first)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from dspark.workers.budget import StepCostTable
from dspark.workers.drafting import DraftWorker, ExtendBatch


def profile_draft_costs(
    worker: DraftWorker,
    num_requests: Sequence[int],
    context: int,
    num_tokens: int,
    num_blocks: int,
    repeats: int = 3,
) -> StepCostTable:
    """Drafting calls per second against the number of requests drafted for (median of
    ``repeats``). Like the verify profile, it must run before any request holds KV."""
    device = worker.drafter.lm_head.weight.device
    vocab = worker.config.vocab_size
    sizes, rates = [], []
    per_req = -(-(context + 1) // worker.block_size)
    for num in sorted(set(num_requests)):
        if num * per_req > num_blocks:
            break
        req_ids = [f"profile-{i}" for i in range(num)]
        for r in req_ids:
            worker.last_h[r] = torch.zeros(worker.config.hidden_size, device=device)
        tables = torch.arange(num * per_req, device=device).view(num, per_req)
        args = (
            req_ids,
            torch.randint(5, vocab, (num,), device=device),
            torch.full((num,), context, device=device),
            tables,
            num_tokens,
            torch.zeros(num, device=device),
            torch.zeros(num, worker.config.block_size, device=device),
        )
        seconds = median_seconds(lambda args=args: propose(worker, context, args), repeats,
                                 device)
        for r in req_ids:
            worker.forget(r)
        sizes.append(num)
        rates.append(1.0 / seconds)
    return StepCostTable(tuple(sizes), tuple(rates))


def propose(worker: DraftWorker, longest: int, args: tuple):
    """One drafting call as the engine makes it: padded to its bucket where the worker's
    calls are (``DraftWorker.enable_graphs``), so the table prices what runs."""
    if worker.graphs is not None:
        padded = worker.graphs.propose(longest, *args[1:], None)
        if padded is not None:
            return padded
    return worker.propose(*args)


def profile_write_cost(worker: DraftWorker, rows: int, num_blocks: int, repeats: int = 3
                       ) -> float | None:
    """Seconds per deferred row written into the drafter cache, timed on one batch of
    ``rows`` rows of one request (median of ``repeats``); None for a drafter that writes
    its rows at once (nothing is deferred) or a cache too small. Like the other profiles,
    it must run before any request holds KV."""
    blocks = -(-rows // worker.block_size)
    if not worker.lazy or blocks > num_blocks:
        return None
    device = worker.drafter.lm_head.weight.device
    batch = ExtendBatch(
        req_ids=["profile-write"],
        features=torch.zeros(rows, worker.config.feature_dim, device=device),
        next_ids=torch.zeros(rows, dtype=torch.long, device=device),
        positions=torch.arange(rows, device=device),
        cu=torch.tensor([0, rows], device=device),
        block_tables=torch.arange(blocks, device=device)[None],
        q_lens=[rows],
    )
    seconds = median_seconds(lambda: worker.extend(batch), repeats, device)
    worker.forget("profile-write")
    return seconds / rows


def median_seconds(call, repeats: int, device) -> float:
    """Median wall time of ``call()`` over ``repeats`` calls after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def profile_drafting(worker: DraftWorker, cfg, gamma: int, table: StepCostTable | None = None
                     ) -> tuple[StepCostTable, float]:
    """The drafting cost table (profiled unless given) and the seconds per deferred row
    written (0 when nothing is deferred); ``cfg``: the engine's ``EngineConfig``."""
    if table is None:
        table = profile_draft_costs(worker, cfg.draft_profile_sizes(), cfg.profile_context,
                                    gamma, cfg.num_blocks)
    return table, profile_write_cost(worker, cfg.profile_context, cfg.num_blocks) or 0.0
