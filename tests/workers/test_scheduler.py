"""The scheduler counts tokens, chunks prefills, preempts by recomputation, and never leaks
KV blocks (driven by a simulated runner: these tests need no model)."""

from __future__ import annotations

import random

import pytest

from dspark.workers.block_manager import BlockManager
from dspark.workers.scheduler import (
    Request,
    RequestResult,
    Scheduler,
    SchedulerConfig,
    Status,
)


def make(num_blocks=64, block_size=4, **cfg):
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size))


def step(sched, rng, accept_max=7, stop_id=None):
    """Run one step: prefill chunks that reach the prompt end sample one token; every
    decoding request asks for its full lookahead and commits a random number of accepted
    drafts plus one token."""
    out = sched.schedule()
    decoding = [item.req_id for item in out.scheduled
                if not sched.requests[item.req_id].is_prefill]
    granted = dict(zip(decoding, sched.grant_lookahead(
        out, [(r, sched.cfg.num_lookahead) for r in decoding])))
    results = []
    for item in out.scheduled:
        req = sched.requests[item.req_id]
        if item.req_id not in granted and (
                req.num_computed_tokens + item.num_new_tokens < req.num_tokens):
            results.append(RequestResult(item.req_id, []))
            continue
        accepted = rng.randint(0, min(accept_max, granted.get(item.req_id, 0)))
        results.append(
            RequestResult(item.req_id, [rng.randrange(5, 50) for _ in range(accepted + 1)])
        )
    return out, sched.update(out, results)


def test_prefill_is_chunked_by_the_token_budget():
    sched = make(max_num_batched_tokens=16)
    sched.add(Request("a", list(range(40)), max_tokens=4))
    out = sched.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [16]
    sched.update(out, [RequestResult("a", [])])
    assert sched.requests["a"].num_computed_tokens == 16
    out = sched.schedule()
    assert out.scheduled[0].num_new_tokens == 16 and out.num_scheduled_tokens == 16


def test_decoding_requests_are_granted_lookahead_and_rejected_slots_are_freed():
    sched = make(num_lookahead=7)
    sched.add(Request("a", [1, 2, 3], max_tokens=50))
    out = sched.schedule()
    sched.update(out, [RequestResult("a", [9])])  # prefill done, first token sampled
    out = sched.schedule()
    item = out.scheduled[0]
    assert item.num_new_tokens == 1 and out.num_scheduled_tokens == 1
    assert len(sched.blocks.table("a").block_ids) == 1  # nothing reserved before a grant
    assert sched.grant_lookahead(out, [("a", 7)]) == [7]
    assert len(sched.blocks.table("a").block_ids) == 3  # 3 + 1 + 7 = 11 slots
    sched.update(out, [RequestResult("a", [4, 5])])  # one draft accepted + bonus
    req = sched.requests["a"]
    assert req.num_computed_tokens == 5 and req.output_ids == [9, 4, 5]
    assert len(sched.blocks.table("a").block_ids) == 2  # rejected slots freed


def test_lookahead_takes_what_anchors_and_prefills_leave_and_never_preempts():
    sched = make(num_blocks=6, block_size=4, max_num_batched_tokens=12, num_lookahead=7)
    sched.add(Request("a", [1, 2, 3], max_tokens=20))
    out = sched.schedule()
    sched.update(out, [RequestResult("a", [9])])
    sched.add(Request("b", list(range(10, 20)), max_tokens=4))
    out = sched.schedule()
    # a's anchor and b's whole 10-token prompt first: one token of budget is left
    assert [(i.req_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 10)]
    assert sched.grant_lookahead(out, [("a", 7)]) == [1]
    sched.update(out, [RequestResult("a", [4]), RequestResult("b", [5])])
    # blocks, not budget: a's anchor sits at slot 5 of its 2 blocks, b's at slot 11 of
    # its 3; the one free block lets a take all 7, and b only the last slot of its own
    out = sched.schedule()
    assert sched.blocks.num_free_blocks == 1
    assert sched.grant_lookahead(out, [("a", 7), ("b", 7)]) == [7, 1]
    assert not out.preempted and {r.req_id for r in sched.running} == {"a", "b"}
    assert sched.blocks.num_free_blocks == 0
    sched.update(out, [RequestResult("a", [6]), RequestResult("b", [7])])
    assert sched.blocks.num_free_blocks == 1  # a's unused lookahead block is back


