"""The asyncio front leaves no request state behind once an output is delivered: after a
finish, after the caller stops listening (abort), and after a refused request."""

from __future__ import annotations

import asyncio
import time

import pytest

from dspark.models.generation import SamplingParams
from dspark.workers.async_engine import AsyncEngine
from dspark.workers.budget import StepCostTable
from dspark.workers.engine import Engine, EngineConfig

COST = StepCostTable((1, 8, 64), (100.0, 90.0, 40.0))


def wait_for(condition, timeout_s=30.0):
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.01)


def test_finished_aborted_and_refused_requests_leave_no_state(make_model, make_drafter):
    target = make_model()
    eng = Engine(target, make_drafter(target, "dspark"),
                 EngineConfig(block_size=4, num_blocks=8, max_num_seqs=4), COST)
    front = AsyncEngine(eng)
    free = eng.blocks.num_free_blocks

    async def scenario():
        tokens = []
        async for out in front.generate([5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True)):
            tokens += out.new_token_ids
        assert len(tokens) == 6
        stream = front.generate([8, 9, 10], SamplingParams(max_tokens=15, ignore_eos=True))
        await stream.__anext__()
        await stream.aclose()  # the caller stops listening: aborted
        with pytest.raises(ValueError, match="KV blocks"):
            async for _ in front.generate([5] * 10, SamplingParams(max_tokens=400)):
                pass

    try:
        asyncio.run(scenario())
        wait_for(lambda: not eng.scheduler.requests and not eng.states)
        assert eng.blocks.num_free_blocks == free and eng.draft_worker.last_h == {}
    finally:
        front.shutdown()
