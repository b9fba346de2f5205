"""Requests that arrive while a step drafts join that step (``Engine.intake``,
``admit_late``): their first token comes one step sooner, every output stays plain
decoding's, and an abort sent meanwhile waits for the step's commit."""

from __future__ import annotations

import asyncio
import random
import threading
import time

from dspark.models.generation import SamplingParams, generate_tokens
from dspark.workers import engine as engine_module
from dspark.workers.async_engine import AsyncEngine
from dspark.workers.budget import StepCostTable
from dspark.workers.engine import Engine, EngineConfig

COST = StepCostTable((1, 8, 64), (100.0, 90.0, 40.0))
STOP = (3,)


def wait_for(condition, timeout_s=30.0):
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.01)


def drafting_engine(target, drafter, **cfg):
    """Every decoding request drafts in every step (no gate), so each step drafts."""
    return Engine(target, drafter, EngineConfig(
        block_size=4, num_blocks=200, max_num_batched_tokens=64, budget="fixed",
        draft_gating=False, **cfg), COST)


def test_requests_that_arrive_while_a_step_drafts_join_that_step(make_model, make_drafter):
    """One newcomer arrives in each drafting step (``intake``): it joins that step's verify
    forward as prefill, so its first token comes out of the step it arrived in; every
    output is plain decoding's and no block is left behind."""
    target = make_model()
    rng = random.Random(3)
    prompts = [[rng.randrange(5, 97) for _ in range(rng.randint(1, 30))] for _ in range(6)]
    params = SamplingParams(max_tokens=12)
    eng = drafting_engine(target, make_drafter(target, "dspark"), max_num_seqs=8)
    free = eng.blocks.num_free_blocks
    ids = [eng.add_request(p, params, STOP) for p in prompts[:2]]
    rest, arrivals = list(prompts[2:]), []

    def intake():
        if rest:
            arrivals.append(eng.add_request(rest.pop(0), params, STOP))

    eng.intake = intake
    outs: dict[str, list[int]] = {}
    joined = 0
    while eng.has_unfinished():
        seen = len(arrivals)
        result = eng.step()
        for out in result.outputs:
            outs.setdefault(out.req_id, []).extend(out.new_token_ids)
        if len(arrivals) > seen:  # the step drafted and a request arrived meanwhile
            assert result.stats.num_drafts > 0
            assert arrivals[-1] in outs, "the newcomer's first token comes from its step"
            joined += 1
    assert joined == len(prompts) - 2
    assert [outs[i] for i in ids + arrivals] == [
        list(generate_tokens(target, p, params, STOP)) for p in prompts]
    assert eng.blocks.num_free_blocks == free
    assert not eng.scheduler.requests and not eng.states


def test_a_request_sent_while_a_step_drafts_joins_it_and_an_abort_waits_for_the_commit(
        make_model, make_drafter, monkeypatch):
    """Through ``AsyncEngine``: a request sent while a step drafts joins that step, and an
    abort of a request of the step, sent meanwhile, waits until the step has committed
    (applied at once, the step would still write into its freed blocks), then leaves no
    state and no block behind."""
    target = make_model()
    eng = drafting_engine(target, make_drafter(target, "dspark"), max_num_seqs=4)
    free = eng.blocks.num_free_blocks
    worker, drafting, joined = eng.draft_worker, threading.Event(), []
    propose, admit_late = worker.propose_step, engine_module.admit_late

    def held_propose(*args):
        if not drafting.is_set():  # the first drafting step waits until the new request
            drafting.set()         # and the abort are both sent
            wait_for(lambda: front._inbox.qsize() >= 2)
        return propose(*args)

    def counted_admit_late(*args):
        joined.append(admit_late(*args))
        return joined[-1]

    worker.propose_step = held_propose
    monkeypatch.setattr(engine_module, "admit_late", counted_admit_late)
    front = AsyncEngine(eng)
    params = SamplingParams(max_tokens=6, ignore_eos=True)

    async def scenario():
        first = front.generate([5, 6, 7], SamplingParams(max_tokens=30, ignore_eos=True))
        await first.__anext__()  # its prefill step is done; its next step drafts
        await asyncio.to_thread(wait_for, drafting.is_set)

        async def collect():
            return [t async for out in front.generate([8, 9, 10, 11], params)
                    for t in out.new_token_ids]

        second = asyncio.create_task(collect())
        await asyncio.to_thread(wait_for, lambda: front._inbox.qsize() >= 1)
        await first.aclose()  # its abort reaches the inbox while the step drafts
        return await asyncio.wait_for(second, 30)

    try:
        tokens = asyncio.run(scenario())
        assert joined[0] is True, "the request sent while the step drafted joined it"
        assert tokens == list(generate_tokens(target, [8, 9, 10, 11], params, ()))
        wait_for(lambda: not eng.scheduler.requests and not eng.states)
        assert eng.blocks.num_free_blocks == free
    finally:
        front.shutdown()