def test_preemption_by_recomputation_and_no_leak():
    rng = random.Random(0)
    sched = make(num_blocks=12, block_size=4, max_num_batched_tokens=64, num_lookahead=7)
    reqs = [Request(f"r{i}", [rng.randrange(5, 50) for _ in range(6)], max_tokens=24)
            for i in range(4)]
    for r in reqs:
        sched.add(r)
    preempted = set()
    for _ in range(200):
        out, _ = step(sched, rng)
        preempted |= set(out.preempted)
        if all(r.status is Status.FINISHED for r in reqs):
            break
    assert preempted, "12 blocks for 4 growing requests must preempt"
    assert all(len(r.output_ids) == 24 for r in reqs)
    assert sched.requests == {}, "finished requests leave the scheduler"
    assert sched.blocks.num_free_blocks == 12


def test_cancel_frees_everything_at_once_and_stops_are_honoured():
    rng = random.Random(1)
    sched = make(num_blocks=32)
    a = Request("a", [1, 2, 3, 4, 5], max_tokens=100)
    sched.add(a)
    b = Request("b", [6, 7], max_tokens=100, stop_ids=(3,))
    sched.add(b)
    step(sched, rng)
    step(sched, rng)
    sched.cancel("a")
    assert a.finish_reason == "cancelled" and "a" not in sched.requests
    assert "a" not in sched.blocks.tables
    out = sched.schedule()
    item = next(s for s in out.scheduled if s.req_id == "b")
    assert item.num_new_tokens == 1
    granted = sched.grant_lookahead(out, [("b", 7)])[0]
    sched.update(out, [RequestResult("b", [8, 3, 9][: granted + 1])])
    if granted >= 1:
        assert b.finish_reason == "stop" and b.output_ids[-1] == 3
    sched.cancel("b")
    assert sched.blocks.num_free_blocks == 32


@pytest.mark.parametrize(
    "prompt, max_tokens, match",
    [([], 4, "empty"), ([1, 2], 0, "max_tokens"), (list(range(600)), 4, "context")],
)
def test_bad_requests_are_refused_and_leave_others_alone(prompt, max_tokens, match):
    sched = make(max_model_len=512)
    sched.add(Request("ok", [1, 2, 3], max_tokens=4))
    with pytest.raises(ValueError, match=match):
        sched.add(Request("bad", prompt, max_tokens=max_tokens))
    assert "bad" not in sched.requests
    assert [s.req_id for s in sched.schedule().scheduled] == ["ok"]


def test_random_mix_returns_every_block():
    rng = random.Random(2)
    sched = make(num_blocks=40, block_size=4, max_num_batched_tokens=48, max_num_seqs=6)
    n = 0
    for _ in range(300):
        if rng.random() < 0.3:
            sched.add(
                Request(
                    f"q{n}",
                    [rng.randrange(5, 50) for _ in range(rng.randint(1, 30))],
                    max_tokens=rng.randint(1, 30),
                    stop_ids=(7,),
                )
            )
            n += 1
        if rng.random() < 0.05 and sched.running:
            sched.cancel(rng.choice(sched.running).req_id)
        step(sched, rng)
    for req_id in list(sched.requests):
        sched.cancel(req_id)
    assert sched.blocks.num_free_blocks == 40
    assert all(b.ref_count == 0 for b in sched.blocks.blocks)


def test_a_late_admission_takes_what_the_step_and_its_lookahead_left():
    """``admit`` on a scheduled step (requests that arrived while it drafted) gives a
    newcomer the token budget left after the step's own tokens and the lookahead granted
    since (``reserved``), chunking its prompt; with no budget left it stays waiting."""
    sched = make(max_num_batched_tokens=16)
    sched.add(Request("a", [5, 6, 7], max_tokens=20))
    step(sched, random.Random(0))  # "a" prefills and starts decoding
    out = sched.schedule()  # its anchor: 1 token
    granted = sched.grant_lookahead(out, [("a", 7)])
    assert granted == [7]
    sched.add(Request("b", list(range(5, 30)), max_tokens=4))
    late = sched.admit(out, reserved=7)
    assert [(i.req_id, i.num_new_tokens) for i in late] == [("b", 8)]  # 16 - 1 - 7
    assert out.admitted == ["b"] and out.num_scheduled_tokens == 9
    sched.add(Request("c", [5, 6], max_tokens=4))
    assert sched.admit(out, reserved=7) == [] and [r.req_id for r in sched.waiting] == ["c"]
