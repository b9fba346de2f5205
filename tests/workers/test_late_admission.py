"""Requests that arrive while a step drafts join that step (``Engine.intake``,
``admit_late``): their first token comes one step sooner and every output stays plain
decoding's (through ``AsyncEngine``, with an abort sent meanwhile:
tests/workers/test_async_engine.py)."""

from __future__ import annotations

import random

from dspark.models.generation import SamplingParams, generate_tokens
from dspark.workers.budget import StepCostTable
from dspark.workers.engine import Engine, EngineConfig

COST = StepCostTable((1, 8, 64), (100.0, 90.0, 40.0))
STOP = (3,)


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

